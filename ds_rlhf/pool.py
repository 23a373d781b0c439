"""The generation pool of rollout.placement separate: the last G ranks of the launch sample
the rollouts, the first W - G train (ARCHITECTURE.md, "The schedule").

    training rank 0                          generation ranks 0 .. G-1
    ─ weights W_v (after each update) ──►    load every bucket, check the checksum, tag v
    ─ rows of step s, with version v  ──►    sample their share with W_v, step s's seeds
    ◄── the rows of step s ────────────────  (in the order of the request)

Which weights sample a step's rows and with which seeds is the schedule's (ds_rlhf/
schedule.py), the same as colocated: the rows do not depend on the placement or on G. The
pool holds a plain copy of the actor (no optimizer, no ZeRO) that receives the weights, and
samples with the run's generation.backend: hf, the sampler of `Actor.generate`; vllm, a vLLM
engine loaded from that copy after every complete transfer, the G generation ranks its process
group (tensor parallel over consecutive ranks, generation.vllm.tensor_parallel_size). The
weight transport is engines/transport.py. `PoolClient` is the training ranks' end, `serve` a
generation rank's.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from datetime import timedelta

import torch

from ds_rlhf import models
from ds_rlhf.config import PPORunConfig
from ds_rlhf.coordinator import collective_timeout, set_phase, start_pool, watch_peers
from ds_rlhf.data import collate_left
from ds_rlhf.engines.hybrid import GenerationModel
from ds_rlhf.engines.roles import sample_responses
from ds_rlhf.engines.transport import Bridge, Transfer, receive_weights, send_weights
from ds_rlhf.schedule import Row, to_rows


def share(num_prompts: int, parts: int, index: int) -> slice:
    """The prompts of part `index` of `parts`: contiguous, as equal as they come."""
    return slice(num_prompts * index // parts, num_prompts * (index + 1) // parts)


class PoolClient:
    """The training ranks' end of the pool. Every training rank calls `submit` and `collect`
    in the same order (the weights' gather under ZeRO-3 and the rows' scatter are
    collectives); training rank 0 alone talks to the pool."""

    def __init__(self, cfg: PPORunConfig, coord, actor, prompt_ids: list[list[int]]):
        self.coord, self.actor, self.prompt_ids = coord, actor, prompt_ids
        self.size = cfg.rollout.generation_ranks
        self.n = cfg.generation.n_samples_per_prompt
        self.bucket_bytes = int(cfg.rollout.weight_bucket_mb * 2**20)
        set_phase("start (the generation pool connects)")
        self.bridge = Bridge(0, self.size + 1, collective_timeout()) if coord.is_main else None
        self.version: int | None = None  # of the weights the pool holds
        self.transfer: Transfer | None = None  # the last one
        # for the step's timing (ppo_step reads and resets them): seconds this rank waited
        # for rows in `collect`, and on rank 0 the pool's seconds for the rows collected
        # last (generating them, waiting for a request before, loading weights before)
        self.wait_seconds = 0.0
        self.pool_seconds: dict[str, float] | None = None

    def send_weights(self, version: int) -> None:
        """The actor as it is now (W_version) to every generation rank."""
        engine = self.actor.engine
        if self.actor.hybrid.lora:  # merged into the HybridEngine's copy, as for generation
            with self.actor.hybrid.full_model() as model:
                self.transfer = send_weights(self.bridge, list(model.named_parameters()),
                                             version, self.bucket_bytes)
        else:
            import deepspeed

            zero3 = engine.zero_optimization_stage() == 3
            self.transfer = send_weights(
                self.bridge, list(engine.module.named_parameters()), version,
                self.bucket_bytes,
                (lambda ps: deepspeed.zero.GatheredParameters(ps)) if zero3 else None)
        self.version = version

    def submit(self, step: int, version: int, prompt_index: torch.Tensor) -> None:
        """Ask for the rows of `step` (the global batch `prompt_index`, n samples each),
        sampled by W_version, which is the actor now."""
        if self.version != version:
            self.send_weights(version)
        if self.bridge is None:
            return
        rows = prompt_index.repeat_interleave(self.n)
        self.bridge.broadcast_object({
            "kind": "rows", "step": step, "version": version,
            "eos_token_id": self.actor.eos_token_id,  # the actor's (bench: a set of ids)
            "prompt_ids": [self.prompt_ids[i] for i in rows.tolist()],
            "prompt_index": rows, "sample_index": torch.arange(self.n).repeat(len(prompt_index))})

    def collect(self, step: int) -> list[Row]:
        """This rank's share of the rows of `step` (its contiguous part, as colocated)."""
        parts, start = None, time.perf_counter()
        if self.bridge is not None:
            rows, seconds = [], []
            for src in range(1, self.size + 1):
                made_for, part, pool_seconds = self.bridge.recv_object(src)
                if made_for != step:
                    raise RuntimeError(f"generation rank {src - 1} sent the rows of step "
                                       f"{made_for}, not {step}")
                rows += part
                seconds.append(pool_seconds)
            # the slowest generation rank's: the pool's time for these rows
            self.pool_seconds = {k: max(s[k] for s in seconds) for k in seconds[0]}
            num, world = len(rows) // self.n, self.coord.world_size
            shares = [share(num, world, r) for r in range(world)]  # equal: derive_sizes
            parts = [rows[p.start * self.n:p.stop * self.n] for p in shares]
        mine = self.coord.scatter(parts)
        self.wait_seconds += time.perf_counter() - start
        return mine

    def close(self) -> None:
        """The run is over: the generation ranks leave their loop."""
        if self.bridge is not None:
            self.bridge.broadcast_object({"kind": "stop"})


