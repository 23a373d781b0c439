"""Score the SFT and RL policies of the demos on held-out prompts.

    python -m ds_rlhf.demo.evaluate OUTPUT_DIR [--samples 4] [--start-time UNIX_SECONDS]
    python -m ds_rlhf.demo.evaluate OUTPUT_DIR --task largest --max-new-tokens 4
    python -m ds_rlhf.demo.evaluate OUTPUT_DIR --task tools

Reviews (default): reads OUTPUT_DIR/{data/eval_prompts.jsonl, sft/model, rm/eval.json,
ppo/actor, ppo/metrics.jsonl, dpo/model, dpo/eval.json}; each policy samples `--samples`
responses per prompt at temperature 1 (the distribution PPO optimises), decoded and scored by
`gold_score`.
Largest (the verifiable-reward demo): reads OUTPUT_DIR/{data/eval_prompts.jsonl, sft/model,
grpo/actor, grpo/metrics.jsonl, grpo/config.yaml}; each policy answers every held-out prompt
greedily, checked by the task's reward function (accuracy_sft, accuracy_rl).
Tools (the tool-use demo): reads OUTPUT_DIR/{data/eval_prompts.jsonl, sft/model, grpo/actor,
grpo/config.yaml}; each policy plays one greedy episode per held-out prompt with the run's
tools (ds_rlhf.episodes, the same loop as training), its final answer checked by the task's
reward function (accuracy_sft, accuracy_rl, valid_tool_calls, mean_turns).
Smol (the real-model demo, ds_rlhf/demo/smol_task.py): reads OUTPUT_DIR/{data/eval_prompts.jsonl,
grpo/actor, grpo/metrics.jsonl, grpo/config.yaml} and the starting model (--base, with
--gguf-file for a GGUF); each model answers every held-out prompt (rendered with its chat
template) greedily with plain transformers `generate` and the run's generation.max_new_tokens,
checked by the task's reward function (accuracy_before, accuracy_rl).
Each writes OUTPUT_DIR/summary.json and prints a short summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_rlhf.data import collate_left
from ds_rlhf.demo import calculator, largest, smol_task
from ds_rlhf.demo.task import gold_score
from ds_rlhf.generation import generate
from ds_rlhf.tracking import read_metrics


@torch.no_grad()
def responses(model_dir: Path, prompts: list[str], samples: int, max_new_tokens: int,
              greedy: bool = False) -> tuple[list[str], list[int]]:
    """`samples` decoded responses per prompt (sample-major) and their lengths in tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids, mask = collate_left([tokenizer(p)["input_ids"] for p in prompts],
                             tokenizer.pad_token_id)
    texts, lengths = [], []
    for s in range(samples):  # the sampling step seeds the draws: same prompts, new samples
        response, response_mask = generate(
            model, ids, mask, torch.arange(len(prompts)), step=10_000 + s, seed=1234,
            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, greedy=greedy)
        for row, row_mask in zip(response.tolist(), response_mask.tolist(), strict=True):
            texts.append(tokenizer.decode(row[:sum(row_mask)], skip_special_tokens=True))
            lengths.append(sum(row_mask))
    return texts, lengths


def mean_gold(model_dir: Path, prompts: list[str], samples: int, max_new_tokens: int) -> dict:
    texts, lengths = responses(model_dir, prompts, samples, max_new_tokens)
    return {"gold": sum(map(gold_score, texts)) / len(texts),
            "length": sum(lengths) / len(lengths), "example": f"{prompts[0]} {texts[0]}"}


def greedy_answers(model_dir: Path, rows: list[dict], max_new_tokens: int) -> tuple[
        list[str], list[float]]:
    """Each held-out prompt's greedy answer, and 1.0 where the task's reward function
    accepts it."""
    prompts = [r["prompt"] for r in rows]
    texts, _ = responses(model_dir, prompts, 1, max_new_tokens, greedy=True)
    return texts, largest.reward(prompts, texts, [r["answer"] for r in rows])


