"""The output_dir lock, checkpoint manifests, rotation, checkpoint.resume, the free-space
check, failed writes and how ranks agree on errors, without engines."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ds_rlhf import checkpoint, lock
from ds_rlhf.checkpoint import CheckpointError, find_resume, verify, write_manifest
from ds_rlhf.checks import check_environment
from ds_rlhf.config import (
    ConfigError,
    PPORunConfig,
    RewardSpec,
    RMRunConfig,
    SFTRunConfig,
    TrainEngineConfig,
    load_config,
)
from ds_rlhf.engines.ds_config import deepspeed_config
from ds_rlhf.errors import RanksFailedError, failure_report
from tests.conftest import ppo_config, write_yaml

HOLD = ("import sys, time; from ds_rlhf import lock; lock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)")


def _holder(out) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_refuses_and_a_dead_one_is_taken_over(tmp_path, capsys):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(lock.RunLockedError) as e:
            lock.acquire(tmp_path)
        assert (f"{tmp_path} is in use by another run: PID {holder.pid} on host "
                f"{socket.gethostname()}") in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the record stays, the lock goes
        holder.wait()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == holder.pid
    lock.acquire(tmp_path)
    try:
        assert f"taking over the lock of PID {holder.pid} on host" in capsys.readouterr().out
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert (tmp_path / "run.lock").read_text() == ""  # a normal end leaves no record
    lock.acquire(tmp_path)  # so the next run takes it silently
    lock.release()
    assert "taking over" not in capsys.readouterr().out


def _step(root, step: int, files: dict[str, bytes]) -> None:
    d = root / "checkpoints" / f"step_{step}"
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    write_manifest(d)
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (root / "checkpoints" / "latest").write_text(d.name)


def test_verify_names_the_damaged_file_and_resume_falls_back(tmp_path, capsys):
    files = {"actor/model.pt": b"x" * 1000, "rng_rank0.pt": b"seed"}
    for step in (2, 4, 6):
        _step(tmp_path, step, files)
    root = tmp_path / "checkpoints"
    assert verify(root / "step_6") is None and find_resume(tmp_path) == root / "step_6"

    (root / "step_6" / "actor" / "model.pt").write_bytes(b"x" * 10)  # truncated
    (root / "step_4" / "rng_rank0.pt").write_bytes(b"seeD")  # same size, other bytes
    assert verify(root / "step_4") == f"{root / 'step_4' / 'rng_rank0.pt'} differs from the " \
        "manifest (sha256)"
    assert find_resume(tmp_path) == root / "step_2"
    message = capsys.readouterr().out
    assert message.count("\n") == 1  # one line for both skipped checkpoints
    assert f"{root / 'step_6' / 'actor' / 'model.pt'} has 10 bytes, the manifest says 1000" \
        in message and "step_4 (" in message and f"resuming from {root / 'step_2'}" in message

    (root / "step_2" / "trainer_state.json").write_text('{"step": 2, "wor')  # torn
    with pytest.raises(CheckpointError) as e:
        find_resume(tmp_path)
    assert f"no intact checkpoint in {root}" in str(e.value)
    assert f"{root / 'step_2' / 'trainer_state.json'}: unreadable" in str(e.value)

    os.remove(root / "step_4" / "manifest.json")  # a checkpoint from before manifests
    assert find_resume(tmp_path) == root / "step_4"


def test_no_space_for_another_checkpoint_is_refused_before_writing(tmp_path):
    _step(tmp_path, 2, {"actor/model.pt": b"x"})
    big = tmp_path / "checkpoints" / "step_2" / "actor" / "optim.pt"
    with big.open("wb") as f:  # sparse: as big as the free space plus 1 MiB, on no disk
        f.truncate(shutil.disk_usage(tmp_path).free + (1 << 20))
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError) as e:  # what rank 0 checks before every rank writes
        checkpoint._prepare_save(root, root / "step_4")
    message = str(e.value)
    assert f"no space to save {tmp_path / 'checkpoints' / 'step_4'}:" in message
    assert f"free on {tmp_path / 'checkpoints'}, and the last checkpoint (step_2) took" in message
    assert f"the previous checkpoint {tmp_path / 'checkpoints' / 'step_2'} is intact" in message
    assert not (root / "step_4").exists()


def test_a_checkpoint_that_cannot_be_converted_is_refused_with_the_reason(tmp_path):
    _step(tmp_path, 2, {"model/mp_rank_00_model_states.pt": b"x"})  # ZeRO-0: no shards
    state = tmp_path / "checkpoints" / "step_2" / "trainer_state.json"
    state.write_text(json.dumps({"step": 2, "world_size": 2}))
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_state(state.parent, 1)
    assert f"{state.parent} was written by 2 ranks but this run has 1" in str(e.value)
    assert "no ZeRO optimizer shards to convert" in str(e.value)
    assert "Restart with 2 ranks" in str(e.value)
    assert not (state.parent / "universal").exists()
    assert checkpoint.read_state(state.parent, 2)["step"] == 2


def test_every_run_has_a_collective_timeout(assets, tmp_path):
    for cls in (PPORunConfig, SFTRunConfig, RMRunConfig):
        assert cls().distributed.timeout_minutes == 30.0
    path = write_yaml(ppo_config(assets, tmp_path), tmp_path / "c.yaml")
    assert load_config(path, ["--distributed.timeout_minutes", "0.5"]).distributed \
        .timeout_minutes == 0.5
    with pytest.raises(ConfigError, match="distributed.timeout_minutes: must be > 0"):
        load_config(path, ["--distributed.timeout_minutes", "0"])


def test_universal_loading_is_asked_of_deepspeed_only_on_another_world_size():
    engine = TrainEngineConfig()
    assert "checkpoint" not in deepspeed_config(engine, 2, 1, 2, on_cpu=True)
    assert deepspeed_config(engine, 2, 1, 2, on_cpu=True, load_universal=True)["checkpoint"] \
        == {"load_universal": True}
    state = {"world_size": 2}
    assert not checkpoint.is_universal(None, 1) and not checkpoint.is_universal(state, 2)
    assert checkpoint.is_universal(state, 1)


class FileEngine:
    """Stands in for a DeepSpeed engine in checkpoint.save: writes one file through its
    checkpoint engine, as DeepSpeed does."""

    def __init__(self):
        self.checkpoint_engine = SimpleNamespace(
            makedirs=lambda path, exist_ok: os.makedirs(path, exist_ok=exist_ok),
            save=lambda obj, path: torch.save(obj, path))

    def _copy_recovery_script(self, path):
        pass

    def save_checkpoint(self, save_dir, tag, save_latest):
        self.checkpoint_engine.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        self.checkpoint_engine.save({"w": torch.ones(4)}, os.path.join(save_dir, tag, "m.pt"))


def _save(out, step: int, coord, keep_last: int):
    return checkpoint.save(out, step, {"actor": FileEngine()}, {"sampler": {}}, coord,
                           keep_last)


def _names(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def test_rotation_keeps_the_new_checkpoint_and_moves_damaged_and_newer_ones_aside(
        tmp_path, coord, capsys):
    """The issue's case: keep_last 1, the newest step_200 damaged, resume falls back to
    step_100, and the next save is step 150. Rotation used to delete step_150 and step_100,
    leaving only the damaged step_200."""
    root = tmp_path / "checkpoints"
    for step in (50, 100, 200):
        _step(tmp_path, step, {"actor/m.pt": b"x" * 100})
    (root / "step_200" / "actor" / "m.pt").write_bytes(b"x" * 10)  # truncated
    (root / "step_50" / "actor" / "m.pt").write_bytes(b"y" * 100)  # other bytes
    assert find_resume(tmp_path) == root / "step_100"
    capsys.readouterr()

    _save(tmp_path, 150, coord, keep_last=1)
    names = _names(root)
    assert names[:1] == ["step_150"] and len(names) == 3, names  # step_100: deleted (keep 1)
    stale, damaged = names[1:]
    assert re.fullmatch(r"step_200\.stale-\d{8}-\d{6}", stale), names
    assert re.fullmatch(r"step_50\.damaged-\d{8}-\d{6}", damaged), names
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "moved aside" in line, line
    assert f"step_200 -> {root / stale}" in line and f"step_50 -> {root / damaged}" in line
    assert (root / stale / "actor" / "m.pt").read_bytes() == b"x" * 10  # kept as it was
    assert find_resume(tmp_path) == root / "step_150"
    assert (root / "latest").read_text() == "step_150"

    _save(tmp_path, 160, coord, keep_last=2)  # an ordinary save: nothing to move aside
    _save(tmp_path, 170, coord, keep_last=2)
    assert _names(root)[:2] == ["step_160", "step_170"] and len(_names(root)) == 4
    assert "moved aside" not in capsys.readouterr().out


def test_resume_false_refuses_checkpoints_and_fresh_moves_them_aside(tmp_path, coord, capsys):
    """The issue's case: resume false on a directory holding step_100 and step_200 deleted
    the new run's step_10 right after writing it; resume true then continued the old run."""
    for step in (100, 200):
        _step(tmp_path, step, {"actor/m.pt": b"x"})
    root = tmp_path / "checkpoints"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError) as e:
        checkpoint.resume_point(tmp_path, False)
    assert str(e.value).startswith(f"checkpoint.resume is false but {root} holds checkpoints "
                                   "(step_100, step_200). Set checkpoint.resume: true")
    assert "fresh to move them aside" in str(e.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

    assert checkpoint.resume_point(tmp_path, "fresh") == (None, None)
    [old] = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert f"moved the previous run aside to {old}" in capsys.readouterr().out
    assert _names(old / "checkpoints") == ["step_100", "step_200"] and not root.exists()
    _save(tmp_path, 10, coord, keep_last=1)
    assert _names(root) == ["step_10"] and find_resume(tmp_path) == root / "step_10"
    assert checkpoint.resume_point(tmp_path, True)[1]["step"] == 10
    assert checkpoint.resume_point(tmp_path / "new", False) == (None, None)  # nothing there


def _tree(path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_fresh_moves_the_whole_previous_run_aside_in_one_bundle(tmp_path, capsys):
    """The issue's case: fresh moved checkpoints/ aside but the new run deleted metrics.jsonl
    and samples.jsonl and overwrote config.yaml and the exports. Every file a run writes goes
    into one previous-<time>/ (the lock, files no run writes and older bundles stay); a second
    fresh start makes a second bundle beside the first, never inside it."""
    _step(tmp_path, 4, {"actor/m.pt": b"x"})
    run = {"metrics.jsonl": b'{"step": 1}\n', "samples.jsonl": b'{"step": 1}\n',
           "config.yaml": b"seed: 1\n", "engines.json": b"{}\n", "eval.json": b"{}\n",
           "metrics.png": b"png", "actor/model.safetensors": b"a", "critic/config.json": b"c",
           "model/config.json": b"m", "wandb/offline-run/run.wandb": b"w"}
    for name, data in run.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("mine")  # not a run's: stays
    lock.acquire(tmp_path)  # what open_run holds while it moves the run aside
    try:
        before = _tree(tmp_path)
        assert checkpoint.resume_point(tmp_path, "fresh") == (None, None)
        [bundle] = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
        assert re.fullmatch(r"previous-\d{8}-\d{6}", bundle.name), bundle.name
        line = capsys.readouterr().out
        assert line.count("\n") == 1 and f"moved the previous run aside to {bundle} " in line
        assert "nothing was deleted" in line
        kept = {"notes.txt", lock.NAME}
        assert _tree(bundle) == {k: v for k, v in before.items() if k not in kept}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([bundle.name, *kept])

        (tmp_path / "metrics.jsonl").write_text('{"step": 2}\n')  # the second run's record
        checkpoint.resume_point(tmp_path, "fresh")
        second = [p for p in tmp_path.iterdir() if p.name.startswith("previous-") and
                  p != bundle]
        assert [_tree(p) for p in second] == [{"metrics.jsonl": b'{"step": 2}\n'}]
        assert _tree(bundle) == {k: v for k, v in before.items() if k not in kept}
        capsys.readouterr()
        assert checkpoint.resume_point(tmp_path, "fresh") == (None, None)  # nothing to move
        assert capsys.readouterr().out == ""
    finally:
        lock.release()


def test_fresh_refuses_to_read_what_it_would_move_aside(tmp_path):
    """`actor.model.path: OUTPUT_DIR/actor` (going on from the previous run's export) with
    fresh: its actor/ would be moved aside before the engine loads it. One line, before
    anything starts; the same path in a bundle, or with resume true, is fine."""
    from ds_rlhf.checks import check_not_moved

    (tmp_path / "out" / "actor").mkdir(parents=True)
    (tmp_path / "out" / "previous-20250101-000000" / "actor").mkdir(parents=True)
    cfg = PPORunConfig(output_dir=str(tmp_path / "out"))
    cfg.checkpoint.resume = "fresh"
    with pytest.raises(ConfigError) as e:
        check_not_moved(cfg, str(tmp_path / "out" / "actor"), "actor.model.path")
    assert str(e.value) == (
        f"actor.model.path: {tmp_path / 'out' / 'actor'} is in output_dir's actor, which "
        f"checkpoint.resume: fresh moves aside (into {tmp_path / 'out' / 'previous'}-<time>/) "
        "before this run reads it; copy it out of output_dir first, or use another output_dir")
    check_not_moved(cfg, str(tmp_path / "out" / "previous-20250101-000000" / "actor"), "a")
    cfg.checkpoint.resume = True
    check_not_moved(cfg, str(tmp_path / "out" / "actor"), "actor.model.path")


def test_a_damaged_checkpoint_is_moved_aside_when_the_run_reaches_its_step(
        tmp_path, coord, capsys):
    """The issue's case: step_200 damaged, resume falls back to step_100, and the next save is
    step 200 again: it deleted the damaged one as if an interrupted save had left it. Only a
    directory without trainer_state.json is such a leftover; a complete one, damaged or not
    (an intact one newer than the resumed checkpoint), is moved aside."""
    root = tmp_path / "checkpoints"
    for step in (100, 200):
        _step(tmp_path, step, {"actor/m.pt": b"x" * 100})
    (root / "step_200" / "actor" / "m.pt").write_bytes(b"x" * 10)  # truncated
    assert find_resume(tmp_path) == root / "step_100"
    capsys.readouterr()

    _save(tmp_path, 200, coord, keep_last=5)
    names = _names(root)
    assert names[:2] == ["step_100", "step_200"] and len(names) == 3, names
    assert re.fullmatch(r"step_200\.damaged-\d{8}-\d{6}", names[2]), names
    assert (root / names[2] / "actor" / "m.pt").read_bytes() == b"x" * 10  # kept as it was
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and f"step_200 -> {root / names[2]}" in line, line
    assert find_resume(tmp_path) == root / "step_200"

    (root / "latest").write_text("step_100")  # a user went back to step_100 by hand
    checkpoint._prepare_save(root, root / "step_200")  # intact, newer than the resumed one
    [stale] = [n for n in _names(root) if n.startswith("step_200.stale-")]
    assert json.loads((root / stale / "trainer_state.json").read_text())["step"] == 200
    assert f"step_200 -> {root / stale}" in capsys.readouterr().out

    (root / "step_300" / "actor").mkdir(parents=True)  # an interrupted save: no trainer state
    checkpoint._prepare_save(root, root / "step_300")
    assert not (root / "step_300").exists() and "step_300" not in capsys.readouterr().out


def test_a_failed_write_of_rank_0_stops_the_save_and_keeps_the_previous(
        tmp_path, coord, monkeypatch):
    _save(tmp_path, 1, coord, keep_last=1)

    def full_disk(step_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_manifest", full_disk)
    with pytest.raises(CheckpointError) as e:
        _save(tmp_path, 2, coord, keep_last=1)
    root = tmp_path / "checkpoints"
    assert str(e.value).startswith(f"saving {root / 'step_2'} failed (rank 0: [Errno 28] No "
                                   "space left on device); ")
    assert f"The previous checkpoint {root / 'step_1'} is intact" in str(e.value)
    assert e.value.every_rank  # raised by every rank at the same point: rank 0 prints it
    assert _names(root) == ["step_1"] and find_resume(tmp_path) == root / "step_1"


def test_on_main_turns_a_bug_of_rank_0_into_one_error_for_every_rank(coord, capsys):
    def broken():
        raise KeyError("k")

    with pytest.raises(RanksFailedError) as e:
        coord.on_main(broken)
    assert e.value.code == 1 and e.value.every_rank
    assert "rank 0 (host " in str(e.value) and "KeyError: 'k'" in str(e.value)
    assert "Traceback" in capsys.readouterr().err  # rank 0 keeps the trace of a bug
    copy = pickle.loads(pickle.dumps(e.value))  # how it travels between ranks
    assert (str(copy), copy.code) == (str(e.value), 1)


def test_the_failure_report_names_each_distinct_message_once():
    same = [(0, "a", "bad"), (1, "b", "bad")]
    assert failure_report(same, 2) == "bad"  # every rank said it: no need to name them
    mixed = [(3, "b", "no RM_TOKEN"), (1, "a", "no RM_TOKEN"), (2, "b", "no file")]
    assert failure_report(mixed, 4).splitlines() == [
        "ranks 1, 3 (host a, b): no RM_TOKEN", "rank 2 (host b): no file"]


def test_missing_environment_variables_are_named_together(monkeypatch):
    cfg = PPORunConfig(rewards=[
        RewardSpec(url="https://rm.example/score", token_env="RM_TOKEN_A"),
        RewardSpec(url="https://rm.example/other", token_env="RM_TOKEN_B")])
    monkeypatch.setenv("RM_TOKEN_A", "")
    monkeypatch.delenv("RM_TOKEN_B", raising=False)
    with pytest.raises(ConfigError) as e:
        check_environment(cfg)
    assert str(e.value).startswith("environment variables RM_TOKEN_A (rewards[0].token_env), "
                                   "RM_TOKEN_B (rewards[1].token_env) not set or empty")
    monkeypatch.setenv("RM_TOKEN_A", "t")
    monkeypatch.setenv("RM_TOKEN_B", "t")
    check_environment(cfg)


def test_checkpoint_resume_takes_true_false_or_fresh(assets, tmp_path):
    path = write_yaml(ppo_config(assets, tmp_path), tmp_path / "c.yaml")
    for value, want in (("fresh", "fresh"), ("false", False), ("true", True)):
        assert load_config(path, ["--checkpoint.resume", value]).checkpoint.resume == want
    with pytest.raises(ConfigError, match="checkpoint.resume: expected bool or 'fresh', got "
                                          "'again'"):
        load_config(path, ["--checkpoint.resume", "again"])
