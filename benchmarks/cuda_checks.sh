#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (a lent GPU machine has little time and no network):
# the conformance table on cuda, every test parametrized on cuda, the whole suite with CUDA present,
# and the collector benchmark's CUDA part. Writes logs under $OUT (or ./out) and prints a summary.
#   bash benchmarks/cuda_checks.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
# register the pytest plugin's entry point without touching the network or the image's torch
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "editable install failed; using PYTHONPATH"; tail -3 "$OUT/install.log"; export PYTHONPATH=$PWD; PLUGIN="-p streamkit.pytest_plugin"; }
PLUGIN=${PLUGIN:-}
echo "== conformance --backend cuda"
timeout 120 $PY -m streamkit conformance --backend cuda 2>&1 | tee "$OUT/conformance.txt" | tail -40
echo "rc=${PIPESTATUS[0]}"
echo "== pytest -k cuda"
timeout 150 $PY -m pytest $PLUGIN -q -p no:cacheprovider -n 8 -k "cuda" -rs tests 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -30
echo "== Triton record kernel against the aten composition"
timeout 120 $PY -m pytest $PLUGIN -q -p no:cacheprovider tests/eplb/test_eplb_triton.py 2>&1 | tail -5
echo "== collector benchmark (cuda part)"
timeout 120 $PY benchmarks/collector.py --calls 10 --ranks 1 2>&1 | tee "$OUT/collector.txt" | tail -25
if [ "${FULL:-1}" = 1 ]; then
  echo "== whole suite"
  timeout 180 $PY -m pytest $PLUGIN -q -p no:cacheprovider -n 12 tests 2>&1 | tee "$OUT/pytest_all.txt" | tail -25
fi
