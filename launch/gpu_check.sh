#!/usr/bin/env bash
# Measure a GPU machine in one command (under 8 minutes on one H100/H200) and write one JSON
# report: the GPU-marked tests (pass/fail each), `bench generation` on a ~1B llama in bf16
# (decode ms per token against the memory-bandwidth bound), `bench ppo --preset
# opt-1.3b-350m` with and without generation.static_cache + compile (samples/s, tokens/s,
# MFU, peak memory), and, when 2 GPUs are present, the same PPO bench on 2 ranks (NCCL) at
# ZeRO-2 and ZeRO-3. Where vLLM is importable (the vllm extra), the generation and PPO benches
# run both generation backends side by side (`--backend hf,vllm`: samples/s, decode tokens/s,
# weight-sync seconds; `vllm` in the report says which). The single-GPU PPO bench also times the
# hf backend's generation and scoring forwards against plain HF calls (`vs_hf_s`). A group
# workload (GRPO, prompts of 512 tokens, 8 samples each, up to 256 new tokens, long-tailed
# lengths) measures both backends and the hf loop with its shared prompt prefill and its
# compaction of finished rows off and on (prefill / decode seconds, finished row-steps). With 2
# GPUs, asynchronous RL: 1 training + 1 generation GPU (rollout.placement separate), lag 0 and 1
# (step seconds, each pool's busy share, weight-transfer seconds and GB/s, overlap).
#   launch/gpu_check.sh                   # report: gpu_check.json (GPU_CHECK_OUT to change)
#   GPU_CHECK_DRY=1 launch/gpu_check.sh   # the same steps on CPU ranks with tiny models (CI)
# A failing step is recorded in the report and the others still run; the exit status is 1
# when any step failed. PYTHON as in launch/env.sh; MASTER_PORT for the launcher (29500).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then GPU=0; fi
. "$REPO/launch/env.sh"  # PYTHONPATH, PYTHON, GPU and the CPU settings
OUT=${GPU_CHECK_OUT:-$PWD/gpu_check.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [ "$DRY" = 1 ]; then
  NUM_GPUS=2  # CPU ranks: the 2-rank steps run too
  GEN="--layers 2 --hidden 64 --vocab 512 --prompts 2 --prompt-len 8 --new-tokens 8 --repeats 1"
  PPO="--preset micro --steps 1 --warmup 1"
  VS_HF="--vs-hf 1"
  # also the variable-length mode: a fifth of the vocabulary ends a response, and token
  # packing next to micro-batches by rows
  PPO2="$PPO --zero-stage 2,3 --eos-frac 0.2 --micro-batch-tokens 0,64"
  FAST="--static-cache"  # torch.compile on CPU would need minutes and a C++ compiler
  GROUP="--preset micro --steps 1 --warmup 1 --n-samples 4 --batch 2 --prompt-len 16 --response-len 8 --eos-frac 0.2"
  ASYNC="--preset micro --steps 1 --warmup 1 --n-samples 4 --batch 2 --prompt-len 8 --response-len 8"
else
  NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  GEN="--layers 16 --hidden 2048 --vocab 32000 --dtype bf16 --prompts 8 --prompt-len 128 --new-tokens 128 --repeats 2"
  PPO="--preset opt-1.3b-350m --batch 32 --steps 3 --warmup 1"
  VS_HF="--vs-hf 2"
  PPO2="$PPO --batch 16 --steps 2 --zero-stage 2,3"
  FAST="--static-cache --compile"
  GROUP="--preset opt-1.3b-350m --steps 2 --warmup 1 --n-samples 8 --batch 4 --prompt-len 512 --response-len 256 --eos-frac 0.01"
  ASYNC="--preset opt-1.3b-350m --steps 3 --warmup 1 --n-samples 8 --batch 4 --prompt-len 128 --response-len 256"
fi

# step NAME NPROC ARGS...: one bench run; its JSON line goes to $WORK/NAME.json, its
# output to $WORK/NAME.log, its exit status and seconds to $WORK/NAME.status.
step() {
  local name=$1 nproc=$2 start rc
  shift 2
  start=$(date +%s)
  "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" \
    --module ds_rlhf bench "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  grep '^{' "$WORK/$name.log" | tail -n 1 > "$WORK/$name.json"
  echo "$rc $(( $(date +%s) - start ))" > "$WORK/$name.status"
  echo "gpu_check: $name exit $rc" >&2
}

start=$(date +%s)
(cd "$REPO" && "$PYTHON" -m pytest -q -m gpu tests --junitxml="$WORK/gpu_tests.xml" \
   > "$WORK/gpu_tests.log" 2>&1)
echo "$? $(( $(date +%s) - start ))" > "$WORK/gpu_tests.status"
BACKENDS=hf
if "$PYTHON" -c "import vllm" > /dev/null 2>&1; then BACKENDS=hf,vllm; fi
step generation 1 generation $GEN --backend $BACKENDS
# dry: vLLM starts once (a minute on CPU), in the generation step; PPO runs on vLLM in the
# dist tests (tests/dist/test_vllm.py). On a GPU machine every step measures both backends.
PPO_BACKENDS=$BACKENDS
if [ "$DRY" = 1 ]; then PPO_BACKENDS=hf; fi
step ppo 1 ppo $PPO --backend $PPO_BACKENDS $VS_HF
step ppo_static_compile 1 ppo $PPO $FAST
step ppo_group 1 ppo $GROUP --estimator grpo --reward function --backend $PPO_BACKENDS \
  --share-prefill 0,1 --compact 0,1
if [ "$NUM_GPUS" -ge 2 ]; then
  step ppo_2ranks 2 ppo $PPO2
  # asynchronous RL: 1 training + 1 generation rank, on-policy (turns) and lag 1 (overlap)
  step ppo_async 2 ppo $ASYNC --estimator grpo --reward function --placement separate \
    --staleness 0,1
fi

"$PYTHON" - "$WORK" "$OUT" "$DRY" "$NUM_GPUS" "$BACKENDS" <<'EOF'
"""Assemble the report from the steps' files."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, dry, num_gpus = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
backends = sys.argv[5].split(",")


def status(name):
    rc, seconds = (work / f"{name}.status").read_text().split()
    return {"ok": rc == "0", "exit_code": int(rc), "seconds": int(seconds)}


def bench(name):
    if not (work / f"{name}.status").exists():
        return None
    text = (work / f"{name}.json").read_text().strip()
    result = status(name)
    if not text:
        result["log_tail"] = (work / f"{name}.log").read_text()[-2000:]
        return result
    data = json.loads(text)
    if data["bench"] == "generation":
        keys = ("params_m", "dtype", "hybrid_engine_s", "switch_s", "zero3_module_s",
                "decode_ms_per_token", "bandwidth_bound_ms_per_token", "peak_memory_gb_per_rank")
        result.update({k: data.get(k) for k in (*keys, "samples_per_s", "tokens_per_s")})
        if "vllm" in data:  # --backend hf,vllm: vLLM's numbers beside the hf backend's
            result.update({"vllm": data["vllm"],
                           "vllm_speedup_over_hf": data["vllm_speedup_over_hf"]})
        return result
    runs = {variant: {
        "samples_per_s": r["samples_per_s"],
        "response_length_mean": r["response_length_mean"],
        "generated_tokens_per_s": r["generated_tokens_per_s"],
        "train_tokens_per_s": r["train_tokens_per_s"],
        "train_mfu": r.get("train_mfu"), "step_s": r["step_s"],
        "time_split_sum_over_step": r["time_split_sum_over_step"],
        "switch_over_generate": r["switch_over_generate"],
        "trained_over_frozen_scoring": r["trained_over_frozen_scoring"],
        "backend": r["backend"], "weight_sync_s": r["time_split_s"]["weight_sync"],
        "share_prompt_prefill": r["share_prompt_prefill"],
        "compact_finished_rows": r["compact_finished_rows"],
        "generate_s": r["time_split_s"]["generate"],
        "prefill_s": r["time_split_s"]["prefill"], "decode_s": r["time_split_s"]["decode"],
        "finished_row_steps_share": r["finished_row_steps_share"],
        **({"vs_hf_s": r["vs_hf_s"]} if "vs_hf_s" in r else {}),
        **({"separate": r["separate"]} if "separate" in r else {}),
    } for variant, r in data["runs"].items()}
    return {**result, "world_size": data["world_size"], "runs": runs,
            "peak_memory_gb_per_rank": data["peak_memory_gb_per_rank"]}


tests = {}
xml = work / "gpu_tests.xml"
if xml.exists():
    for case in ET.parse(xml).iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = ("failed" if kinds & {"failure", "error"} else
                   "skipped" if "skipped" in kinds else "passed")
        tests[f"{case.get('classname')}::{case.get('name')}"] = outcome
report = {
    "dry_run": dry, "num_gpus": num_gpus, "work_dir": str(work),  # each step's log is there
    "gpu_tests": {**status("gpu_tests"), "tests": tests},
    "generation": bench("generation"),
    "ppo": bench("ppo"),
    "ppo_static_compile": bench("ppo_static_compile"),
    "ppo_group": bench("ppo_group"),  # prompt 512 x 8 samples: shared prefill, compaction
    "ppo_2ranks": bench("ppo_2ranks"),  # null with fewer than 2 GPUs
    "ppo_async": bench("ppo_async"),  # rollout.placement separate, 1 + 1 GPUs (or null)
}
report["vllm"] = "vllm" in backends  # generation and ppo measured both backends
report["ok"] = all(v["ok"] for v in report.values() if isinstance(v, dict))
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"gpu_check: report in {out}: {'all passed' if report['ok'] else 'FAILURES'}")
sys.exit(0 if report["ok"] else 1)
EOF
