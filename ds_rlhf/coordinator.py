"""Keeps the data-parallel ranks in step: prompt sharding, reductions, global statistics.

Every rank runs the same program. Each PPO step the coordinator draws the next global batch
of prompt indices from a seeded, epoch-aware, resumable sampler and hands rank r the r-th
equal share, so every rank runs the same number of batches of each phase (no collective can
wait on a rank that has nothing left to do).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

from ds_rlhf.rollout import Rollout


def setup_distributed_env() -> None:
    """Fill RANK/WORLD_SIZE/... for plain `python` runs and Slurm tasks (one task per GPU).

    The deepspeed launcher and torchrun set these themselves; srun sets SLURM_* only.
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    if "RANK" not in os.environ:  # a single process started with plain python
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("LOCAL_RANK", "0")


LAUNCH_WORLD = "DS_RLHF_LAUNCH_WORLD_SIZE"  # the launch's world size, once split_world ran


def split_world(placement: str, generation_ranks: int) -> int | None:
    """rollout.placement separate: the last `generation_ranks` (G) ranks of the launch form the
    generation pool, the first W - G train. The training ranks' world is then just them
    (WORLD_SIZE), so that DeepSpeed, the coordinator and the checkpoints see the training world
    as the whole world; the pool meets rank 0 through the rendezvous store (engines/transport.py).
    Returns this process's index in the pool, or None on a training rank. Idempotent."""
    from ds_rlhf.config import ConfigError

    if placement != "separate":  # after a split, a run of the training ranks alone (bench)
        if pool_index() is not None:
            raise ConfigError("rollout.placement: colocated, in a launch whose last ranks "
                              "are a generation pool; give every run of it the same placement")
        return None
    world = int(os.environ.setdefault(LAUNCH_WORLD, os.environ["WORLD_SIZE"]))
    if generation_ranks >= world:
        raise ConfigError(f"rollout.generation_ranks: {generation_ranks} leaves no training "
                          f"rank of the {world} ranks launched; launch more ranks or use "
                          "fewer generation ranks")
    trainers = world - generation_ranks
    os.environ["WORLD_SIZE"] = str(trainers)
    rank = int(os.environ["RANK"])
    return rank - trainers if rank >= trainers else None


def pool_index() -> int | None:
    """This process's index in the generation pool (None: a training rank, or no pool)."""
    if LAUNCH_WORLD not in os.environ:
        return None
    rank, trainers = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank - trainers if rank >= trainers else None


T = TypeVar("T")
UNTIMED_HOURS = 24  # how long on_main_untimed waits for rank 0
FAILED_KEY = "ds_rlhf/failed"  # in the rendezvous store: an error that one rank had alone
WATCH_EVERY_S = 1.0  # how often every rank looks for it
STOPPED_KEY = "ds_rlhf/stopped"  # the training ranks stopped together: the exit code
_STORE: list = [None]  # a client of the rendezvous store, with a generation pool (_store)
_TOLD = [False]  # this rank put its own error there (its watcher then leaves it alone)
_PHASE = ["start"]  # what this rank is doing, named when a collective fails (see cli.py)
_TIMEOUT: list[timedelta | None] = [None]  # distributed.timeout_minutes: start_distributed


def set_phase(name: str) -> None:
    """Name what this rank does now ("step 3 generate", "save step 4"...): when a collective
    times out or a peer vanishes, the error says where this rank was waiting."""
    _PHASE[0] = name


def current_phase() -> str:
    return _PHASE[0]


# How gloo and NCCL report a peer that stopped answering or went away.
_COLLECTIVE_ERRORS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset",
                      "Watchdog caught collective operation timeout")


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that gave up on another rank (timeout or lost peer)."""
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _COLLECTIVE_ERRORS))


def launched_with_peers() -> bool:
    """Whether a launcher (deepspeed, torchrun, srun) started other ranks with this process.
    Read before `setup_distributed_env` fills in defaults: a process given WORLD_SIZE by hand
    but no rendezvous address has no peers to meet."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    return world > 1 and ("MASTER_ADDR" in os.environ or "SLURM_PROCID" in os.environ)


