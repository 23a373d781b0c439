"""W&B in offline mode through the real entry point, read back from the run's record log, then
`ds-rlhf plot` on the run's metrics.jsonl; and a resumed Tracker continuing the same W&B run.

wandb 0.31 ships no Python reader for its `.wandb` files (the old
`wandb.sdk.internal.datastore` is gone; wandb-core writes them), so `wandb_records` below
reads the format itself: the LevelDB log format (32 KiB blocks of chunks with a 7-byte header
crc32 / length / type, FULL=1 FIRST=2 MIDDLE=3 LAST=4; the crc is zlib.crc32 of the data seeded
with the crc of the type byte) after a 7-byte file header ":W&B", 0xBEE1, version 0. Each
record is a `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, cpu_env, ppo_config, write_yaml

pytestmark = pytest.mark.e2e

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator:
    """The `Record` protos of a `.wandb` transaction log, checksums checked."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # too little room for a header: block padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            continue
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"bad checksum at {pos}"
        parts = [chunk] if kind in (FULL, FIRST) else [*parts, chunk]
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(b"".join(parts))
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: Path) -> dict:
    """What an offline run logged: its run record, config, history rows by step.

    `run.finish()` can return before wandb-core has written the records (seen under pytest's
    output capture): wait for the run's last record, `exit`, to be on disk first."""
    [log] = run_dir.glob("run-*.wandb")
    deadline = time.time() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(log)):
        assert time.time() < deadline, f"{log} has no exit record"
        time.sleep(0.1)
    out: dict = {"run": None, "config": {}, "history": {}}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({_key(u): json.loads(u.value_json)
                                  for u in record.run.config.update})
        elif kind == "config":
            out["config"].update({_key(u): json.loads(u.value_json)
                                  for u in record.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            out["history"][row["_step"]] = row
    return out


def offline_runs(output_dir: Path, run_id: str) -> list[Path]:
    return sorted(output_dir.glob(f"wandb/offline-run-*-{run_id}*"))


@pytest.fixture(scope="module")
def ppo_run(assets, tmp_path_factory) -> Path:
    """Two PPO steps, one process, W&B offline, samples every step."""
    tmp = tmp_path_factory.mktemp("tracking")
    out = tmp / "out"
    cfg = ppo_config(assets, out, ppo={"steps": 2}, tracking={
        "sample_every": 1, "wandb_project": "ds-rlhf-tests", "wandb_group": "e2e",
        "wandb_name": "tiny-ppo", "wandb_tags": ["ppo", "tiny"]})
    proc = subprocess.run(
        [sys.executable, "-m", "ds_rlhf", "ppo", "--config", str(write_yaml(cfg, tmp / "r.yaml")),
         "--ppo.kl_coef", "0.07"],
        cwd=REPO, env=cpu_env(WANDB_MODE="offline"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_offline_wandb_run_has_metrics_config_and_samples(ppo_run):
    [run_dir] = ppo_run.glob("wandb/offline-run-*")
    run = read_run(run_dir)

    assert run["run"].project == "ds-rlhf-tests"
    assert run["run"].run_group == "e2e" and run["run"].display_name == "tiny-ppo"
    assert list(run["run"].tags) == ["ppo", "tiny"]
    assert run_dir.name.endswith("-" + run["run"].run_id)

    # the resolved config, flags included
    assert run["config"]["ppo"]["kl_coef"] == 0.07
    assert run["config"]["ppo"]["steps"] == 2
    assert run["config"]["tracking"]["wandb_project"] == "ds-rlhf-tests"
    assert run["config"]["output_dir"] == str(ppo_run)

    # the same numbers as metrics.jsonl, at the same steps
    local = [json.loads(x) for x in (ppo_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in local] == [1, 2]
    for row in local:
        logged = run["history"][row["step"]]
        for key in ("objective/scores", "objective/kl", "objective/rlhf_reward",
                    "loss/policy_avg", "loss/value_avg", "response_length/mean"):
            assert logged[key] == pytest.approx(row[key]), key
        assert logged["samples/_type"] == "table-file"
        assert logged["samples/nrows"] == 8

    # one table per step: (step, prompt, response, score) rows
    tables = sorted(run_dir.glob("files/media/table/samples_*.table.json"))
    assert len(tables) == 2
    seen_steps = set()
    for table in tables:
        content = json.loads(table.read_text())
        assert content["columns"] == ["step", "prompt", "response", "score"]
        assert len(content["data"]) == 8
        for step, prompt, response, score in content["data"]:
            assert isinstance(prompt, str) and prompt.startswith("review of")
            assert isinstance(response, str) and isinstance(score, float)
            seen_steps.add(step)
    assert seen_steps == {1, 2}


def test_plot_command_on_the_run(ppo_run, tmp_path):
    png = tmp_path / "ppo.png"
    proc = subprocess.run(
        [sys.executable, "-m", "ds_rlhf", "plot", str(ppo_run / "metrics.jsonl"), "--out",
         str(png)], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_resume_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from ds_rlhf.config import TrackingConfig
    from ds_rlhf.tracking import Tracker, read_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracking = TrackingConfig(wandb_project="ds-rlhf-tests")
    first = Tracker(tmp_path, True, 1, 2, tracking=tracking, config={"seed": 1})
    run_id = first.run_id
    assert run_id and len(run_id) == 8
    first.log(1, {"objective/scores": 1.0})
    first.finish()

    # the checkpoint saved run_id; the restarted job passes it back
    resumed = Tracker(tmp_path, True, 1, 2, start_step=1, tracking=tracking,
                      config={"seed": 1}, run_id=run_id)
    assert resumed.run_id == run_id
    resumed.log(2, {"objective/scores": 2.0})
    resumed.finish()

    runs = offline_runs(tmp_path, run_id)
    assert len(runs) == 2  # one directory per process, both for the same W&B run
    logged = [read_run(d) for d in runs]
    assert [r["run"].run_id for r in logged] == [run_id, run_id]
    # offline, the resumed process cannot ask W&B what it holds: it sends step 1 again (its
    # checkpoint's steps, from metrics.jsonl), then step 2
    assert [sorted(r["history"]) for r in logged] == [[1], [1, 2]]
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_resumed_run_sends_wandb_the_steps_a_killed_run_lost(tmp_path, monkeypatch):
    """kill -9 loses what W&B had not sent yet; metrics.jsonl has every step (a line per step).
    The resumed run sends W&B the steps up to its checkpoint again, then goes on."""
    from ds_rlhf.config import TrackingConfig
    from ds_rlhf.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    killed = Tracker(tmp_path, True, 1, 4)  # steps 1-3 reached metrics.jsonl, none reached W&B
    for step in (1, 2, 3):
        killed.log(step, {"objective/scores": float(step)})
    resumed = Tracker(tmp_path, True, 1, 4, start_step=2, run_id="abcd1234", config={},
                      tracking=TrackingConfig(wandb_project="ds-rlhf-tests"))
    resumed.log(3, {"objective/scores": 30.0})  # step 3 again, from the step-2 checkpoint
    resumed.finish()
    [run_dir] = offline_runs(tmp_path, "abcd1234")
    history = read_run(run_dir)["history"]
    assert sorted(history) == [1, 2, 3]
    assert [history[s]["objective/scores"] for s in (1, 2, 3)] == [1.0, 2.0, 30.0]
