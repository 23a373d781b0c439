"""DeepSpeed config dicts for each role, from the JSON templates in ds_configs/.

The templates hold the tuning knobs (bucket sizes, prefetching); every field that must agree
with the run config (ZeRO stage, offload, dtype, batch sizes, optimizer, clipping) is filled
here from it, so the two can never disagree. Pure: no deepspeed import.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ds_rlhf.config import EngineConfig, TrainEngineConfig

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def template_name(engine: EngineConfig, trainable: bool) -> str:
    if not trainable:
        return "frozen.json"
    if engine.zero_stage < 3:
        return "zero2.json"
    offload = engine.offload_params or getattr(engine, "offload_optimizer", False)
    return "zero3_offload.json" if offload else "zero3.json"


def load_template(name: str) -> dict:
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed template {path} is missing; ds_rlhf must be installed "
                                "from its repository (pip install -e .) so ds_configs/ is found")
    config = json.loads(path.read_text())
    config.pop("_comment", None)
    return config


def deepspeed_config(engine: EngineConfig, micro_batch_size: int, grad_accum: int,
                     world_size: int, on_cpu: bool, load_universal: bool = False) -> dict:
    """The DeepSpeed config of one engine; trained iff `engine` is a TrainEngineConfig.
    `load_universal`: the engine will load a universal checkpoint (another world size)."""
    trainable = isinstance(engine, TrainEngineConfig)
    config = copy.deepcopy(load_template(template_name(engine, trainable)))
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = engine.zero_stage
    if engine.zero_stage < 3:  # stage-3 knobs are rejected by lower stages
        for key in [k for k in zero if k.startswith("stage3_")]:
            del zero[key]
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    else:
        zero.pop("offload_param", None)
    if trainable and engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    else:
        zero.pop("offload_optimizer", None)

    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = micro_batch_size * grad_accum * world_size
    config["bf16"] = {"enabled": engine.dtype == "bf16"}
    config["fp16"] = {"enabled": engine.dtype == "fp16", "initial_scale_power": 16}
    if trainable:
        config["optimizer"] = {
            "type": "AdamW",
            # torch's AdamW where DeepSpeed's fused CUDA kernel does not exist
            "params": {"lr": engine.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                       "weight_decay": engine.weight_decay, "torch_adam": on_cpu},
        }
        if engine.warmup_steps > 0:  # WarmupLR treats 0 as 2 steps starting at lr 0
            config["scheduler"] = {
                "type": "WarmupLR",
                "params": {"warmup_min_lr": 0.0, "warmup_max_lr": engine.lr,
                           "warmup_num_steps": engine.warmup_steps, "warmup_type": "linear"},
            }
        config["gradient_clipping"] = engine.grad_clip
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config
