"""Step 3: PPO with actor, critic, reference and reward as four DeepSpeed engines.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module ds_rlhf ppo --config run.yaml
    ds-rlhf ppo --config run.yaml --ppo.kl_coef 0.1          # one process

Each step: generate -> score -> shape rewards -> GAE -> ppo_epochs x num_minibatches updates
(Ouyang et al. 2022, step 3; PPO details follow Huang et al. 2024, "The N+ implementation
details of RLHF with PPO").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_rlhf import algo, checkpoint, models
from ds_rlhf.config import ConfigError, PPORunConfig, Sizes, derive_sizes, save_yaml
from ds_rlhf.coordinator import (
    Coordinator,
    PromptSampler,
    set_phase,
    setup_distributed_env,
    start_distributed,
)
from ds_rlhf.data import PromptSet, collate_left, load_prompts
from ds_rlhf.engines.roles import Actor, Critic, MicroBatcher, Reference, RewardModel, init_engine
from ds_rlhf.errors import NonFiniteError
from ds_rlhf.rollout import Rollout
from ds_rlhf.tracking import Timer, Tracker


@dataclass
class PPOTrainer:
    cfg: PPORunConfig
    sizes: Sizes
    coord: Coordinator
    tokenizer: object
    prompts: PromptSet
    sampler: PromptSampler
    actor: Actor
    critic: Critic
    ref: Reference
    reward: RewardModel
    kl_ctl: algo.AdaptiveKLController | algo.FixedKLController
    tracker: Tracker
    preempted: checkpoint.PreemptionFlag
    step: int = 0  # PPO steps completed
    saved_step: int = 0  # the step of the newest checkpoint (0: none)
    untrained_steps: int = 0  # PPO steps in a row that took no optimizer step

    def train(self) -> bool:
        """Run to ppo.steps; returns False when stopped early by a preemption signal."""
        every = self.cfg.checkpoint.save_every
        while self.step < self.cfg.ppo.steps:
            if self.coord.any(bool(self.preempted)):  # all ranks agree, then save together
                self.save()
                checkpoint.preempted_exit(self.saved_step, self.coord.is_main)
                return False
            self.step += 1
            metrics = self.ppo_step(self.step)
            self.tracker.log(self.step, metrics)
            self.check_progress(metrics)
            if every and self.step % every == 0:
                self.save()
        self.save()
        return True

    def engines(self) -> dict:
        return {"actor": self.actor.engine, "critic": self.critic.engine}

    def save(self) -> None:
        if self.step == self.saved_step:
            return
        state = {"sampler": self.sampler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                 "consumed_prompts": self.step * self.cfg.ppo.rollout_batch_size,
                 "wandb_run_id": self.tracker.run_id}
        checkpoint.save(self.cfg.output_dir, self.step, self.engines(), state, self.coord,
                        self.cfg.checkpoint.keep_last)
        self.saved_step = self.step

    def resume(self, step_dir, state: dict) -> None:
        checkpoint.load(step_dir, self.engines(), self.coord, state)
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.step = self.saved_step = state["step"]

    def ppo_step(self, step: int) -> dict[str, float]:
        cfg, start = self.cfg, time.perf_counter()
        timer = Timer(on_enter=lambda name: set_phase(f"step {step} {name}"))

        # 1. This rank's equal share of the next global batch of prompts.
        prompt_index = self.coord.shard(self.sampler.next_batch())
        prompt_ids, prompt_mask = collate_left(
            [self.prompts.input_ids[i] for i in prompt_index], self.tokenizer.pad_token_id)

        # 2. Rollout: sample responses, then score them with all four models.
        with timer("generate"), self.actor.generation_mode():
            rollout = self.actor.generate(prompt_ids, prompt_mask, prompt_index, step)
        with timer("actor_logprobs"):
            rollout.old_logprobs = self.actor.logprobs(rollout)
        with timer("ref_logprobs"):
            rollout.ref_logprobs = self.ref.logprobs(rollout)
        with timer("values"):
            rollout.values = self.critic.values(rollout)
        with timer("reward"):
            scores = self.reward.scores(rollout)
            nonfinite = ~torch.isfinite(scores)  # before score_clip makes inf finite
            rollout.scores = self.adjust_scores(scores, rollout)
        every = cfg.tracking.sample_every
        samples = self.samples(rollout, step) if every and step % every == 0 else None
        num_dropped = self.drop_rows(nonfinite, rollout)

        # 3. Per-token rewards (score at the last token, KL penalty everywhere), GAE.
        with timer("advantages"):
            rollout.rewards, kl = algo.shaped_rewards(
                rollout.scores, rollout.old_logprobs, rollout.ref_logprobs,
                rollout.response_mask, self.kl_ctl.value, cfg.ppo.kl_estimator)
            rollout.advantages, rollout.returns = algo.gae(
                rollout.rewards, rollout.values, rollout.response_mask, cfg.ppo.gamma,
                cfg.ppo.lam)
            if cfg.ppo.whiten_advantages:
                rollout.advantages = self.coord.masked_whiten(rollout.advantages,
                                                              rollout.response_mask)

        # 4. PPO updates of actor and critic.
        train_stats = self.update(rollout, step, timer)

        # 5. KL controller, metrics, samples.
        metrics = self.rollout_metrics(rollout, kl)
        metrics["train/nonfinite_score_rows"] = num_dropped
        if samples is not None:
            self.tracker.log_samples(self.coord.gather_objects(samples))
        if num_dropped < cfg.ppo.rollout_batch_size:  # else no KL was measured (NaN)
            self.kl_ctl.update(metrics["objective/kl"], cfg.ppo.rollout_batch_size)
        metrics.update(train_stats)
        timer.seconds["step"] = time.perf_counter() - start
        # The switch into and out of generation mode (ZeRO-3 gather) is part of "generate".
        timer.seconds["switch"] = self.actor.hybrid.switch_seconds
        timer.seconds["generate"] -= timer.seconds["switch"]
        t = timer.seconds
        t["score"] = t["actor_logprobs"] + t["ref_logprobs"] + t["values"] + t["reward"]
        t["train"] = t.get("actor_train", 0.0) + t.get("critic_train", 0.0)  # 0: all skipped
        metrics.update({f"timing/{k}": v for k, v in t.items()})
        metrics["perf/samples_per_s"] = cfg.ppo.rollout_batch_size / timer.seconds["step"]
        metrics["perf/tokens_per_s"] = metrics["response_length/mean"] * \
            metrics["perf/samples_per_s"]
        return metrics

    def samples(self, rollout: Rollout, step: int) -> list[dict]:
        rows = []
        for i in range(len(rollout)):
            response = rollout.response_ids[i, :int(rollout.response_lengths[i])].tolist()
            rows.append({"step": step, "prompt_index": int(rollout.prompt_index[i]),
                         "prompt": self.prompts.texts[int(rollout.prompt_index[i])],
                         "response": self.tokenizer.decode(response), "response_ids": response,
                         "score": float(rollout.scores[i])})  # NaN: null in samples.jsonl
        return rows

    def drop_rows(self, bad: torch.Tensor, rollout: Rollout) -> int:
        """Rows `bad` ([B] bool: a NaN/inf reward score) leave the update, in place: their
        response mask is zeroed (no tokens in the losses, GAE, whitening or the global token
        counts) and their score set to 0. The rows stay, so every rank still runs the same
        micro-batches. Returns the number of such rows over all ranks; under
        ppo.nonfinite: stop, any one stops the run (every rank sees the same count)."""
        num_bad = int(self.coord.sum(bad.sum().double()).item())
        if num_bad and self.cfg.ppo.nonfinite == "stop":
            raise NonFiniteError(
                f"the reward model gave NaN/inf scores to {num_bad} of "
                f"{self.cfg.ppo.rollout_batch_size} rows at PPO step {self.step}; the last "
                "checkpoint is intact. Check the reward model, or set ppo.nonfinite: skip to "
                "drop such rows from the update")
        rollout.response_mask[bad] = 0
        rollout.scores[bad] = 0.0
        return num_bad

    def check_progress(self, metrics: dict[str, float]) -> None:
        """Stop (exit 3) after ppo.max_untrained_steps PPO steps in a row without an optimizer
        step: a run that skips everything must not finish as if it had trained."""
        num_updates = self.cfg.ppo.ppo_epochs * self.cfg.ppo.num_minibatches
        trained = metrics["train/skipped_minibatches"] < num_updates
        self.untrained_steps = 0 if trained else self.untrained_steps + 1
        limit = self.cfg.ppo.max_untrained_steps
        if limit and self.untrained_steps >= limit:
            raise NonFiniteError(
                f"no optimizer step in the last {self.untrained_steps} PPO steps (up to step "
                f"{self.step}): every row had a NaN/inf score or every micro-batch a NaN/inf "
                f"loss (see train/nonfinite_score_rows and train/skipped_microbatches in "
                f"{Path(self.cfg.output_dir) / 'metrics.jsonl'}); the last checkpoint is "
                "intact. Check the reward model and the learning rate")

    def adjust_scores(self, scores: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        p = self.cfg.ppo
        if p.missing_eos_penalty is not None:
            scores = scores - p.missing_eos_penalty * (~self.ends_with_eos(rollout)).float()
        if p.score_clip is not None:
            scores = scores.clamp(-p.score_clip, p.score_clip)
        return scores

    def ends_with_eos(self, rollout: Rollout) -> torch.Tensor:  # [B] bool
        last = (rollout.response_lengths - 1).clamp(min=0)
        last_token = rollout.response_ids.gather(1, last[:, None]).squeeze(1)
        return (last_token == self.tokenizer.eos_token_id) & (rollout.response_lengths > 0)

    def update(self, rollout: Rollout, step: int, timer: Timer) -> dict[str, float]:
        """ppo_epochs passes, each num_minibatches optimizer steps over a seeded shuffle."""
        p, size = self.cfg.ppo, self.sizes.minibatch_per_rank
        shuffle = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        totals: dict[str, float] = {"tokens": 0.0}  # stays 0 when every minibatch is empty
        for _ in range(p.ppo_epochs):
            order = torch.randperm(len(rollout), generator=shuffle)
            for k in range(p.num_minibatches):
                minibatch = rollout.select(order[k * size:(k + 1) * size])
                num_tokens = self.coord.sum(minibatch.response_mask.sum()).item()
                if num_tokens == 0:  # every row dropped on every rank: no pass, no step
                    continue
                with timer("actor_train"):
                    actor_stats = self.actor.train_step(minibatch, num_tokens)
                with timer("critic_train"):
                    critic_stats = self.critic.train_step(minibatch, num_tokens)
                for prefix, stats in (("actor", actor_stats), ("critic", critic_stats)):
                    for key, value in stats.items():
                        totals[f"{prefix}/{key}"] = totals.get(f"{prefix}/{key}", 0.0) + value
                totals["tokens"] = totals.get("tokens", 0.0) + float(minibatch.response_mask.sum())
        g = self.coord.sum_dict(totals)
        num_updates, tokens = p.ppo_epochs * p.num_minibatches, max(g["tokens"], 1.0)
        g = {key: g.get(key, 0.0) for key in (  # a key is missing if every micro-batch skipped
            "actor/skipped_microbatches", "critic/skipped_microbatches", "actor/loss",
            "critic/loss", "actor/approx_kl", "actor/clipfrac", "actor/ratio", "critic/clipfrac",
            "actor/optimizer_steps")}
        return {
            "train/skipped_microbatches": g["actor/skipped_microbatches"]
            + g["critic/skipped_microbatches"],
            # the actor's minibatches that took no optimizer step (all rows or passes skipped)
            "train/skipped_minibatches": num_updates - round(g["actor/optimizer_steps"]),
            "loss/policy_avg": g["actor/loss"] / num_updates,
            "loss/value_avg": g["critic/loss"] / num_updates,
            "policy/approxkl_avg": g["actor/approx_kl"] / tokens,
            "policy/clipfrac_avg": g["actor/clipfrac"] / tokens,
            "val/ratio": g["actor/ratio"] / tokens,
            "val/clipfrac_avg": g["critic/clipfrac"] / tokens,
        }

    def rollout_metrics(self, rollout: Rollout, kl: torch.Tensor) -> dict[str, float]:
        lengths = rollout.response_lengths.double()
        kl_seq = kl.sum(1).double()  # kl is already zero on padding
        has_eos = self.ends_with_eos(rollout)
        max_new = self.cfg.generation.max_new_tokens
        local = torch.stack([  # rows dropped for a NaN/inf score have no tokens: not counted
            (lengths > 0).double().sum(), rollout.scores.double().sum(),
            kl_seq.sum(), (rollout.scores.double() - self.kl_ctl.value * kl_seq).sum(),
            lengths.sum(), has_eos.double().sum(), ((lengths >= max_new) & ~has_eos).double().sum(),
        ])
        n, scores, kl_sum, rlhf, length, eos, clipped = self.coord.sum(local).tolist()
        n = n or float("nan")  # every row dropped: means are undefined (null in metrics.jsonl)
        return {
            "objective/scores": scores / n, "objective/kl": kl_sum / n,
            "objective/rlhf_reward": rlhf / n, "objective/kl_coef": self.kl_ctl.value,
            "response_length/mean": length / n, "response_length/clip_ratio": clipped / n,
            "val/num_eos_tokens": eos,
        }


def _tokenizers(cfg: PPORunConfig):
    """The actor's tokenizer; the critic's and reward's must have the same vocabulary."""
    tokenizer = models.load_tokenizer(cfg.actor.model, "actor")
    actor_source = cfg.actor.model.tokenizer or cfg.actor.model.path
    for role in ("critic", "reward"):
        m = getattr(cfg, role).model
        source = m.tokenizer or m.path
        if source is not None and source != actor_source:
            models.check_same_tokenizer(tokenizer, models.load_tokenizer(m, role), role)
    return tokenizer


