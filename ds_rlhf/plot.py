"""`ds-rlhf plot`: curves of a run's metrics.jsonl in one PNG, for runs without W&B.

    ds-rlhf plot runs/ppo                      # writes runs/ppo/metrics.png
    ds-rlhf plot runs/ppo/metrics.jsonl --out ppo.png
    ds-rlhf plot runs/ppo --keys objective/kl,val/ratio

One panel per quantity (reward, KL, losses, response length for PPO; loss and accuracy for SFT
and the reward model; implicit rewards, accuracy and log-probs for DPO), each against step;
keys that the file lacks are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ds_rlhf.config import UserInputError
from ds_rlhf.extras import require

# (panel title, metric keys drawn in it), in order.
PANELS: list[tuple[str, list[str]]] = [
    ("reward", ["objective/scores", "objective/rlhf_reward"]),
    ("KL to the reference", ["objective/kl"]),
    ("policy loss", ["loss/policy_avg"]),
    ("value loss", ["loss/value_avg"]),
    ("response length", ["response_length/mean"]),
    ("loss", ["train/loss", "eval/loss"]),
    ("accuracy", ["train/accuracy", "eval/accuracy"]),
    ("reward-model scores", ["eval/chosen_mean", "eval/rejected_mean"]),
    ("DPO implicit rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("DPO preference accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
    ("DPO log-probabilities", ["logps/chosen", "logps/rejected"]),
]


def find_metrics(path: str | Path) -> Path:
    """A run directory or a metrics.jsonl file -> the metrics.jsonl file."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UserInputError(f"{file}: no such file; pass a run's output_dir or its "
                             "metrics.jsonl")
    return file


def read_rows(file: Path) -> list[dict]:
    """The JSON rows of `file`; a torn last line (a run killed mid-write) is skipped."""
    lines = [(i, line) for i, line in enumerate(file.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) - 1 and rows:
                break
            raise UserInputError(f"{file}, line {i}: not a JSON object ({e})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise UserInputError(f"{file}, line {i}: expected a JSON object with a \"step\"")
        rows.append(row)
    if not rows:
        raise UserInputError(f"{file}: no metrics yet (the file is empty); let the run log a "
                             "step first")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have a finite number under `key`."""
    steps, values = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(row["step"])
            values.append(float(v))
    return steps, values


def plot_metrics(path: str | Path, out: str | Path | None = None,
                 keys: list[str] | None = None) -> Path:
    """Draw the panels (or one panel per key of `keys`) into a PNG; returns its path."""
    file = find_metrics(path)
    rows = read_rows(file)
    panels = [(k, [k]) for k in keys] if keys else PANELS
    drawn = [(title, [(k, *series(rows, k)) for k in ks]) for title, ks in panels]
    drawn = [(title, [s for s in lines if s[1]]) for title, lines in drawn]
    drawn = [(title, lines) for title, lines in drawn if lines]
    if not drawn:
        present = sorted({k for row in rows for k in row if k != "step"})
        wanted = sorted({k for _, ks in panels for k in ks})
        raise UserInputError(f"{file}: none of {', '.join(wanted)} has a numeric value; the "
                             f"file has {', '.join(present) or 'no metrics'} (choose with --keys)")
    out = Path(out) if out is not None else file.with_suffix(".png")

    require("matplotlib", "ds-rlhf plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(drawn))
    nrows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, drawn, strict=False):
        for key, steps, values in lines:
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None,
                    markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    fig.suptitle(str(file), fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ds-rlhf plot", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run's output_dir or its metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default: metrics.png next to the file)")
    parser.add_argument("--keys", help="comma-separated metric keys, one panel each "
                        "(default: reward, KL, losses, response length, accuracy)")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    try:
        out = plot_metrics(args.run, args.out, keys)
    except UserInputError as e:
        print(f"ds-rlhf plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
