"""Benchmarks. One JSON line on rank 0.

    launch/bench.sh ppo --preset tiny     # 2 ranks, CPU unless a GPU is present
    launch/bench.sh ppo --preset opt-4l-256 --zero-stage 2,3 --steps 8   # issue 13's workload
    launch/bench.sh ppo --preset tiny --config actor.json --critic-config critic.json
    launch/bench.sh ppo --preset opt-4l-256 --eos-frac 0.05 --micro-batch-tokens 0,256
    launch/bench.sh ppo --preset tiny --estimator grpo --n-samples 4 --reward function
    launch/bench.sh generation            # HybridEngine vs the ZeRO-3 module
    NPROC=1 GPU=1 launch/bench.sh ppo --preset opt-1.3b-350m

`ppo`: a PPO workload on random weights, a few warm-up steps then measured steps; prints, per
variant (each `--zero-stage` x `--micro-batch-tokens`, all built in one process and stepped
in turn, so their ratios hold on a loaded machine): the engines built (ZeRO stage, dtype,
size of each role), median / min / max seconds per step and each step's, rank 0's CPU
seconds per step (`cpu_step_s`, steadier on a shared machine), samples/s, generated
and training tokens/s, the median time split of a step (switch into generation mode,
generate, actor / reference logprobs, critic values, reward, advantages, actor / critic
train; actor logprobs 0 under the on-policy shortcut, `on_policy_shortcut` says whether it was
taken), and on GPU the training phase's TFLOP/s and MFU (6 x parameters x tokens); then peak
memory per rank (all variants together). Models: a preset, or HF config JSON files
(`--config`, `--critic-config`). The tokenizer is a word-level one with exactly the actor's
vocabulary (every sampled id decodes); a critic or reward model with another vocabulary is
refused. Responses have fixed length (no EOS) unless `--eos-frac` makes that share of the
vocabulary end them, so lengths vary and `--micro-batch-tokens` packing has padding to save.
`--estimator` picks ppo.advantage_estimator and `--n-samples` the samples per prompt (--batch
stays prompts per rank, so a step has batch x n rows per rank); grpo and dr_grpo run without a
KL term (no reference engine), the others with ppo.kl_coef 0.05; a critic-free estimator builds
no critic. `--reward function` scores with a rule (`bench_reward`) instead of the reward model,
which is then not built.

`generation`: on an actor at ZeRO-3, the same prompts (fixed length: no EOS) are generated
through the ZeRO-3 module itself (every forward all-gathers each layer, ranks in lock-step)
and through the HybridEngine (weights gathered once into a plain copy, KV cache, local).
The HybridEngine time includes its gather; decode ms per token excludes it and is set against
the memory-bandwidth bound (weight bytes / HBM bandwidth) on known GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import transformers

from ds_rlhf import generation
from ds_rlhf.config import DistributedConfig, TrainEngineConfig, UserInputError
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

    def run(gather: bool) -> tuple[float, float]:
        """(seconds of the whole call, seconds of the switch in and out)"""
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
        return time.perf_counter() - start, hybrid.switch_seconds

    run(True)  # warm-up: first calls allocate and compile
    zero3_s = min(run(False)[0] for _ in range(args.repeats))
    hybrid_s, switch_s = min(run(True) for _ in range(args.repeats))
    params = model_params(engine)
    # Each decode step reads every weight once: at batch sizes this small the step can be no
    # faster than the weights' bytes over the memory bandwidth.
    bandwidth = _gpu_peak(PEAK_TB_PER_S)
    bound_ms = params * dtype.itemsize / (bandwidth * 1e12) * 1e3 if bandwidth else None
    return {
        "bench": "generation", "device": accelerator.device_name(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "world_size": coord.world_size, "layers": args.layers, "hidden": args.hidden,
        "vocab": args.vocab, "dtype": args.dtype, "params_m": round(params / 1e6, 2),
        "prompts_per_rank": args.prompts, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "zero3_module_s": round(zero3_s, 4),
        "hybrid_engine_s": round(hybrid_s, 4), "switch_s": round(switch_s, 4),
        "speedup": round(zero3_s / hybrid_s, 2),
        # The generate call (prefill included) per new token, switch excluded.
        "decode_ms_per_token": round((hybrid_s - switch_s) / args.new_tokens * 1e3, 3),
        "bandwidth_bound_ms_per_token": round(bound_ms, 3) if bound_ms else None,
        "peak_memory_gb_per_rank": coord.gather_objects([round(_peak_memory_gb(), 3)]),
    }


PRESETS = {
    # A tiny llama for CPU runs.
    "tiny": dict(actor={"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024,
                        "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "vocab_size": 32000},
                 critic=None, prompt_len=64, response_len=64, batch=16, dtype="fp32",
                 zero_stage=2),
    # The 2-CPU-rank comparison workload of issue 13 (actor, critic, reference and reward).
    "opt-4l-256": dict(
        actor={"model_type": "opt", "hidden_size": 256, "ffn_dim": 1024,
               "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 4096,
               "word_embed_proj_dim": 256},
        critic=None, prompt_len=32, response_len=32, batch=8, dtype="fp32", zero_stage=2),
    # The smallest llama that builds: the dry run of launch/gpu_check.sh.
    "micro": dict(actor={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "vocab_size": 512},
                  critic=None, prompt_len=8, response_len=8, batch=4, dtype="fp32",
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
PEAK_TB_PER_S = {"H100": 3.35, "H200": 4.8, "A100": 2.0}  # HBM bandwidth per GPU
PHASES = ("switch", "generate", "actor_logprobs", "ref_logprobs", "values", "reward",
          "advantages", "actor_train", "critic_train")


def _gpu_peak(table: dict[str, float]) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in table.items() if k in name), None)


def load_model_config(path: str | None, preset: dict | None, what: str) -> dict:
    """An HF config dict: the JSON file at `path` (config.json of a checkpoint, or written by
    hand with a model_type) when given, else the preset's."""
    if path is None:
        return dict(preset)
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserInputError(f"{what} {path}: not a readable JSON file ({e})") from e
    if not isinstance(config, dict) or "model_type" not in config or "vocab_size" not in config:
        raise UserInputError(f"{what} {path}: an HF config JSON needs model_type and vocab_size")
    return config


