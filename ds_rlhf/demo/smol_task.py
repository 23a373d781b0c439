"""The real-model demo task: SmolLM2-135M-Instruct says which of two numbers is larger.

    python -m ds_rlhf.demo.smol_task OUTDIR [--seed 0]      # writes the prompt files

A prompt is one user message, "Which number is larger, 59 or 63?", for two distinct numbers
10-99, rendered with the model's chat template (its default system prompt included); the
answer is the larger number, checked by a rule (`reward`, the run's reward function,
referenced in ds_rlhf/demo/smol.yaml as `ds_rlhf.demo.smol_task:reward`): the first number
of the response must be it.

Why the pretrained model scores badly and RL helps: asked greedily, SmolLM2-135M-Instruct
starts to explain ("To solve this problem, we need to ...") and names no number within the
few response tokens the demo allows, so its greedy accuracy is near 0; sampled at
temperature 1 it answers with the right number first about a fifth of the time. Those
samples are enough for GRPO's group baseline: within a few steps the greedy answer starts
with a number, and more often with the larger one. No reward model, critic or SFT step.

Everything is local and deterministic: held-out prompts are pairs that appear in no
training prompt.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from pathlib import Path

NUMBERS = range(10, 100)
NUM_PROMPTS = 2000
NUM_EVAL = 100
FIRST_NUMBER = re.compile(r"-?\d+")


def question(a: int, b: int) -> str:
    return f"Which number is larger, {a} or {b}?"


def first_number(text: str) -> str | None:
    found = FIRST_NUMBER.search(text)
    return found.group() if found else None


def reward(prompts: list[str], completions: list[str], answer: list[str],
           **columns) -> list[float]:
    """1.0 when the completion's first number is the answer, else 0.0 (no number: 0.0)."""
    return [float(first_number(c) == a) for c, a in zip(completions, answer, strict=True)]


def make_rows(seed: int, num_eval: int = NUM_EVAL) -> dict[str, list[dict]]:
    """The rows of each file ({"messages": [user turn], "answer"}); a pure function of the
    seed."""
    pairs = list(itertools.permutations(NUMBERS, 2))  # 8010 ordered pairs of distinct numbers
    random.Random(f"{seed}:split").shuffle(pairs)
    eval_pool, train_pool = pairs[:num_eval], pairs[NUM_EVAL:]  # the same training prompts

    def row(a: int, b: int) -> dict:
        return {"messages": [{"role": "user", "content": question(a, b)}],
                "answer": str(max(a, b))}

    prompts = [row(*p) for p in random.Random(f"{seed}:prompts").sample(train_pool,
                                                                         NUM_PROMPTS)]
    return {"prompts.jsonl": prompts, "eval_prompts.jsonl": [row(*p) for p in eval_pool]}


def write(outdir: str | Path, seed: int = 0, num_eval: int = NUM_EVAL) -> dict[str, list[dict]]:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    files = make_rows(seed, num_eval)
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the real-model demo's prompt files.")
    parser.add_argument("outdir", help="directory to write the .jsonl files to")
    parser.add_argument("--seed", type=int, default=0, help="seed of all random draws")
    parser.add_argument("--num-eval", type=int, default=NUM_EVAL,
                        help=f"held-out prompts (at most {NUM_EVAL})")
    args = parser.parse_args(argv)
    if not 1 <= args.num_eval <= NUM_EVAL:
        parser.error(f"--num-eval must be 1 to {NUM_EVAL}")
    files = write(args.outdir, args.seed, args.num_eval)
    print(f"wrote {', '.join(f'{n} ({len(r)} rows)' for n, r in files.items())} to "
          f"{args.outdir}")


if __name__ == "__main__":
    main()
