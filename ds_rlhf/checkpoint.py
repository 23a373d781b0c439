"""Checkpoints, auto-resume and preemption, shared by the trainers (PPO, SFT, RM...).

Layout under `<output_dir>/checkpoints/`:

    step_<N>/<engine>/...        DeepSpeed engine checkpoints (model, optimizer, scheduler)
    step_<N>/rng_rank<r>.pt      each rank's RNG states
    step_<N>/manifest.json       every file above: size, and sha256 for files up to 64 MiB
    step_<N>/trainer_state.json  step, sampler, KL controller, W&B run id... written last
    latest                       "step_<N>", replaced atomically once step_<N> is complete

A step directory without trainer_state.json is incomplete (a crash during save) and is never
loaded. Before loading, a checkpoint is checked against its manifest (missing or truncated
files, changed small files, unreadable trainer state); resume takes the newest checkpoint that
passes and says once which file made it skip the others. Frozen models are not saved; their
sources are in config.yaml.

Rotation (`rotate`), once a new checkpoint is complete: it and the `keep_last - 1` newest
older intact checkpoints stay, older intact ones are deleted. Damaged step directories and
ones newer than the new checkpoint (left by a run that resumed from an older one) are moved
aside, renamed `step_<N>.damaged-<time>` / `step_<N>.stale-<time>`, named in one line and
never counted; so rotation never deletes the checkpoint just written or the newest intact one.
A save whose own step directory is already there (it reached a damaged checkpoint's step
after falling back) moves a complete one aside the same way; only a step directory without
trainer state (an interrupted save) is deleted.

`checkpoint.resume`: true continues from the newest intact checkpoint; false refuses an
output_dir that holds checkpoints (a new run there would mix with them); fresh moves what the
previous run wrote (`RUN_FILES`: checkpoints, metrics, config.yaml, exports...) into one
`<output_dir>/previous-<time>/` and starts over.

Before a save, rank 0 checks the free space against the size of the last checkpoint; a save
that fails (full disk or another OS error, on any rank, or in what rank 0 alone writes: the
manifest, the trainer state, `latest`) stops every rank with one message naming the path, the
free space and the previous checkpoint, which stays intact.

Several nodes: rank 0 alone writes the manifests, `latest` and the lock, so every node must
see the same output_dir; `open_run` checks it (`check_shared`) before anything else.

Preemption: SIGTERM or SIGUSR1 only sets a flag. At the next step boundary the trainer asks
all ranks (`Coordinator.any`), and if any was signalled they save together and exit 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

import psutil
import torch

from ds_rlhf import lock
from ds_rlhf.config import UserInputError
from ds_rlhf.coordinator import is_collective_failure, set_phase

SHARED_WAIT_S = 10.0  # how long a node looks for rank 0's probe file (NFS caches lookups)

LATEST = "latest"
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
# Files up to this size are hashed as well as sized (sha256 runs at ~0.8 GiB/s on one CPU
# core, so ~80 ms each): RNG states, trainer state, small models. Bigger files (the model and
# optimizer shards) are checked by size only, which catches the truncation of an interrupted
# copy or a full disk without reading the whole checkpoint twice per save and resume.
HASH_MAX_BYTES = 64 << 20


class CheckpointError(UserInputError):
    """A checkpoint that cannot be resumed or saved here; the message says why and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _step_number(step_dir: Path) -> int:
    return int(step_dir.name[5:])


def _step_dirs(root: Path) -> list[Path]:
    """Every step_<N> directory, complete or not, by step."""
    found = [d for d in root.glob("step_*") if re.fullmatch(r"step_\d+", d.name) and d.is_dir()]
    return sorted(found, key=_step_number)


def _complete_steps(root: Path) -> list[Path]:
    return [d for d in _step_dirs(root) if (d / STATE).is_file()]


