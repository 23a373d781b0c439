"""Tracker (metrics.jsonl, console line, samples.jsonl, rank 0 only), the tracking config checks
and `ds-rlhf plot` on a hand-written metrics.jsonl. W&B itself is tested in tests/e2e."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ds_rlhf.cli import main as cli_main
from ds_rlhf.config import ConfigError, TrackingConfig, UserInputError, load_config
from ds_rlhf.plot import plot_metrics
from ds_rlhf.tracking import Progress, Tracker, format_duration, read_metrics
from tests.conftest import REPO, ppo_config, write_yaml

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(step: int) -> dict:
    return {"objective/scores": 0.5 * step, "objective/kl": 0.01 * step,
            "loss/policy_avg": -0.1, "loss/value_avg": 0.2 / step,
            "response_length/mean": 7.0 + step, "timing/step": 1.25, "perf/samples_per_s": 8.0}


def _rows(step: int, n: int = 2) -> list[dict]:
    return [{"step": step, "prompt_index": i, "prompt": f"p{i}", "response": f"r{i}",
             "response_ids": [i, 2], "score": 0.1 * i} for i in range(n)]


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_metrics_lines_console_and_samples(tmp_path, capsys):
    clock = FakeClock()
    tracker = Tracker(tmp_path, is_main=True, log_every=2, total_steps=3, clock=clock)
    for step, seconds in ((1, 2.0), (2, 3.0), (3, 5.0)):
        clock.now += seconds
        tracker.log(step, _metrics(step))
    tracker.log_samples(_rows(2))
    tracker.finish()  # W&B off: nothing to close

    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": s, **_metrics(s)}
                                                        for s in (1, 2, 3)]
    out = capsys.readouterr().out
    assert "\r" not in out  # whole lines only: Slurm output files read cleanly
    lines = out.splitlines()
    # every log_every steps and the last step; labelled cells in CONSOLE order
    assert [line.split(" | ")[0] for line in lines] == ["step 2/3", "step 3/3"]
    # step 2: 2 + 3 = 5 s in; step 2 (the only one measured) took 3 s, 1 step left: eta 3 s
    assert lines[0] == ("step 2/3 | elapsed 5s | eta 3s | samples/s 8 | score 1 | kl 0.02 | "
                        "pg_loss -0.1 | vf_loss 0.1 | resp_len 9 | sec 1.25")
    assert lines[1].startswith("step 3/3 | elapsed 10s | eta 0s | samples/s 8 | score 1.5")
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == _rows(2)
    assert tracker.run_id is None and tracker.wandb_run is None


def test_progress_eta_is_the_mean_of_the_last_ten_steps_times_steps_left():
    progress = Progress(total_steps=100, now=50.0)
    assert progress.update(1, 80.0) == "step 1/100 | elapsed 30s | eta ?"  # nothing measured
    now = 80.0
    for step in range(2, 12):  # steps 2-11 take 1 s, 2 s, ..., 10 s
        now += step - 1
        line = progress.update(step, now)
    # 30 + (1 + ... + 10) = 85 s in; mean of the last 10 steps 5.5 s x 89 steps left = 489.5
    assert line == "step 11/100 | elapsed 1m25s | eta 8m10s"
    line = progress.update(12, now + 21.0)  # step 12 takes 21 s; step 2's 1 s leaves the window
    # (2 + ... + 10 + 21) / 10 = 7.5 s x 88 steps left = 660 s
    assert line == "step 12/100 | elapsed 1m46s | eta 11m00s"
    # steps logged two at a time: the mean is per step
    assert Progress(10, 0.0).update(2, 4.0).endswith("eta ?")
    two = Progress(10, 0.0)
    two.update(2, 4.0)
    assert two.update(4, 10.0) == "step 4/10 | elapsed 10s | eta 18s"  # 3 s x 6


def test_a_resumed_run_counts_from_its_own_start(tmp_path, capsys):
    """Resumed at step 40 of 50: elapsed from this process's start, eta from its own steps."""
    clock = FakeClock(500.0)
    tracker = Tracker(tmp_path, is_main=True, log_every=1, total_steps=50, start_step=40,
                      clock=clock)
    for step, seconds in ((41, 7.0), (42, 2.0), (43, 4.0)):
        clock.now += seconds
        tracker.log(step, {"train/loss": 1.0, "timing/step": seconds})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | loss")[0] for line in lines] == [
        "step 41/50 | elapsed 7s | eta ?",  # the first step includes loading the checkpoint
        "step 42/50 | elapsed 9s | eta 16s",  # 2 s x 8
        "step 43/50 | elapsed 13s | eta 21s"]  # (2 + 4) / 2 x 7


def test_durations_read_as_seconds_minutes_and_hours():
    assert [format_duration(s) for s in (0.4, 42, 59.6, 307, 3723, 90000)] == [
        "0s", "42s", "1m00s", "5m07s", "1h02m03s", "25h00m00s"]


def test_other_ranks_write_nothing(tmp_path, capsys):
    tracker = Tracker(tmp_path / "out", is_main=False, log_every=1, total_steps=1,
                      tracking=TrackingConfig(wandb_project="never-started"))
    tracker.log(1, _metrics(1))
    tracker.log_samples(_rows(1))
    tracker.finish()
    assert not (tmp_path / "out").exists()
    assert capsys.readouterr().out == ""
    assert tracker.wandb_run is None