def _check_lengths(cfg: PPORunConfig) -> None:
    actor_config = models.hf_config(cfg.actor.model, "actor")
    limit = getattr(actor_config, "max_position_embeddings", None)
    needed = cfg.data.max_prompt_len + cfg.generation.max_new_tokens
    if limit is not None and needed > limit:
        raise ConfigError(
            f"data.max_prompt_len + generation.max_new_tokens = {needed} exceeds the actor's "
            f"max_position_embeddings ({limit}); lower one of them")


def build_ppo(cfg: PPORunConfig) -> PPOTrainer:
    """Check everything cheap first (sizes, tokenizers, prompts), then build the engines."""
    setup_distributed_env()
    world_size = int(os.environ["WORLD_SIZE"])
    sizes = derive_sizes(cfg, world_size)
    _check_lengths(cfg)
    tokenizer = _tokenizers(cfg)
    prompts = load_prompts(cfg.data, tokenizer, split="train")
    sampler = PromptSampler(len(prompts.input_ids), cfg.ppo.rollout_batch_size, cfg.data.seed)
    preempted = checkpoint.preemption_flag()  # a signal now waits for a step boundary

    coord = start_distributed(cfg.distributed.timeout_minutes)
    resume_dir, state = checkpoint.open_run(cfg.output_dir, cfg.checkpoint.resume, coord)
    if coord.is_main:
        save_yaml(cfg, Path(cfg.output_dir) / "config.yaml")
        if prompts.num_filtered:
            print(f"data: dropped {prompts.num_filtered} prompts longer than "
                  f"{cfg.data.max_prompt_len} tokens", flush=True)

    pad = tokenizer.pad_token_id
    universal = checkpoint.is_universal(state, world_size)  # resuming from another world size
    actor_engine = init_engine(
        models.build_causal_lm(cfg.actor.model, "actor", cfg.actor.dtype, cfg.seed),
        cfg.actor, sizes.actor_grad_accum, world_size,
        micro_batch_size=sizes.minibatch_per_rank // sizes.actor_grad_accum,
        load_universal=universal)
    critic_engine = init_engine(
        models.build_scalar_model(cfg.critic.model, "critic", cfg.critic.dtype, cfg.seed, pad),
        cfg.critic, sizes.critic_grad_accum, world_size,
        micro_batch_size=sizes.minibatch_per_rank // sizes.critic_grad_accum,
        load_universal=universal)
    ref_model = cfg.ref.model if (cfg.ref.model.path or cfg.ref.model.init) else cfg.actor.model
    ref_engine = init_engine(
        models.build_causal_lm(ref_model, "ref", cfg.ref.dtype, cfg.seed), cfg.ref, 1, world_size)
    reward_engine = init_engine(
        models.build_scalar_model(cfg.reward.model, "reward", cfg.reward.dtype, cfg.seed, pad),
        cfg.reward, 1, world_size)
    batcher = {role: MicroBatcher(getattr(cfg, role).micro_batch_size,
                                  getattr(cfg, role).micro_batch_tokens, coord)
               for role in ("actor", "critic", "ref", "reward")}

    p = cfg.ppo
    kl_ctl = (algo.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
              if p.kl_target is not None else algo.FixedKLController(p.kl_coef))
    trainer = PPOTrainer(
        cfg=cfg, sizes=sizes, coord=coord, tokenizer=tokenizer, prompts=prompts, sampler=sampler,
        actor=Actor(actor_engine, sizes.actor_grad_accum, coord, cfg.generation, p,
                    batcher["actor"], tokenizer, cfg.seed),
        critic=Critic(critic_engine, sizes.critic_grad_accum, coord, p, batcher["critic"]),
        ref=Reference(ref_engine, batcher["ref"], cfg.generation.temperature),
        reward=RewardModel(reward_engine, batcher["reward"]),
        kl_ctl=kl_ctl,
        tracker=Tracker(cfg.output_dir, coord.is_main, cfg.tracking.log_every, p.steps,
                        tracking=cfg.tracking, config=cfg,
                        start_step=state["step"] if state else 0,
                        run_id=state.get("wandb_run_id") if state else None),
        preempted=preempted,
    )
    if resume_dir is not None:
        trainer.resume(resume_dir, state)
        if coord.is_main:
            print(f"resumed from {resume_dir} at step {trainer.step}", flush=True)
    return trainer


def run(cfg: PPORunConfig) -> PPOTrainer:
    trainer = build_ppo(cfg)
    if trainer.train():
        set_phase("export")
        out = Path(cfg.output_dir)
        trainer.actor.export(out / "actor", trainer.tokenizer, trainer.coord.is_main)
        if cfg.checkpoint.export_critic:
            trainer.critic.export(out / "critic", trainer.tokenizer, trainer.coord.is_main)
    trainer.tracker.finish()
    return trainer
