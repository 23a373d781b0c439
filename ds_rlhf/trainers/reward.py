"""Step 2: a reward model trained on preference pairs (Ouyang et al. 2022, eq. 1).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module ds_rlhf rm --config rm.yaml
    ds-rlhf rm --config rm.yaml --model.model.path runs/sft/model     # one process

The model is an AutoModelForSequenceClassification (num_labels=1) inside ScalarHeadModel,
started from an SFT checkpoint (fresh score head) or from init. A sequence's score is read at
its last real token (the EOS), found from its length, never from pad ids (pad may equal EOS),
exactly where the PPO reward role reads it. The loss is -logsigmoid(r_chosen - r_rejected -
margin) averaged over the pairs of the global batch. Writes metrics.jsonl, config.yaml,
eval.json (accuracy, chosen_mean, rejected_mean, loss), checkpoints/ (the same command resumes
from the newest) and OUTPUT_DIR/model, loadable with
AutoModelForSequenceClassification.from_pretrained and as the `reward` model of a PPO run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_rlhf import models
from ds_rlhf.config import RMRunConfig
from ds_rlhf.data import PreferenceSet, collate_right, load_preferences, split_state
from ds_rlhf.trainers import common


def pair_scores(engine, data: PreferenceSet, rows: torch.Tensor, pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ([b], [b]) of the chosen and rejected sides of `rows`, in one forward pass."""
    seqs = [data.chosen_ids[i] for i in rows] + [data.rejected_ids[i] for i in rows]
    ids, mask = collate_right(seqs, pad_id)
    lengths = torch.tensor([len(s) for s in seqs])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    per_token = engine(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device),
                       position_ids=position_ids.to(engine.device))  # [2b, T]
    scores = per_token.gather(1, (lengths - 1).to(engine.device)[:, None]).squeeze(1)
    return scores[: len(rows)], scores[len(rows):]


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: float) -> torch.Tensor:
    """[b] -log sigmoid(r_chosen - r_rejected - margin) (Touvron et al. 2023, eq. 2)."""
    return -F.logsigmoid(chosen - rejected - margin)


def run(cfg: RMRunConfig) -> dict[str, float] | None:
    # 1. Cheap checks first: batch arithmetic, lengths, tokenizer, data.
    world_size, grad_accum = common.check_sizes(cfg)
    tokenizer = models.load_tokenizer(cfg.model.model, "model")
    train_set = load_preferences(cfg.data, tokenizer, "train")
    eval_set = load_preferences(cfg.data, tokenizer, "eval")
    total_steps = common.num_steps(cfg.train, len(train_set.chosen_ids))

    # 2. The engine.
    pad = tokenizer.pad_token_id
    session = common.start(
        cfg, lambda: models.build_scalar_model(cfg.model.model, "model", cfg.model.dtype,
                                               cfg.seed, pad),
        grad_accum, world_size, split_state(train_set.fingerprints, eval_set.fingerprints))
    coord, engine = session.coord, session.engine
    if coord.is_main:
        print(f"rm: {len(train_set.chosen_ids)} train pairs ({train_set.num_filtered} dropped "
              f"as too long), {len(eval_set.chosen_ids)} eval pairs, {total_steps} steps of "
              f"{cfg.train.batch_size} pairs", flush=True)

    # 3. One optimizer step: the loss is the mean over the pairs of the global batch.
    def loss_fn(rows: torch.Tensor):
        chosen, rejected = pair_scores(engine, train_set, rows, pad)
        return (pair_losses(chosen, rejected, cfg.margin).sum(),
                {"correct": (chosen > rejected).sum().item()})

    def train_step(micro_rows: list[torch.Tensor]) -> dict[str, float]:
        sums = coord.sum_dict(common.backward_step(engine, micro_rows, loss_fn,
                                                   cfg.train.batch_size, coord))
        return {"train/loss": sums["loss"] / cfg.train.batch_size,
                "train/accuracy": sums["correct"] / cfg.train.batch_size}

    # 4. Eval: pairwise accuracy, mean scores and loss over every eval pair, reduced over ranks.
    def evaluate() -> dict[str, float]:
        def sums(rows: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
            chosen, rejected = pair_scores(engine, eval_set, rows, pad)
            w = weights.to(chosen.device)
            return {"pairs": w.sum(), "correct": ((chosen > rejected).float() * w).sum(),
                    "chosen": (chosen * w).sum(), "rejected": (rejected * w).sum(),
                    "loss": (pair_losses(chosen, rejected, cfg.margin) * w).sum()}

        g = common.eval_sums(engine, coord, len(eval_set.chosen_ids), cfg.model.micro_batch_size,
                             sums)
        n = g["pairs"]
        return {"eval/accuracy": g["correct"] / n, "eval/chosen_mean": g["chosen"] / n,
                "eval/rejected_mean": g["rejected"] / n, "eval/loss": g["loss"] / n}

    final = common.fit(cfg, session, len(train_set.chosen_ids), total_steps, train_step,
                       evaluate if eval_set.chosen_ids else None)
    if final is not None:  # None: preempted, checkpoint saved
        common.finish(cfg, coord, engine, engine.module.hf_model, tokenizer, final, total_steps)
    return final
