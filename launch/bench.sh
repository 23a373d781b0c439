#!/usr/bin/env bash
# Benchmarks; prints one JSON line. Usage: launch/bench.sh {ppo,generation} [flags]
# (ds-rlhf bench --help lists the flags)
#   NPROC   ranks (default 2)
#   GPU     1 to run on GPUs; default: 1 when nvidia-smi sees one, else CPU ranks
#   PYTHON  the interpreter that has ds_rlhf's dependencies (default python3)
#   MASTER_PORT  the launcher's rendezvous port (default 29500)
# Example (the issue's CPU setting): launch/bench.sh generation --layers 4 --hidden 256
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/launch/env.sh"  # PYTHONPATH, PYTHON, GPU and the CPU settings
NPROC=${NPROC:-2}
exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module ds_rlhf bench "$@"