def _unused_name(parent: Path, name: str) -> Path:
    """`parent/<name>-<UTC time>`, with a counter if that exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = parent / f"{name}-{stamp}", 1
    while target.exists():
        n += 1
        target = parent / f"{name}-{stamp}-{n}"
    return target


def _move_aside(path: Path, tag: str) -> Path:
    """Rename `path` to `<path>.<tag>-<UTC time>` (with a counter if that exists): kept for
    the user to inspect or delete, out of the way of resume and rotation."""
    target = _unused_name(path.parent, f"{path.name}.{tag}")
    os.rename(path, target)
    return target


# What a run writes into its output_dir (the trainers, tracking.py, export, `ds-rlhf plot`'s
# default PNG, W&B's local files): `checkpoint.resume: fresh` moves these aside together.
# Named rather than "everything but the lock": an output_dir may also hold what the new run
# reads (another run's output_dir below it, the user's data), which must stay where it is.
RUN_FILES = ("checkpoints", "config.yaml", "engines.json", "metrics.jsonl", "metrics.png",
             "samples.jsonl", "eval.json", "model", "actor", "critic", "wandb")
PREVIOUS = "previous"  # output_dir/previous-<time>/: one earlier run's RUN_FILES


def _move_run_aside(output_dir: Path) -> None:
    """Rank 0, under the lock: move the RUN_FILES of the run that used output_dir before
    into one new output_dir/previous-<time>/ (a rename each: same file system, nothing
    copied or deleted) and say where in one line. Earlier bundles are not RUN_FILES, so they
    stay beside it."""
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    if not found:
        return
    bundle = _unused_name(output_dir, PREVIOUS)
    moved = []
    try:
        bundle.mkdir()
        for path in found:
            os.rename(path, bundle / path.name)
            moved.append(path.name)
    except OSError as e:
        raise CheckpointError(
            f"checkpoint.resume is fresh, but moving the previous run aside into {bundle} "
            f"failed ({e}); moved so far: {', '.join(moved) or 'nothing'}. Fix that (or move "
            f"{', '.join(p.name for p in found)} away by hand), or use another output_dir"
        ) from e
    print(f"checkpoint: resume is fresh; moved the previous run aside to {bundle} "
          f"({', '.join(moved)}); nothing was deleted", flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*")
                  if p.is_file() and p.name not in (STATE, MANIFEST))


def write_manifest(step_dir: Path) -> None:
    """Size (and sha256 when small) of every file the ranks wrote into `step_dir`."""
    files = {}
    for path in _data_files(step_dir):
        size = path.stat().st_size
        files[str(path.relative_to(step_dir))] = (
            {"size": size, "sha256": _sha256(path)} if size <= HASH_MAX_BYTES else {"size": size})
    _write_atomic(step_dir / MANIFEST, json.dumps({"files": files}, indent=1))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def verify(step_dir: Path) -> str | None:
    """None if `step_dir` matches its manifest, else what is wrong, naming the file."""
    try:
        _read_json(step_dir / STATE)
        if not (step_dir / MANIFEST).is_file():
            return None  # written before manifests existed: nothing to compare with
        files = _read_json(step_dir / MANIFEST)["files"]
    except CheckpointError as e:
        return str(e)
    for name, want in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, the manifest says {want['size']} (truncated?)"
        if "sha256" in want and _sha256(path) != want["sha256"]:
            return f"{path} differs from the manifest (sha256)"
    return None


def find_resume(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that passes `verify`: the one `latest` names, else the
    newest other. One line names the file that made it skip newer ones."""
    root = checkpoint_root(output_dir)
    candidates = _complete_steps(root)[::-1]
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:  # normally the newest already; an older one if moved by hand
            candidates.remove(named)
            candidates.insert(0, named)
        elif candidates:
            print(f"checkpoint: {named} is incomplete (interrupted save); resuming from "
                  f"{candidates[0]}", flush=True)
    problems = []
    for step_dir in candidates:
        problem = verify(step_dir)
        if problem is None:
            if problems:
                print(f"checkpoint: skipping damaged {'; '.join(problems)}; resuming from "
                      f"{step_dir}", flush=True)
            return step_dir
        problems.append(f"{step_dir.name} ({problem})")
    if problems:
        raise CheckpointError(
            f"no intact checkpoint in {root}: {'; '.join(problems)}. Restore the file, move the "
            "damaged step directories away, or start over (checkpoint.resume: fresh moves "
            "them aside, or use another output_dir); nothing was changed or deleted")
    return None


