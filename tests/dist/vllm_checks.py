"""Run by tests/dist/test_vllm.py under `deepspeed --num_gpus 2`: generation.backend vllm.

    python tests/dist/vllm_checks.py CONFIGS.json RESULT.json

CONFIGS.json maps names to PPO config files: "zero2", "zero3", "zero2_lora", "zero3_lora"
(the weight checks), "agent" (multi-turn episodes), "resume_full", "resume_first",
"resume_second" (kill and resume). All runs share one vLLM engine per process (same model
and max_model_len). Each rank writes its own measurements; rank 0 writes them all.
"""

import json
import sys
from pathlib import Path

import torch

from ds_rlhf import generation
from ds_rlhf.config import load_config
from ds_rlhf.coordinator import exit_process, stop_distributed
from ds_rlhf.trainers.ppo import build_ppo


def _masked_mean_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.float()
    return float(((a - b).abs() * mask).sum() / mask.sum().clamp(min=1))


def _prompts(trainer, indices: list[int]):
    from ds_rlhf.data import collate_left

    index = torch.tensor(indices).repeat_interleave(trainer.cfg.generation.n_samples_per_prompt)
    n = trainer.cfg.generation.n_samples_per_prompt
    sample = torch.arange(n).repeat(len(indices))
    ids, mask = collate_left([trainer.prompts.input_ids[i] for i in index],
                             trainer.tokenizer.pad_token_id)
    return ids, mask, index, sample


def _hf_greedy(actor, ids, mask, index, max_new_tokens, eos=None):
    """Greedy tokens of the actor's current weights through the hf backend's copy."""
    with actor.hybrid.generation_mode() as gen:
        out, out_mask = generation.generate(
            gen.model, ids, mask, index, step=0, seed=0, max_new_tokens=max_new_tokens,
            eos_token_id=actor.eos_token_id if eos is None else eos,
            pad_token_id=actor.pad_token_id, greedy=True, synced=gen.synced)
    return out.cpu(), out_mask.cpu()


def eos_checks(trainer, coord) -> dict:
    """Responses end as the hf backend's: greedy ids and masks of both backends when the EOS
    ids are tokens the greedy responses hold at position 4 of two rows (so that some
    responses end early, at different lengths, and others run to max_new_tokens)."""
    actor, g = trainer.actor, trainer.cfg.generation
    ids, mask, index, _ = _prompts(trainer, [coord.rank * 4 + i for i in range(4)])
    free, _ = _hf_greedy(actor, ids, mask, index, g.max_new_tokens, eos=[])
    eos = sorted({int(free[0, 4]), int(free[3, 4])})
    saved, actor.vllm.eos_token_id = actor.vllm.eos_token_id, eos
    with actor.generation_mode():
        v = actor.generate(ids, mask, index, step=0, greedy=True)
    actor.vllm.eos_token_id = saved
    hf_ids, hf_mask = _hf_greedy(actor, ids, mask, index, g.max_new_tokens, eos)
    return {"vllm_ids": v.response_ids.tolist(), "vllm_mask": v.response_mask.tolist(),
            "hf_ids": hf_ids.tolist(), "hf_mask": hf_mask.tolist(), "eos": eos,
            "pad": actor.pad_token_id, "max_new_tokens": g.max_new_tokens}


def weight_checks(trainer, coord) -> dict:
    """Per step: greedy vLLM tokens against the hf backend's on the same (just trained)
    weights, and the trainer's logprobs of vLLM's greedy tokens against vLLM's; plus the
    same logprobs for tokens vLLM drew before the step (how far one step moves them)."""
    actor, g = trainer.actor, trainer.cfg.generation
    ids, mask, index, sample = _prompts(trainer, [coord.rank * 4 + i for i in range(4)])
    out = {"steps": []}
    with actor.generation_mode():  # before training: sampled rows, to compare over configs
        sampled = actor.generate(ids, mask, index, step=1, sample_index=sample)
    out["sampled_step1"] = sampled.response_ids.tolist()
    previous = None
    for step in (1, 2):
        metrics = trainer.ppo_step(step)
        trainer.step = step
        with actor.generation_mode():
            greedy = actor.generate(ids, mask, index, step=step, greedy=True)
        hf_ids, hf_mask = _hf_greedy(actor, ids, mask, index, g.max_new_tokens)
        width = max(hf_ids.shape[1], greedy.response_ids.shape[1])
        pad = actor.pad_token_id
        hf_ids = torch.nn.functional.pad(hf_ids, (0, width - hf_ids.shape[1]), value=pad)
        v_ids = torch.nn.functional.pad(greedy.response_ids,
                                        (0, width - greedy.response_ids.shape[1]), value=pad)
        trainer_lp = actor.logprobs(greedy)
        record = {
            "step": step, "weight_sync_s": metrics["timing/weight_sync"],
            "logprob_abs_diff_metric": metrics["rollout/logprob_abs_diff"],
            "greedy_rows_equal": int((hf_ids == v_ids).all(1).sum()), "rows": len(hf_ids),
            "greedy_logprob_abs_diff": _masked_mean_abs(trainer_lp, greedy.sampler_logprobs,
                                                        greedy.response_mask),
            "optimizer_steps": actor.engine.global_steps,
        }
        if previous is not None:  # the tokens of the weights before this step
            record["stale_logprob_abs_diff"] = _masked_mean_abs(
                actor.logprobs(previous), previous.sampler_logprobs, previous.response_mask)
        previous = greedy
        out["steps"].append(record)
    return out


