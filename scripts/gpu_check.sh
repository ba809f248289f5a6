#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): on a lent device `bash scripts/gpu_check.sh`, anywhere
# `bash scripts/gpu_check.sh --dry-run` (CPU, small; CI runs it). On the device, Python packages
# it lacks (laplace-torch, curvlinops, netcal, ...) travel as wheels in .whl/ (device README) and
# are installed here first; the project itself goes on PYTHONPATH (no pip install needed there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec $PY scripts/gpu_check.py "$@"
