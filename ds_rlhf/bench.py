"""Benchmarks. One JSON line on rank 0.

    launch/bench.sh generation            # 2 ranks, CPU unless a GPU is present
    deepspeed --num_gpus 2 --module ds_rlhf.bench generation --layers 4 --hidden 256

`generation`: on an actor at ZeRO-3, the same prompts (fixed length: no EOS) are generated
through the ZeRO-3 module itself (every forward all-gathers each layer, ranks in lock-step)
and through the HybridEngine (weights gathered once into a plain copy, KV cache, local).
The HybridEngine time includes its gather.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import deepspeed
import torch
import transformers

from ds_rlhf import generation
from ds_rlhf.config import TrainEngineConfig
from ds_rlhf.coordinator import Coordinator, setup_distributed_env
from ds_rlhf.engines.hybrid import HybridEngine
from ds_rlhf.engines.roles import init_engine


def bench_generation(args) -> dict:
    setup_distributed_env()
    deepspeed.init_distributed()
    accelerator = deepspeed.get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    coord = Coordinator(torch.device(accelerator.current_device_name()))
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


def model_params(engine) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["generation"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rank")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    result = bench_generation(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
