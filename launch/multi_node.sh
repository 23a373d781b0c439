#!/usr/bin/env bash
# Several nodes, with the deepspeed launcher. Two ways:
#
# (a) No ssh: run this on every node, each with its NODE_RANK (by hand, from a scheduler, or
#     see launch/slurm.sbatch MODE=per-node). Each node's launcher starts NPROC local ranks.
#       node0$ NODE_RANK=0 NNODES=2 NPROC=8 MASTER_ADDR=node0 launch/multi_node.sh ppo run.yaml
#       node1$ NODE_RANK=1 NNODES=2 NPROC=8 MASTER_ADDR=node0 launch/multi_node.sh ppo run.yaml
# (b) ssh: run this once, on the first node; deepspeed starts the other nodes through pdsh and
#     passwordless ssh (the same repository path and PYTHON on every node):
#       HOSTFILE=hostfile launch/multi_node.sh ppo run.yaml     # lines like "node0 slots=8"
#
# Arguments: COMMAND CONFIG [--section.key VALUE ...], as for launch/single_node.sh. Every node
# must see the same CONFIG and output_dir (a shared file system, an absolute path); rank 0
# writes the logs and every rank writes its checkpoint shards. A run checks this at the start
# and stops in one line when a node does not see rank 0's probe file. Variables the config
# names (rewards[i].token_env) must be set on every node: in (b), list them in .deepspeed_env.
# Running the same commands again resumes.
#
# Variables:
#   NODE_RANK    this node's index, 0..NNODES-1; setting it selects (a), `--no_ssh --node_rank`
#   NNODES       number of nodes (required in (a) unless HOSTFILE lists them; optional in (b):
#                the first NNODES hosts of HOSTFILE)
#   NPROC        ranks per node (default in (a): every GPU nvidia-smi lists, 1 on CPU; default
#                in (b): the slots of HOSTFILE)
#   HOSTFILE     deepspeed hostfile, "HOST slots=N" per line (required in (b)). In (a) it only
#                fixes how many ranks each node has: the names are never resolved or contacted
#                (every launcher uses node_list[NODE_RANK] as "itself" and MASTER_ADDR to meet),
#                so without one this script writes "node0 slots=NPROC" ... "node<NNODES-1> ..."
#   MASTER_ADDR  address of node 0, reachable from every node (required in (a); in (b) deepspeed
#                asks the first host over ssh with `hostname -I` when unset)
#   MASTER_PORT  rendezvous port on MASTER_ADDR (default 29500)
#   GPU          1: GPUs (NCCL); 0: CPU ranks, DS_ACCELERATOR=cpu and gloo (default: 1 when
#                nvidia-smi sees a GPU). In (b), CPU runs also need DS_ACCELERATOR=cpu in a
#                .deepspeed_env file: deepspeed only forwards NCCL*/PYTHON* variables over ssh.
#   PYTHON       interpreter with ds_rlhf's dependencies (default python3)
#   OMP_NUM_THREADS  threads per rank on CPU (default 1)
set -euo pipefail
if [ "$#" -lt 2 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
CMD=$1 CONFIG=$2
shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/launch/env.sh"  # PYTHONPATH, PYTHON, GPU and the CPU settings
MASTER_PORT=${MASTER_PORT:-29500}
runner=("$PYTHON" -m deepspeed.launcher.runner)  # the `deepspeed` command, with PYTHON

if [ -n "${NODE_RANK:-}" ]; then  # (a) one launcher per node, no ssh
  : "${MASTER_ADDR:?multi_node.sh: set MASTER_ADDR (the address of node 0) when NODE_RANK is set}"
  if [ -z "${HOSTFILE:-}" ]; then
    : "${NNODES:?multi_node.sh: set NNODES (or HOSTFILE) when NODE_RANK is set}"
    if [ -z "${NPROC:-}" ]; then
      if [ "$GPU" = 0 ]; then NPROC=1; else NPROC=$(nvidia-smi -L | wc -l); fi
    fi
    # deepspeed's runner takes the nodes from a hostfile only: without one it sees this
    # machine alone and refuses --num_nodes > 1. The names are placeholders (see HOSTFILE),
    # and the content depends only on the file name, so concurrent writers agree.
    dir=${TMPDIR:-/tmp}/ds_rlhf-$(id -u)
    mkdir -p "$dir"
    HOSTFILE=$dir/hostfile-${NNODES}x$NPROC
    tmp=$(mktemp "$HOSTFILE.XXXXXX")
    for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NPROC"; done >"$tmp"
    mv -f "$tmp" "$HOSTFILE"
  fi
  args=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
        --master_port "$MASTER_PORT")
else  # (b) deepspeed reaches the other nodes over ssh (pdsh)
  : "${HOSTFILE:?multi_node.sh: set HOSTFILE (ssh mode) or NODE_RANK, NNODES and MASTER_ADDR (no-ssh mode)}"
  args=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"})
fi
args+=(${NNODES:+--num_nodes "$NNODES"} ${NPROC:+--num_gpus "$NPROC"})
exec "${runner[@]}" "${args[@]}" --module ds_rlhf "$CMD" --config "$CONFIG" "$@"
