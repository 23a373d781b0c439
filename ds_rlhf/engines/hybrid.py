"""The HybridEngine: switches the actor between generation and ZeRO training.

    with hybrid.generation_mode() as gen:
        response_ids, response_mask = generation.generate(gen.model, ..., synced=gen.synced)

ZeRO 0-2 keep full weights on every rank and add no forward hooks, so generation runs on the
training module itself. Under ZeRO-3 (or with LoRA adapters) entering the mode gathers the
partitioned weights once, module by module, into a plain copy of the model that has no ZeRO
hooks and has the adapters merged; generation then runs with a KV cache entirely on the local
rank. No collective runs inside generation, so ranks may stop at different lengths without
hanging. Leaving the mode frees the copy; the training weights are never touched.

`gather_weights=False` (models too big to gather) generates through the ZeRO-3 module itself,
whose every forward all-gathers layers: then all ranks must run the same number of forwards,
which `synced` (an all-reduce of "done") guarantees.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from ds_rlhf.engines.export import is_lora_layer, merged_weights


@dataclass
class GenerationModel:
    model: nn.Module  # call this for generation (eval mode, no grad needed)
    synced: Callable[[bool], bool] | None  # pass to generation.generate
    decode: Callable | None = None  # compiled decode forward, pass to generation.generate


def _plain_copy(module: nn.Module, device: torch.device, into: nn.Module | None = None
                ) -> nn.Module:
    """A hook-free copy of the model: ZeRO-3 weights gathered, LoRA adapters merged.
    `into`: a copy made earlier, refilled in place (no allocation)."""
    copy = into
    if copy is None:
        dtype = next(module.parameters()).dtype
        with torch.device("meta"):  # no memory and no random init for weights we overwrite
            copy = transformers.AutoModelForCausalLM.from_config(module.config, dtype=dtype)
        copy.to_empty(device=device)
        copy.tie_weights()  # to_empty gives tied weights (embeddings, LM head) separate storage
    # Tied weights appear under each of their names (filled twice with the same values).
    targets = {**dict(copy.named_parameters(remove_duplicate=False)),
               **dict(copy.named_buffers())}
    for name, tensor in merged_weights(module):
        targets[name].data.copy_(tensor)
    # What merged_weights does not carry: non-persistent buffers (rotary inv_freq) and plain
    # tensor attributes (original_inv_freq), which to_empty left uninitialised or on meta.
    sources = dict(module.named_modules())
    for name, target in copy.named_modules():
        source = sources.get(name)
        if source is None:
            continue
        for bname in target._non_persistent_buffers_set:
            getattr(target, bname).data.copy_(getattr(source, bname).data)
        for key, value in list(vars(target).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(target, key, getattr(source, key).to(device))
    return copy


class HybridEngine:
    def __init__(self, engine, gather_weights: bool, synced: Callable[[bool], bool],
                 reuse_copy: bool = False, compile: bool = False):
        self.engine = engine  # the actor's DeepSpeedEngine
        self.gather_weights = gather_weights
        self._synced = synced  # all-reduce "all ranks done", for the ZeRO-3 fallback
        self.reuse_copy = reuse_copy  # keep the plain copy between steps, refill it
        self.compile = compile  # torch.compile the decode forward, once per kept model
        self._copy: nn.Module | None = None
        self._compiled: tuple[nn.Module, Callable] | None = None  # (model, compiled forward)
        self.switch_seconds = 0.0  # entering + leaving generation mode, last time

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    @property
    def lora(self) -> bool:
        return any(is_lora_layer(m) for m in self.engine.module.modules())

    @contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """The whole model on this rank: the module itself, or under ZeRO-3 a gathered copy."""
        module = self.engine.module
        # ZeRO 0-2 hold full weights and add no forward hooks: the module itself will do,
        # unless LoRA adapters must be merged (merging into the training weights in place and
        # unmerging after would drift them by round-off, in bf16 noticeably).
        copy = self.zero3 or self.lora
        model = _plain_copy(module, self.engine.device, into=self._copy) if copy else module
        if copy and self.reuse_copy:
            self._copy = model
        try:
            yield model
        finally:
            if model is not module and not self.reuse_copy:
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _decode(self, model: nn.Module) -> Callable | None:
        """The compiled decode forward of `model`, compiled once while the model is kept."""
        if not self.compile:
            return None
        if self._compiled is None or self._compiled[0] is not model:
            self._compiled = (model, torch.compile(model, mode="reduce-overhead"))
        return self._compiled[1]

    @contextmanager
    def generation_mode(self) -> Iterator[GenerationModel]:
        """Generation inside; `switch_seconds` is then the time spent entering and leaving."""
        start = time.perf_counter()
        module = self.engine.module
        module.eval()
        try:
            if self.zero3 and not self.gather_weights:
                self.switch_seconds = time.perf_counter() - start
                yield GenerationModel(module, self._synced)
                start = time.perf_counter()
            else:
                with self.full_model() as model:
                    model.eval()
                    self.switch_seconds = time.perf_counter() - start
                    yield GenerationModel(model, None, self._decode(model))
                    start = time.perf_counter()
        finally:
            module.train()
            self.switch_seconds += time.perf_counter() - start
