"""Offline preference optimisation on a ZeRO engine: DPO, IPO, hinge and conservative DPO.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module ds_rlhf dpo --config dpo.yaml
    ds-rlhf dpo --config dpo.yaml --policy.model.path runs/sft/model     # one process

The policy (usually the SFT model) is a trained engine; the reference is a frozen engine of
the same model (`ref`), or, with `policy.lora_rank > 0`, the policy itself with its adapters
off, so no second model is loaded. A sequence's log-probability is the sum of its response
tokens' log-probabilities (prompt tokens excluded, the EOS included), with the response found
from the prompt length and the sequence length, never from pad ids (pad may equal EOS). The
loss (algo.dpo_loss, plus `dpo.sft_coef` x the chosen response's per-token NLL) is averaged
over the pairs of the global batch, so any number of ranks and micro-batches takes the same
step. With `dpo.precompute_ref` the reference log-probs of every pair are computed in one
pass before training and kept with the data, and the reference engine is freed.

Writes metrics.jsonl (TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected; train/loss), config.yaml, eval.json (the same on
the eval split), checkpoints/ (the same command resumes from the newest) and OUTPUT_DIR/model,
loadable with AutoModelForCausalLM.from_pretrained.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from ds_rlhf import algo, models
from ds_rlhf.config import ConfigError, DPORunConfig, ModelConfig
from ds_rlhf.coordinator import Coordinator
from ds_rlhf.data import PreferenceSet, collate_right, load_preferences, split_state
from ds_rlhf.engines.roles import adapters_disabled, init_engine
from ds_rlhf.trainers import common


@dataclass
class PairBatch:
    """Pairs as one right-padded batch: rows 0..b-1 the chosen sides, b..2b-1 the rejected."""

    input_ids: torch.Tensor  # [2b, T]
    attention_mask: torch.Tensor  # [2b, T], 1 on the real tokens
    position_ids: torch.Tensor  # [2b, T]
    response_mask: torch.Tensor  # [2b, T] bool: token t belongs to the response (EOS included)


def collate_pairs(data: PreferenceSet, rows: torch.Tensor, pad_id: int) -> PairBatch:
    """The pairs `rows` of `data`, with response masks from prompt and sequence lengths."""
    seqs = [data.chosen_ids[i] for i in rows] + [data.rejected_ids[i] for i in rows]
    ids, mask = collate_right(seqs, pad_id)
    lengths = torch.tensor([len(s) for s in seqs])
    prompt_lens = torch.tensor([data.prompt_lens[i] for i in rows]).repeat(2)
    # Token 0 is predicted by nothing: an empty prompt leaves the first response token out.
    t = torch.arange(ids.shape[1])
    response = (t >= prompt_lens.clamp(min=1)[:, None]) & (t < lengths[:, None])
    return PairBatch(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), response)


def sequence_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """([2b] sum of log pi(token) over each row's response tokens, [2b] their counts).

    `model` is an engine or an HF causal LM. Only the logits that predict a response token
    are computed (`logits_to_keep`), and the log-softmax runs row by row
    (algo.logprobs_from_logits): never a whole [2b, T, V] float32 log-softmax.
    """
    device = model.device
    mask = batch.response_mask.to(device)
    # The earliest response token of the batch (never token 0: nothing predicts it).
    first = max(int(mask.float().argmax(1).min()), 1)
    width = batch.input_ids.shape[1]
    logits = model(input_ids=batch.input_ids.to(device),
                   attention_mask=batch.attention_mask.to(device),
                   position_ids=batch.position_ids.to(device), use_cache=False,
                   logits_to_keep=width - first + 1).logits[:, :-1]  # predict tokens first..T-1
    logprobs = algo.logprobs_from_logits(logits, batch.input_ids[:, first:].to(device))
    mask = mask[:, first:]
    return torch.where(mask, logprobs, 0.0).sum(1), mask.sum(1)


@dataclass
class PairSplit:
    """One split of the preference pairs and, once precomputed, their reference log-probs."""

    pairs: PreferenceSet
    ref_logps: torch.Tensor | None = None  # [N, 2] (chosen, rejected) sums; None: per batch

    def __len__(self) -> int:
        return len(self.pairs.chosen_ids)


class Reference:
    """Reference log-probs of pairs, without gradient: from `model` (a frozen engine, or the
    LoRA policy engine run with its adapters off), or from a split's precomputed table."""

    def __init__(self, model, adapters_off: bool, micro_batch_size: int, pad_id: int):
        self.model = model
        self.adapters_off = adapters_off
        self.micro_batch_size = micro_batch_size  # pairs per reference forward
        self.pad_id = pad_id

    @torch.no_grad()
    def _forward(self, data: PairSplit, rows: torch.Tensor) -> torch.Tensor:
        """[b, 2] (chosen, rejected) summed log-probs of `rows`, ref.micro_batch_size at a
        time."""
        out = []
        for chunk in rows.split(self.micro_batch_size):
            batch = collate_pairs(data.pairs, chunk, self.pad_id)
            if self.adapters_off:
                with adapters_disabled(self.model.module):
                    sums, _ = sequence_logps(self.model, batch)
            else:
                sums, _ = sequence_logps(self.model, batch)
            out.append(sums.float().cpu().view(2, -1).T)
        return torch.cat(out)

    def logps(self, data: PairSplit, rows: torch.Tensor) -> torch.Tensor:
        """[b, 2] (chosen, rejected) reference log-probs of `rows` of `data`."""
        if data.ref_logps is not None:
            return data.ref_logps[rows]
        return self._forward(data, rows)

    def precompute(self, data: PairSplit, coord: Coordinator) -> None:
        """Fill `data.ref_logps` in one pass: rank r computes pairs r, r + W, ... (a rank
        with one pair fewer repeats one and discards it, so every rank runs the same number
        of forwards), and a sum over ranks puts every entry on every rank."""
        if not len(data):
            data.ref_logps = torch.zeros(0, 2)
            return
        rows = torch.arange(coord.rank, len(data), coord.world_size)
        per_rank = -(-len(data) // coord.world_size)
        padded = torch.cat([rows, rows.new_zeros(per_rank - len(rows))])
        table = torch.zeros(len(data), 2, dtype=torch.float64)
        table[rows] = self._forward(data, padded)[:len(rows)].double()
        data.ref_logps = coord.sum(table).float()  # exact: one non-zero term per entry

    def free(self) -> None:
        """Drop a frozen reference engine (nothing to drop when it is the policy)."""
        if not self.adapters_off:
            self.model.destroy()
        self.model = None
        gc.collect()


def check_reference(cfg: DPORunConfig, tokenizer) -> ModelConfig:
    """The reference's model config (the policy's unless `ref.model` is set), checked: same
    tokenizer as the policy, room for data.max_len."""
    ref = cfg.ref.model
    if ref.path is None and ref.init is None:
        return cfg.policy.model
    policy_source = cfg.policy.model.tokenizer or cfg.policy.model.path
    if (ref.tokenizer or ref.path) != policy_source:
        models.check_same_tokenizer(tokenizer, models.load_tokenizer(ref, "ref"), "ref",
                                    "policy")
    limit = getattr(models.hf_config(ref, "ref"), "max_position_embeddings", None)
    if limit is not None and cfg.data.max_len > limit:
        raise ConfigError(f"data.max_len: {cfg.data.max_len} exceeds the reference model's "
                          f"max_position_embeddings ({limit}); lower it")
    return ref


@dataclass
class DPOTrainer:
    """A built DPO run: `fit()` trains on the shared supervised loop, `finish()` exports."""

    cfg: DPORunConfig
    session: common.Session
    tokenizer: object
    train_set: PairSplit
    eval_set: PairSplit
    reference: Reference
    total_steps: int

    def pair_losses(self, batch: PairBatch, ref_logps: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """([b] loss of each pair, {metric: [b] value of each pair}) of one micro-batch."""
        d = self.cfg.dpo
        sums, counts = sequence_logps(self.session.engine, batch)
        ref = ref_logps.to(sums.device).T.reshape(-1)  # [2b], chosen then rejected
        counts = counts.clamp(min=1)
        if d.loss_type == "ipo":  # IPO compares per-token averages (Azar et al. 2023)
            logps, ref = sums / counts, ref / counts
        else:
            logps = sums
        b = len(sums) // 2
        losses, chosen, rejected = algo.dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:],
                                                 d.beta, d.loss_type, d.label_smoothing)
        stats = {"rewards/chosen": chosen, "rewards/rejected": rejected,
                 "rewards/accuracies": (chosen > rejected).float(),
                 "rewards/margins": chosen - rejected,
                 "logps/chosen": logps[:b].detach(), "logps/rejected": logps[b:].detach()}
        if d.sft_coef:  # RPO: the chosen response's per-token NLL (Pang et al. 2024)
            nll = -sums[:b] / counts[:b]
            losses = losses + d.sft_coef * nll
            stats["nll_loss"] = nll.detach()
        return losses, stats

    def train_step(self, micro_rows: list[torch.Tensor]) -> dict[str, float]:
        """One optimizer step; the loss is the mean over the pairs of the global batch."""
        engine, coord, n = self.session.engine, self.session.coord, self.cfg.train.batch_size
        # Every reference forward of the step runs before the first policy forward: with LoRA
        # the reference is the policy engine, and ZeRO-3 expects forward then backward.
        refs = self.reference.logps(self.train_set, torch.cat(micro_rows)).split(
            [len(r) for r in micro_rows])
        batches = [(collate_pairs(self.train_set.pairs, rows, self.tokenizer.pad_token_id), ref)
                   for rows, ref in zip(micro_rows, refs, strict=True)]

        def loss_fn(item):
            losses, stats = self.pair_losses(*item)
            return losses.sum(), {k: v.sum().item() for k, v in stats.items()}

        sums = coord.sum_dict(common.backward_step(engine, batches, loss_fn, n, coord,
                                                   lr_field="policy.lr"))
        return {"train/loss": sums.pop("loss") / n, **{k: v / n for k, v in sums.items()}}

    def evaluate(self) -> dict[str, float]:
        """The loss and the implicit-reward metrics over every eval pair, reduced over ranks."""
        def sums(rows: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
            ref = self.reference.logps(self.eval_set, rows)
            batch = collate_pairs(self.eval_set.pairs, rows, self.tokenizer.pad_token_id)
            losses, stats = self.pair_losses(batch, ref)
            w = weights.to(losses.device)
            return {"pairs": w.sum(), "loss": (losses * w).sum(),
                    **{k: (v * w).sum() for k, v in stats.items()}}

        g = common.eval_sums(self.session.engine, self.session.coord, len(self.eval_set),
                             self.cfg.policy.micro_batch_size, sums)
        n = g.pop("pairs")
        return {f"eval/{k}": v / n for k, v in g.items()}

    def fit(self) -> dict[str, float] | None:
        return common.fit(self.cfg, self.session, len(self.train_set), self.total_steps,
                          self.train_step, self.evaluate if len(self.eval_set) else None)

    def finish(self, final: dict[str, float]) -> None:
        engine = self.session.engine
        common.finish(self.cfg, self.session.coord, engine, engine.module, self.tokenizer, final,
                      self.total_steps)


def build_dpo(cfg: DPORunConfig) -> DPOTrainer:
    """Check everything cheap first (sizes, tokenizers, pairs), then build the engines."""
    world_size, grad_accum = common.check_sizes(cfg)
    tokenizer = models.load_tokenizer(cfg.policy.model, "policy")
    ref_model = check_reference(cfg, tokenizer)
    train_set, eval_set = (
        PairSplit(load_preferences(cfg.data, tokenizer, split, overlong_pairs="error"))
        for split in ("train", "eval"))
    total_steps = common.num_steps(cfg.train, len(train_set))

    session = common.start(
        cfg, lambda: models.build_causal_lm(cfg.policy.model, "policy", cfg.policy.dtype,
                                            cfg.seed), grad_accum, world_size,
        split_state(train_set.pairs.fingerprints, eval_set.pairs.fingerprints))
    coord, pad = session.coord, tokenizer.pad_token_id
    if cfg.policy.lora_rank:  # the policy with its adapters off: no second model
        reference = Reference(session.engine, True, cfg.ref.micro_batch_size, pad)
    else:
        engine = init_engine(models.build_causal_lm(ref_model, "ref", cfg.ref.dtype, cfg.seed),
                             cfg.ref, 1, world_size)
        reference = Reference(engine, False, cfg.ref.micro_batch_size, pad)
    if cfg.dpo.precompute_ref:
        for split in (train_set, eval_set):
            reference.precompute(split, coord)
        reference.free()
    if coord.is_main:
        print(f"dpo: {len(train_set)} train pairs ({train_set.pairs.num_filtered} dropped), "
              f"{len(eval_set)} eval pairs, {total_steps} steps of {cfg.train.batch_size} "
              f"pairs, loss {cfg.dpo.loss_type}, beta {cfg.dpo.beta}", flush=True)
    return DPOTrainer(cfg, session, tokenizer, train_set, eval_set, reference, total_steps)


def run(cfg: DPORunConfig) -> dict[str, float] | None:
    trainer = build_dpo(cfg)
    final = trainer.fit()
    if final is not None:  # None: preempted, checkpoint saved
        trainer.finish(final)
    return final