def main_grpo(out: Path, start_time: float | None, max_new_tokens: int) -> dict:
    """The verifiable-reward demo (ds_rlhf/demo/largest.py): SFT vs GRPO, greedy, held out."""
    rows = [json.loads(x) for x in
            (out / "data" / "eval_prompts.jsonl").read_text().splitlines() if x.strip()]
    sft, sft_right = greedy_answers(out / "sft" / "model", rows, max_new_tokens)
    rl, rl_right = greedy_answers(out / "grpo" / "actor", rows, max_new_tokens)
    accuracy_sft, accuracy_rl = sum(sft_right) / len(rows), sum(rl_right) / len(rows)
    # the example: the first prompt that RL fixed, if any (the accuracies tell the rest)
    k = next((i for i, (a, b) in enumerate(zip(sft_right, rl_right, strict=True)) if b > a), 0)
    metrics = read_metrics(out / "grpo" / "metrics.jsonl")
    summary = {
        "accuracy_sft": round(accuracy_sft, 4), "accuracy_rl": round(accuracy_rl, 4),
        "accuracy_gain": round(accuracy_rl - accuracy_sft, 4),
        "estimator": _config_value(out / "grpo", "ppo", "advantage_estimator"),
        **_generated_by(out / "grpo"),
        "rl_steps": metrics[-1]["step"], "eval_prompts": len(rows),
        "example_sft": f"{rows[k]['prompt']} {sft[k]}",
        "example_rl": f"{rows[k]['prompt']} {rl[k]}",
    }
    if start_time is not None:
        summary["wall_s"] = round(time.time() - start_time, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nheld-out greedy accuracy, SFT policy : {summary['accuracy_sft']:.3f}\n"
          f"held-out greedy accuracy, RL policy  : {summary['accuracy_rl']:.3f} "
          f"(gain {summary['accuracy_gain']:+.3f}, {summary['estimator']}, "
          f"{summary['rl_steps']} steps, generation backend {summary['backend']}, "
          f"staleness {summary['staleness']}, {summary['placement']}"
          + (f" with {summary['generation_ranks']} generation "
             f"rank{'s' if summary['generation_ranks'] != 1 else ''}"
             if summary["placement"] == "separate" else "") + ")\n"
          f"SFT says: {summary['example_sft']}\nRL says:  {summary['example_rl']}\n"
          + (f"wall time: {summary['wall_s']:.0f} s\n" if "wall_s" in summary else "")
          + f"summary: {out / 'summary.json'}")
    return summary


