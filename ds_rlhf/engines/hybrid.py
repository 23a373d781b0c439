"""The HybridEngine: switches the actor between generation and ZeRO training.

    with hybrid.generation_mode() as gen:
        response_ids, response_mask = generation.generate(gen.model, ..., synced=gen.synced)

ZeRO 0-2 keep full weights on every rank and add no forward hooks, so generation runs on the
training module itself. Under ZeRO-3 (or with LoRA adapters) generation runs on a plain copy
of the model that has no ZeRO hooks and has the adapters merged; generation then runs with a
KV cache entirely on the local rank. No collective runs inside generation, so ranks may stop at
different lengths without hanging. The training weights are never touched.

The copy is built once (its module skeleton, buffers and rotary tables) and kept. Its
parameters are views into one flat buffer per entry into generation mode: entering allocates
it (or reuses it, `reuse_copy`) and fills it from the ZeRO-3 partitions: a parameter of
`GATHER_DIRECT` elements or more with one all-gather straight into its place, smaller ones
together in all-gathers of up to `GATHER_BUCKET` elements, copied out, and the ones ZeRO-3
keeps whole on every rank (under stage3_param_persistence_threshold) copied without a
collective; then LoRA adapters are merged in place. Leaving drops the buffer (no garbage
collection, no cache flush), so between steps the copy holds no weights. Memory held
during training:
  - ZeRO 0-2 without LoRA: nothing (no copy);
  - ZeRO-3 or LoRA: the skeleton only (buffers: rotary tables, a few KB to MB);
  - with `reuse_copy`: also the flat buffer, a whole model in the actor's dtype.
During generation: the flat buffer, plus one bucket of gathered partitions while it fills.
Tied input and output embeddings stay tied in the copy: one storage for both.

`gather_weights=False` (models too big to gather) generates through the ZeRO-3 module itself,
whose every forward all-gathers layers: then all ranks must run the same number of forwards,
which `synced` (an all-reduce of "done") guarantees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import transformers
from torch import nn

from ds_rlhf.engines.export import Lora, is_lora_layer, plain_parameters

# torch's own F.linear (a builtin). DeepSpeed's ZeRO-3 may replace torch.nn.functional.linear
# process-wide with its memory-efficient linear; `linear_for` picks one per pass.
TORCH_LINEAR = torch._C._nn.linear

GATHER_BUCKET = 2**26  # elements of full parameters per all-gather (128 MiB in bf16)
GATHER_DIRECT = 2**20  # a parameter this large is gathered alone, straight into place


@dataclass
class GenerationModel:
    model: nn.Module  # call this for generation (eval mode, no grad needed)
    synced: Callable[[bool], bool] | None  # pass to generation.generate
    decode: Callable | None = None  # compiled decode forward, pass to generation.generate


@dataclass
class _Slot:
    """One parameter of the copy and where its value comes from."""

    target: nn.Parameter  # the copy's parameter (a view into the flat buffer while filled)
    source: nn.Parameter  # the training module's (a ZeRO-3 partition or a full tensor)
    offset: int  # into the flat buffer
    size: int  # elements reserved there: the padded size of a ZeRO-3 parameter's partitions
    shape: torch.Size  # of the full parameter (the target is empty while the copy is dropped)
    lora: Lora | None = None  # an adapter merged into the weight


def _is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def _is_persistent(p: nn.Parameter) -> bool:
    """A ZeRO-3 parameter held whole on every rank, and whole now."""
    return getattr(p, "ds_persist", False) and p.numel() == p.ds_numel


def _full_shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if _is_partitioned(p) else p.shape


def _build_copy(module: nn.Module, device: torch.device) -> tuple[nn.Module, list[_Slot], int]:
    """The plain model's skeleton (no weight storage yet), its slots and their total size."""
    dtype = next(module.parameters()).dtype
    with torch.device("meta"):  # no memory and no random init for weights we overwrite
        copy = transformers.AutoModelForCausalLM.from_config(module.config, dtype=dtype)
    copy.to_empty(device=device)
    copy.tie_weights()  # to_empty gave tied modules separate tensors: one storage again
    copy.requires_grad_(False)
    copy.eval()
    # Buffers and plain tensor attributes (rotary inv_freq, original_inv_freq) are not
    # trained: copied once. to_empty left them uninitialised or on meta.
    sources = dict(module.named_modules())
    for name, target in copy.named_modules():
        source = sources.get(name)
        if source is None:
            continue
        for bname, buf in target.named_buffers(recurse=False):
            if buf is not None:
                buf.copy_(getattr(source, bname).data)
        for key, value in list(vars(target).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(target, key, getattr(source, key).to(device))
    targets = dict(copy.named_parameters())  # tied parameters appear once
    slots, offset, seen, skipped = [], 0, set(), []
    for name, source, lora in plain_parameters(module):
        target = targets.get(name)
        if target is None or id(target) in seen:
            skipped.append((name, source))  # the second name of a tied parameter
            continue
        if _full_shape(source) != target.shape:
            raise RuntimeError(f"generation copy: {name} has shape {tuple(target.shape)}, the "
                               f"training module {tuple(_full_shape(source))}")
        seen.add(id(target))
        # A ZeRO-3 parameter gets room for all ranks' padded partitions, so a large one is
        # gathered straight into place (no copy).
        size = source.ds_tensor.numel() * dist.get_world_size(source.ds_process_group) \
            if _is_partitioned(source) else target.numel()
        slots.append(_Slot(target, source, offset, size, target.shape, lora))
        offset += size
    missing = [n for n, p in targets.items() if id(p) not in seen]
    used = {id(slot.source) for slot in slots}
    untied = [n for n, source in skipped if id(source) not in used]  # tied in one model only
    if missing or untied:
        raise RuntimeError(f"generation copy: no weights for {missing[:5]}, or weights tied in "
                           f"the copy but not in the training module: {untied[:5]}")
    return copy, slots, offset


def _gather_into(pairs: list[tuple[nn.Parameter, torch.Tensor]], device: torch.device) -> None:
    """Write each ZeRO-3 parameter's full value at the start of its 1-D destination. One of
    GATHER_DIRECT elements or more whose destination holds all ranks' padded partitions is
    gathered straight into it; smaller ones go together, up to GATHER_BUCKET elements' worth
    in one all-gather, and are copied out of it."""
    bucket, size = [], 0
    for source, dest in pairs:
        group = source.ds_process_group
        padded = source.ds_tensor.numel() * dist.get_world_size(group)
        if source.ds_numel >= GATHER_DIRECT and dest.numel() == padded:
            dist.all_gather_into_tensor(dest, source.ds_tensor.data.to(device), group=group)
            continue
        bucket.append((source, dest))
        size += source.ds_numel
        if size >= GATHER_BUCKET:
            _gather_bucket(bucket, device)
            bucket, size = [], 0
    if bucket:
        _gather_bucket(bucket, device)


def _gather_bucket(pairs: list[tuple[nn.Parameter, torch.Tensor]], device: torch.device) -> None:
    # Rank r holds elements [r * n, (r + 1) * n) of each flattened (padded) parameter, n its
    # partition size; the all-gather puts the ranks' concatenated partitions side by side.
    group = pairs[0][0].ds_process_group
    world = dist.get_world_size(group)
    local = torch.cat([s.ds_tensor.data.to(device).reshape(-1) for s, _ in pairs])
    gathered = torch.empty(world * local.numel(), dtype=local.dtype, device=device)
    dist.all_gather_into_tensor(gathered, local, group=group)
    gathered = gathered.view(world, local.numel())
    offset = 0
    for source, dest in pairs:
        n = source.ds_tensor.numel()
        dest[:source.ds_numel].copy_(gathered[:, offset:offset + n].reshape(-1)[:source.ds_numel])
        offset += n


def _zero3_linear(engine) -> bool:
    """Whether `engine` wants DeepSpeed's ZeRO-3 linear in its training passes."""
    if engine.zero_optimization_stage() != 3:
        return False
    return engine._config.zero_config.memory_efficient_linear


@contextmanager
def linear_for(engine, grad: bool) -> Iterator[None]:
    """torch.nn.functional.linear inside: DeepSpeed's ZeRO-3 memory-efficient linear for a
    training pass (`grad`) of a ZeRO-3 engine whose config asks for it
    (zero_optimization.memory_efficient_linear, DeepSpeed's default), torch's plain linear
    for every other pass (no-grad scoring, generation, ZeRO 0-2 training).

    DeepSpeed installs its linear for the whole process as soon as one ZeRO-3 engine is
    built, so every later linear, of any engine or of the generation copy, went through an
    autograd Function: a third more time per decode step on small models. Its backward
    re-gathers a weight that ZeRO-3 released, which only a training pass needs. The two give
    the same values (the forward is the same matmul and bias add).
    """
    linear = TORCH_LINEAR
    if grad and _zero3_linear(engine):
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        linear = zero3_linear_wrap
    previous = torch.nn.functional.linear
    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = previous


@contextmanager
def keep_prefetch_trace(engine) -> Iterator[None]:
    """No-grad forwards (scoring, generation through the module) of a trained ZeRO-3 engine
    that leave its prefetch trace to training, and its weights released.

    DeepSpeed ZeRO-3 keeps one trace of the sub-module order per engine and prefetches along
    it. A trained engine's trace must be forward + backward; no-grad forwards that find no
    trace record a forward-only one, which the next backward invalidates, so every step
    re-recorded it: per-layer all-gathers without prefetch and a collective check of the
    order, which made the actor's logprobs and the critic's values about 2x the frozen
    models' identical forwards. What such forwards recorded is dropped here, so training
    records the whole trace, which later no-grad forwards follow as a prefix. The weights
    they gathered are released after: along a forward + backward trace they would otherwise
    stay gathered until the next backward, a whole model held through the other roles' work.
    Only those: the parameters ZeRO-3 keeps whole on every rank (`ds_persist`) stay, as after
    an optimizer step (DeepSpeed's `empty_partition_cache` released them too, and the training
    forward then re-gathered them layer by layer, every step).
    """
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", None)  # trained ZeRO-3 engines only
    coordinator = offload.get_param_coordinator() if offload is not None else None
    untraced = coordinator is not None and coordinator.is_invalid_trace()
    try:
        yield
    finally:
        if coordinator is not None:
            if untraced and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # recorded by no-grad forwards: forward only
            _release_gathered(coordinator, offload.module)


def _release_gathered(coordinator, module: nn.Module) -> None:
    """Partition `module`'s gathered ZeRO-3 parameters but the persistent ones."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    coordinator._clean_inflight_param_registry()  # prefetches in flight land first
    for p in module.parameters():
        if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist:
            p.ds_active_sub_modules.clear()
            p.partition()


class HybridEngine:
    def __init__(self, engine, gather_weights: bool, synced: Callable[[bool], bool],
                 reuse_copy: bool = False, compile: bool = False):
        self.engine = engine  # the actor's DeepSpeedEngine
        self.gather_weights = gather_weights
        self._synced = synced  # all-reduce "all ranks done", for the ZeRO-3 fallback
        self.reuse_copy = reuse_copy  # keep the copy's weights between steps, refill them
        self.compile = compile  # torch.compile the decode forward, once per kept model
        self._copy: tuple[nn.Module, list[_Slot], int] | None = None  # skeleton, slots, numel
        self._flat: torch.Tensor | None = None  # the copy's weights, while held
        self._compiled: Callable | None = None  # compiled forward of the held weights
        self.switch_seconds = 0.0  # entering + leaving generation mode, last time

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    @property
    def lora(self) -> bool:
        return any(is_lora_layer(m) for m in self.engine.module.modules())

    def _fill(self) -> nn.Module:
        """The copy with the training weights in it: gathered, adapters merged."""
        if self._copy is None:
            self._copy = _build_copy(self.engine.module, self.engine.device)
        model, slots, numel = self._copy
        device = self.engine.device
        if self._flat is None:
            self._flat = torch.empty(numel, dtype=slots[0].target.dtype, device=device)
        adapters = {}  # id(A or B) -> its full value, for the merge
        pairs = []  # (source, 1-D destination)
        for slot in slots:
            region = self._flat[slot.offset:slot.offset + slot.size]
            slot.target.data = region[:slot.shape.numel()].view(slot.shape)
            pairs.append((slot.source, region))
            for p in slot.lora[:2] if slot.lora else ():
                adapters[id(p)] = torch.empty(_full_shape(p), dtype=p.dtype, device=device)
                pairs.append((p, adapters[id(p)].view(-1)))
        # ZeRO-3 keeps parameters under stage3_param_persistence_threshold whole on every
        # rank (re-gathered after each optimizer step): copied, like ZeRO 0-2 weights.
        whole = [(s, d) for s, d in pairs if not _is_partitioned(s) or _is_persistent(s)]
        _gather_into([(s, d) for s, d in pairs if _is_partitioned(s) and not _is_persistent(s)],
                     device)
        with torch.no_grad():
            for source, dest in whole:
                dest[:source.numel()].copy_(source.data.reshape(-1))
            for slot in slots:
                if slot.lora:  # W = W_base + scaling * B @ A (Hu et al. 2021, eq. 3)
                    a, b = slot.lora.a, slot.lora.b
                    a, b = adapters.get(id(a), a.data), adapters.get(id(b), b.data)
                    w = slot.target.data
                    w.copy_((w.float() + slot.lora.delta(a, b)).to(w.dtype))
        return model

    def _drop(self) -> None:
        """Free the copy's weights: its parameters point at an empty tensor."""
        model, slots, _ = self._copy
        empty = self._flat.new_empty(0)
        for slot in slots:
            slot.target.data = empty
        self._flat = None
        self._compiled = None  # compiled against the storage just freed

    @contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """The whole model on this rank: the module itself, or under ZeRO-3 a gathered copy."""
        module = self.engine.module
        # ZeRO 0-2 hold full weights and add no forward hooks: the module itself will do,
        # unless LoRA adapters must be merged (merging into the training weights in place and
        # unmerging after would drift them by round-off, in bf16 noticeably).
        if not (self.zero3 or self.lora):
            yield module
            return
        try:
            yield self._fill()
        finally:
            if not self.reuse_copy:
                self._drop()

    def _decode(self, model: nn.Module) -> Callable | None:
        """The compiled decode forward of `model`, compiled once while its weights are kept."""
        if not self.compile:
            return None
        if self._compiled is None:
            self._compiled = torch.compile(model, mode="reduce-overhead")
        return self._compiled

    @contextmanager
    def generation_mode(self) -> Iterator[GenerationModel]:
        """Generation inside; `switch_seconds` is then the time spent entering and leaving."""
        start = time.perf_counter()
        module = self.engine.module
        module.eval()
        try:
            with linear_for(self.engine, grad=False), self._generation_model() as gen:
                self.switch_seconds = time.perf_counter() - start
                yield gen
                start = time.perf_counter()
        finally:
            module.train()
            self.switch_seconds += time.perf_counter() - start

    @contextmanager
    def _generation_model(self) -> Iterator[GenerationModel]:
        if self.zero3 and not self.gather_weights:
            with keep_prefetch_trace(self.engine):
                yield GenerationModel(self.engine.module, self._synced)
        else:
            with self.full_model() as model:
                yield GenerationModel(model, None, self._decode(model))
