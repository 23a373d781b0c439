"""The verifiable-reward demo task: name the largest of four digits.

    python -m ds_rlhf.demo.largest OUTDIR [--seed 0]      # writes the data and tokenizer

A prompt lists four distinct digits, "largest of 3 9 4 1 :", and the answer is one digit,
"9": a rule checks it exactly (`reward`, the run's reward function, referenced in the GRPO
config as `ds_rlhf.demo.largest:reward`).

Why SFT is mediocre and RL helps: the SFT demonstrations are imperfect on purpose, as
demonstrations often are. Each one answers with the largest digit (SFT_RULES: 35% of rows),
the first digit (40%) or the last one (25%), so the SFT model learns all three behaviours and
its most likely answer is the first digit: greedy decoding is right only where the first (or
the last) digit happens to be the largest, about half of the held-out prompts. Sampling
several answers per prompt finds the right one often enough for GRPO's group baseline to
push it up until it is the greedy answer everywhere: RL picks the right behaviour out of the
SFT policy's repertoire, with no reward model and no critic.

Everything is local and deterministic: the tokenizer is word-level over VOCAB (no download),
held-out prompts are digit sequences that appear in no training file.
"""

from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

from ds_rlhf.demo.make_data import write_files
from ds_rlhf.demo.task import SPECIAL_TOKENS, build_tokenizer

DIGITS = [str(d) for d in range(10)]
VOCAB: dict[str, int] = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *DIGITS, "largest",
                                                     "of", ":"])}
SFT_RULES = {"largest": 0.35, "first": 0.40, "last": 0.25}  # how demonstrations answer
NUM_SFT = 4000
NUM_PROMPTS = 2000
NUM_EVAL = 200


def prompt_of(digits: tuple[str, ...]) -> str:
    return "largest of " + " ".join(digits) + " :"


def answer_of(prompt: str) -> str:
    """The correct answer: the largest digit of the prompt."""
    return max(prompt.removeprefix("largest of ").removesuffix(" :").split())


def reward(prompts: list[str], completions: list[str], answer: list[str],
           **columns) -> list[float]:
    """1.0 when the completion is exactly the answer (spaces aside), else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def make_rows(seed: int) -> dict[str, list[dict[str, str]]]:
    """The rows of each file, keyed by file name; a pure function of the seed."""
    combos = list(itertools.permutations(DIGITS, 4))  # 5040 prompts with distinct digits
    random.Random(f"{seed}:split").shuffle(combos)
    eval_pool, train_pool = combos[:NUM_EVAL], combos[NUM_EVAL:]
    rng = random.Random(f"{seed}:sft")
    rules, weights = list(SFT_RULES), list(SFT_RULES.values())
    sft = []
    for digits in rng.choices(train_pool, k=NUM_SFT):
        rule = rng.choices(rules, weights)[0]
        shown = {"largest": max(digits), "first": digits[0], "last": digits[-1]}[rule]
        sft.append({"prompt": prompt_of(digits), "completion": " " + shown})
    rng = random.Random(f"{seed}:prompts")
    prompts = [{"prompt": prompt_of(d), "answer": max(d)}
               for d in rng.sample(train_pool, NUM_PROMPTS)]
    eval_prompts = [{"prompt": prompt_of(d), "answer": max(d)} for d in eval_pool]
    return {"sft.jsonl": sft, "prompts.jsonl": prompts, "eval_prompts.jsonl": eval_prompts}


def write(outdir: str | Path, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    files = make_rows(seed)
    write_files(outdir, files, build_tokenizer(VOCAB))
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the largest-digit demo data set.")
    parser.add_argument("outdir", help="directory to write the .jsonl files and tokenizer/ to")
    parser.add_argument("--seed", type=int, default=0, help="seed of all random draws")
    args = parser.parse_args(argv)
    files = write(args.outdir, args.seed)
    right = sum(r["completion"].strip() == answer_of(r["prompt"]) for r in files["sft.jsonl"])
    print(f"wrote {', '.join(f'{n} ({len(r)} rows)' for n, r in files.items())} and tokenizer/ "
          f"to {args.outdir}; {right / len(files['sft.jsonl']):.2f} of the SFT "
          "demonstrations are right")


if __name__ == "__main__":
    main()
