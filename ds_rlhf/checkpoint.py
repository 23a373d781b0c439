"""Checkpoints, auto-resume and preemption, shared by the PPO, SFT and RM trainers.

Layout under `<output_dir>/checkpoints/`:

    step_<N>/<engine>/...        DeepSpeed engine checkpoints (model, optimizer, scheduler)
    step_<N>/rng_rank<r>.pt      each rank's RNG states
    step_<N>/trainer_state.json  step, sampler, KL controller, W&B run id... written last
    latest                       "step_<N>", replaced atomically once step_<N> is complete

A step directory without trainer_state.json is incomplete (a crash during save) and is never
loaded: resume falls back to the newest complete one. Old checkpoints are deleted only after
the new one is complete. Frozen models are not saved; their sources are in config.yaml.

Preemption: SIGTERM or SIGUSR1 only sets a flag. At the next step boundary the trainer asks
all ranks (`Coordinator.any`), and if any was signalled they save together and exit 0.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import torch

from ds_rlhf.config import UserInputError

LATEST = "latest"
STATE = "trainer_state.json"


class CheckpointError(UserInputError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _complete_steps(root: Path) -> list[Path]:
    found = [d for d in root.glob("step_*") if re.fullmatch(r"step_\d+", d.name)]
    return sorted((d for d in found if (d / STATE).is_file()), key=lambda d: int(d.name[5:]))


def find_resume(output_dir: str | Path) -> Path | None:
    """The step directory to resume from: `latest` if complete, else the newest complete one."""
    root = checkpoint_root(output_dir)
    complete = _complete_steps(root)
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if (named / STATE).is_file():
            return named
        if complete:
            print(f"checkpoint: {named} is incomplete (interrupted save); resuming from "
                  f"{complete[-1]}", flush=True)
    return complete[-1] if complete else None


def resume_point(output_dir: str | Path, resume: bool,
                 world_size: int) -> tuple[Path | None, dict | None]:
    """(step directory, trainer state) to resume from, checked against this run; or Nones."""
    step_dir = find_resume(output_dir) if resume else None
    return (step_dir, read_state(step_dir, world_size)) if step_dir else (None, None)


def read_state(step_dir: Path, world_size: int) -> dict:
    """The trainer state of a checkpoint, after checking it fits this run."""
    state = json.loads((step_dir / STATE).read_text())
    saved = state["world_size"]
    if saved != world_size:
        raise CheckpointError(
            f"{step_dir} was written by {saved} ranks but this run has {world_size}. DeepSpeed "
            "ZeRO checkpoints hold one partition per rank and load only with the same number "
            f"of ranks: restart with {saved} ranks. To change the number of ranks, DeepSpeed "
            "converts such checkpoints to its rank-independent 'universal' format (python -m "
            "deepspeed.checkpoint.ds_to_universal --input_folder STEP/actor --output_folder "
            "STEP/actor_universal), which ds-rlhf does not load yet. To start over, use a new "
            "output_dir; nothing was changed or deleted.")
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: str | Path, step: int, engines: dict, state: dict, coord,
         keep_last: int) -> Path:
    """Save on every rank (collective). `state` must be JSON-serialisable."""
    root = checkpoint_root(output_dir)
    step_dir = root / f"step_{step}"
    if coord.is_main and step_dir.exists():  # a leftover of an interrupted save of this step
        shutil.rmtree(step_dir)
    coord.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(step_dir), tag=name, save_latest=False)
    torch.save(_rng_state(), step_dir / f"rng_rank{coord.rank}.pt")
    coord.barrier()  # every rank's shards are on disk
    if coord.is_main:
        _write_atomic(step_dir / STATE, json.dumps(
            {**state, "step": step, "world_size": coord.world_size}, indent=1))
        _write_atomic(root / LATEST, step_dir.name)
        for old in _complete_steps(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    coord.barrier()
    return step_dir


def load(step_dir: Path, engines: dict, coord) -> None:
    """Load engine states (into freshly built engines) and this rank's RNG states."""
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(str(step_dir), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{step_dir / name}: DeepSpeed found no checkpoint to load")
    rng = step_dir / f"rng_rank{coord.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm's early warning); read at step boundaries."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signalled: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signalled = signum

    def __bool__(self) -> bool:
        return self.signalled is not None


_FLAG: PreemptionFlag | None = None


def preemption_flag() -> PreemptionFlag:
    """The process's one flag; the first call installs the handlers (the CLI does it first
    thing, so a signal during start-up is not lost)."""
    global _FLAG
    if _FLAG is None:
        _FLAG = PreemptionFlag()
    return _FLAG
