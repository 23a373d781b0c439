#!/usr/bin/env bash
# One node: the deepspeed launcher (or torchrun) starts NPROC ranks of `ds_rlhf COMMAND`.
#
#   launch/single_node.sh COMMAND CONFIG [--section.key VALUE ...]
#   launch/single_node.sh ppo run.yaml --ppo.steps 100          # all GPUs of this machine
#   GPU=0 NPROC=2 launch/single_node.sh ppo run.yaml            # 2 CPU ranks (gloo)
#
# COMMAND is sft, rm, ppo or dpo; CONFIG and the dotted overrides are those of `ds-rlhf`. Paths are
# relative to the directory you run this from. Running the same command again resumes from
# OUTPUT_DIR/checkpoints/latest; SIGTERM/SIGUSR1 to the workers, or to this script (it becomes
# the launcher command, whose end the workers notice), save at the next step and exit 0.
#
# Variables:
#   NPROC        ranks on this node (default: every GPU nvidia-smi lists; 2 on CPU)
#   GPU          1: GPUs (NCCL); 0: CPU ranks, DS_ACCELERATOR=cpu and gloo
#                (default: 1 when nvidia-smi sees a GPU, else 0)
#   MASTER_PORT  rendezvous port on 127.0.0.1 (default 29500; give two runs at once two ports)
#   LAUNCHER     deepspeed (default) or torchrun
#   PYTHON       the interpreter that has ds_rlhf's dependencies (default python3: the one of
#                an activated virtual environment)
#   OMP_NUM_THREADS  threads per rank on CPU (default 1)
set -euo pipefail
if [ "$#" -lt 2 ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
CMD=$1 CONFIG=$2
shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/launch/env.sh"  # PYTHONPATH, PYTHON, GPU and the CPU settings
if [ "$GPU" = 0 ]; then NPROC=${NPROC:-2}; else NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}; fi
MASTER_PORT=${MASTER_PORT:-29500}

case "${LAUNCHER:-deepspeed}" in
  deepspeed)
    # `python -m deepspeed.launcher.runner` is the `deepspeed` command, run by PYTHON so that
    # the launcher and its workers use the same interpreter.
    exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$MASTER_PORT" \
      --module ds_rlhf "$CMD" --config "$CONFIG" "$@" ;;
  torchrun)
    exec "$PYTHON" -m torch.distributed.run --nnodes 1 --node_rank 0 --nproc_per_node "$NPROC" \
      --master_addr 127.0.0.1 --master_port "$MASTER_PORT" -m ds_rlhf "$CMD" --config "$CONFIG" "$@" ;;
  *) echo "single_node.sh: LAUNCHER must be deepspeed or torchrun, not '$LAUNCHER'" >&2; exit 2 ;;
esac
