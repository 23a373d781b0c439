"""Metrics out of the trainers: `metrics.jsonl` (always) and a console line, rank 0 only."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Timer:
    """Wall-clock seconds per named phase: `with timer("generate"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# The columns of the console line, in order; the file gets every metric.
CONSOLE = {"score": "objective/scores", "kl": "objective/kl", "pg_loss": "loss/policy_avg",
           "vf_loss": "loss/value_avg", "clipfrac": "policy/clipfrac_avg",
           "resp_len": "response_length/mean", "sec": "timing/step"}


class Tracker:
    def __init__(self, output_dir: str | Path, is_main: bool, log_every: int, total_steps: int,
                 start_step: int = 0):
        self.is_main = is_main
        self.log_every = log_every
        self.total_steps = total_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self.samples_path = Path(output_dir) / "samples.jsonl"
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start_step == 0:  # a fresh run starts fresh files
                self.path.unlink(missing_ok=True)
                self.samples_path.unlink(missing_ok=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % self.log_every == 0 or step == self.total_steps:
            cells = [f"{label} {metrics[k]:.4g}" for label, k in CONSOLE.items() if k in metrics]
            print(f"step {step}/{self.total_steps} | " + " | ".join(cells), flush=True)


    def log_samples(self, rows: list[dict]) -> None:
        if not self.is_main:
            return
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