def filter_checks(trainer, coord, top_k: int = 6, top_p: float = 0.9) -> dict:
    """Sampled rows with top-k and top-p: vLLM's sampler logprobs against the hf backend's
    definition of the same quantity (generation.behaviour_logprobs, renormalised over the
    kept tokens) on vLLM's tokens and the same weights, and the TIS weights of both against
    the trainer's old logprobs; the full-vocabulary logprobs, which the filter changes, as
    the control."""
    from ds_rlhf import algo

    actor, g = trainer.actor, trainer.cfg.generation
    ids, mask, index, sample = _prompts(trainer, [coord.rank * 4 + i for i in range(4)])
    saved = g.top_k, g.top_p
    g.top_k, g.top_p = top_k, top_p
    with actor.generation_mode():
        rollout = actor.generate(ids, mask, index, step=3, sample_index=sample)
    g.top_k, g.top_p = saved
    behaviour = torch.zeros_like(rollout.sampler_logprobs)
    with actor.hybrid.generation_mode() as gen, torch.no_grad():
        for row in range(len(rollout)):  # the trainer's view: one unpadded forward per row
            n = int(rollout.response_mask[row].sum())
            response = rollout.response_ids[row, :n]
            prompt = ids[row][mask[row].bool()]
            seq = torch.cat([prompt, response])[None]
            logits = gen.model(input_ids=seq).logits[0, len(prompt) - 1:-1]
            behaviour[row, :n] = generation.behaviour_logprobs(
                logits.float().cpu(), response, g.temperature, top_k, top_p)
    old = actor.logprobs(rollout)  # the trainer's, full vocabulary
    tis_vllm, _ = algo.rollout_is_weights(old, rollout.sampler_logprobs, rollout.response_mask)
    tis_hf, _ = algo.rollout_is_weights(old, behaviour, rollout.response_mask)
    real = rollout.response_mask.bool()
    return {"behaviour_abs_diff": _masked_mean_abs(behaviour, rollout.sampler_logprobs,
                                                   rollout.response_mask),
            "tis_abs_diff": float((tis_vllm - tis_hf)[real].abs().mean()),
            "tis_mean": float(tis_vllm[real].mean()),
            "full_vocab_abs_diff": _masked_mean_abs(old, rollout.sampler_logprobs,
                                                    rollout.response_mask)}


def seed_checks(trainer, coord) -> dict:
    """Same seed twice: identical rows. Rank 0 also generates every rank's rows in one
    call, as one rank would: the share of rows that differ from the 2-rank rollout."""
    actor = trainer.actor
    ids, mask, index, sample = _prompts(trainer, [coord.rank * 4 + i for i in range(4)])
    with actor.generation_mode():
        first = actor.generate(ids, mask, index, step=5, sample_index=sample)
        again = actor.generate(ids, mask, index, step=5, sample_index=sample)
        all_ids, all_mask, all_index, all_sample = _prompts(trainer, list(range(8)))
        alone = actor.generate(all_ids, all_mask, all_index, step=5, sample_index=all_sample)
    fields = actor.vllm.llm.llm_engine.input_processor.generation_config_fields
    return {"engine_eos": fields.get("eos_token_id"),
            "repeat_equal": bool(torch.equal(first.response_ids, again.response_ids) and
                                 torch.equal(first.sampler_logprobs, again.sampler_logprobs)),
            "rows": [(int(i), int(s), r) for i, s, r in
                     zip(index, sample, first.response_ids.tolist(), strict=True)],
            "one_rank_rows": [(int(i), int(s), r) for i, s, r in
                              zip(all_index, all_sample, alone.response_ids.tolist(),
                                  strict=True)]}


def _run(path: str) -> None:
    trainer = build_ppo(load_config(path))
    trainer.train()
    trainer.tracker.finish()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    configs = json.loads(Path(args[0]).read_text())
    results = {}
    for name in ("zero2", "zero3", "zero2_lora", "zero3_lora"):
        trainer = build_ppo(load_config(configs[name]))
        coord = trainer.coord
        if name == "zero2":
            results["seeds"] = seed_checks(trainer, coord)
            results["eos"] = eos_checks(trainer, coord)
            results["filters"] = filter_checks(trainer, coord)
        results[name] = weight_checks(trainer, coord)
        trainer.tracker.finish()
    for name in ("agent", "resume_full", "resume_first", "resume_second", "lag1"):
        _run(configs[name])
    gathered = coord.gather_objects([results])
    if coord.is_main:
        Path(args[1]).write_text(json.dumps(gathered))
    stop_distributed()
    exit_process(0)  # see its docstring


if __name__ == "__main__":
    main()
