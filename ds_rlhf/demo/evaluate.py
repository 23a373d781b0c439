"""Score the SFT, PPO and DPO policies of the demo with the gold scorer on held-out prompts.

    python -m ds_rlhf.demo.evaluate OUTPUT_DIR [--samples 4] [--start-time UNIX_SECONDS]

Reads OUTPUT_DIR/{data/eval_prompts.jsonl, sft/model, rm/eval.json, ppo/actor,
ppo/metrics.jsonl, dpo/model, dpo/eval.json}; each policy samples `--samples` responses per
prompt at temperature 1 (the distribution PPO optimises), decoded and scored by `gold_score`.
Writes OUTPUT_DIR/summary.json and prints a short summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_rlhf.data import collate_left
from ds_rlhf.demo.task import gold_score
from ds_rlhf.generation import generate
from ds_rlhf.tracking import read_metrics


@torch.no_grad()
def mean_gold(model_dir: Path, prompts: list[str], samples: int, max_new_tokens: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids, mask = collate_left([tokenizer(p)["input_ids"] for p in prompts],
                             tokenizer.pad_token_id)
    scores, lengths, example = [], [], None
    for s in range(samples):  # the sampling step seeds the draws: same prompts, new samples
        response, response_mask = generate(
            model, ids, mask, torch.arange(len(prompts)), step=10_000 + s, seed=1234,
            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        for row, row_mask in zip(response.tolist(), response_mask.tolist(), strict=True):
            text = tokenizer.decode(row[:sum(row_mask)], skip_special_tokens=True)
            scores.append(gold_score(text))
            lengths.append(sum(row_mask))
            example = example or text
    return {"gold": sum(scores) / len(scores), "length": sum(lengths) / len(lengths),
            "example": f"{prompts[0]} {example}"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--start-time", type=float, default=None,
                        help="when the pipeline started (unix seconds), for wall_s")
    args = parser.parse_args(argv)
    out = args.output_dir
    prompts = [json.loads(x)["prompt"] for x in
               (out / "data" / "eval_prompts.jsonl").read_text().splitlines() if x.strip()]
    sft = mean_gold(out / "sft" / "model", prompts, args.samples, args.max_new_tokens)
    ppo = mean_gold(out / "ppo" / "actor", prompts, args.samples, args.max_new_tokens)
    dpo = mean_gold(out / "dpo" / "model", prompts, args.samples, args.max_new_tokens)
    rm_eval = json.loads((out / "rm" / "eval.json").read_text())
    dpo_eval = json.loads((out / "dpo" / "eval.json").read_text())
    ppo_metrics = read_metrics(out / "ppo" / "metrics.jsonl")
    summary = {
        "rm_eval_accuracy": rm_eval["accuracy"],
        "gold_score_sft": round(sft["gold"], 4),
        "gold_score_ppo": round(ppo["gold"], 4),
        "gold_gain": round(ppo["gold"] - sft["gold"], 4),
        "gold_score_dpo": round(dpo["gold"], 4),
        "gold_gain_dpo": round(dpo["gold"] - sft["gold"], 4),
        "dpo_eval_accuracy": dpo_eval["rewards/accuracies"],
        "kl_final": ppo_metrics[-1]["objective/kl"],
        "ppo_steps": ppo_metrics[-1]["step"],
        "response_length_sft": round(sft["length"], 2),
        "response_length_ppo": round(ppo["length"], 2),
        "response_length_dpo": round(dpo["length"], 2),
        "eval_prompts": len(prompts), "samples_per_prompt": args.samples,
        "example_sft": sft["example"], "example_ppo": ppo["example"],
        "example_dpo": dpo["example"],
    }
    if args.start_time is not None:
        summary["wall_s"] = round(time.time() - args.start_time, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nreward model held-out accuracy : {summary['rm_eval_accuracy']:.3f}\n"
          f"gold score, SFT policy         : {summary['gold_score_sft']:+.3f}\n"
          f"gold score, PPO policy         : {summary['gold_score_ppo']:+.3f} "
          f"(gain {summary['gold_gain']:+.3f})\n"
          f"gold score, DPO policy         : {summary['gold_score_dpo']:+.3f} "
          f"(gain {summary['gold_gain_dpo']:+.3f})\n"
          f"KL(PPO || SFT) at the last step: {summary['kl_final']:.3f}\n"
          f"SFT says: {summary['example_sft']}\nPPO says: {summary['example_ppo']}\n"
          f"DPO says: {summary['example_dpo']}\n"
          + (f"wall time: {summary['wall_s']:.0f} s\n" if "wall_s" in summary else "")
          + f"summary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
