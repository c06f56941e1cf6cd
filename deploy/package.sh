#!/usr/bin/env bash
# Package the MONAI Deploy application as a MAP (a container image) with `monai-deploy package`.
#
#   bash deploy/package.sh                 # stage build/deploy-app, then package it (needs Docker with buildx)
#   bash deploy/package.sh --stage-only    # stage only: a self-contained application folder to inspect or run
#
# Staging puts what the application imports into one folder, because the packager copies only the application
# folder into the image: deploy/'s application, operators and requirements, and the bundle's preprocessing and
# inference package (bundle/scripts: data/ and inference/, no training code) as bundle/scripts/, where app.py looks
# first. The copy is a build output (build/ is not in git); the code lives once, in bundle/scripts.
#
# Packaging needs Docker with buildx, network access (the base image and the SDK wheels are downloaded), the
# application's environment (deploy/setup_venv.sh, which provides `monai-deploy` from holoscan-cli 4.2.0) and the
# exported model (docs/inference.md). Variables: MODEL, TAG, PLATFORM, STAGE.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-bundle/models/model.ts}
TAG=${TAG:-brain-tumour-multitask:0.5.0}
PLATFORM=${PLATFORM:-x86_64}
STAGE=${STAGE:-build/deploy-app}

rm -rf "$STAGE"
mkdir -p "$STAGE/bundle/scripts"
cp deploy/app.py deploy/__main__.py deploy/requirements.txt "$STAGE/"
cp -r deploy/operators "$STAGE/"
# The inference subset of the bundle package: the package itself, its user-error reporting and yes/no settings,
# data and inference.
cp bundle/scripts/__init__.py bundle/scripts/errors.py bundle/scripts/flags.py "$STAGE/bundle/scripts/"
cp -r bundle/scripts/data bundle/scripts/inference "$STAGE/bundle/scripts/"
cp bundle/LICENSE "$STAGE/LICENSE"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
echo "[package] staged the application in $STAGE"
if [ "${1:-}" = "--stage-only" ]; then
    exit 0
fi

if [ ! -f "$MODEL" ]; then
    echo "[package] $MODEL does not exist: export the model first (docs/inference.md)" >&2
    exit 1
fi
if ! command -v docker >/dev/null 2>&1 || ! docker buildx version >/dev/null 2>&1; then
    echo "[package] monai-deploy package needs Docker with the buildx plugin (and network access)" >&2
    exit 1
fi
bash deploy/setup_venv.sh
.venv-deploy/bin/monai-deploy package "$STAGE" --config deploy/app.yaml --models "$MODEL" \
    --platform "$PLATFORM" --tag "$TAG" -l INFO
