"""Step 3: PPO with actor, critic, reference and reward as DeepSpeed engines, and the
critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) on the same step.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module ds_rlhf ppo --config run.yaml
    ds-rlhf ppo --config run.yaml --ppo.kl_coef 0.1          # one process

Each step: generate -> score -> rewards -> advantages -> ppo_epochs x num_minibatches updates
(Ouyang et al. 2022, step 3; PPO details follow Huang et al. 2024, "The N+ implementation
details of RLHF with PPO"). Only the engines the run needs are built: no critic for a
critic-free estimator, no reference without a KL term (ppo.kl_coef, ppo.kl_loss_coef).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_rlhf import algo, checkpoint, model_card, models, pool
from ds_rlhf.config import ConfigError, PPORunConfig, Sizes, derive_sizes, save_yaml
from ds_rlhf.coordinator import (
    Coordinator,
    PromptSampler,
    set_phase,
    setup_distributed_env,
    split_world,
    start_distributed,
)
from ds_rlhf.data import PromptSet, collate_left, load_prompts, split_state
from ds_rlhf.data.sources import check_resumed_split
from ds_rlhf.engines.roles import (
    Actor,
    Critic,
    LossScale,
    MicroBatcher,
    Reference,
    RewardModel,
    init_engine,
)
from ds_rlhf.episodes import (
    EpisodeRunner,
    Episodes,
    actor_backend,
    build_episodes,
    episode_metrics,
)
from ds_rlhf.errors import FailedRowsError, NonFiniteError
from ds_rlhf.rewards import Rewards, build_rewards, reward_metrics, reward_rows
from ds_rlhf.rollout import Rollout, RowFailure, minibatch_schedule
from ds_rlhf.schedule import Schedule
from ds_rlhf.tracking import Timer, Tracker

ROLLOUTS = "rollouts.pt"  # a checkpoint's FIFO of generated rollouts (rollout.staleness)


@dataclass
class PPOTrainer:
    cfg: PPORunConfig
    sizes: Sizes
    coord: Coordinator
    tokenizer: object
    prompts: PromptSet
    sampler: PromptSampler
    actor: Actor
    critic: Critic | None  # None: a critic-free estimator
    ref: Reference | None  # None: no KL term
    reward: RewardModel | None
    rewards: Rewards  # the reward model, functions and servers, combined by weight
    kl_ctl: algo.AdaptiveKLController | algo.FixedKLController
    tracker: Tracker
    preempted: checkpoint.PreemptionFlag
    episodes: EpisodeRunner | None = None  # multi-turn episodes (rollout.tools/environment)
    schedule: Schedule | None = None  # which rollout each step trains on (build_ppo sets it)
    step: int = 0  # PPO steps completed
    saved_step: int = 0  # the step of the newest checkpoint (0: none)
    untrained_steps: int = 0  # PPO steps in a row that took no optimizer step
    failure_kinds: set[str] = field(default_factory=set)  # failures printed so far

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

    @property
    def engine_names(self) -> list[str]:
        """The engines this run built, by config section."""
        roles = {"actor": self.actor, "critic": self.critic, "ref": self.ref,
                 "reward": self.reward}
        return [name for name, role in roles.items() if role is not None]

    def engines(self) -> dict:
        """The trained engines: what a checkpoint holds."""
        trained = {"actor": self.actor, "critic": self.critic}
        return {name: role.engine for name, role in trained.items() if role is not None}

    def save(self) -> None:
        if self.step == self.saved_step:
            return
        # A lagged run's FIFO: generated, not yet trained on (every rank's rows; a collective)
        files = {ROLLOUTS: self.schedule.state()} if self.cfg.rollout.staleness else None
        state = {"sampler": self.sampler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                 "consumed_prompts": self.step * self.cfg.ppo.rollout_batch_size,
                 "wandb_run_id": self.tracker.run_id,
                 "data_split": split_state(self.prompts.fingerprints)}
        checkpoint.save(self.cfg.output_dir, self.step, self.engines(), state, self.coord,
                        self.cfg.checkpoint.keep_last, files)
        self.saved_step = self.step

    def resume(self, step_dir, state: dict) -> None:
        checkpoint.load(step_dir, self.engines(), self.coord, state)
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.step = self.saved_step = state["step"]
        self.schedule.load_state(checkpoint.load_file(step_dir, ROLLOUTS), self.step)

    def ppo_step(self, step: int) -> dict[str, float]:
        cfg, start = self.cfg, time.perf_counter()
        timer = Timer(on_enter=lambda name: set_phase(f"step {step} {name}"))
        n = cfg.generation.n_samples_per_prompt

        # 1-2. The rollout of this step: this rank's share of the step's prompts, each n
        #    times, with sampled responses (self.generate); with rollout.staleness k, made k
        #    steps ago by the actor after step - 1 - k (ds_rlhf/schedule.py). Then score it
        #    with the models the run has, the old logprobs with the actor as it is now (the
        #    proximal policy of decoupled PPO; the sampler's are the behaviour policy's).
        with timer("generate"):
            generated = self.schedule.rollout_for(step)
        rollout, episodes = generated.rollout, generated.episodes
        # The on-policy shortcut: the update's own forward gives the old logprobs (0 s here).
        # Never for a lagged rollout: the actor that sampled it is gone.
        shortcut = cfg.takes_on_policy_shortcut
        timer.seconds["actor_logprobs"] = 0.0
        if not shortcut:
            with timer("actor_logprobs"):
                rollout.old_logprobs = self.actor.logprobs(rollout)
        if self.ref is not None:
            with timer("ref_logprobs"):
                rollout.ref_logprobs = self.ref.logprobs(rollout)
        if self.critic is not None:
            with timer("values"):
                rollout.values = self.critic.values(rollout)
        with timer("reward"):
            scores, per_reward, reward_failures = self.rewards.score(
                reward_rows(rollout, self.prompts, self.tokenizer, episodes))
            # A row whose episode failed is that episode's failure, whatever its reward did.
            failures = [e or r for e, r in zip(
                episodes.errors if episodes is not None else [None] * len(rollout),
                reward_failures, strict=True)]
            failed = torch.tensor([f is not None for f in failures], dtype=torch.bool)
            nonfinite = ~torch.isfinite(scores) & ~failed  # before score_clip makes inf finite
            rollout.scores = self.adjust_scores(scores, rollout)
        every = cfg.tracking.sample_every
        samples = self.samples(rollout, step, episodes, failures) \
            if every and step % every == 0 else None
        num_failed = self.drop_failed_rows(failures, rollout)
        num_dropped = self.drop_rows(nonfinite, rollout)

        # 3. Per-token rewards and advantages of ppo.advantage_estimator.
        with timer("advantages"):
            kl = self.advantages(rollout)

        # 4. Policy-gradient updates of the actor (and the critic, for GAE).
        train_stats = self.update(rollout, step, timer)
        if shortcut:  # what needed the old logprobs, now that the update gave them
            kl = self.reward_kl(rollout)

        # 5. KL controller, metrics, samples.
        metrics = self.rollout_metrics(rollout, kl)
        metrics.update(reward_metrics(per_reward, rollout.scores, n, self.coord,
                                      ~(nonfinite | failed)))
        metrics["train/nonfinite_score_rows"] = num_dropped
        metrics["reward/failed_rows"] = num_failed["reward"]
        if episodes is not None:
            metrics["env/failed_episodes"] = num_failed["episode"]
        metrics["rollout/staleness"] = step - 1 - generated.version  # updates since sampled
        if episodes is not None:
            metrics.update(episode_metrics(self.coord.sum(episodes.stats()).tolist()))
            timer.seconds["env"] = generated.env_seconds
            timer.seconds["generate"] -= generated.env_seconds
        if samples is not None:
            self.tracker.log_samples(self.coord.gather_objects(samples))
        num_rows = cfg.ppo.rollout_batch_size * n
        if num_dropped + sum(num_failed.values()) < num_rows:  # else no KL was measured (NaN)
            self.kl_ctl.update(metrics["objective/kl"], num_rows)
        metrics.update(train_stats)
        timer.seconds["step"] = time.perf_counter() - start
        # 0 for the phases of engines the run lacks, and for training when all was skipped
        for phase in ("ref_logprobs", "values", "actor_train", "critic_train"):
            timer.seconds.setdefault(phase, 0.0)
        # The switch into and out of generation mode (ZeRO-3 gather) is part of "generate".
        timer.seconds["switch"] = self.actor.switch_seconds
        timer.seconds["generate"] -= timer.seconds["switch"]
        timer.seconds["weight_sync"] = self.actor.weight_sync_seconds  # vllm: part of switch
        if self.schedule.pool is not None:
            metrics.update(self.pool_metrics(timer.seconds))
        t = timer.seconds
        t["score"] = t["actor_logprobs"] + t["ref_logprobs"] + t["values"] + t["reward"]
        t["train"] = t["actor_train"] + t["critic_train"]
        metrics.update({f"timing/{k}": v for k, v in t.items()})
        metrics["perf/samples_per_s"] = num_rows / timer.seconds["step"]
        metrics["perf/tokens_per_s"] = metrics["response_length/mean"] * \
            metrics["perf/samples_per_s"]
        return metrics

    def pool_metrics(self, seconds: dict[str, float]) -> dict[str, float]:
        """rollout.placement separate: this step's weight transfer (into `seconds`, like
        the waits: parts of "generate"), and the pool's seconds for the rows trained on
        (generating them; before that, idle and loading weights: rank 0's numbers)."""
        client, metrics = self.schedule.pool, {}
        seconds["wait_rollout"] = client.wait_seconds
        transfer = client.transfer
        if transfer is not None:  # the weights sent this step
            seconds["weight_transfer"] = transfer.seconds
            metrics["weights/transfer_bytes"] = transfer.bytes
            metrics["weights/transfer_gb_per_s"] = transfer.gb_per_s
            metrics["weights/version"] = transfer.version  # the actor after that step
            metrics["weights/checksum"] = transfer.checksum % 2**52  # exact in a float
        if client.pool_seconds is not None:
            for name, value in client.pool_seconds.items():
                metrics[f"timing/pool_{name}"] = value
        client.transfer, client.pool_seconds, client.wait_seconds = None, None, 0.0
        return metrics

    def generate(self, step: int) -> tuple[Rollout, Episodes | None]:
        """This rank's rows of step `step`, sampled by the actor as it is now (in generation
        mode): its equal share of the step's global batch of prompts, each n times (rows
        g*n .. g*n+n-1 are the samples of one prompt, a group never split over ranks), with
        step `step`'s per-row seeds; a multi-turn episode per row with rollout.tools or
        rollout.environment."""
        n = self.cfg.generation.n_samples_per_prompt
        prompt_index = self.coord.shard(self.sampler.next_batch()).repeat_interleave(n)
        sample_index = torch.arange(n).repeat(len(prompt_index) // n)
        pad = self.tokenizer.pad_token_id
        if self.episodes is None:
            prompt_ids, prompt_mask = collate_left(
                [self.prompts.input_ids[i] for i in prompt_index], pad)
            return self.actor.generate(prompt_ids, prompt_mask, prompt_index, step,
                                       sample_index=sample_index), None
        return self.episodes.run(
            actor_backend(self.actor, step, pad), [self.prompts.input_ids[i] for i in prompt_index],
            self.dataset_rows(prompt_index), prompt_index, sample_index, self.coord, pad)

    def samples(self, rollout: Rollout, step: int, episodes: Episodes | None,
                failures: list[RowFailure | None]) -> list[dict]:
        """samples.jsonl rows; an episode's also list its parts, each with its role; a
        failed row says why ("failed")."""
        rows = []
        for i in range(len(rollout)):
            response = rollout.response_ids[i, :int(rollout.response_lengths[i])].tolist()
            prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
            rows.append({"step": step, "prompt_index": int(rollout.prompt_index[i]),
                         "sample_index": int(rollout.sample_index[i]),
                         "prompt": self.prompts.texts[int(rollout.prompt_index[i])]
                         if episodes is None else self.tokenizer.decode(prompt),
                         "response": self.tokenizer.decode(response), "response_ids": response,
                         "score": float(rollout.scores[i])})  # NaN: null in samples.jsonl
            if episodes is not None:
                rows[-1]["parts"] = episodes.parts(i, self.tokenizer)
            if failures[i] is not None:
                rows[-1]["failed"] = f"{failures[i].kind} ({failures[i].row})"
        return rows

    def dataset_rows(self, prompt_index: torch.Tensor) -> list[dict]:
        """The dataset row of each prompt as environments see it: {"prompt", **columns}."""
        p = self.prompts
        return [{"prompt": p.texts[i], **{k: v[i] for k, v in p.columns.items()}}
                for i in prompt_index.tolist()]

    def drop_rows(self, bad: torch.Tensor, rollout: Rollout) -> int:
        """Rows `bad` ([B] bool: a NaN/inf reward score) leave the update, in place: their
        response mask is zeroed (no tokens in the losses, GAE, whitening or the global token
        and sequence counts, no part in their group's statistics) and their score set to 0.
        The rows stay, so every rank still runs the same
        micro-batches. Returns the number of such rows over all ranks; under
        ppo.nonfinite: stop, any one stops the run (every rank sees the same count)."""
        num_bad = int(self.coord.sum(bad.sum().double()).item())
        if num_bad and self.cfg.ppo.nonfinite == "stop":
            raise NonFiniteError(
                f"the reward model gave NaN/inf scores to {num_bad} of "
                f"{len(rollout) * self.coord.world_size} rows at PPO step {self.step}; the last "
                "checkpoint is intact. Check the reward model, or set ppo.nonfinite: skip to "
                "drop such rows from the update")
        rollout.response_mask[bad] = 0
        rollout.scores[bad] = 0.0
        return num_bad

    def drop_failed_rows(self, failures: list[RowFailure | None], rollout: Rollout
                         ) -> dict[str, int]:
        """Rows whose episode or reward call failed (`failures[i]` not None) leave the update
        as drop_rows' do. Each kind of failure is printed once per run (rank 0, with its count
        in the step it first appeared); a step where more than rollout.max_failed_fraction of
        the rows failed stops the run on every rank. Returns the failed rows over all ranks by
        source ("episode", "reward")."""
        counts = self.coord.sum(torch.tensor(
            [sum(f is not None and f.source == source for f in failures)
             for source in RowFailure.SOURCES], dtype=torch.float64))
        num_failed = dict(zip(RowFailure.SOURCES, (int(c) for c in counts.tolist()),
                              strict=True))
        total, num_rows = sum(num_failed.values()), len(rollout) * self.coord.world_size
        if not total:
            return num_failed
        kinds: dict[str, list[RowFailure]] = {}
        for f in self.coord.gather_objects([f for f in failures if f is not None]):
            kinds.setdefault(f.kind, []).append(f)
        report = "; ".join(f"{kind} ({len(fs)} row{'s' * (len(fs) > 1)}, first {fs[0].row})"
                           for kind, fs in kinds.items())
        limit = self.cfg.rollout.max_failed_fraction
        if total > limit * num_rows:
            raise FailedRowsError(
                f"{total} of {num_rows} rows failed at PPO step {self.step}, more than "
                f"rollout.max_failed_fraction ({limit:g}): {report}. The last checkpoint is "
                "intact; fix what failed, or raise rollout.max_failed_fraction")
        new = {kind: fs for kind, fs in kinds.items() if kind not in self.failure_kinds}
        self.failure_kinds.update(new)
        if new and self.coord.is_main:
            for kind, fs in new.items():
                print(f"PPO step {self.step}: {len(fs)} of {num_rows} rows failed: {kind} "
                      f"(first {fs[0].row}); such rows leave the update (env/failed_episodes, "
                      "reward/failed_rows), this message is not repeated", flush=True)
        failed = torch.tensor([f is not None for f in failures], dtype=torch.bool)
        rollout.response_mask[failed] = 0
        rollout.scores[failed] = 0.0
        return num_failed

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
                f"{self.step}): every row failed or had a NaN/inf score, or every micro-batch a "
                f"NaN/inf loss (see env/failed_episodes, reward/failed_rows, "
                f"train/nonfinite_score_rows and train/skipped_microbatches in "
                f"{Path(self.cfg.output_dir) / 'metrics.jsonl'}); the last checkpoint is "
                "intact. Check the reward model and the learning rate")

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """rollout.rewards and .advantages (and .returns for GAE) by ppo.advantage_estimator,
        the table of design/PPO_SPEC.md; returns the per-token KL to the reference [B, R]."""
        p, mask = self.cfg.ppo, rollout.loss_mask
        estimator, n = p.advantage_estimator, self.cfg.generation.n_samples_per_prompt
        scores = rollout.scores
        valid = mask.bool().any(1)  # rows dropped by drop_rows have no tokens left
        if estimator == "reinforce_pp_baseline":  # the group's mean score as baseline
            scores = algo.group_advantages(scores, n, "dr_grpo", valid=valid)
        # Without a reference engine (no KL term configured) the actor is its own reference:
        # the KL is 0. Under the on-policy shortcut the old logprobs come with the update and
        # kl_coef is 0: the rewards do not depend on them (the KL is measured after it).
        old_logprobs = rollout.old_logprobs
        if old_logprobs is None:
            old_logprobs = torch.zeros(mask.shape)
        ref_logprobs = old_logprobs if self.ref is None else rollout.ref_logprobs
        rollout.rewards, kl = algo.shaped_rewards(
            scores, old_logprobs, ref_logprobs, mask, self.kl_ctl.value, p.kl_estimator)
        if estimator in algo.GROUP_ESTIMATORS:
            # One advantage per row from its group's sequence rewards (score - kl_coef * KL;
            # grpo and dr_grpo have kl_coef 0), on every real token, never whitened.
            per_row = algo.group_advantages(rollout.rewards.sum(1), n, estimator, valid=valid)
            rollout.advantages = torch.where(mask.bool(), per_row[:, None], 0.0)
            return kl
        # In episodes the model's tokens have observations between them: the recursions run
        # over the model's tokens only, moved together (a stable sort), then put back.
        order = torch.argsort(1 - mask, dim=1, stable=True)
        packed = mask.gather(1, order)
        if estimator == "gae":
            advantages, returns = algo.gae(rollout.rewards.gather(1, order),
                                           rollout.values.gather(1, order), packed, p.gamma,
                                           p.lam)
            rollout.returns = torch.zeros_like(returns).scatter(1, order, returns)
        else:  # reinforce_pp, reinforce_pp_baseline: returns-to-go, no critic
            advantages = algo.discounted_returns(rollout.rewards.gather(1, order), packed,
                                                 p.gamma)
        rollout.advantages = torch.zeros_like(advantages).scatter(1, order, advantages)
        if p.whiten_advantages:
            rollout.advantages = self.coord.masked_whiten(rollout.advantages, mask)
        return kl

    def reward_kl(self, rollout: Rollout) -> torch.Tensor:
        """[B, R] the per-token KL to the reference that shaped_rewards measures (0 on
        padding; 0 without a reference engine)."""
        if self.ref is None:
            return torch.zeros(rollout.loss_mask.shape)
        return torch.where(rollout.loss_mask.bool(),
                           algo.kl_per_token(rollout.old_logprobs, rollout.ref_logprobs,
                                             self.cfg.ppo.kl_estimator), 0.0)

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
        """ppo_epochs passes, each num_minibatches optimizer steps over a seeded shuffle of
        the step's rows on all ranks: the same minibatches on any number of ranks."""
        p, world = self.cfg.ppo, self.coord.world_size
        shuffle = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        num_rows = len(rollout) * world
        trained = {"actor": self.actor, "critic": self.critic}
        trained = {name: role for name, role in trained.items() if role is not None}
        totals: dict[str, float] = {"tokens": 0.0}  # stays 0 when every minibatch is empty
        for _ in range(p.ppo_epochs):
            schedule = minibatch_schedule(num_rows, p.num_minibatches, world, shuffle)
            for minibatch in self.coord.minibatches(rollout, schedule):
                # valid tokens and rows (dropped rows have no tokens) of the global minibatch
                mask = minibatch.loss_mask
                num_tokens, num_sequences = self.coord.sum(
                    torch.stack([mask.sum(), mask.bool().any(1).sum()])).tolist()
                if num_tokens == 0:  # every row dropped on every rank: no pass, no step
                    continue
                scale = LossScale(p.loss_agg, num_tokens, int(num_sequences),
                                  self.max_response_len)
                for name, role in trained.items():
                    with timer(f"{name}_train"):
                        stats = role.train_step(minibatch, scale)
                    for key, value in stats.items():
                        totals[f"{name}/{key}"] = totals.get(f"{name}/{key}", 0.0) + value
                if rollout.old_logprobs is None:  # the on-policy shortcut: one minibatch,
                    rollout.old_logprobs = minibatch.old_logprobs  # this rank's rows in order
                totals["tokens"] = totals.get("tokens", 0.0) + float(minibatch.loss_mask.sum())
        if rollout.old_logprobs is None:  # no pass ran: every row dropped, nothing to measure
            rollout.old_logprobs = torch.zeros(rollout.loss_mask.shape)
        g = self.coord.sum_dict(totals)
        num_updates, tokens = p.ppo_epochs * p.num_minibatches, max(g["tokens"], 1.0)
        g = {key: g.get(key, 0.0) for key in (  # a key is missing if every micro-batch skipped
            "actor/skipped_microbatches", "critic/skipped_microbatches", "actor/loss",
            "critic/loss", "actor/approx_kl", "actor/clipfrac", "actor/ratio", "critic/clipfrac",
            "actor/optimizer_steps", "actor/ref_kl")}
        metrics = {
            "train/skipped_microbatches": g["actor/skipped_microbatches"]
            + g["critic/skipped_microbatches"],
            # the actor's minibatches that took no optimizer step (all rows or passes skipped)
            "train/skipped_minibatches": num_updates - round(g["actor/optimizer_steps"]),
            "loss/policy_avg": g["actor/loss"] / num_updates,
            "policy/approxkl_avg": g["actor/approx_kl"] / tokens,
            "policy/clipfrac_avg": g["actor/clipfrac"] / tokens,
            "val/ratio": g["actor/ratio"] / tokens,
        }
        if p.kl_loss_coef:  # the KL loss term's per-token KL, before its coefficient
            metrics["policy/ref_kl_avg"] = g["actor/ref_kl"] / tokens
        if self.critic is not None:
            metrics["loss/value_avg"] = g["critic/loss"] / num_updates
            metrics["val/clipfrac_avg"] = g["critic/clipfrac"] / tokens
        return metrics

    @property
    def max_response_len(self) -> int:
        """Response tokens of a row at most: one response, or an episode's budget."""
        if self.episodes is not None:
            return self.cfg.rollout.max_total_tokens
        return self.cfg.generation.max_new_tokens

    def rollout_metrics(self, rollout: Rollout, kl: torch.Tensor) -> dict[str, float]:
        lengths = rollout.response_lengths.double()
        kl_seq = kl.sum(1).double()  # kl is already zero on padding
        has_eos = self.ends_with_eos(rollout)
        max_new = self.max_response_len
        # The sampler/trainer mismatch over the model's tokens; its means times their counts
        # (tokens, non-empty rows) add up over ranks. Rows without sampler logprobs: 0.
        num_rows, num_tokens = (lengths > 0).double().sum(), lengths.sum()
        model_tokens = rollout.loss_mask.sum().double()
        mismatch = {"logprob_abs_diff": 0.0, "capped_frac": 0.0, "mismatch_kl": 0.0}
        weights = torch.zeros(1)  # the TIS weights on the model's tokens (0 elsewhere)
        if rollout.sampler_logprobs is not None:
            weights, mismatch = algo.rollout_is_weights(
                rollout.old_logprobs, rollout.sampler_logprobs, rollout.loss_mask,
                self.cfg.ppo.rollout_is_cap)
        local = torch.stack([  # rows dropped for a NaN/inf score have no tokens: not counted
            num_rows, rollout.scores.double().sum(),
            kl_seq.sum(), (rollout.scores.double() - self.kl_ctl.value * kl_seq).sum(),
            num_tokens, has_eos.double().sum(), ((lengths >= max_new) & ~has_eos).double().sum(),
            model_tokens, mismatch["logprob_abs_diff"] * model_tokens,
            mismatch["capped_frac"] * model_tokens, mismatch["mismatch_kl"] * num_rows,
            weights.double().sum(),
        ])
        n, scores, kl_sum, rlhf, length, eos, clipped, model, abs_diff, capped, mismatch_kl, \
            weight_sum = self.coord.sum(local).tolist()
        n = n or float("nan")  # every row dropped: means are undefined (null in metrics.jsonl)
        model = model or float("nan")
        metrics = {
            "objective/scores": scores / n, "objective/kl": kl_sum / n,
            "objective/rlhf_reward": rlhf / n, "objective/kl_coef": self.kl_ctl.value,
            "response_length/mean": length / n, "response_length/clip_ratio": clipped / n,
            "val/num_eos_tokens": eos,
            "rollout/logprob_abs_diff": abs_diff / model, "rollout/mismatch_kl": mismatch_kl / n,
        }
        if self.cfg.ppo.rollout_correction == "tis":  # the weights' share capped, mean, max
            metrics["rollout/is_capped_frac"] = capped / model
            metrics["rollout/is_weight_mean"] = weight_sum / model
            metrics["rollout/is_weight_max"] = self.coord.max(float(weights.max()))
        return metrics


def _tokenizers(cfg: PPORunConfig):
    """The actor's tokenizer; the critic's and reward's must have the same vocabulary."""
    tokenizer = models.load_tokenizer(cfg.actor.model, "actor")
    actor_source = cfg.actor.model.tokenizer or cfg.actor.model.path
    for role in ("critic", "reward") if cfg.ppo.uses_critic else ("reward",):
        m = getattr(cfg, role).model
        source = m.tokenizer or m.path
        if source is not None and source != actor_source:
            models.check_same_tokenizer(tokenizer, models.load_tokenizer(m, role), role)
    return tokenizer


def _check_lengths(cfg: PPORunConfig) -> None:
    actor_config = models.hf_config(cfg.actor.model, "actor")
    limit = getattr(actor_config, "max_position_embeddings", None)
    response = "rollout.max_total_tokens" if cfg.rollout.multi_turn else \
        "generation.max_new_tokens"
    needed = _max_sequence_len(cfg)
    if limit is not None and needed > limit:
        raise ConfigError(
            f"data.max_prompt_len + {response} = {needed} exceeds the actor's "
            f"max_position_embeddings ({limit}); lower one of them")


def _max_sequence_len(cfg: PPORunConfig) -> int:
    """Prompt + response tokens of the longest sequence a rollout can hold."""
    return cfg.data.max_prompt_len + (cfg.rollout.max_total_tokens if cfg.rollout.multi_turn
                                      else cfg.generation.max_new_tokens)


def vllm_max_model_len(cfg: PPORunConfig) -> int:
    """The longest sequence the vLLM engine serves: generation.vllm.max_model_len, or the
    longest a rollout can hold."""
    return cfg.generation.vllm.max_model_len or _max_sequence_len(cfg)


def _check_vllm(cfg: PPORunConfig) -> None:
    """generation.backend vllm: vLLM installed and supporting the actor (else exit 2)."""
    if cfg.generation.backend != "vllm":
        return
    from ds_rlhf.engines.vllm_backend import check_available

    config = models.hf_config(cfg.actor.model, "actor")
    limit, wanted = getattr(config, "max_position_embeddings", None), \
        cfg.generation.vllm.max_model_len
    if limit is not None and wanted is not None and wanted > limit:
        raise ConfigError(f"generation.vllm.max_model_len: {wanted} exceeds the actor's "
                          f"max_position_embeddings ({limit}); lower it or leave it null")
    check_available(config)


def build_ppo(cfg: PPORunConfig) -> PPOTrainer | None:
    """Check everything cheap first (sizes, tokenizers, prompts), then build the engines."""
    setup_distributed_env()
    pool_index = split_world(cfg.rollout.placement, cfg.rollout.generation_ranks)
    world_size = int(os.environ["WORLD_SIZE"])  # the training ranks'
    sizes = derive_sizes(cfg, world_size)
    _check_lengths(cfg)
    _check_vllm(cfg)
    tokenizer = _tokenizers(cfg)
    # imports tools, parser and environment, checks the chat template: fail early
    episodes = build_episodes(cfg.rollout, tokenizer, cfg.generation.max_new_tokens,
                              cfg.data.max_prompt_len)
    prompts = load_prompts(cfg.data, tokenizer, split="train",
                           tools=episodes.schemas if episodes is not None else None)
    build_rewards(cfg, None)  # imports the reward functions, reads server tokens: fail early
    if pool_index is not None:  # a generation rank: the same checks, then the pool's loop
        pool.serve(cfg, pool_index, tokenizer)
        return None
    sampler = PromptSampler(len(prompts.input_ids), cfg.ppo.rollout_batch_size, cfg.data.seed)
    preempted = checkpoint.preemption_flag()  # a signal now waits for a step boundary

    coord = start_distributed(cfg.distributed.timeout_minutes)
    resume_dir, state = checkpoint.open_run(cfg.output_dir, cfg.checkpoint.resume, coord)
    check_resumed_split(cfg.data, state, split_state(prompts.fingerprints), coord.is_main)
    if coord.is_main:
        save_yaml(cfg, Path(cfg.output_dir) / "config.yaml")
        if prompts.num_filtered:
            print(f"data: dropped {prompts.num_filtered} prompts longer than "
                  f"{cfg.data.max_prompt_len} tokens", flush=True)

    pad = tokenizer.pad_token_id
    p, gen = cfg.ppo, cfg.generation
    universal = checkpoint.is_universal(state, world_size)  # resuming from another world size
    batcher = {role: MicroBatcher(getattr(cfg, role).micro_batch_size,
                                  getattr(cfg, role).micro_batch_tokens, coord)
               for role in ("actor", "critic", "ref", "reward")}
    actor_engine = init_engine(
        models.build_causal_lm(cfg.actor.model, "actor", cfg.actor.dtype, cfg.seed),
        cfg.actor, sizes.actor_grad_accum, world_size,
        micro_batch_size=sizes.minibatch_per_rank // sizes.actor_grad_accum,
        load_universal=universal)
    actor = Actor(actor_engine, sizes.actor_grad_accum, coord, gen, p, batcher["actor"],
                  tokenizer, cfg.seed, vllm_max_model_len(cfg))
    critic = ref = reward = None  # only the engines this run needs
    if p.uses_critic:
        critic_engine = init_engine(
            models.build_scalar_model(cfg.critic.model, "critic", cfg.critic.dtype, cfg.seed,
                                      pad),
            cfg.critic, sizes.critic_grad_accum, world_size,
            micro_batch_size=sizes.minibatch_per_rank // sizes.critic_grad_accum,
            load_universal=universal)
        critic = Critic(critic_engine, sizes.critic_grad_accum, coord, p, batcher["critic"])
    if p.uses_reference:
        ref_model = cfg.ref.model if (cfg.ref.model.path or cfg.ref.model.init) else \
            cfg.actor.model
        ref = Reference(init_engine(models.build_causal_lm(ref_model, "ref", cfg.ref.dtype,
                                                           cfg.seed), cfg.ref, 1, world_size),
                        batcher["ref"], gen.temperature)
    if cfg.reward.model.path or cfg.reward.model.init:
        reward = RewardModel(init_engine(
            models.build_scalar_model(cfg.reward.model, "reward", cfg.reward.dtype, cfg.seed,
                                      pad), cfg.reward, 1, world_size), batcher["reward"])

    kl_ctl = (algo.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
              if p.kl_target is not None else algo.FixedKLController(p.kl_coef))
    trainer = PPOTrainer(
        cfg=cfg, sizes=sizes, coord=coord, tokenizer=tokenizer, prompts=prompts, sampler=sampler,
        actor=actor, critic=critic, ref=ref, reward=reward,
        rewards=build_rewards(cfg, reward, coord), kl_ctl=kl_ctl,
        tracker=Tracker(cfg.output_dir, coord.is_main, cfg.tracking.log_every, p.steps,
                        tracking=cfg.tracking, config=cfg,
                        start_step=state["step"] if state else 0,
                        run_id=state.get("wandb_run_id") if state else None),
        preempted=preempted, episodes=episodes,
    )
    client = pool.PoolClient(cfg, coord, actor, prompts.input_ids) \
        if cfg.rollout.placement == "separate" else None
    trainer.schedule = Schedule(cfg.rollout.staleness, trainer.generate, coord, pad,
                                actor.generation_mode, client, sampler.next_batch)
    if coord.is_main:  # what was built, for the user and for tools (bench, tests)
        print(f"engines: {', '.join(trainer.engine_names)} (ppo.advantage_estimator "
              f"{p.advantage_estimator})", flush=True)
        (Path(cfg.output_dir) / "engines.json").write_text(
            json.dumps({"engines": trainer.engine_names}) + "\n")
    if resume_dir is not None:
        trainer.resume(resume_dir, state)
        if coord.is_main:
            print(f"resumed from {resume_dir} at step {trainer.step}", flush=True)
    return trainer


def run(cfg: PPORunConfig) -> PPOTrainer | None:
    """The run; None on a generation rank (rollout.placement separate), once it is over."""
    trainer = build_ppo(cfg)
    if trainer is None:
        return None
    try:
        finished = trainer.train()
    finally:  # the tool worker processes end with the run, however it ends
        if trainer.episodes is not None:
            trainer.episodes.close()
    trainer.schedule.close()  # the generation pool, if any, leaves with the last checkpoint
    if finished:
        set_phase("export")
        out = Path(cfg.output_dir)
        exported = ["actor", "critic"] if cfg.checkpoint.export_critic else ["actor"]
        for role in exported:  # config checks: a critic export only with a critic
            getattr(trainer, role).export(out / role, trainer.tokenizer, trainer.coord.is_main)
            if trainer.coord.is_main:
                model_card.write(out / role, cfg, role)
    trainer.tracker.finish()
    return trainer
