#!/usr/bin/env bash
# The test suite on a GPU machine, where `device auto` sends the runs to CUDA (CI's CPU cannot take them).
#   [WORKERS=N] bash scripts/gpu_tests.sh [SECONDS] [pytest args...]   # default: all of tests/ within 540 s
# One line per test as it ends, so a run cut off by the time limit (SIGINT: pytest still prints its summary)
# says what passed; then the failures' short tracebacks. BENCHMARKS.md section 27.
set -uo pipefail
cd "$(dirname "$0")/.."
limit=${1:-540}
shift || true
export HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ $# -gt 0 ] || set -- tests
# -o addopts="": one process by default (the device image has no pytest-xdist); WORKERS=N runs N pytest-xdist
# workers, which share the GPU
workers=()
[ "${WORKERS:-1}" -gt 1 ] && workers=(-n "$WORKERS" --dist worksteal)
timeout -s INT "$limit" python -m pytest -o addopts="" "${workers[@]}" -vv -p no:warnings -p no:logging -p no:cacheprovider \
  --tb=short -rfE "$@"
