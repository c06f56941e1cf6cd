#!/usr/bin/env bash
# Set up the environment and run the checks CI runs: lint, format and the test suite.
# The tracking tests also start a PostgreSQL server and render MLflow's UI in headless Chromium: where they are
# missing and this runs as root with apt-get (CI, a fresh container), Debian's packages are installed first;
# elsewhere those two tests are skipped and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
missing=()
command -v chromium >/dev/null || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages for the tracking tests: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "[setup] could not install ${missing[*]}: the tests that need them will be skipped"
fi
export MLFLOW_DISABLE_TELEMETRY=true
# OpenMP threads sleep instead of spinning while they wait: on a shared CPU spinning cost 2.8-6.4x (docs/performance.md).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers (pytest-xdist), as many as CI's cores: most of a test's time is a subprocess starting (importing MONAI
# takes about 5 s of one core) or small single-threaded work, so two at once nearly halve the wall time. The workers
# share the generated data and the tiny trained pipeline (made once: conftest.made_once). PYTEST_WORKERS=0: one
# process.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