def start_distributed(timeout_minutes: float, failed: BaseException | None = None
                      ) -> Coordinator:
    """deepspeed.init_distributed (gloo on CPU, nccl on GPU), this rank's device, a Coordinator;
    then the ranks agree on their start (`agree_on_start`).

    Every collective, the rendezvous included, gives up after `timeout_minutes`
    (distributed.timeout_minutes): a stalled or vanished rank then ends the others instead of
    leaving them waiting silently. A rank whose own checks failed (`failed`) still comes to
    the rendezvous, so that every rank learns of it and leaves at once (cli.py).
    """
    import deepspeed  # here, so that importing this module stays cheap
    from deepspeed.utils import groups

    set_phase("start (rendezvous of the ranks)")
    _TIMEOUT[0] = timeout = timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(timeout=timeout)
    accelerator = deepspeed.get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        _unlink_shm_buffer()
    # The engines reduce gradients and gather ZeRO-3 weights over DeepSpeed's clone of the world
    # group, which torch creates with its own default timeout (30 minutes), not the one above:
    # without this, a rank stalled inside an engine's collective held the others for 30 minutes.
    dist.distributed_c10d._set_pg_timeout(timeout, groups._get_data_parallel_group())
    coord = Coordinator(torch.device(accelerator.current_device_name()))
    threading.Thread(target=watch_peers, args=(_store(), coord.rank), daemon=True).start()
    agree_on_start(coord, failed)
    return coord


def collective_timeout() -> timedelta:
    """distributed.timeout_minutes: every process group the run makes is given it, since
    torch gives a group made without one its default (30 minutes), not the world's."""
    if _TIMEOUT[0] is None:
        raise RuntimeError("collective_timeout() before start_distributed()")
    return _TIMEOUT[0]


def start_pool(timeout_minutes: float):
    """A generation rank (rollout.placement separate): it never joins the training ranks'
    world; it reaches the rendezvous store as a client, to open the bridge to training rank 0
    (engines/transport.py) and to watch for, and tell of, failures as every rank does."""
    from ds_rlhf.engines.transport import rendezvous_store

    if _STORE[0] is not None:
        return _STORE[0]
    set_phase("start (the generation pool connects)")
    _TIMEOUT[0] = timeout = timedelta(minutes=timeout_minutes)
    _STORE[0] = rendezvous_store(timeout)
    return _STORE[0]


def _store():
    """Where ranks leave word of failures: the default group's store, or with a generation
    pool (which has no default group) a plain client of the rendezvous store, on every rank."""
    if _STORE[0] is None and LAUNCH_WORLD in os.environ:
        from ds_rlhf.engines.transport import rendezvous_store

        _STORE[0] = rendezvous_store(collective_timeout())
    return _STORE[0] if _STORE[0] is not None else dist.distributed_c10d._get_default_store()


def tell_peers(message: str) -> None:
    """Before this rank exits on an error of its own (cli.py), put `message` in the
    rendezvous store, where every other rank's watcher finds it within WATCH_EVERY_S."""
    _TOLD[0] = True
    try:
        _store().set(FAILED_KEY, message)
    except Exception:  # noqa: BLE001 (no store left: the others notice the exit anyway)
        return
    # rank 0 hosts the store (deepspeed launcher, srun): the others
    if dist.is_initialized() and dist.get_rank() == 0:
        time.sleep(2.5 * WATCH_EVERY_S)  # must read the message before it goes


def told_failure() -> str | None:
    """The message of a rank that failed alone and said so (tell_peers), if one did."""
    try:
        store = _store()
        return store.get(FAILED_KEY).decode(errors="replace") \
            if store.check([FAILED_KEY]) else None
    except Exception:  # noqa: BLE001 (no store left)
        return None


def tell_pool(code: int) -> None:
    """Training rank 0, stopping with every training rank (an error they all had): the
    generation pool, which saw none of it, leaves too, silently, with the same exit code."""
    if LAUNCH_WORLD in os.environ and dist.is_initialized() and dist.get_rank() == 0:
        try:
            _store().set(STOPPED_KEY, str(code))
            time.sleep(2.5 * WATCH_EVERY_S)  # this rank hosts the store: let the pool read it
        except Exception:  # noqa: BLE001 (no store: the pool's bridge fails on its own)
            pass


