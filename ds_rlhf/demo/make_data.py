"""Write the demo data set (deterministic for a given seed).

    python -m ds_rlhf.demo.make_data data/demo --seed 0

OUTDIR gets:
  sft.jsonl           4000 {prompt, completion}: sentiment-balanced reviews (mean gold ~ 0)
  prefs.jsonl         4000 {prompt, chosen, rejected}: gold(chosen) >= gold(rejected) + 0.2
  prompts.jsonl       1000 {prompt}: PPO training prompts
  eval_prompts.jsonl  64 {prompt}: held-out prompts (item/adjective/template combinations
                      that appear in none of the other files)
  tokenizer/          the demo tokenizer (save_pretrained), for `model.tokenizer`
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ds_rlhf.demo.task import all_prompts, build_tokenizer, gold_score, sample_response

NUM_SFT = 4000
NUM_PREFS = 4000
NUM_PROMPTS = 1000
NUM_EVAL_PROMPTS = 64
MIN_GOLD_GAP = 0.2  # keeps every pair's preference meaningful (and learnable)


def make_rows(seed: int) -> dict[str, list[dict[str, str]]]:
    """The rows of each file, keyed by file name; a pure function of the seed."""
    combos = all_prompts()
    random.Random(f"{seed}:split").shuffle(combos)
    eval_pool, train_pool = combos[:NUM_EVAL_PROMPTS], combos[NUM_EVAL_PROMPTS:]

    rng = random.Random(f"{seed}:sft")
    sft = []
    for _ in range(NUM_SFT // 2):
        prompt, item = rng.choice(train_pool)
        mood = rng.uniform(-1, 1)
        # antithetic moods (m, -m) keep the SFT data balanced: a policy imitating it scores ~ 0
        for m in (mood, -mood):
            sft.append({"prompt": prompt, "completion": " " + sample_response(rng, item, m)})

    rng = random.Random(f"{seed}:prefs")
    prefs = []
    while len(prefs) < NUM_PREFS:
        prompt, item = rng.choice(train_pool)
        a = sample_response(rng, item, rng.uniform(-1, 1))
        b = sample_response(rng, item, rng.uniform(-1, 1))
        if abs(gold_score(a) - gold_score(b)) < MIN_GOLD_GAP:
            continue  # resample: too close to call (and never identical)
        chosen, rejected = (a, b) if gold_score(a) > gold_score(b) else (b, a)
        prefs.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})

    rng = random.Random(f"{seed}:prompts")
    prompts = [{"prompt": rng.choice(train_pool)[0]} for _ in range(NUM_PROMPTS)]
    eval_prompts = [{"prompt": p} for p, _ in eval_pool]
    return {"sft.jsonl": sft, "prefs.jsonl": prefs, "prompts.jsonl": prompts,
            "eval_prompts.jsonl": eval_prompts}


def write_files(outdir: str | Path, files: dict[str, list[dict]], tokenizer) -> None:
    """Each `name: rows` of `files` as OUTDIR/name (JSON lines), the tokenizer in tokenizer/."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with open(out / name, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    tokenizer.save_pretrained(out / "tokenizer")


def write(outdir: str | Path, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    files = make_rows(seed)
    write_files(outdir, files, build_tokenizer())
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the ds_rlhf demo data set.")
    parser.add_argument("outdir", help="directory to write the .jsonl files and tokenizer/ to")
    parser.add_argument("--seed", type=int, default=0, help="seed of all random draws")
    args = parser.parse_args(argv)
    files = write(args.outdir, args.seed)
    sft_gold = [gold_score(r["completion"]) for r in files["sft.jsonl"]]
    gaps = [gold_score(r["chosen"]) - gold_score(r["rejected"]) for r in files["prefs.jsonl"]]
    print(f"wrote {', '.join(f'{n} ({len(r)} rows)' for n, r in files.items())} and tokenizer/ "
          f"to {args.outdir}")
    print(f"mean gold of SFT completions {sum(sft_gold) / len(sft_gold):+.3f}; "
          f"mean gold gap of preference pairs {sum(gaps) / len(gaps):.3f}")


if __name__ == "__main__":
    main()
