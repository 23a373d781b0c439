"""HF-format export of a DeepSpeed engine's model (save_pretrained + tokenizer), any ZeRO stage."""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch
from torch import nn


def gathered_state_dict(module: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """A full CPU state dict of `module` on the main rank (None elsewhere).

    Under ZeRO-3 every rank must call this (each parameter is all-gathered, one submodule at a
    time, so peak memory stays at one submodule). Below ZeRO-3 it is the plain state dict.
    """
    state: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            if is_main:
                for name, p in own:
                    state[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
        if is_main:
            for name, buf in sub.named_buffers(recurse=False):
                if buf is not None and name not in sub._non_persistent_buffers_set:
                    state[f"{prefix}.{name}" if prefix else name] = buf.detach().cpu().clone()
    return state if is_main else None


def export_hf(engine, hf_model: nn.Module, tokenizer, path: str | Path, is_main: bool) -> None:
    """Write `hf_model` (a PreTrainedModel inside `engine.module`) with the engine's weights.

    `hf_model` may be the engine's module itself or a submodule of it (e.g. the sequence
    classifier inside ScalarHeadModel); its keys are taken relative to it.
    """
    if not any(m is hf_model for m in engine.module.modules()):
        raise ValueError("hf_model is not part of the engine's module")
    state = gathered_state_dict(hf_model, is_main)
    if is_main:
        hf_model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)
    torch.distributed.barrier()
