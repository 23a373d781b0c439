"""Step 1: supervised fine-tuning (causal-LM loss on completion tokens) on a ZeRO engine.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module ds_rlhf sft --config sft.yaml
    ds-rlhf sft --config sft.yaml --train.max_steps 100          # one process

The loss is the mean next-token NLL over the target tokens of the whole optimizer batch
(completion + EOS; every token with train_on_prompt), so long and short rows weigh by their
tokens on any number of ranks. Writes metrics.jsonl, config.yaml, eval.json (eval loss and
perplexity), checkpoints/ (the same command resumes from the newest) and OUTPUT_DIR/model,
loadable with AutoModelForCausalLM.from_pretrained.
"""

from __future__ import annotations

import math

import torch

from ds_rlhf import algo, models
from ds_rlhf.config import SFTRunConfig
from ds_rlhf.data import SFTSet, collate_right, load_sft, split_state
from ds_rlhf.trainers import common


def make_batch(data: SFTSet, rows: torch.Tensor, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded rows: input_ids, attention_mask, position_ids, targets ([B, T] each)."""
    ids, mask, loss_mask = collate_right([data.input_ids[i] for i in rows], pad_id,
                                         [data.loss_mask[i] for i in rows])
    # loss_mask[t] = 1: token t is predicted from tokens < t (position 0 never is).
    targets = loss_mask.clone()
    targets[:, 0] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device),
            "targets": targets.to(device)}


def token_nll(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T-1] NLL of token t+1 given tokens <= t, zero where t+1 is not a target."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False).logits[:, :-1]
    # Row by row, never the whole [B, T, V] float32 log-softmax (see algo.logprobs_from_logits).
    return -algo.logprobs_from_logits(logits, batch["input_ids"][:, 1:]) * batch["targets"][:, 1:]


def run(cfg: SFTRunConfig) -> dict[str, float] | None:
    # 1. Cheap checks first: batch arithmetic, lengths, tokenizer, data.
    world_size, grad_accum = common.check_sizes(cfg)
    tokenizer = models.load_tokenizer(cfg.model.model, "model")
    train_set = load_sft(cfg.data, tokenizer, "train", cfg.train_on_prompt)
    eval_set = load_sft(cfg.data, tokenizer, "eval", cfg.train_on_prompt)
    total_steps = common.num_steps(cfg.train, len(train_set.input_ids))

    # 2. The engine.
    session = common.start(
        cfg, lambda: models.build_causal_lm(cfg.model.model, "model", cfg.model.dtype, cfg.seed),
        grad_accum, world_size, split_state(train_set.fingerprints, eval_set.fingerprints))
    coord, engine = session.coord, session.engine
    pad, device = tokenizer.pad_token_id, engine.device
    if coord.is_main:
        print(f"sft: {len(train_set.input_ids)} train rows ({train_set.num_truncated} cut at "
              f"data.max_len), {len(eval_set.input_ids)} eval rows, {total_steps} steps of "
              f"{cfg.train.batch_size} rows", flush=True)

    # 3. One optimizer step: the loss is normalised by the global count of target tokens.
    def train_step(micro_rows: list[torch.Tensor]) -> dict[str, float]:
        batches = [make_batch(train_set, rows, pad, device) for rows in micro_rows]
        num_tokens = coord.sum(torch.stack([b["targets"].sum() for b in batches]).sum()).item()
        sums = common.backward_step(engine, batches, lambda b: (token_nll(engine, b).sum(), {}),
                                    num_tokens, coord)
        return {"train/loss": coord.sum_dict(sums)["loss"] / num_tokens}

    # 4. Eval: token-weighted NLL over every eval row, reduced over ranks.
    def evaluate() -> dict[str, float]:
        def sums(rows: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
            batch = make_batch(eval_set, rows, pad, device)
            w = weights.to(device)[:, None]
            return {"nll": (token_nll(engine, batch) * w).sum(),
                    "tokens": (batch["targets"] * w).sum()}

        g = common.eval_sums(engine, coord, len(eval_set.input_ids), cfg.model.micro_batch_size,
                             sums)
        loss = g["nll"] / g["tokens"]
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0))}

    final = common.fit(cfg, session, len(train_set.input_ids), total_steps, train_step,
                       evaluate if eval_set.input_ids else None)
    if final is not None:  # None: preempted, checkpoint saved
        common.finish(cfg, coord, engine, engine.module, tokenizer, final, total_steps)
    return final