def open_run(output_dir: str | Path, resume: bool | str, coord
             ) -> tuple[Path | None, dict | None]:
    """Check that every node sees output_dir (`check_shared`), lock it for this run, then pick
    the checkpoint to resume from (see `resume_point`); rank 0 does the last two and every
    rank gets the answer or the refusal. A checkpoint written by another number of ranks is
    converted on rank 0 while the others wait without the collective timeout (it can take
    longer for a large model). Call it right after `start_distributed`, before anything in
    the output directory is touched."""
    set_phase("start (check that every node sees the output_dir)")
    check_shared(output_dir, coord)

    def claim() -> tuple[Path | None, dict | None]:
        lock.acquire(output_dir)
        return resume_point(output_dir, resume)

    set_phase("start (lock the output_dir, pick the checkpoint)")
    step_dir, state = coord.on_main(claim)
    if state is not None and state["world_size"] != coord.world_size:
        set_phase("start (convert the checkpoint to the universal format)")
        coord.on_main_untimed(lambda: read_state(step_dir, coord.world_size))
    set_phase("start (build the engines, load the checkpoint)")
    return step_dir, state


def check_shared(output_dir: str | Path, coord) -> None:
    """Rank 0 writes a probe file with a random token into output_dir; every rank looks for
    it (for up to SHARED_WAIT_S: a network file system may show a new file late). A node that
    does not see it has another directory under that name: its checkpoint shards would not
    be where rank 0 writes the manifest, so the run stops before anything else, on every rank.
    """
    out = Path(output_dir)

    def probe() -> str:
        token = secrets.token_hex(8)
        try:
            out.mkdir(parents=True, exist_ok=True)
            _write_atomic(out / f".shared-check-{token}", token)
        except OSError as e:
            raise CheckpointError(f"output_dir {str(out)!r}: cannot write there "
                                  f"({e.strerror or e}); fix its permissions or the path"
                                  ) from None
        return token

    token = coord.on_main(probe)
    path = out / f".shared-check-{token}"
    deadline = time.monotonic() + SHARED_WAIT_S
    while not _holds(path, token) and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = coord.gather_objects([(_holds(path, token), socket.gethostname())])
    if coord.is_main:
        path.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (ok, host) in enumerate(seen) if not ok]
    if blind:
        ranks = ", ".join(str(rank) for rank, _ in blind)
        hosts = ", ".join(dict.fromkeys(host for _, host in blind))
        who = f"ranks {ranks} (host {hosts}) do" if len(blind) > 1 else \
            f"rank {ranks} (host {hosts}) does"
        raise _together(CheckpointError(
            f"output_dir {str(out)!r} is not the same directory on every node: rank 0 (host "
            f"{seen[0][1]}) wrote {path.name} there, and {who} not see it. output_dir must be "
            "on a file system shared by all nodes (and an absolute path: a relative one "
            "depends on each node's working directory)"))


