"""The weight transport of rollout.placement separate: the training ranks' rank 0 and the
generation pool (the last G ranks of the launch, ds_rlhf/pool.py) over a process group of
their own, the bridge, made from the launch's rendezvous store (the pool never joins the
training ranks' world, so DeepSpeed and the coordinator see the trainers alone).

    bridge rank 0          = training rank 0: sends requests and weights, receives rows
    bridge ranks 1 .. G    = generation ranks 0 .. G-1

The weights go after every actor update, in buckets of rollout.weight_bucket_mb, tagged with
their version (the actor updates done) and checked on arrival: a transfer's checksum is the
sum of its bytes read as 32-bit words, exact and the same on every machine; a generation rank
takes the tag only once every bucket arrived and the checksum matched, and samples a request
only with the version the request names. Under ZeRO-3 the training ranks gather one bucket at
a time (no whole second copy on any of them); LoRA adapters are merged into a copy, as the
HybridEngine does for generation. Gloo carries the buckets (on GPUs through host memory).
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

BRIDGE_PREFIX = "ds_rlhf/bridge"
POOL_WORLD_PREFIX = "ds_rlhf/pool_world"  # the generation ranks' own group (vLLM in the pool)
CONNECT_TIMEOUT = timedelta(minutes=30)  # the pool and training rank 0 meeting (see Bridge)
_BRIDGES = [0]  # bridges this process opened: the key of the next one (runs of one launch)


def rendezvous_store(timeout: timedelta) -> dist.TCPStore:
    """A client of the launch's rendezvous store (MASTER_ADDR:MASTER_PORT, hosted by rank 0)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timeout, wait_for_workers=False)


class Bridge:
    """Training rank 0 (bridge rank 0) and the G generation ranks: objects and tensors."""

    def __init__(self, rank: int, size: int, timeout: timedelta):
        """`timeout` (distributed.timeout_minutes) bounds every operation; meeting, the pool
        waits for the training ranks to build their engines, which may take longer: up to
        CONNECT_TIMEOUT (or `timeout`, if longer)."""
        _BRIDGES[0] += 1  # every process of the launch opens its bridges in the same order
        self.rank, self.size = rank, size
        connect = max(timeout, CONNECT_TIMEOUT)
        self.store = rendezvous_store(connect)
        self.pg = dist.ProcessGroupGloo(
            dist.PrefixStore(f"{BRIDGE_PREFIX}/{_BRIDGES[0]}", self.store), rank, size, connect)
        self.timeout = timeout  # each operation's wait

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """From bridge rank 0 to all (in place, a CPU tensor)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait(self.timeout)
        return tensor

    def broadcast_object(self, obj=None):
        data = pickle.dumps(obj) if self.rank == 0 else b""
        size = self.broadcast(torch.tensor([len(data)], dtype=torch.long))
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else \
            torch.empty(int(size), dtype=torch.uint8)
        return pickle.loads(self.broadcast(buffer).numpy().tobytes())

    def send_object(self, obj, dst: int) -> None:
        data = pickle.dumps(obj)
        for tensor in (torch.tensor([len(data)], dtype=torch.long),
                       torch.frombuffer(bytearray(data), dtype=torch.uint8)):
            self.pg.send([tensor], dst, 0).wait(self.timeout)

    def recv_object(self, src: int):
        size = torch.empty(1, dtype=torch.long)
        self.pg.recv([size], src, 0).wait(self.timeout)
        buffer = torch.empty(int(size), dtype=torch.uint8)
        self.pg.recv([buffer], src, 0).wait(self.timeout)
        return pickle.loads(buffer.numpy().tobytes())


def checksum(data: torch.Tensor) -> int:
    """The sum of `data`'s bytes read as int32 words (zero padded): exact, order-free."""
    flat = data.reshape(-1).view(torch.uint8)
    if len(flat) % 4:  # a copy only then: buckets are usually whole words
        flat = torch.cat([flat, flat.new_zeros(-len(flat) % 4)])
    return int(flat.view(torch.int32).sum(dtype=torch.int64))  # no int64 copy of the bucket


@dataclass
class Transfer:
    """One transfer of the actor's weights: what the metrics report."""

    version: int
    bytes: int
    seconds: float
    checksum: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


def _full_shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def plan_buckets(named: list[tuple[str, nn.Parameter]], bucket_bytes: int
                 ) -> list[list[tuple[str, nn.Parameter]]]:
    """Consecutive parameters in buckets of about `bucket_bytes` (a larger one goes alone)."""
    buckets, size = [[]], 0
    for name, p in named:
        nbytes = _full_shape(p).numel() * p.element_size()
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, p))
        size += nbytes
    return [b for b in buckets if b]


def send_weights(bridge: Bridge | None, named: list[tuple[str, nn.Parameter]], version: int,
                 bucket_bytes: int,
                 gathered: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None
                 ) -> Transfer:
    """Every training rank (a collective under ZeRO-3: `gathered` makes a bucket's parameters
    whole on every rank); bridge rank 0 (`bridge` set) sends them."""
    start = time.perf_counter()
    buckets = plan_buckets(named, bucket_bytes)
    if bridge is not None:
        bridge.broadcast_object({"kind": "weights", "version": version, "buckets": [
            [(name, tuple(_full_shape(p)), p.dtype) for name, p in bucket] for bucket in buckets]})
    total, nbytes = 0, 0
    for bucket in buckets:
        with (gathered or (lambda _: nullcontext()))([p for _, p in bucket]):
            if bridge is None:
                continue
            flat = torch.cat([p.data.detach().reshape(-1).view(torch.uint8).cpu()
                              for _, p in bucket])
            total += checksum(flat)
            nbytes += len(flat)
            bridge.broadcast(flat)
    if bridge is not None:
        bridge.broadcast_object({"checksum": total})
    return Transfer(version, nbytes, time.perf_counter() - start, total)


def receive_weights(bridge: Bridge, model: nn.Module, header: dict) -> Transfer:
    """A generation rank: the buckets announced by `header` into `model`'s parameters (names
    as the actor's). Raises when a parameter is unknown or the checksum differs."""
    start = time.perf_counter()
    params = dict(model.named_parameters())
    total, nbytes = 0, 0
    for bucket in header["buckets"]:
        size = sum(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
                   for _, shape, dtype in bucket)
        flat = bridge.broadcast(torch.empty(size, dtype=torch.uint8))
        total += checksum(flat)
        nbytes += size
        offset = 0
        with torch.no_grad():
            for name, shape, dtype in bucket:
                if name not in params:
                    raise RuntimeError(f"weight transfer: the actor's parameter {name} is not "
                                       "in the generation rank's model")
                n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
                value = flat[offset:offset + n].view(dtype).view(shape)
                params[name].data.copy_(value)
                offset += n
    sent = bridge.broadcast_object()["checksum"]
    if sent != total:
        raise RuntimeError(f"weight transfer of version {header['version']}: checksum "
                           f"{total} != {sent} sent; the weights were damaged on the way")
    return Transfer(header["version"], nbytes, time.perf_counter() - start, total)

