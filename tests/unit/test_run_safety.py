"""The output_dir lock, checkpoint manifests and the free-space check, without engines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from ds_rlhf import checkpoint, lock
from ds_rlhf.checkpoint import CheckpointError, find_resume, verify, write_manifest
from ds_rlhf.config import (
    ConfigError,
    PPORunConfig,
    RMRunConfig,
    SFTRunConfig,
    TrainEngineConfig,
    load_config,
)
from ds_rlhf.engines.ds_config import deepspeed_config
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
