# Sourced by launch/single_node.sh, multi_node.sh and bench.sh (not run on its own): the
# repository on PYTHONPATH, the interpreter and the device, from the variables they document.
#   needs REPO (the repository root); reads PYTHON, GPU, OMP_NUM_THREADS, TOKENIZERS_PARALLELISM
#   sets  PYTHONPATH, PYTHON (default python3), GPU (1 when nvidia-smi sees a GPU, else 0);
#         on CPU DS_ACCELERATOR=cpu (gloo) and OMP_NUM_THREADS (default 1 per rank)
# launch/slurm.sbatch keeps its own copy: sbatch runs a spooled copy of the script, and the
# submit directory need not be this repository.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # `-m ds_rlhf` works without pip install -e
PYTHON=${PYTHON:-python3}
if [ -z "${GPU:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; else GPU=0; fi
fi
if [ "$GPU" = 0 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