def watch_peers(store, rank: int) -> None:
    """Every rank, in a daemon thread: once another rank failed alone (`tell_peers`), end
    this one at once with exit code 4, rank 0 repeating the message. Gloo ranks would also
    see the failed rank's connections close, but a rank blocked in an NCCL collective does
    not notice a peer that is gone until distributed.timeout_minutes. `rank` -1: a generation
    rank (pool.py), which also leaves when the training ranks stopped together (tell_pool)."""
    while True:
        time.sleep(WATCH_EVERY_S)
        try:
            if rank < 0 and store.check([STOPPED_KEY]):  # a generation rank (pool.py)
                sys.stdout.flush()
                os._exit(int(store.get(STOPPED_KEY)))
            if _TOLD[0] or not store.check([FAILED_KEY]):
                continue
            message = store.get(FAILED_KEY).decode(errors="replace")
        except Exception:  # noqa: BLE001 (the store ended with the run: nothing to watch)
            return
        if rank == 0:
            print(f"ds-rlhf: stopping every rank: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(4)


def _describe(e: BaseException) -> str:
    from ds_rlhf.config import UserInputError

    return str(e) if isinstance(e, UserInputError) else f"{type(e).__name__}: {e}"


def agree_on_start(coord: Coordinator, failed: BaseException | None) -> None:
    """Each rank ran its own checks (config, inputs, environment variables: a node may lack a
    file or a variable the others have); every rank learns which failed. If any did, every
    rank raises the same RanksFailedError naming each failing rank, its host and its message
    (exit code 2 when all were bad input)."""
    from ds_rlhf.config import UserInputError
    from ds_rlhf.errors import RanksFailedError, failure_report

    set_phase("start (the ranks compare their checks)")
    mine = None
    if failed is not None:
        if not isinstance(failed, UserInputError):  # a bug, not bad input: keep its trace
            print(f"rank {coord.rank} (host {socket.gethostname()}):", file=sys.stderr)
            traceback.print_exception(failed)
        mine = (socket.gethostname(), _describe(failed), isinstance(failed, UserInputError))
    everyone = coord.gather_objects([mine])
    failures = [(rank, host, message) for rank, item in enumerate(everyone) if item is not None
                for host, message, _ in [item]]
    if failures:
        all_input = all(item[2] for item in everyone if item is not None)
        raise RanksFailedError(failure_report(failures, coord.world_size), 2 if all_input else 1)


def stop_distributed() -> None:
    """Leave the process group together: a rank that exits while a peer still holds gloo
    connections to it can abort that peer at interpreter exit (SIGABRT after a finished run)."""
    if dist.is_initialized():
        dist.barrier()
        vllm_backend = sys.modules.get("ds_rlhf.engines.vllm_backend")
        if vllm_backend is not None:  # generation.backend vllm: its groups go first
            vllm_backend.shutdown()
        from deepspeed.comm import comm as ds_comm

        # Through DeepSpeed when it set up the world, so that it also forgets its cached
        # groups: a second run in this process (tests, a notebook) would get destroyed ones.
        # (A generation pool's own group, vLLM's world there, may be gone with vLLM's.)
        if ds_comm.cdb is not None:
            ds_comm.destroy_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a worker with `code` once its Python cleanup is done (atexit: the output_dir lock,
    W&B), without the interpreter's teardown of C++ objects. Even after stop_distributed, that
    teardown sometimes aborts a rank of a finished 2-rank CPU run ("terminate called without an
    active exception", SIGABRT; about 1 finished run in 15 on the test suite), which would turn
    a finished job into a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer from /dev/shm.

    DeepSpeed's shared-memory all-reduce (CPU accelerator) creates one /dev/shm segment per
    rank, named after the master address and port, and never unlinks it: every run leaked one
    per rank until /dev/shm filled memory and the kernel killed ranks. Once every rank has
    mapped the others' segments (init returned everywhere: the barrier), the names can go;
    the mappings live on until the processes exit.
    """
    dist.barrier()
    pattern = (f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ.get('MASTER_PORT')}"
               f"_{dist.get_rank()}")
    for path in Path("/dev/shm").glob(pattern):
        path.unlink(missing_ok=True)


@dataclass
class PromptSampler:
    """Seeded epoch-wise permutation of prompt indices, consumed `batch_size` at a time.

    An epoch's leftover (fewer than `batch_size` prompts) is skipped so that every step sees
    a full batch. The state is two integers, saved in checkpoints.
    """

    num_prompts: int
    batch_size: int
    seed: int
    epoch: int = 0
    offset: int = 0  # prompts of this epoch already handed out

    def __post_init__(self):
        if self.num_prompts < self.batch_size:
            raise ValueError(f"ppo.rollout_batch_size={self.batch_size} is larger than the "
                             f"{self.num_prompts} prompts of the dataset; lower it or add data")

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_prompts, generator=g)

    def next_batch(self) -> torch.Tensor:
        if self.offset + self.batch_size > self.num_prompts:
            self.epoch, self.offset = self.epoch + 1, 0
        batch = self._order()[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class Coordinator:
    """Rank bookkeeping and the few collectives the trainer needs (after init_process_group)."""

    def __init__(self, device: torch.device):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device  # where collectives run (cpu for gloo, cuda for nccl)
        self._untimed = None  # the process group of on_main_untimed, made on first use

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's equal, contiguous share of a global batch of indices."""
        n = len(global_batch) // self.world_size
        return global_batch[self.rank * n:(self.rank + 1) * n]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (float64 so counts and sums stay exact)."""
        t = values.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        total = self.sum(torch.tensor([float(values[k]) for k in keys]))
        return dict(zip(keys, total.tolist(), strict=True))

    def max(self, value: float) -> float:
        """The largest `value` over ranks (an int stays an int)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return type(value)(t.item())

    def any(self, flag: bool) -> bool:
        return bool(self.sum(torch.tensor([float(flag)])).item() > 0)

    def all(self, flag: bool) -> bool:
        return not self.any(not flag)

    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """algo.masked_whiten with the mean and (unbiased) variance of all ranks' entries."""
        xm = x.double() * mask
        count, total, total_sq = self.sum(
            torch.stack([mask.sum().double(), xm.sum(), (xm * x.double()).sum()]).cpu())
        mean = total / count
        var = (total_sq - count * mean**2) / (count - 1).clamp(min=1)
        return ((x.double() - mean) * torch.rsqrt(var + eps) * mask).to(x.dtype)

    def minibatches(self, rollout: Rollout, schedule: torch.Tensor) -> list[Rollout]:
        """This rank's share of each minibatch of ``schedule`` (rollout.minibatch_schedule,
        global row ids), fetched from the ranks that hold those rows.

        ``rollout`` is this rank's rows of the step, global rows rank * B .. rank * B + B - 1.
        Rows that live on another rank come by an all-to-all exchange; when every rank's
        share is its own (one minibatch), nothing moves.
        """
        num_rows = len(rollout)
        wanted = schedule.transpose(0, 1).reshape(self.world_size, -1).sort(dim=1).values
        owner = wanted // num_rows  # [W, rows of the epoch] the rank holding each wanted row
        first = self.rank * num_rows
        if bool((owner == torch.arange(self.world_size)[:, None]).all()):
            rows = rollout.select(wanted[self.rank] - first)
        else:
            received = self.exchange([rollout.select(ids[owner[d] == self.rank] - first)
                                      for d, ids in enumerate(wanted)])
            width_p = max(r.prompt_ids.shape[1] for r in received)
            width_r = max(r.response_ids.shape[1] for r in received)
            # From rank 0 up, each source's rows ascending: rows is wanted[self.rank] in order.
            rows = Rollout.cat([r.pad(width_p, width_r) for r in received])
        return [rows.select(torch.searchsorted(wanted[self.rank], share))
                for share in schedule[:, self.rank]]

    def exchange(self, parts: list) -> list:
        """All-to-all of python objects: parts[d] goes to rank d; returns what every rank
        sent to this one, in rank order."""
        received = []
        for src in range(self.world_size):
            out = [None]
            dist.scatter_object_list(out, parts if self.rank == src else None, src=src)
            received.append(out[0])
        return received

    def scatter(self, parts: list | None):
        """parts[d] (rank 0's list; None on the others) to rank d; returns this rank's."""
        out = [None]
        dist.scatter_object_list(out, parts if self.is_main else None, src=0)
        return out[0]

    def gather_objects(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (on every rank)."""
        out: list[list] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def barrier(self) -> None:
        dist.barrier()

    def on_main(self, fn: Callable[[], T], group=None) -> T:
        """`fn()` on rank 0 only; its result, or its error, on every rank.

        For what one process must do for the run (lock the output directory, pick and verify
        the checkpoint, check free space, write a checkpoint's manifest): the others learn the
        outcome, and a failure stops every rank with the same message instead of leaving them
        waiting in a collective. A UserInputError is raised as is on every rank; any other
        error (a bug) prints its traceback on rank 0 and becomes a RanksFailedError naming it.
        `group`: the process group to broadcast over (see `on_main_untimed`).
        """
        from ds_rlhf.config import UserInputError
        from ds_rlhf.errors import RanksFailedError

        out: list = [None]
        if self.is_main:
            try:
                out = [(True, fn())]
            except UserInputError as e:
                out = [(False, e)]
            except Exception as e:
                traceback.print_exc()
                out = [(False, RanksFailedError(
                    f"rank 0 (host {socket.gethostname()}) failed in phase '{current_phase()}': "
                    f"{_describe(e)}", 1))]
        dist.broadcast_object_list(out, src=0, device=self.device if group is None else
                                   torch.device("cpu"), group=group)
        ok, value = out[0]
        if not ok:
            value.every_rank = True  # every rank raises it here: rank 0 prints it (cli.py)
            raise value
        return value

    def on_main_untimed(self, fn: Callable[[], T]) -> T:
        """`on_main` for work that may outlast distributed.timeout_minutes (the conversion
        of a large checkpoint to the universal format): the others wait for it over a gloo
        group of their own whose timeout is UNTIMED_HOURS. A rank 0 that dies still ends
        their wait at once (its connections close)."""
        if self._untimed is None:  # collective: every rank creates it at the same call
            self._untimed = dist.new_group(backend="gloo",
                                           timeout=timedelta(hours=UNTIMED_HOURS))
        return self.on_main(fn, group=self._untimed)
