"""Whole-model weights out of an engine: ZeRO-3 partitions gathered, LoRA adapters merged.

`plain_parameters` names the weights as in the plain model and pairs LoRA layers with their
adapters; the HybridEngine's generation copy (which gathers them in bulk) and the HF-format
export (`merged_weights`, save_pretrained + tokenizer) both use it, so the two always see the
same weights. Exported reward models and critics get a pad token that is not EOS (see
classifier_tokenizer), so HF's standard pooled forward scores the token training scored.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import deepspeed
import torch
from torch import nn

ADAPTER = "default"  # peft's name for the one adapter we inject


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


class Lora(NamedTuple):
    """A LoRA layer's adapter, merged as W = W_base + scaling * B @ A (Hu et al. 2021, eq. 3)."""

    a: nn.Parameter  # lora_A weight [rank, in]
    b: nn.Parameter  # lora_B weight [out, rank]
    scaling: float  # alpha / rank
    fan_in_fan_out: bool  # peft's flag for Conv1D (GPT-2 family), whose W is [in, out]

    def delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """scaling * B @ A in float32 from the full A and B, laid out like the base weight."""
        delta = (b.float() @ a.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta


def plain_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, Lora | None]]:
    """(name in the plain, adapter-free model, parameter, None or the LoRA adapter to merge
    into it) for every parameter; under ZeRO-3 the parameters are partitioned."""
    lora = [name for name, m in module.named_modules() if is_lora_layer(m)]
    for prefix, sub in module.named_modules():
        if any(prefix.startswith(f"{name}.") for name in lora):
            continue  # the insides of a LoRA layer are merged below

        def key(name: str, prefix: str = prefix) -> str:
            return f"{prefix}.{name}" if prefix else name

        if is_lora_layer(sub):
            base = sub.base_layer
            yield key("weight"), base.weight, Lora(
                sub.lora_A[ADAPTER].weight, sub.lora_B[ADAPTER].weight, sub.scaling[ADAPTER],
                bool(getattr(sub, "fan_in_fan_out", False)))
            if base.bias is not None:
                yield key("bias"), base.bias, None
            continue
        for name, p in sub.named_parameters(recurse=False):
            yield key(name), p, None


def merged_parameters(module: nn.Module, tied_once: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter, named as in the plain (adapter-free) model:
    W = W_base + scaling * B @ A for LoRA layers (Hu et al. 2021, eq. 3). `tied_once`: a
    parameter with two names (tied embeddings) comes once, under its first name.

    Gathers one parameter (with its adapters) at a time, so every rank must run the iterator
    to its end (the gathers are collective) and copy each tensor before asking for the next.
    """
    seen = set()
    for name, p, lora in plain_parameters(module):
        if tied_once and id(p) in seen:
            continue
        seen.add(id(p))
        with deepspeed.zero.GatheredParameters([p, *(lora[:2] if lora else ())],
                                               modifier_rank=None):
            if lora is None:
                yield name, p.data
                continue
            yield name, (p.data.float() + lora.delta(lora.a.data, lora.b.data)).to(p.dtype)


def merged_weights(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """merged_parameters, then every persistent buffer: a whole state dict. Tied weights come
    once (the input embedding's name): save_pretrained would store two copies of the
    separately gathered tensors, and from_pretrained ties the LM head back from the config."""
    yield from merged_parameters(module, tied_once=True)
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
        config, saved_pad = hf_model.config, hf_model.config.pad_token_id
        if hasattr(hf_model, "score"):  # a sequence classifier: reward model or critic
            tokenizer = classifier_tokenizer(tokenizer, config.vocab_size)
            config.pad_token_id = tokenizer.pad_token_id
        try:
            hf_model.save_pretrained(path, state_dict=state)
        finally:
            config.pad_token_id = saved_pad  # the training model keeps its config
        tokenizer.save_pretrained(path)
    torch.distributed.barrier()


def classifier_tokenizer(tokenizer, vocab_size: int):
    """The tokenizer to ship with an exported reward model or critic.

    HF's ForSequenceClassification scores the rightmost token that is not
    `config.pad_token_id`, whatever the attention_mask says. With pad == EOS (what
    models.load_tokenizer sets when a tokenizer has no pad) a batch padded the standard way
    would be scored one token before the EOS, where training scores the EOS (found from
    lengths). So the export pads with a token that is not EOS: unk or another special token,
    else a new "<pad>" when the embedding has a free row for it (vocab_size > len(tokenizer)).
    The training tokenizer is left as it is; a copy is returned.
    """
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    out = copy.deepcopy(tokenizer)
    specials = [out.unk_token] + list(out.all_special_tokens)
    spare = [t for t in specials if t is not None and t != out.eos_token]
    if spare:
        out.pad_token = spare[0]
    elif len(out) < vocab_size:
        out.add_special_tokens({"pad_token": "<pad>"})
    else:  # no token to spare and no free row: keep pad == EOS, and say what it means
        print("export: the pad token stays EOS (the tokenizer has no other special token "
              "and the embedding no free row): HF's ForSequenceClassification would score a "
              "padded batch one token before the EOS; score such exports one row at a time",
              flush=True)
    return out
