#!/usr/bin/env bash
# Benchmarks; prints one JSON line. Usage: launch/bench.sh {ppo,generation} [flags]
# (ds-rlhf bench --help lists the flags)
#   NPROC   ranks (default 2)
#   GPU     1 to run on GPUs; default: 1 when nvidia-smi sees one, else CPU ranks
# Example (the issue's CPU setting): launch/bench.sh generation --layers 4 --hidden 256
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
if [ -z "${GPU:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; else GPU=0; fi
fi
if [ "$GPU" = 0 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec deepspeed --num_gpus "$NPROC" --module ds_rlhf bench "$@"