def _holds(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


def resume_point(output_dir: str | Path, resume: bool | str
                 ) -> tuple[Path | None, dict | None]:
    """(step directory, trainer state) to resume from under checkpoint.resume; or Nones.

    true: the newest intact checkpoint. false: none, and an output_dir that holds checkpoints
    is refused (the new run's saves would be rotated among the old run's, and `latest` would
    later resume whichever is newest). fresh: everything the previous run wrote is moved
    aside first, into one output_dir/previous-<time>/ (`_move_run_aside`)."""
    root = checkpoint_root(output_dir)
    if resume is True:
        step_dir = find_resume(output_dir)
        return (step_dir, _read_json(step_dir / STATE)) if step_dir else (None, None)
    held = _step_dirs(root)
    if held and resume is False:
        names = ", ".join(d.name for d in held)
        raise CheckpointError(
            f"checkpoint.resume is false but {root} holds checkpoints ({names}). Set "
            "checkpoint.resume: true to continue from them, or fresh to move them aside "
            f"(with the rest of that run, into {PREVIOUS}-<time>/) and start over; or use "
            "another output_dir")
    if resume == "fresh":
        _move_run_aside(Path(output_dir))
    return None, None


def read_state(step_dir: Path, world_size: int) -> dict:
    """The trainer state of a checkpoint, after checking it fits this run: one written by
    another number of ranks is converted to DeepSpeed's universal format first (see
    `to_universal`), or refused with the reason when it cannot be. Rank 0 (open_run)."""
    state = _read_json(step_dir / STATE)
    saved = state["world_size"]
    if saved != world_size:
        try:
            to_universal(step_dir, saved, world_size)
        except Exception as e:  # DeepSpeed's converter raises anything from asserts to OSError
            raise CheckpointError(
                f"{step_dir} was written by {saved} ranks but this run has {world_size}, and "
                f"DeepSpeed's conversion to its rank-independent universal format failed ({e}). "
                f"Restart with {saved} ranks, or use a new output_dir to start over; nothing was "
                "changed or deleted.") from None
    return state


UNIVERSAL = "universal"  # step_<N>/universal/<engine>/: DeepSpeed's rank-independent copy


def is_universal(state: dict | None, world_size: int) -> bool:
    """Whether this checkpoint loads through its universal copy: it was written by another
    number of ranks. Engines must then be built with DeepSpeed's `load_universal` flag."""
    return state is not None and state["world_size"] != world_size


def to_universal(step_dir: Path, saved: int, world_size: int) -> None:
    """Rank 0: convert each engine checkpoint of `step_dir` (the subdirectories holding ZeRO
    optimizer shards) with DeepSpeed's ds_to_universal into step_dir/universal/, once.

    The universal format holds every parameter and its optimizer states whole (fp32), so
    DeepSpeed re-partitions them over any number of ranks at load (Lian et al. 2024,
    "Universal Checkpointing"). `inject_missing_state` adds the metadata it needs that engines
    do not save unless configured for it. Serial (one worker): it runs in a trainer process.
    """
    out = step_dir / UNIVERSAL
    if out.is_dir():
        return
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    print(f"checkpoint: {step_dir} was written by {saved} ranks; converting it to DeepSpeed's "
          f"universal format to resume on {world_size}", flush=True)
    tmp = step_dir / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    engines = sorted(d for d in step_dir.iterdir()
                     if d.is_dir() and any(d.glob("*_optim_states.pt")))
    if not engines:
        raise CheckpointError(f"{step_dir}: no ZeRO optimizer shards to convert")
    log = io.StringIO()  # its progress lines, shown only when it fails
    try:
        for engine in engines:
            args = argparse.Namespace(
                input_folder=str(engine), output_folder=str(tmp / engine.name),
                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=True)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        print(log.getvalue()[-2000:], flush=True)
        raise
    os.replace(tmp, out)  # complete or absent


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


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _together(error: CheckpointError) -> CheckpointError:
    """Mark an error that every rank raises at the same point (cli.py: rank 0 prints it)."""
    error.every_rank = True
    return error


def _previous(root: Path) -> str:
    done = [d for d in _complete_steps(root) if verify(d) is None]
    return (f"the previous checkpoint {done[-1]} is intact" if done
            else "no checkpoint was saved before")


def _free(root: Path) -> str:
    try:
        return _mib(shutil.disk_usage(root).free)
    except OSError as e:
        return f"unknown space ({e.strerror or e})"


def _save_failed(step_dir: Path, problems: list[str]) -> CheckpointError:
    """The error of a failed save, raised by every rank together."""
    root = step_dir.parent
    previous = _previous(root)
    return _together(CheckpointError(
        f"saving {step_dir} failed ({'; '.join(problems)}); {_free(root)} free on {root} (no "
        f"space left is the usual cause). {previous[0].upper()}{previous[1:]}: free space, "
        "then run the same command to resume from it"))


def _guard_save(step_dir: Path, write) -> None:
    """`write()` (what rank 0 alone writes for a save, inside coord.on_main), its OS errors
    turned into the one error of a failed save, which every rank then raises; the partial
    step directory is removed to free its space."""
    try:
        write()
    except OSError as e:
        shutil.rmtree(step_dir, ignore_errors=True)
        raise _save_failed(step_dir, [_write_error(e, 0)]) from e


def _prepare_save(root: Path, step_dir: Path) -> None:
    """Rank 0, before a save: clear the way for step_dir, and check that the free space can
    hold another checkpoint as big as the last one.

    A step_dir without trainer state is the leftover of an interrupted save: removed. A
    complete one is another run's (or this run's before it fell back to an older checkpoint)
    and is moved aside like rotation does: damaged (the one resume skipped) or stale."""
    if (step_dir / STATE).is_file():
        tag = "stale" if verify(step_dir) is None else "damaged"
        try:
            _say_moved([(step_dir.name, _move_aside(step_dir, tag))])
        except OSError as e:  # not one for _guard_save, which would delete step_dir
            raise CheckpointError(
                f"cannot save {step_dir}: moving the complete {step_dir.name} there aside "
                f"failed ({e}); move it away by hand, then run the same command") from e
    elif step_dir.exists():
        shutil.rmtree(step_dir)
    root.mkdir(parents=True, exist_ok=True)
    done = _complete_steps(root)
    if not done:
        return
    needed, free = _dir_bytes(done[-1]), shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(
            f"no space to save {step_dir}: {_mib(free)} free on {root}, and the last "
            f"checkpoint ({done[-1].name}) took {_mib(needed)}. Nothing was written; "
            f"{_previous(root)}. Free space (or lower checkpoint.keep_last), then run the same "
            "command to resume from it")


def _write_error(e: Exception, rank: int) -> str:
    if is_collective_failure(e):
        raise e  # a stalled or lost rank, not a write error: see cli.py
    return f"rank {rank}: {str(e).strip().splitlines()[-1]}"


class _GuardedWrites:
    """An engine's DeepSpeed checkpoint engine during a save, with failed writes recorded
    instead of raised (torch.save reports a full disk as RuntimeError). A rank that raised
    between the barriers inside `save_checkpoint` would leave the others waiting in one until
    the timeout; recorded, it goes on through them, and every rank learns of it after."""

    def __init__(self, inner, rank: int):
        self.inner, self.rank = inner, rank
        self.error: str | None = None
        self.makedirs = self.wrap(inner.makedirs)
        self.save = self.wrap(inner.save)

    def wrap(self, write):
        def guarded(*args, **kwargs) -> None:
            if self.error is not None:
                return  # after the first failure, write nothing more
            try:
                write(*args, **kwargs)
            except (OSError, RuntimeError) as e:
                self.error = _write_error(e, self.rank)
        return guarded

    def __getattr__(self, name):  # create, commit, load...: DeepSpeed's own
        return getattr(self.inner, name)


def save(output_dir: str | Path, step: int, engines: dict, state: dict, coord,
         keep_last: int, files: dict[str, object] | None = None) -> Path:
    """Save on every rank (collective). `state` must be JSON-serialisable; `files`: more of
    the trainer's state by file name (torch.save, by rank 0: the same on every rank), in
    the manifest like the rest (`load_file`)."""
    root = checkpoint_root(output_dir)
    step_dir = root / f"step_{step}"
    set_phase(f"save step {step}")
    coord.on_main(lambda: _guard_save(step_dir, lambda: _prepare_save(root, step_dir)))
    error = None
    for name, engine in engines.items():
        guard = _GuardedWrites(engine.checkpoint_engine, coord.rank)
        # DeepSpeed writes through its checkpoint engine, and copies zero_to_fp32.py (rank 0)
        engine.checkpoint_engine = guard
        engine._copy_recovery_script = guard.wrap(engine._copy_recovery_script)
        try:
            engine.save_checkpoint(str(step_dir), tag=name, save_latest=False)
        finally:
            engine.checkpoint_engine = guard.inner
            del engine._copy_recovery_script  # back to the class's method
        error = error or guard.error
    if error is None:
        try:
            torch.save(_rng_state(), step_dir / f"rng_rank{coord.rank}.pt")
        except (OSError, RuntimeError) as e:
            error = _write_error(e, coord.rank)
    errors = [e for e in coord.gather_objects([error]) if e]
    if errors:  # every rank stops here together, with the same message
        if coord.is_main:
            shutil.rmtree(step_dir, ignore_errors=True)  # the partial save, to free its space
        raise _save_failed(step_dir, errors)
    coord.barrier()  # every rank's shards are on disk

    def complete() -> None:
        for name, obj in (files or {}).items():
            torch.save(obj, step_dir / name)
        write_manifest(step_dir)
        _write_atomic(step_dir / STATE, json.dumps(
            {**state, "step": step, "world_size": coord.world_size}, indent=1))
        _write_atomic(root / LATEST, step_dir.name)

    def complete_and_rotate() -> None:
        _guard_save(step_dir, complete)
        try:
            rotate(root, step_dir, keep_last)
        except OSError as e:
            raise CheckpointError(
                f"saved {step_dir}, but moving aside an older step directory failed ({e}); "
                "fix that, then run the same command to resume from it") from e

    coord.on_main(complete_and_rotate)  # also the barrier: step_dir is complete
    return step_dir


def rotate(root: Path, current: Path, keep_last: int) -> None:
    """Rank 0, once `current` is complete: keep it and the `keep_last - 1` newest older intact
    checkpoints, delete older intact ones; move aside (`_move_aside`) step directories newer
    than `current` ("stale": a run that resumed from an older checkpoint went past them) and
    damaged or incomplete ones, none of them counted, all named in one line."""
    step = _step_number(current)
    moved, intact = [], []
    for d in _step_dirs(root):
        if d == current:
            continue
        if _step_number(d) > step:
            moved.append((d.name, _move_aside(d, "stale")))
        elif verify(d) is not None:
            moved.append((d.name, _move_aside(d, "damaged")))
        else:
            intact.append(d)
    for old in intact[:max(len(intact) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    if moved:
        _say_moved(moved)


def _say_moved(moved: list[tuple[str, Path]]) -> None:
    print("checkpoint: moved aside, kept and not counted in checkpoint.keep_last: "
          + ", ".join(f"{name} -> {new}" for name, new in moved), flush=True)


def load(step_dir: Path, engines: dict, coord, state: dict) -> None:
    """Load engine states (into freshly built engines) and this rank's RNG states; through the
    universal copy when the checkpoint has another world size (see `is_universal`)."""
    set_phase(f"load {step_dir}")
    universal = is_universal(state, coord.world_size)
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(str(step_dir / UNIVERSAL if universal else step_dir),
                                         tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{step_dir / name}: DeepSpeed found no checkpoint to load")
    rng = step_dir / f"rng_rank{coord.rank}.pt"
    if rng.is_file():  # a rank the writing run did not have keeps its own seeds
        _set_rng_state(torch.load(rng, weights_only=False))


def load_file(step_dir: Path, name: str):
    """A file `save` wrote from its `files`, or None where the checkpoint has none (the
    manifest was checked when the run opened the checkpoint)."""
    path = step_dir / name
    return torch.load(path, weights_only=False) if path.is_file() else None


def _launching_command() -> psutil.Process | None:
    """The command that started this worker, when a launcher did: with `deepspeed`, our parent
    is its per-node launcher (deepspeed.launcher.launch) and the command its parent; with
    torchrun, our parent."""
    try:
        parent = psutil.Process().parent()
        command = " ".join(parent.cmdline()) if parent is not None else ""
        if "deepspeed.launcher.launch" in command:
            return parent.parent()
        if "torch.distributed.run" in command or "torchrun" in command:
            return parent
    except psutil.Error:
        pass
    return None


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm's early warning); read at step boundaries.

    Also set when the command that started this worker (`deepspeed`, torchrun) is gone. The
    `deepspeed` command handles no signal in a single-node run: SIGTERM or SIGUSR1 to it (what
    `kill PID`, a scheduler or `timeout` sends) ends it at once and leaves its launcher and the
    workers running, orphaned; torchrun dies of SIGUSR1 the same way. Its going is taken as the
    same request: save at the next step boundary, exit. This covers the launch/ scripts, which
    exec the command.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signalled: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
        self.command = _launching_command()

    def _handler(self, signum, frame) -> None:
        self.signalled = signum

    def __bool__(self) -> bool:
        if self.signalled is None and self.command is not None and not self.command.is_running():
            print(f"the launching command (PID {self.command.pid}) is gone; stopping as if it "
                  "had forwarded a signal", flush=True)
            self.signalled = signal.SIGTERM
        return self.signalled is not None


def preempted_exit(saved: int, is_main: bool) -> None:
    """The last word of a preempted run: what was saved, if anything."""
    if not is_main:
        return
    if saved:
        print(f"preempted: saved step {saved}; run the same command to resume", flush=True)
    else:
        print("preempted: stopped before the first step; nothing to save, run the same command "
              "to start", flush=True)


_FLAG: PreemptionFlag | None = None


def preemption_flag() -> PreemptionFlag:
    """The process's one flag; the first call installs the handlers (the CLI does it first
    thing, so a signal during start-up is not lost)."""
    global _FLAG
    if _FLAG is None:
        _FLAG = PreemptionFlag()
    return _FLAG