def serve(cfg: PPORunConfig, index: int, tokenizer) -> None:
    """Generation rank `index`: sample what training rank 0 asks for until it says stop."""
    store = start_pool(cfg.distributed.timeout_minutes)
    threading.Thread(target=watch_peers, args=(store, -1), daemon=True).start()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    set_phase("pool: building the actor's copy")
    model = models.build_causal_lm(cfg.actor.model, "actor", cfg.actor.dtype, cfg.seed)
    model = model.to(device).eval()
    size = cfg.rollout.generation_ranks
    vllm = _vllm_engine(cfg, index, model, tokenizer) if cfg.generation.backend == "vllm" \
        else None
    bridge = Bridge(index + 1, size + 1, collective_timeout())
    version = None
    pad = tokenizer.pad_token_id
    gen = GenerationModel(model, None, None)
    idle_s = receive_s = 0.0  # since the last rows went back: waiting, loading weights
    while True:
        set_phase(f"pool: waiting for training rank 0 (weights {version})")
        start = time.perf_counter()
        message = bridge.broadcast_object()
        idle_s += time.perf_counter() - start
        if message["kind"] == "stop":
            return
        if message["kind"] == "weights":
            set_phase(f"pool: receiving weights {message['version']}")
            start = time.perf_counter()
            transfer = receive_weights(bridge, model, message)
            if vllm is not None:  # complete and checked: now vLLM's
                vllm.load_weights()
            version, receive_s = transfer.version, receive_s + time.perf_counter() - start
            continue
        step = message["step"]
        if message["version"] != version:
            raise RuntimeError(f"generation rank {index}: asked for step {step} with weights "
                               f"{message['version']}, holds {version}")
        set_phase(f"pool: step {step} generate")
        num = len(message["prompt_ids"]) // cfg.generation.n_samples_per_prompt
        n = cfg.generation.n_samples_per_prompt
        mine = share(num, size, index)
        rows = slice(mine.start * n, mine.stop * n)
        prompt_ids, prompt_mask = collate_left(message["prompt_ids"][rows], pad)
        start = time.perf_counter()
        if vllm is not None:
            vllm.eos_token_id = message["eos_token_id"]
            rollout = vllm.generate(prompt_ids, prompt_mask, message["prompt_index"][rows],
                                    step, sample_index=message["sample_index"][rows])
        else:
            rollout = sample_responses(gen, cfg.generation, device, prompt_ids, prompt_mask,
                                       message["prompt_index"][rows], step, cfg.seed,
                                       message["eos_token_id"], pad,
                                       sample_index=message["sample_index"][rows])
        seconds = {"generate": time.perf_counter() - start, "idle": idle_s,
                   "receive_weights": receive_s}
        bridge.send_object((step, to_rows(rollout, None), seconds), 0)
        idle_s = receive_s = 0.0



def _vllm_engine(cfg: PPORunConfig, index: int, model, tokenizer):
    """generation.backend vllm: the pool's vLLM engine, built from the actor's copy `model`,
    its process group the G generation ranks (a default group of their own, from the
    launch's rendezvous store: this process never joins the training ranks' world). Its
    weights are the copy's from the first transfer on."""
    import torch.distributed as dist

    from ds_rlhf.engines.transport import POOL_WORLD_PREFIX, rendezvous_store
    from ds_rlhf.engines.vllm_backend import VllmGenerator
    from ds_rlhf.trainers.ppo import vllm_max_model_len

    set_phase("pool: building the vLLM engine")
    if not dist.is_initialized():  # once per process (bench: several runs share it)
        timeout = timedelta(minutes=cfg.distributed.timeout_minutes)
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", rank=index,
            world_size=cfg.rollout.generation_ranks, timeout=timeout,
            store=dist.PrefixStore(POOL_WORLD_PREFIX, rendezvous_store(timeout)))
    with _environ(RANK=str(index)):  # vLLM's external launcher reads its rank from RANK
        return VllmGenerator(model, cfg.generation, tokenizer, cfg.seed,
                             vllm_max_model_len(cfg), colocated=False)


@contextlib.contextmanager
def _environ(**values: str):
    """os.environ with `values`, restored after (RANK stays the launch's outside)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