@torch.no_grad()
def hf_greedy(model_dir: str | Path, gguf_file: str | None, rows: list[dict],
              max_new_tokens: int, batch_size: int = 50) -> list[str]:
    """Each row's greedy response to its messages, by plain transformers (no ds_rlhf code):
    the chat template, left padding and `generate`, as a user of the model would."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file).eval()
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(r["messages"], tokenize=False,
                                             add_generation_prompt=True) for r in rows]
    texts = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)  # the template wrote the special tokens
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                        skip_special_tokens=True)
    return texts


def main_smol(out: Path, base: str, gguf_file: str | None, start_time: float | None) -> dict:
    """The real-model demo (ds_rlhf/demo/smol_task.py): the pretrained model vs its GRPO
    export, greedy, held out, with as many new tokens as the rollouts had."""
    max_new_tokens = _config_value(out / "grpo", "generation", "max_new_tokens")
    rows = [json.loads(x) for x in
            (out / "data" / "eval_prompts.jsonl").read_text().splitlines() if x.strip()]
    answers = [r["answer"] for r in rows]
    before = hf_greedy(base, gguf_file, rows, max_new_tokens)
    rl = hf_greedy(out / "grpo" / "actor", None, rows, max_new_tokens)
    before_right = smol_task.reward([], before, answers)
    rl_right = smol_task.reward([], rl, answers)
    k = next((i for i, (a, b) in enumerate(zip(before_right, rl_right, strict=True)) if b > a),
             0)
    question = rows[k]["messages"][-1]["content"]
    summary = {
        "model": f"{base}/{gguf_file}" if gguf_file else base,
        "accuracy_before": round(sum(before_right) / len(rows), 4),
        "accuracy_rl": round(sum(rl_right) / len(rows), 4),
        "estimator": _config_value(out / "grpo", "ppo", "advantage_estimator"),
        **_generated_by(out / "grpo"),
        "rl_steps": read_metrics(out / "grpo" / "metrics.jsonl")[-1]["step"],
        "eval_prompts": len(rows), "max_new_tokens": max_new_tokens,
        "example_before": f"{question} {before[k]}", "example_rl": f"{question} {rl[k]}",
    }
    summary["accuracy_gain"] = round(summary["accuracy_rl"] - summary["accuracy_before"], 4)
    return _write_summary(out, summary, start_time, (
        f"\nheld-out greedy accuracy, {summary['model']}: {summary['accuracy_before']:.3f}\n"
        f"held-out greedy accuracy, after GRPO : {summary['accuracy_rl']:.3f} "
        f"(gain {summary['accuracy_gain']:+.3f}, {summary['rl_steps']} steps)\n"
        f"before: {summary['example_before']!r}\nafter:  {summary['example_rl']!r}\n"))


def _write_summary(out: Path, summary: dict, start_time: float | None, text: str) -> dict:
    """Add wall_s (when the start time is known), write OUTPUT_DIR/summary.json and print
    `text` with the wall time and the file's path."""
    if start_time is not None:
        summary["wall_s"] = round(time.time() - start_time, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(text + (f"wall time: {summary['wall_s']:.0f} s\n" if "wall_s" in summary else "")
          + f"summary: {out / 'summary.json'}")
    return summary


def greedy_episodes(model_dir: Path, rows: list[dict], rollout: dict, max_new_tokens: int):
    """One greedy episode per row ({"messages", "answer"}) with the run's tools: the
    Episodes, and 1.0 where the final answer is right."""
    from ds_rlhf.config import RolloutConfig
    from ds_rlhf.episodes import EpisodeRunner

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    @torch.no_grad()
    def backend(contexts, prompt_index, sample_index, offsets, max_new):
        ids, mask = collate_left(contexts, pad)
        response, response_mask = generate(model, ids, mask, prompt_index, step=0, seed=0,
                                           max_new_tokens=max_new, eos_token_id=eos,
                                           pad_token_id=pad, greedy=True)
        return [row[:n] for row, n in zip(response.tolist(), response_mask.sum(1).tolist(),
                                          strict=True)], None

    runner = EpisodeRunner(RolloutConfig(**rollout), tokenizer, max_new_tokens, 64)
    prompts = [tokenizer.apply_chat_template(r["messages"], tokenize=False,
                                             add_generation_prompt=True, tools=runner.schemas)
               for r in rows]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = len(rows)
    _, episodes = runner.run(backend, prompt_ids, [{"prompt": p, **r} for p, r in
                                                   zip(prompts, rows, strict=True)],
                             torch.arange(n), torch.zeros(n, dtype=torch.long))
    right = calculator.reward(prompts, episodes.final_texts(tokenizer),
                              [r["answer"] for r in rows])
    return episodes, right, prompts


def main_tools(out: Path, start_time: float | None) -> dict:
    """The tool-use demo (ds_rlhf/demo/calculator.py): SFT vs GRPO, greedy episodes."""
    rows = [json.loads(x) for x in
            (out / "data" / "eval_prompts.jsonl").read_text().splitlines() if x.strip()]
    config = yaml.safe_load((out / "grpo" / "config.yaml").read_text())
    max_new = config["generation"]["max_new_tokens"]
    sft, sft_right, prompts = greedy_episodes(out / "sft" / "model", rows, config["rollout"],
                                              max_new)
    rl, rl_right, _ = greedy_episodes(out / "grpo" / "actor", rows, config["rollout"], max_new)
    tokenizer = AutoTokenizer.from_pretrained(out / "sft" / "model")
    _, turns, calls, errors, _ = rl.stats().tolist()
    k = next((i for i, (a, b) in enumerate(zip(sft_right, rl_right, strict=True)) if b > a), 0)

    def example(episodes):
        return " ".join(p["text"] for p in episodes.parts(k, tokenizer))

    summary = {
        "accuracy_sft": round(sum(sft_right) / len(rows), 4),
        "accuracy_rl": round(sum(rl_right) / len(rows), 4),
        "valid_tool_calls": round((calls - errors) / calls, 4) if calls else None,
        "mean_turns": round(turns / len(rows), 4),
        "tool_calls_sft": round(sft.stats()[2].item() / len(rows), 4),
        "tool_calls_rl": round(calls / len(rows), 4),
        "rl_steps": read_metrics(out / "grpo" / "metrics.jsonl")[-1]["step"],
        **_generated_by(out / "grpo"),
        "eval_prompts": len(rows),
        "example_sft": f"{prompts[k]}{example(sft)}", "example_rl": f"{prompts[k]}{example(rl)}",
    }
    summary["accuracy_gain"] = round(summary["accuracy_rl"] - summary["accuracy_sft"], 4)
    return _write_summary(out, summary, start_time, (
        f"\nheld-out greedy accuracy, SFT policy : {summary['accuracy_sft']:.3f} "
        f"({summary['tool_calls_sft']:.2f} tool calls per episode)\n"
        f"held-out greedy accuracy, RL policy  : {summary['accuracy_rl']:.3f} "
        f"(gain {summary['accuracy_gain']:+.3f}, {summary['rl_steps']} GRPO steps)\n"
        f"RL policy: {summary['tool_calls_rl']:.2f} tool calls per episode, "
        f"{summary['valid_tool_calls']} of them valid, {summary['mean_turns']:.2f} turns\n"
        f"SFT episode: {summary['example_sft']}\nRL episode:  {summary['example_rl']}\n"))


def _generated_by(run_dir: Path) -> dict:
    """What generated the run's rollouts: the backend (hf or vllm), rollout.staleness (the
    lag in actor updates) and the placement (colocated: the training ranks generate;
    separate: a pool of rollout.generation_ranks ranks)."""
    return {"backend": _config_value(run_dir, "generation", "backend"),
            "staleness": _config_value(run_dir, "rollout", "staleness"),
            "placement": _config_value(run_dir, "rollout", "placement"),
            "generation_ranks": _config_value(run_dir, "rollout", "generation_ranks")}


def _config_value(run_dir: Path, section: str, key: str):
    """A value of the run's resolved config (run_dir/config.yaml); `generation.backend` is
    what generated the rollouts (hf or vllm)."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())[section][key]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--start-time", type=float, default=None,
                        help="when the pipeline started (unix seconds), for wall_s")
    parser.add_argument("--task", choices=("reviews", "largest", "tools", "smol"),
                        default="reviews",
                        help="reviews: the SFT -> RM -> PPO demo; largest: SFT -> GRPO; "
                        "tools: SFT -> GRPO with a calculator tool; smol: GRPO on a "
                        "pretrained model (--base)")
    parser.add_argument("--base", help="smol: the starting model (directory or hub name)")
    parser.add_argument("--gguf-file", help="smol: the GGUF file inside --base, if any")
    args = parser.parse_args(argv)
    out = args.output_dir
    if args.task == "smol":
        return main_smol(out, args.base, args.gguf_file, args.start_time)
    if args.task == "largest":
        return main_grpo(out, args.start_time, args.max_new_tokens)
    if args.task == "tools":
        return main_tools(out, args.start_time)
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
        **_generated_by(out / "ppo"),
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
