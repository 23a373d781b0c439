"""Benchmarks. One JSON line on rank 0.

    launch/bench.sh ppo --preset tiny     # 2 ranks, CPU unless a GPU is present
    launch/bench.sh generation            # HybridEngine vs the ZeRO-3 module
    NPROC=1 GPU=1 launch/bench.sh ppo --preset opt-1.3b-350m
    launch/bench.sh ppo --preset tiny --estimator grpo --n-samples 4   # critic-free
    deepspeed --num_gpus 2 --module ds_rlhf.bench generation --layers 4 --hidden 256

`ppo`: a fixed-length PPO workload (no EOS: every response has --response-len tokens) on
random weights, a few warm-up steps then measured steps; prints samples/s, generated and
training tokens/s, the time split of a step (switch into generation mode, generate, actor /
reference logprobs, critic values, reward, advantages, actor / critic train), peak memory per
rank, the engines built and, on GPU, the training phase's TFLOP/s and MFU (6 x parameters x
tokens). `--estimator` picks ppo.advantage_estimator and `--n-samples` the samples per prompt
(--batch stays prompts per rank, so a step has batch x n rows per rank); grpo and dr_grpo run
without a KL term (no reference engine), the others with ppo.kl_coef 0.05; a critic-free
estimator builds no critic. `--reward function` scores with a rule (`bench_reward`) instead of
the reward model, which is then not built.

`generation`: on an actor at ZeRO-3, the same prompts (fixed length: no EOS) are generated
through the ZeRO-3 module itself (every forward all-gathers each layer, ranks in lock-step)
and through the HybridEngine (weights gathered once into a plain copy, KV cache, local).
The HybridEngine time includes its gather.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import deepspeed
import torch
import transformers

from ds_rlhf import generation
from ds_rlhf.config import DistributedConfig, TrainEngineConfig
from ds_rlhf.coordinator import setup_distributed_env, start_distributed, stop_distributed
from ds_rlhf.engines.hybrid import HybridEngine
from ds_rlhf.engines.roles import init_engine


def bench_generation(args) -> dict:
    setup_distributed_env()
    coord = start_distributed(DistributedConfig().timeout_minutes)
    accelerator = deepspeed.get_accelerator()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.prompt_len + args.new_tokens)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    engine_cfg = TrainEngineConfig(zero_stage=3, micro_batch_size=args.prompts, dtype=args.dtype)
    engine = init_engine(model, engine_cfg, grad_accum=1, world_size=coord.world_size)
    hybrid = HybridEngine(engine, gather_weights=True, synced=coord.all)

    g = torch.Generator().manual_seed(coord.rank)
    prompt_ids = torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    index = torch.arange(args.prompts) + coord.rank * args.prompts

    def run(gather: bool) -> float:
        hybrid.gather_weights = gather
        coord.barrier()
        start = time.perf_counter()
        with hybrid.generation_mode() as gen:
            ids, _ = generation.generate(
                gen.model, prompt_ids, prompt_mask, index, step=0, seed=0,
                max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0,
                synced=gen.synced)
        assert ids.shape == (args.prompts, args.new_tokens)
        accelerator.synchronize()
        coord.barrier()
        return time.perf_counter() - start

    run(True)  # warm-up: first calls allocate and compile
    zero3_s = min(run(False) for _ in range(args.repeats))
    hybrid_s = min(run(True) for _ in range(args.repeats))
    return {
        "bench": "generation", "device": accelerator.device_name(),
        "world_size": coord.world_size, "layers": args.layers, "hidden": args.hidden,
        "vocab": args.vocab, "dtype": args.dtype, "params_m": round(model_params(engine) / 1e6, 2),
        "prompts_per_rank": args.prompts, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "zero3_module_s": round(zero3_s, 4),
        "hybrid_engine_s": round(hybrid_s, 4), "speedup": round(zero3_s / hybrid_s, 2),
    }


PRESETS = {
    # A tiny llama for CPU runs.
    "tiny": dict(actor={"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024,
                        "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "vocab_size": 32000},
                 critic=None, prompt_len=64, response_len=64, batch=16, dtype="fp32",
                 zero_stage=2),
    # The classic DeepSpeed-Chat pairing: OPT-1.3B actor, OPT-350M critic and reward.
    "opt-1.3b-350m": dict(
        actor={"model_type": "opt", "hidden_size": 2048, "ffn_dim": 8192,
               "num_hidden_layers": 24, "num_attention_heads": 32, "vocab_size": 50272,
               "word_embed_proj_dim": 2048},
        critic={"model_type": "opt", "hidden_size": 1024, "ffn_dim": 4096,
                "num_hidden_layers": 24, "num_attention_heads": 16, "vocab_size": 50272,
                "word_embed_proj_dim": 512},
        prompt_len=256, response_len=256, batch=64, dtype="bf16", zero_stage=2),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 per GPU
PHASES = ("switch", "generate", "actor_logprobs", "ref_logprobs", "values", "reward",
          "advantages", "actor_train", "critic_train")


def _ppo_config(args, preset: dict, workdir) -> dict:
    import json

    from ds_rlhf.demo.task import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(workdir / "tokenizer")
    words = [w for w in tokenizer.get_vocab() if w.isalpha()]
    with open(workdir / "prompts.jsonl", "w") as f:  # one word = one token: fixed lengths
        for i in range(4 * args.batch):
            prompt = " ".join(words[(i + j) % len(words)] for j in range(args.prompt_len))
            f.write(json.dumps({"prompt": prompt}) + "\n")
    positions = args.prompt_len + args.response_len
    room = {"max_position_embeddings": max(positions, 64)}
    actor = {**preset["actor"], **room}
    critic = {**(preset["critic"] or preset["actor"]), **room}
    engine = {"zero_stage": args.zero_stage, "dtype": args.dtype,
              "micro_batch_size": args.micro_batch}
    return {
        "output_dir": str(workdir / "run"), "seed": 0,
        "actor": {**engine, "model": {"init": actor, "tokenizer": str(workdir / "tokenizer")}},
        "critic": {**engine, "model": {"init": critic, "tokenizer": str(workdir / "tokenizer")}},
        "ref": {"zero_stage": 3 if args.zero_stage == 3 else 0, "dtype": args.dtype,
                "micro_batch_size": args.micro_batch},
        "reward": {"zero_stage": 3 if args.zero_stage == 3 else 0, "dtype": args.dtype,
                   "micro_batch_size": args.micro_batch,
                   "model": {"init": critic, "tokenizer": str(workdir / "tokenizer")}
                   if args.reward == "model" else {}},
        "rewards": [{"function": "ds_rlhf.bench:bench_reward"}] if args.reward == "function"
        else [],
        "data": {"datasets": [{"path": str(workdir / "prompts.jsonl")}],
                 "max_prompt_len": args.prompt_len, "max_len": positions},
        "generation": {"max_new_tokens": args.response_len, "batch_size": args.gen_batch,
                       "n_samples_per_prompt": args.n_samples},
        "ppo": {"steps": args.warmup + args.steps, "rollout_batch_size": args.batch,
                "advantage_estimator": args.estimator,
                "kl_coef": 0.0 if args.estimator in ("grpo", "dr_grpo") else 0.05},
        "tracking": {"log_every": 1, "sample_every": 0},
        "checkpoint": {"resume": False},
    }


def bench_reward(prompts, completions, **columns) -> list[float]:
    """`--reward function`: a cheap rule with spread between samples (distinct words)."""
    return [len(set(c.split())) / max(len(c.split()), 1) for c in completions]


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_ppo(args) -> dict:
    import tempfile
    from pathlib import Path

    from ds_rlhf.config import load_config
    from ds_rlhf.trainers.ppo import build_ppo

    preset = PRESETS[args.preset]
    for key in ("prompt_len", "response_len", "batch", "dtype", "zero_stage"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.micro_batch = args.micro_batch or min(args.batch * args.n_samples, 8)
    args.gen_batch = args.gen_batch or args.batch * args.n_samples
    workdir = Path(tempfile.mkdtemp(prefix="ds_rlhf_bench_"))
    cfg = load_config(None, {k: v for k, v in _ppo_config(args, preset, workdir).items()})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.ppo.rollout_batch_size = args.batch * world  # --batch is per rank
    trainer = build_ppo(cfg)
    trainer.actor.eos_token_id = None  # fixed-length responses: nothing stops early
    coord = trainer.coord
    steps = []
    for step in range(1, args.warmup + args.steps + 1):
        metrics = trainer.ppo_step(step)
        if step > args.warmup:
            steps.append(metrics)
    mean = {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]}
    t = {phase: mean[f"timing/{phase}"] for phase in PHASES}
    step_s = mean["timing/step"]
    samples = cfg.ppo.rollout_batch_size * args.n_samples  # rows: responses per step
    seq = args.prompt_len + args.response_len
    memory = coord.gather_objects([round(_peak_memory_gb(), 3)])
    result = {
        "bench": "ppo", "preset": args.preset, "device": torch.device(coord.device).type,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "world_size": coord.world_size, "dtype": args.dtype, "zero_stage": args.zero_stage,
        "estimator": args.estimator, "n_samples": args.n_samples, "reward": args.reward,
        "engines": trainer.engine_names, "rollout_batch": samples, "prompt_len": args.prompt_len,
        "response_len": args.response_len, "measured_steps": args.steps,
        "actor_params_m": round(model_params(trainer.actor.engine) / 1e6, 1),
        "critic_params_m": round(model_params(trainer.critic.engine) / 1e6, 1)
        if trainer.critic is not None else None,
        "step_s": round(step_s, 4),
        "samples_per_s": round(samples / step_s, 3),
        "generated_tokens_per_s": round(samples * args.response_len / t["generate"], 1),
        "train_tokens_per_s": round(samples * seq * cfg.ppo.ppo_epochs
                                    / (t["actor_train"] + t["critic_train"]), 1),
        "time_split_s": {k: round(v, 4) for k, v in t.items()},
        "time_split_sum_over_step": round(sum(t.values()) / step_s, 4),
        "peak_memory_gb_per_rank": memory,
    }
    if torch.cuda.is_available():
        train_s = t["actor_train"] + t["critic_train"]
        params = sum(model_params(engine) for engine in trainer.engines().values())
        flops = 6 * params * samples * seq * cfg.ppo.ppo_epochs
        tflops = flops / train_s / 1e12 / coord.world_size
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in result["gpu"]), None)
        result["train_tflops_per_gpu"] = round(tflops, 1)
        result["train_mfu"] = round(tflops / peak, 3) if peak else None
    return result


def model_params(engine) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="ds-rlhf bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["ppo", "generation"])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="ppo only")
    parser.add_argument("--batch", type=int, default=None, help="ppo: prompts per rank")
    parser.add_argument("--response-len", type=int, default=None, help="ppo: new tokens")
    parser.add_argument("--micro-batch", type=int, default=None, help="ppo: rows per pass")
    parser.add_argument("--gen-batch", type=int, default=None, help="ppo: rows per generate")
    parser.add_argument("--zero-stage", type=int, default=None, help="ppo: actor and critic")
    parser.add_argument("--estimator", default="gae", help="ppo: ppo.advantage_estimator",
                        choices=["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                                 "reinforce_pp_baseline"])
    parser.add_argument("--n-samples", type=int, default=1,
                        help="ppo: generation.n_samples_per_prompt")
    parser.add_argument("--reward", choices=["model", "function"], default="model",
                        help="ppo: score with the reward model or a rule (no reward engine)")
    parser.add_argument("--warmup", type=int, default=1, help="ppo: steps not measured")
    parser.add_argument("--steps", type=int, default=2, help="ppo: measured steps")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rank")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 32 / preset")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="default: fp32 / preset")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    args = parser.parse_args([a for a in (sys.argv[1:] if argv is None else argv)
                              if not a.startswith("--local_rank=")])
    if args.workload == "ppo":
        result = bench_ppo(args)
    else:
        args.prompt_len = args.prompt_len or 32
        args.dtype = args.dtype or "fp32"
        result = bench_generation(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    stop_distributed()


if __name__ == "__main__":
    main()
