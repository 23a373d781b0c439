"""Metrics out of the trainers, rank 0 only: `metrics.jsonl` (always), a console line, sample
rows in `samples.jsonl`, and Weights & Biases when `tracking.wandb_project` is set.

W&B follows its guide for distributed jobs: one run, written by rank 0. A fresh run gets a new
id (`Tracker.run_id`); the checkpoint saves it and a resumed run passes it back as `run_id`, so
`wandb.init(id=..., resume="allow")` continues the same W&B run. `WANDB_MODE=offline` writes
the run under `OUTPUT_DIR/wandb/` for a later `wandb sync`. `wandb` is imported only when it
is turned on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ds_rlhf.config import TrackingConfig


class Timer:
    """Wall-clock seconds per named phase: `with timer("generate"): ...`. `on_enter(name)` is
    called as each phase starts (the trainers name the phase for error messages with it)."""

    def __init__(self, on_enter: Callable[[str], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.on_enter = on_enter

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.on_enter is not None:
            self.on_enter(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Progress:
    """The start of the console line: `step k/N | elapsed T | eta T`.

    Elapsed counts from this object's start (a resumed run: from its own start). The ETA is
    the mean duration of the last up to `window` steps times the steps left, where a step
    lasts from one `update` (one log call) to the next, so evals and checkpoint saves on the
    way count too; "eta ?" until a step has been measured (the first step of a process
    includes its start-up, so it is not one). `now` comes from the caller's clock.
    """

    def __init__(self, total_steps: int, now: float, window: int = 10):
        self.total_steps = total_steps
        self.start = now
        self.marks: deque[tuple[int, float]] = deque(maxlen=window + 1)  # (step, time)

    def update(self, step: int, now: float) -> str:
        self.marks.append((step, now))
        (first_step, first_time), (last_step, last_time) = self.marks[0], self.marks[-1]
        eta = "?"
        if last_step > first_step:
            per_step = (last_time - first_time) / (last_step - first_step)
            eta = format_duration(per_step * max(self.total_steps - step, 0))
        return (f"step {step}/{self.total_steps} | elapsed {format_duration(now - self.start)}"
                f" | eta {eta}")


def format_duration(seconds: float) -> str:
    """Whole seconds as 42s, 5m07s or 1h02m03s."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# The columns of the console line after step k/N, elapsed and eta, in order; the file gets
# every metric.
CONSOLE = {"samples/s": "perf/samples_per_s",  # every trainer; then PPO:
           "score": "objective/scores", "kl": "objective/kl", "pg_loss": "loss/policy_avg",
           "vf_loss": "loss/value_avg", "clipfrac": "policy/clipfrac_avg",
           "resp_len": "response_length/mean",  # PPO; then SFT and the reward model:
           "loss": "train/loss", "acc": "train/accuracy",  # then DPO:
           "pref_acc": "rewards/accuracies", "margin": "rewards/margins",
           "lr": "train/lr", "sec": "timing/step"}

# The columns of the W&B sample table (the keys of the rows given to `log_samples`).
TABLE_COLUMNS = ["step", "prompt", "response", "score"]
TABLE_KEY = "samples"  # the W&B key of the table


def new_run_id() -> str:
    """A fresh W&B run id (8 lowercase letters and digits, as W&B makes them)."""
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


class Tracker:
    """`log(step, metrics)` every step, `log_samples(rows)` every `sample_every` steps,
    `finish()` at the end. Every method is a no-op on ranks other than rank 0.

    tracking:  the run's TrackingConfig; W&B is on when its `wandb_project` is set.
    config:    the resolved run config (a dataclass or a dict), sent to W&B as the run config.
    run_id:    the W&B run id to continue (from the checkpoint); None starts a new run.
    """

    def __init__(self, output_dir: str | Path, is_main: bool, log_every: int, total_steps: int,
                 start_step: int = 0, *, tracking: TrackingConfig | None = None,
                 config: Any = None, run_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.is_main = is_main
        self.clock = clock
        self.progress = Progress(total_steps, clock())
        self.log_every = log_every
        self.total_steps = total_steps
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self.samples_path = self.output_dir / "samples.jsonl"
        self.run_id = run_id  # the W&B run id; saved by checkpoints (rank 0's is the one)
        self.wandb_run = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:  # a fresh run starts fresh files
            self.path.unlink(missing_ok=True)
            self.samples_path.unlink(missing_ok=True)
        else:  # a resumed run drops what was logged after its checkpoint
            _truncate_after(self.path, start_step)
            _truncate_after(self.samples_path, start_step)
        if tracking is not None and tracking.wandb_project is not None:
            self._init_wandb(tracking, config)
            if start_step > 0:
                self._relog_to_wandb()

    def _init_wandb(self, tracking: TrackingConfig, config: Any) -> None:
        from ds_rlhf.config import ConfigError
        from ds_rlhf.extras import require

        require("wandb", "tracking.wandb_project", ConfigError)  # checks.py says it earlier
        import wandb

        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        if self.run_id is None:
            self.run_id = new_run_id()
        self.wandb_run = wandb.init(
            project=tracking.wandb_project, entity=tracking.wandb_entity,
            group=tracking.wandb_group, name=tracking.wandb_name,
            tags=list(tracking.wandb_tags) or None, config=config, id=self.run_id,
            resume="allow", dir=str(self.output_dir))

    def _relog_to_wandb(self) -> None:
        """Send W&B the steps of metrics.jsonl (already cut at the checkpoint) that its run
        lacks. W&B drops what a killed process had not sent yet, and keeps only steps above
        the last it has (`run.step` is the next one: 0 offline, where the server sorts it out
        at sync), so this makes the resumed run hold every step its checkpoint covers."""
        if not self.path.is_file():
            return
        first = self.wandb_run.step
        for row in read_metrics(self.path):
            if row["step"] >= first:
                self.wandb_run.log({k: v for k, v in row.items() if k != "step"},
                                   step=row["step"])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json_line({"step": step, **metrics}))
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)
        progress = self.progress.update(step, self.clock())
        cells = [f"{label} {metrics[k]:.4g}" for label, k in CONSOLE.items() if k in metrics]
        # A whole line each time, never a carriage return: Slurm output files read cleanly.
        if cells and (step % self.log_every == 0 or step == self.total_steps):
            print(" | ".join([progress, *cells]), flush=True)

    def log_samples(self, rows: list[dict]) -> None:
        """Rows {step, prompt, response, score, ...} of one step: all go to samples.jsonl, and
        (step, prompt, response, score) to a W&B table at that step."""
        if not self.is_main or not rows:
            return
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json_line(row))
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=TABLE_COLUMNS,
                                data=[[row[c] for c in TABLE_COLUMNS] for row in rows])
            self.wandb_run.log({TABLE_KEY: table}, step=int(rows[0]["step"]))

    def finish(self, exit_code: int | None = None) -> None:
        """Close the W&B run (uploads or, offline, flushes it); safe to call twice."""
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def json_line(row: dict[str, Any]) -> str:
    """One strict JSON line: NaN and inf (which json.dumps writes as the non-JSON NaN and
    Infinity) become null, so any JSON reader can read metrics.jsonl and samples.jsonl."""
    def finite(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps({key: finite(value) for key, value in row.items()}, allow_nan=False) + "\n"


def _truncate_after(path: Path, step: int) -> None:
    """Keep the rows of `path` (JSON lines with a "step") up to `step`; drop a torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if row.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
