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
from ds_rlhf.tracking import Tracker, read_metrics
from tests.conftest import REPO, ppo_config, write_yaml

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(step: int) -> dict:
    return {"objective/scores": 0.5 * step, "objective/kl": 0.01 * step,
            "loss/policy_avg": -0.1, "loss/value_avg": 0.2 / step,
            "response_length/mean": 7.0 + step, "timing/step": 1.25, "perf/samples_per_s": 8.0}


def _rows(step: int, n: int = 2) -> list[dict]:
    return [{"step": step, "prompt_index": i, "prompt": f"p{i}", "response": f"r{i}",
             "response_ids": [i, 2], "score": 0.1 * i} for i in range(n)]


def test_metrics_lines_console_and_samples(tmp_path, capsys):
    tracker = Tracker(tmp_path, is_main=True, log_every=2, total_steps=3)
    for step in (1, 2, 3):
        tracker.log(step, _metrics(step))
    tracker.log_samples(_rows(2))
    tracker.finish()  # W&B off: nothing to close

    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": s, **_metrics(s)}
                                                        for s in (1, 2, 3)]
    lines = capsys.readouterr().out.splitlines()
    # every log_every steps and the last step; labelled cells in CONSOLE order
    assert [line.split(" | ")[0] for line in lines] == ["step 2/3", "step 3/3"]
    assert lines[0] == ("step 2/3 | score 1 | kl 0.02 | pg_loss -0.1 | vf_loss 0.1 | "
                        "resp_len 9 | sec 1.25")
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == _rows(2)
    assert tracker.run_id is None and tracker.wandb_run is None


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
    assert "step 2/3 | score nan | kl inf" in capsys.readouterr().out  # the console says so
    assert plot_metrics(tmp_path).read_bytes().startswith(PNG_MAGIC)  # nulls are skipped
