"""Whole-model weights out of an engine: ZeRO-3 partitions gathered, LoRA adapters merged.

`plain_parameters` names the weights as in the plain model and pairs LoRA layers with their
adapters; the HybridEngine's generation copy (which gathers them in bulk) and the HF-format
export (`merged_weights`, save_pretrained + tokenizer) both use it, so the two always see the
same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
from torch import nn

ADAPTER = "default"  # peft's name for the one adapter we inject


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def plain_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, tuple | None]]:
    """(name in the plain, adapter-free model, parameter, None or the LoRA (A, B, scaling) to
    merge into it) for every parameter; under ZeRO-3 the parameters are partitioned."""
    lora = [name for name, m in module.named_modules() if is_lora_layer(m)]
    for prefix, sub in module.named_modules():
        if any(prefix.startswith(f"{name}.") for name in lora):
            continue  # the insides of a LoRA layer are merged below

        def key(name: str, prefix: str = prefix) -> str:
            return f"{prefix}.{name}" if prefix else name

        if is_lora_layer(sub):
            base = sub.base_layer
            yield key("weight"), base.weight, (sub.lora_A[ADAPTER].weight,
                                               sub.lora_B[ADAPTER].weight, sub.scaling[ADAPTER])
            if base.bias is not None:
                yield key("bias"), base.bias, None
            continue
        for name, p in sub.named_parameters(recurse=False):
            yield key(name), p, None


def merged_weights(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter and persistent buffer, named as in the plain
    (adapter-free) model: W = W_base + scaling * B @ A for LoRA layers (Hu et al. 2021, eq. 3).

    Gathers one parameter (with its adapters) at a time, so every rank must run the iterator
    to its end (the gathers are collective) and copy each tensor before asking for the next.
    """
    for name, p, lora in plain_parameters(module):
        with deepspeed.zero.GatheredParameters([p, *(lora[:2] if lora else ())],
                                               modifier_rank=None):
            if lora is None:
                yield name, p.data
                continue
            a, b, scaling = lora
            delta = (b.data.float() @ a.data.float()) * scaling
            yield name, (p.data.float() + delta).to(p.dtype)
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf.data


def export_hf(engine, hf_model: nn.Module, tokenizer, path: str | Path, is_main: bool) -> None:
    """Write `hf_model` (a PreTrainedModel inside `engine.module`) in HF format.

    Every rank must call it. The weights are the engine's, gathered and with LoRA merged, so
    the export loads with plain `from_pretrained` (no peft needed).
    """
    if not any(m is hf_model for m in engine.module.modules()):
        raise ValueError("hf_model is not part of the engine's module")
    state = {}
    for name, tensor in merged_weights(hf_model):
        if is_main:
            state[name] = tensor.detach().cpu().clone()
    if is_main:
        hf_model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)
    torch.distributed.barrier()