def test_fresh_run_restarts_files_and_resume_drops_rows_after_checkpoint(tmp_path):
    first = Tracker(tmp_path, is_main=True, log_every=1, total_steps=4)
    for step in (1, 2, 3):
        first.log(step, {"x": float(step)})
        first.log_samples(_rows(step, n=1))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "x": 4')  # torn by a crash

    # resumed from the checkpoint of step 2: rows of steps 3 and 4 were never saved
    resumed = Tracker(tmp_path, is_main=True, log_every=1, total_steps=4, start_step=2)
    resumed.log(3, {"x": 30.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 3, "x": 30.0}]
    assert [r["step"] for r in read_metrics(tmp_path / "samples.jsonl")] == [1, 2]

    Tracker(tmp_path, is_main=True, log_every=1, total_steps=4)  # start_step 0: a new run
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "samples.jsonl").exists()


def test_importing_and_tracking_without_wandb_stays_cheap(tmp_path):
    code = ("import sys; from ds_rlhf.config import TrackingConfig; "
            "from ds_rlhf.tracking import Tracker; "
            f"t = Tracker({str(tmp_path)!r}, True, 1, 1, tracking=TrackingConfig()); "
            "t.log(1, {'x': 1.0}); t.finish(); "
            "assert 'wandb' not in sys.modules, 'wandb imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_wandb_fields_from_yaml_and_flags(assets, tmp_path):
    path = write_yaml(ppo_config(assets, tmp_path, tracking={"wandb_project": "rlhf"}),
                      tmp_path / "run.yaml")
    cfg = load_config(path, ["--tracking.wandb_tags", "[ppo, tiny]",
                             "--tracking.wandb_group=sweep1"])
    assert cfg.tracking == TrackingConfig(sample_every=1, wandb_project="rlhf",
                                          wandb_group="sweep1", wandb_tags=["ppo", "tiny"])
    assert TrackingConfig().wandb_project is None  # W&B off by default
    with pytest.raises(ConfigError, match="did you mean 'wandb_project'"):
        load_config(path, ["--tracking.wandb_projet", "x"])
    with pytest.raises(ConfigError, match="tracking.wandb_tags"):
        load_config(path, ["--tracking.wandb_tags", "a"])  # a string, not a list


@pytest.mark.parametrize("fields, needle", [
    ({"wandb_entity": "team"}, "tracking.wandb_entity"),
    ({"wandb_tags": ["a"]}, "tracking.wandb_tags"),
    ({"wandb_project": ""}, "tracking.wandb_project: is empty"),
    ({"wandb_project": "p", "wandb_tags": ["x" * 65]}, "tracking.wandb_tags[0]"),
    ({"sample_every": -1}, "tracking.sample_every"),
])
def test_wandb_field_errors_name_the_field(fields, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        TrackingConfig(**fields).check()


# --------------------------------------------------------------------------------------------
# ds-rlhf plot
# --------------------------------------------------------------------------------------------


def _write_metrics(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_ppo_metrics(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl", [{"step": s, **_metrics(s)} for s in range(1, 6)])
    out = plot_metrics(tmp_path)  # a run directory
    assert out == tmp_path / "metrics.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_plot_sft_metrics_skips_missing_keys_and_a_torn_last_line(tmp_path, capsys):
    rows = [{"step": s, "train/loss": 3.0 / s} for s in range(1, 9)]
    rows += [{"step": 4, "eval/loss": 1.1, "eval/accuracy": 0.6},
             {"step": 8, "eval/loss": 0.9, "eval/accuracy": 0.7}]
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, rows)
    with path.open("a") as f:
        f.write('{"step": 9, "train/lo')
    assert cli_main(["plot", str(path), "--out", str(tmp_path / "sub" / "p.png")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "sub" / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_chosen_keys(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl", [{"step": s, "val/ratio": 1.0} for s in (1, 2)])
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "k.png", keys=["val/ratio"])
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_errors(tmp_path, capsys):
    with pytest.raises(UserInputError, match="no such file"):
        plot_metrics(tmp_path / "missing")
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserInputError, match="empty"):
        plot_metrics(tmp_path)
    _write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "other": 1.0}])
    with pytest.raises(UserInputError, match="the file has other"):
        plot_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserInputError, match="line 2"):
        plot_metrics(tmp_path)
    # the command: one line on stderr naming the file, exit code 2, no traceback
    assert cli_main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ds-rlhf plot: error:") and "nope" in err


def test_non_finite_values_are_written_as_null_and_plotted_around(tmp_path, capsys):
    """json.dumps writes NaN / Infinity, which no strict JSON reader accepts: null instead."""
    tracker = Tracker(tmp_path, is_main=True, log_every=1, total_steps=3)
    tracker.log(1, _metrics(1))
    tracker.log(2, {**_metrics(2), "objective/scores": float("nan"),
                    "objective/kl": float("inf")})
    tracker.log(3, _metrics(3))
    tracker.log_samples([{**_rows(2)[0], "score": float("nan")}])

    def refuse(name):
        raise ValueError(name)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=refuse) for line in lines]
    assert rows[1]["objective/scores"] is None and rows[1]["objective/kl"] is None
    assert rows[1]["loss/value_avg"] == 0.1  # the finite ones stay
    sample = json.loads((tmp_path / "samples.jsonl").read_text(), parse_constant=refuse)
    assert sample["score"] is None
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step 2/3 ")]
    assert "| score nan | kl inf |" in line  # the console says so
    assert plot_metrics(tmp_path).read_bytes().startswith(PNG_MAGIC)  # nulls are skipped
