"""The HybridEngine: switches the actor between generation and ZeRO training.

    with hybrid.generation_mode() as gen:
        response_ids, response_mask = generation.generate(gen.model, ..., synced=gen.synced)

ZeRO 0-2 keep full weights on every rank and add no forward hooks, so generation runs on the
training module itself. Under ZeRO-3 entering the mode gathers the partitioned weights once,
module by module, into a plain copy of the model that has no ZeRO hooks; generation then runs
with a KV cache entirely on the local rank. No collective runs inside generation, so ranks may
stop at different lengths without hanging. Leaving the mode frees the copy.

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

import deepspeed
import torch
import transformers
from torch import nn


@dataclass
class GenerationModel:
    model: nn.Module  # call this for generation (eval mode, no grad needed)
    synced: Callable[[bool], bool] | None  # pass to generation.generate


def _plain_copy(module: nn.Module, device: torch.device) -> nn.Module:
    """A hook-free copy of a ZeRO-3 partitioned HF model, gathered one submodule at a time."""
    dtype = next(module.parameters()).dtype
    with torch.device("meta"):  # no memory and no random init for weights we overwrite
        copy = transformers.AutoModelForCausalLM.from_config(module.config, dtype=dtype)
    copy.to_empty(device=device)
    sources = dict(module.named_modules())
    # One coalesced all-gather of every partitioned parameter: the copy needs all of them
    # anyway, and one collective is far cheaper than one per submodule.
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        for name, target in copy.named_modules():
            source = sources[name]
            for (pname, p), q in zip(source.named_parameters(recurse=False),
                                     target.parameters(recurse=False), strict=True):
                assert p.shape == q.shape, f"{name}.{pname}: {p.shape} vs {q.shape}"
                q.data.copy_(p.data)
            for bname, buf in source.named_buffers(recurse=False):
                if buf is not None:
                    getattr(target, bname).data.copy_(buf.data)
            # Plain tensor attributes (e.g. rotary embeddings' original_inv_freq) stay on meta.
            for key, value in list(vars(target).items()):
                if isinstance(value, torch.Tensor) and value.is_meta:
                    setattr(target, key, getattr(source, key).to(device))
    return copy


class HybridEngine:
    def __init__(self, engine, gather_weights: bool, synced: Callable[[bool], bool]):
        self.engine = engine  # the actor's DeepSpeedEngine
        self.gather_weights = gather_weights
        self._synced = synced  # all-reduce "all ranks done", for the ZeRO-3 fallback
        self.switch_seconds = 0.0  # entering + leaving generation mode, last time

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    @contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """The whole model on this rank: the module itself, or under ZeRO-3 a gathered copy."""
        module = self.engine.module
        model = _plain_copy(module, self.engine.device) if self.zero3 else module
        try:
            yield model
        finally:
            if model is not module:
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

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
                    yield GenerationModel(model, None)
                    start = time.perf_counter()
        finally:
            module.train()
            self.switch_seconds += time.perf_counter() - start