def matched_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` ids ("<eos>" = pad = 0, "<unk>" = 1,
    then "t2" ... ), so every id a random model samples decodes, and one word is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                   unk_token="<unk>", model_max_length=1 << 20)


def check_vocab(tokenizer, configs: dict[str, dict]) -> None:
    """Refuse models whose vocabulary is not the tokenizer's: prompt ids beyond a model's
    embedding fail, sampled ids beyond the tokenizer cannot be decoded."""
    for role, config in configs.items():
        if config["vocab_size"] != len(tokenizer):
            raise UserInputError(
                f"bench: the {role} model's vocab_size {config['vocab_size']} differs from the "
                f"tokenizer's {len(tokenizer)} (the actor's); give --critic-config a model with "
                "the actor's vocabulary")


@dataclass
class Variant:
    """One engine setup measured by `bench ppo` (several are interleaved step by step)."""

    zero_stage: int  # actor and critic; reference and reward: 3 if 3 else 0
    micro_batch_tokens: int  # 0: micro-batches of --micro-batch rows

    @property
    def name(self) -> str:
        return f"zero{self.zero_stage}" + (f"_tokens{self.micro_batch_tokens}"
                                           if self.micro_batch_tokens else "")


def _ppo_config(args, actor: dict, critic: dict, variant: Variant, workdir: Path) -> dict:
    positions = args.prompt_len + args.response_len
    room = {"max_position_embeddings": max(positions, actor.get("max_position_embeddings", 0),
                                           64)}
    actor, critic = {**actor, **room}, {**critic, **room}
    tokenizer = str(workdir / "tokenizer")
    frozen_stage = 3 if variant.zero_stage == 3 else 0
    batching = {"micro_batch_size": args.micro_batch,
                "micro_batch_tokens": variant.micro_batch_tokens}
    engine = {"zero_stage": variant.zero_stage, "dtype": args.dtype, **batching}
    frozen = {"zero_stage": frozen_stage, "dtype": args.dtype, **batching}
    return {
        "output_dir": str(workdir / variant.name), "seed": 0,
        "actor": {**engine, "model": {"init": actor, "tokenizer": tokenizer}},
        "critic": {**engine, "model": {"init": critic, "tokenizer": tokenizer}},
        "ref": frozen,
        "reward": {**frozen, "model": {"init": critic, "tokenizer": tokenizer}
                   if args.reward == "model" else {}},
        "rewards": [{"function": "ds_rlhf.bench:bench_reward"}] if args.reward == "function"
        else [],
        "data": {"datasets": [{"path": str(workdir / "prompts.jsonl")}],
                 "max_prompt_len": args.prompt_len, "max_len": positions},
        "generation": {"max_new_tokens": args.response_len, "batch_size": args.gen_batch,
                       "static_cache": args.static_cache, "compile": args.compile,
                       "reuse_copy": args.reuse_copy or args.compile,
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


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def _engines(trainer) -> dict:
    """What was built: each role's ZeRO stage, dtype, size and whether it trains."""
    out = {}
    for role in trainer.engine_names:
        engine = getattr(trainer, role).engine
        out[role] = {"zero_stage": engine.zero_optimization_stage(),
                     "dtype": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
                     "params_m": round(model_params(engine) / 1e6, 2),
                     "trained": role in ("actor", "critic")}
    return out


def _summary(args, trainer, steps: list[dict]) -> dict:
    """Per-step medians (and min / max of the step) of one variant's measured steps."""
    cfg = trainer.cfg
    samples = cfg.ppo.rollout_batch_size * cfg.generation.n_samples_per_prompt  # rows
    seq = args.prompt_len + args.response_len
    step_s = [m["timing/step"] for m in steps]
    t = {phase: statistics.median(m[f"timing/{phase}"] for m in steps) for phase in PHASES}
    median = statistics.median(step_s)
    response = statistics.median(m["response_length/mean"] for m in steps)
    frozen = t["ref_logprobs"] + t["reward"]
    result = {
        "engines": _engines(trainer),
        "step_s": _stats(step_s), "steps_s": [round(x, 4) for x in step_s],
        # CPU seconds of rank 0's process per step (its threads included; waits in gloo
        # collectives are not): on a shared machine, steadier than wall-clock seconds.
        "cpu_step_s": _stats([m["cpu/step"] for m in steps]),
        "samples_per_s": round(samples / median, 3),
        "response_length_mean": round(response, 2),
        "generated_tokens_per_s": round(samples * response / t["generate"], 1),
        "train_tokens_per_s": round(samples * seq * cfg.ppo.ppo_epochs
                                    / (t["actor_train"] + t["critic_train"]), 1),
        # The old logprobs came from the training forward (ppo.on_policy_shortcut): then
        # actor_logprobs is 0 and the actor's training forward stands in for it.
        "on_policy_shortcut": cfg.ppo.takes_on_policy_shortcut,
        "time_split_s": {k: round(v, 4) for k, v in t.items()},
        "time_split_sum_over_step": round(sum(t.values()) / median, 4),
        "switch_over_generate": round(t["switch"] / t["generate"], 3),
        # The trained engines' scoring forwards against the frozen ones' (same shapes).
        # None unless all four engines run: then the forwards are the same shapes.
        "trained_over_frozen_scoring": round((t["actor_logprobs"] + t["values"]) / frozen, 3)
        if len(trainer.engine_names) == 4 else None,
    }
    if torch.cuda.is_available():
        train_s = t["actor_train"] + t["critic_train"]
        params = sum(model_params(engine) for engine in trainer.engines().values())
        flops = 6 * params * samples * seq * cfg.ppo.ppo_epochs
        tflops = flops / train_s / 1e12 / trainer.coord.world_size
        peak = _gpu_peak(PEAK_TFLOPS)
        result["train_tflops_per_gpu"] = round(tflops, 1)
        result["train_mfu"] = round(tflops / peak, 3) if peak else None
    return result


def bench_ppo(args) -> dict:
    import tempfile

    from ds_rlhf.config import load_config
    from ds_rlhf.trainers.ppo import build_ppo

    preset = PRESETS[args.preset]
    for key in ("prompt_len", "response_len", "batch", "dtype"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.micro_batch = args.micro_batch or min(args.batch * args.n_samples, 8)
    args.gen_batch = args.gen_batch or args.batch * args.n_samples
    actor = load_model_config(args.config, preset["actor"], "--config")
    critic = load_model_config(args.critic_config, preset["critic"] or actor, "--critic-config")
    tokenizer = matched_tokenizer(actor["vocab_size"])
    check_vocab(tokenizer, {"actor": actor, "critic and reward": critic})
    variants = [Variant(z, n) for z in args.zero_stage or [preset["zero_stage"]]
                for n in args.micro_batch_tokens]

    workdir = Path(tempfile.mkdtemp(prefix="ds_rlhf_bench_"))
    tokenizer.save_pretrained(workdir / "tokenizer")
    words = torch.randint(2, actor["vocab_size"], (4 * args.batch, args.prompt_len),
                          generator=torch.Generator().manual_seed(0))
    with open(workdir / "prompts.jsonl", "w") as f:  # one word = one token: fixed lengths
        for row in words.tolist():
            f.write(json.dumps({"prompt": " ".join(f"t{i}" for i in row)}) + "\n")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainers = []
    for variant in variants:
        cfg = load_config(None, _ppo_config(args, actor, critic, variant, workdir))
        cfg.ppo.rollout_batch_size = args.batch * world  # --batch is per rank
        trainer = build_ppo(cfg)
        # Fixed lengths: nothing stops early. --eos-frac: the first ids of that share of the
        # vocabulary all end a response, so random weights stop at a rate of about that share
        # per token and lengths vary (what packing by tokens is for).
        num_eos = int(args.eos_frac * actor["vocab_size"])
        trainer.actor.eos_token_id = list(range(max(num_eos, 1))) if args.eos_frac else None
        trainers.append(trainer)
    # Interleaved: step k of every variant runs before step k + 1 of any, so a load change
    # on a shared machine hits all variants alike and their ratios stay comparable.
    measured: list[list[dict]] = [[] for _ in variants]
    for step in range(1, args.warmup + args.steps + 1):
        for trainer, steps in zip(trainers, measured, strict=True):
            cpu = time.process_time()
            metrics = trainer.ppo_step(step)
            metrics["cpu/step"] = time.process_time() - cpu
            if step > args.warmup:
                steps.append(metrics)
    coord = trainers[0].coord
    memory = coord.gather_objects([round(_peak_memory_gb(), 3)])
    runs = {v.name: {"zero_stage": v.zero_stage, "micro_batch_tokens": v.micro_batch_tokens,
                     **_summary(args, trainer, steps)}
            for v, trainer, steps in zip(variants, trainers, measured, strict=True)}
    first = runs[variants[0].name]["step_s"]["median"]
    return {
        "bench": "ppo", "preset": args.preset, "config": args.config,
        "critic_config": args.critic_config, "device": torch.device(coord.device).type,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "world_size": coord.world_size, "dtype": args.dtype,
        "estimator": args.estimator, "n_samples": args.n_samples, "reward": args.reward,
        "engines": trainers[0].engine_names,
        "rollout_batch": args.batch * world * args.n_samples, "prompt_len": args.prompt_len,
        "response_len": args.response_len, "eos_frac": args.eos_frac,
        "static_cache": args.static_cache, "compile": args.compile,
        "reuse_copy": args.reuse_copy or args.compile, "warmup_steps": args.warmup,
        "measured_steps": args.steps,
        "actor_params_m": round(model_params(trainers[0].actor.engine) / 1e6, 1),
        "critic_params_m": round(model_params(trainers[0].critic.engine) / 1e6, 1)
        if trainers[0].critic is not None else None,
        "runs": runs,
        # Each variant's median step over the first variant's, from this one process.
        "step_ratio": {name: round(r["step_s"]["median"] / first, 3) for name, r in runs.items()},
        "peak_memory_gb_per_rank": memory,
    }


def model_params(engine) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def _stages(text: str) -> list[int]:
    stages = [int(x) for x in text.split(",")]
    if any(z not in (0, 1, 2, 3) for z in stages):
        raise argparse.ArgumentTypeError(f"ZeRO stages are 0-3, got {text}")
    return stages


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags, one group per workload (add a workload's flags to its group)."""
    parser = argparse.ArgumentParser(prog="ds-rlhf bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["ppo", "generation"])
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 32 / preset")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="default: fp32 / preset")
    ppo = parser.add_argument_group("ppo")
    ppo.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ppo.add_argument("--config", default=None,
                     help="HF config JSON of the actor (and reference); overrides the preset's")
    ppo.add_argument("--critic-config", default=None,
                     help="HF config JSON of the critic and reward (default: the preset's, or "
                     "the actor's); its vocab_size must be the actor's")
    ppo.add_argument("--batch", type=int, default=None, help="prompts per rank")
    ppo.add_argument("--response-len", type=int, default=None, help="new tokens at most")
    ppo.add_argument("--micro-batch", type=int, default=None, help="rows per pass")
    ppo.add_argument("--micro-batch-tokens", type=_ints, default=[0],
                     help="tokens per pass of every role (0: by rows); a list such as 0,512 "
                     "measures each, interleaved")
    ppo.add_argument("--gen-batch", type=int, default=None, help="rows per generate call")
    ppo.add_argument("--zero-stage", type=_stages, default=None,
                     help="actor and critic (frozen roles: 3 if 3 else 0); a list such as 2,3 "
                     "measures each, interleaved step by step in one process")
    ppo.add_argument("--eos-frac", type=float, default=0.0,
                     help="variable lengths: this share of the vocabulary ends a response "
                     "(0: fixed length, no EOS)")
    ppo.add_argument("--reuse-copy", action="store_true", help="generation.reuse_copy")
    ppo.add_argument("--static-cache", action="store_true", help="generation.static_cache")
    ppo.add_argument("--compile", action="store_true",
                     help="generation.compile (with reuse_copy; needs --static-cache)")
    ppo.add_argument("--estimator", default="gae", help="ppo.advantage_estimator",
                     choices=["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                              "reinforce_pp_baseline"])
    ppo.add_argument("--n-samples", type=int, default=1, help="generation.n_samples_per_prompt")
    ppo.add_argument("--reward", choices=["model", "function"], default="model",
                     help="score with the reward model or a rule (no reward engine)")
    ppo.add_argument("--warmup", type=int, default=1, help="steps not measured")
    ppo.add_argument("--steps", type=int, default=2, help="measured steps")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--layers", type=int, default=4)
    gen.add_argument("--hidden", type=int, default=256)
    gen.add_argument("--vocab", type=int, default=32000)
    gen.add_argument("--prompts", type=int, default=8, help="prompts per rank")
    gen.add_argument("--new-tokens", type=int, default=32)
    gen.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args([a for a in (sys.argv[1:] if argv is None else argv)
                                      if not a.startswith("--local_rank=")])
    try:
        if args.workload == "ppo":
            result = bench_ppo(args)
        else:
            args.prompt_len = args.prompt_len or 32
            args.dtype = args.dtype or "fp32"
            result = bench_generation(args)
    except UserInputError as e:
        print(f"ds-rlhf bench: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    stop_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
