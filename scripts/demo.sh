#!/usr/bin/env bash
# The main job on generated data, from a fresh clone: set up .venv, generate BraTS- and Kaggle-layout data,
# prepare it, train the three stages and both single-task baselines, choose each segmentation model's post-processing
# on the validation split, and evaluate all three models on the test split. Rerunning skips what is already done
# (generation, preparation, finished stages).
# FOLDS=5 bash scripts/demo.sh cross-validates instead: the three models on each of 5 folds of the training and
# validation patients (scripts/seed_study.py --folds, into study/cv/), each scored on its fold's validation, then the
# mean and 95% CI over the folds and the paired multi-task vs baseline differences (scripts/compare_runs.py --folds).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup_env.sh
PY=.venv/bin/python
export MLFLOW_DISABLE_TELEMETRY=true
# OpenMP threads sleep instead of spinning while they wait: on a shared CPU spinning cost 2.8-6.4x (docs/performance.md).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

DATA=${DATA:-data}
SYNTHETIC=$DATA/synthetic
PREPARED=$DATA/prepared
PRESET=${PRESET:-configs/demo.yaml}
SIZE=${SIZE:-64}
TRAIN=bundle/configs/train.yaml
EVALUATE=bundle/configs/evaluate.yaml

step() { printf '\n==== %s ====\n' "$*"; }
bundle() { "$PY" -m monai.bundle run --config_file "$1" --bundle_root bundle --dataset_dir "$PREPARED" "${@:2}"; }
# The size below which a model's tumour components are removed, chosen on validation and stored with the model.
choose_postprocessing() { bundle "$1" --eval_split validation --choose_postprocessing true; }
train() { "$PY" scripts/train.py --config_file "$1" --bundle_root bundle --dataset_dir "$PREPARED"; }

start=$(date +%s)
if [ ! -f "$SYNTHETIC/manifest.json" ]; then
    step "generating synthetic data in $SYNTHETIC"
    "$PY" scripts/make_synthetic_data.py --out "$SYNTHETIC" --seed 0 --brats-cases 16 --kaggle-per-class 1000
fi
step "preparing slices in $PREPARED"
# A quarter of the patients for testing: the per-patient Dice of a handful of test patients is a noisy mean.
"$PY" scripts/prepare_data.py --brats "$SYNTHETIC/brats" --kaggle "$SYNTHETIC/kaggle" --out "$PREPARED" --size "$SIZE" \
    --split 0.6 0.15 0.25

if [ -n "${FOLDS:-}" ]; then
    CV_OUT=${CV_OUT:-study/cv}
    step "cross-validation: $FOLDS folds, the three models each (log per fold under $CV_OUT/seed_0/fold_*/logs/)"
    "$PY" scripts/seed_study.py --dataset_dir "$PREPARED" --folds "$FOLDS" --preset "$PRESET" --out "$CV_OUT"
    step "comparison over the folds (from the MLflow runs)"
    "$PY" scripts/compare_runs.py --tracking-uri "sqlite:///$CV_OUT/mlruns/mlflow.db" --experiment cross_validation \
        --split validation --folds --out-dir "$CV_OUT"
    echo
    echo "Done in $(( $(date +%s) - start )) s. Cross-validation: $CV_OUT/study.json and $CV_OUT/comparison.{json,png}"
    exit 0
fi

# The two baselines train beside the multi-task pipeline: at the demo's size two one-thread processes on 2 cores do
# 1.9x the work of one process with both threads (docs/performance.md). Each process gets half the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( ($(nproc) + 1) / 2 ))}"
LOGS=bundle/logs
mkdir -p "$LOGS"
set -m  # the background job gets its own process group, so that it can be stopped with its stage processes
baselines() {
    for baseline in baseline_seg baseline_cls; do
        echo "==== training the $baseline baseline ===="
        train "['$TRAIN','$PRESET','configs/$baseline.yaml']"
    done
}
step "training the seg-only and cls-only baselines in the background (log: $LOGS/baselines.log)"
baselines > "$LOGS/baselines.log" 2>&1 &
baselines_pid=$!
trap 'kill -- -$baselines_pid 2>/dev/null || true' EXIT

step "training the multi-task model: stages 1, 2, 3"
train "['$TRAIN','$PRESET']"
step "choosing the multi-task model's post-processing on the validation split"
choose_postprocessing "['$TRAIN','$EVALUATE','$PRESET']"
step "exporting the multi-task model to TorchScript (bundle/models/model.ts)"
# MONAI's exporter does not put the bundle root on sys.path as `run` does. No preset: training wrote the network it
# published into bundle/configs/metadata.json, and the choice above its post-processing, which inference.yaml reads.
PYTHONPATH=bundle "$PY" -m monai.bundle ckpt_export network_def --filepath bundle/models/model.ts \
    --ckpt_file bundle/models/model.pt --meta_file bundle/configs/metadata.json \
    --config_file bundle/configs/inference.yaml --bundle_root bundle
step "evaluating the multi-task model"
bundle "['$TRAIN','$EVALUATE','$PRESET']"

step "waiting for the baselines (log: $LOGS/baselines.log)"
if ! wait "$baselines_pid"; then
    tail -n 30 "$LOGS/baselines.log" >&2
    echo "Training a baseline failed: see $LOGS/baselines.log" >&2
    exit 1
fi
trap - EXIT
grep -E "^stage [0-9]+: [0-9]+ s" "$LOGS/baselines.log" | sed 's/^/  baseline /' || true
step "choosing the baseline_seg baseline's post-processing on the validation split"
choose_postprocessing "['$TRAIN','$EVALUATE','$PRESET','configs/baseline_seg.yaml']"
for baseline in baseline_seg baseline_cls; do
    step "evaluating the $baseline baseline"
    bundle "['$TRAIN','$EVALUATE','$PRESET','configs/$baseline.yaml']"
done

step "comparison (from the MLflow runs)"
"$PY" scripts/compare_runs.py
echo
echo "Done in $(( $(date +%s) - start )) s."
echo "  models:      bundle/models/model.pt and model.ts (multi-task), bundle/models/baseline_{seg,cls}/model.pt"
echo "  evaluation:  bundle/eval/report.md and bundle/eval/metrics.json (baselines in bundle/eval/baseline_*/)"
echo "  comparison:  bundle/eval/comparison.json and comparison.png"
echo "  MLflow runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///bundle/mlruns/mlflow.db  (http://127.0.0.1:5000)"
