"""The schedule: the rollout that PPO step t trains on, and which weights generated it.

`rollout.staleness` k (ARCHITECTURE.md, "The schedule"): the rollout of step t is generated
by the actor as it was after step t - 1 - k, exactly (the initial actor where t - 1 - k <= 0).
An exact lag, not "at most k": which weights sampled a row is a function of the config, never
of timing, so a lagged run is as reproducible as an on-policy one (per-row seeds as always:
the rollout of step s draws with step s's seeds, whenever it is generated).

    k = 0: generate the rollout of step t now, with W_{t-1}         (the on-policy step)
    k >= 1 (colocated): a FIFO of k rollouts generated ahead; step t generates the rollout
           of step t + k with W_{t-1}, then hands back step t's, made with W_{t-1-k}

The trainer asks for "the rollout of step t" (`rollout_for`); how it was produced is not its
business. With k >= 1 the FIFO holds rows (plain token lists, one `Row` per rollout row), and
a rollout is collated from them whether it stayed in memory or came back from a checkpoint:
a resumed run trains on the same tensors as the uninterrupted one, and a checkpoint's FIFO
is global (every rank's rows, in rank order), so a run resumed on another number of ranks
trains on the same rows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ds_rlhf.data import collate_left
from ds_rlhf.episodes import Episode, Episodes
from ds_rlhf.rollout import Rollout


@dataclass
class Generated:
    """The rollout of one step on this rank (its generation fields only) and its episodes
    (multi-turn runs, else None); `version`: the actor updates done when it was generated
    (it was sampled by W_version); `env_seconds`: time this call spent in tools and
    environments (for the step's timing; with k >= 1, generating a later step's rollout)."""

    rollout: Rollout
    episodes: Episodes | None
    version: int
    env_seconds: float = 0.0


@dataclass
class Row:
    """One row of a generated rollout, unpadded: what the FIFO and the checkpoint hold."""

    prompt_ids: list[int]
    response_ids: list[int]  # the row's real response tokens (response_mask 1)
    sampler_logprobs: list[float] | None
    action_mask: list[int] | None  # multi-turn episodes only
    prompt_index: int
    sample_index: int
    episode: Episode | None  # multi-turn episodes only


def to_rows(rollout: Rollout, episodes: Episodes | None) -> list[Row]:
    rows = []
    for i in range(len(rollout)):
        n = int(rollout.response_lengths[i])
        rows.append(Row(
            prompt_ids=rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist(),
            response_ids=rollout.response_ids[i, :n].tolist(),
            sampler_logprobs=None if rollout.sampler_logprobs is None
            else rollout.sampler_logprobs[i, :n].tolist(),
            action_mask=None if rollout.action_mask is None
            else rollout.action_mask[i, :n].tolist(),
            prompt_index=int(rollout.prompt_index[i]),
            sample_index=int(rollout.sample_index[i]),
            episode=None if episodes is None else episodes.episodes[i]))
    return rows


def from_rows(rows: list[Row], pad_token_id: int) -> tuple[Rollout, Episodes | None]:
    """The rollout of `rows` (prompts left padded, responses right padded to the longest)."""
    prompt_ids, prompt_mask = collate_left([r.prompt_ids for r in rows], pad_token_id)
    lengths = torch.tensor([len(r.response_ids) for r in rows])
    width = int(lengths.max()) if rows else 0
    response_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()

    def padded(values: list[list], fill, dtype) -> torch.Tensor:
        out = torch.full((len(rows), width), fill, dtype=dtype)
        for i, v in enumerate(values):
            out[i, :len(v)] = torch.tensor(v, dtype=dtype)
        return out

    rollout = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        response_ids=padded([r.response_ids for r in rows], pad_token_id, torch.long),
        response_mask=response_mask,
        prompt_index=torch.tensor([r.prompt_index for r in rows], dtype=torch.long),
        sample_index=torch.tensor([r.sample_index for r in rows], dtype=torch.long),
        sampler_logprobs=None if rows[0].sampler_logprobs is None
        else padded([r.sampler_logprobs for r in rows], 0.0, torch.float32),
        action_mask=None if rows[0].action_mask is None
        else padded([r.action_mask for r in rows], 0, torch.long))
    episodes = None if rows[0].episode is None else Episodes([r.episode for r in rows], 0.0)
    return rollout, episodes


class Schedule:
    """`rollout_for(t)`: the rollout step t trains on, generated `staleness` steps ahead.

    `generate(s)` generates this rank's rows of step s with the actor as it is now (the
    caller's prompts for step s: the sampler hands them out in step order, so a FIFO k deep
    has drawn k batches more than the steps trained). The last k steps of a run generate
    rollouts for steps past ppo.steps too: the final checkpoint holds them, so a run
    continued with more steps trains on what the longer run would have."""

    def __init__(self, staleness: int,
                 generate: Callable[[int], tuple[Rollout, Episodes | None]], coord,
                 pad_token_id: int,
                 generation_mode: Callable[[], AbstractContextManager] = nullcontext,
                 pool=None, next_prompts: Callable[[], torch.Tensor] | None = None):
        self.staleness = staleness
        self.generate, self.coord, self.pad_token_id = generate, coord, pad_token_id
        self.generation_mode = generation_mode  # the actor's, around generating here
        # rollout.placement separate: the generation pool's client (pool.PoolClient) and the
        # sampler's next global batch of prompts; None: this rank generates (colocated)
        self.pool, self.next_prompts = pool, next_prompts
        self.next_step = 1  # the next step whose rollout is to be generated (or asked for)
        self.fifo: deque[tuple[int, int, list[Row]]] = deque()  # (step, version, rows)
        self.asked: deque[tuple[int, int]] = deque()  # (step, version): the pool's, not back

    def rollout_for(self, step: int) -> Generated:
        version = step - 1  # the updates done so far: the actor is W_{step-1}
        if self.pool is not None:
            return self._from_pool(step, version)
        if self.staleness == 0:
            with self.generation_mode():
                rollout, episodes = self.generate(step)
            self.next_step = step + 1
            return Generated(rollout, episodes, version,
                             0.0 if episodes is None else episodes.env_seconds)
        env_seconds = 0.0
        with self.generation_mode():
            while self.next_step <= step + self.staleness:
                rollout, episodes = self.generate(self.next_step)
                if episodes is not None:
                    env_seconds += episodes.env_seconds
                self.fifo.append((self.next_step, version, to_rows(rollout, episodes)))
                self.next_step += 1
        made_for, made_by, rows = self.fifo.popleft()
        assert made_for == step, f"the FIFO holds step {made_for}'s rollout, not {step}'s"
        rollout, episodes = from_rows(rows, self.pad_token_id)
        return Generated(rollout, episodes, made_by, env_seconds)

    def _ask_until(self, last: int, version: int) -> None:
        """Ask the pool for the rollouts of steps up to `last`, sampled by W_version (now)."""
        while self.next_step <= last:
            self.pool.submit(self.next_step, version, self.next_prompts())
            self.asked.append((self.next_step, version))
            self.next_step += 1

    def _collect(self) -> None:
        """The oldest rollout asked for, back from the pool, into the FIFO."""
        made_for, made_by = self.asked.popleft()
        self.fifo.append((made_for, made_by, self.pool.collect(made_for)))

    def _from_pool(self, step: int, version: int) -> Generated:
        """rollout.placement separate: the same rows as colocated. Step t's rollout was asked
        for k steps ago (with W_{t-1-k}); the pool generates step t + k's, asked for now with
        W_{t-1}, while this step trains (with k = 0 the two take turns)."""
        self._ask_until(step, version)  # k = 0, and the first step after a start
        if not self.fifo:
            self._collect()
        made_for, made_by, rows = self.fifo.popleft()
        assert made_for == step, f"the FIFO holds step {made_for}'s rollout, not {step}'s"
        self._ask_until(step + self.staleness, version)
        rollout, episodes = from_rows(rows, self.pad_token_id)
        return Generated(rollout, episodes, made_by)

    def close(self) -> None:
        """The run is over: the pool leaves (after the final checkpoint took its rows; a
        request still out, as when a bench stops, is taken back first: the pool's send of it
        waits for this side)."""
        if self.pool is not None:
            while self.asked:
                self._collect()
            self.pool.close()

    def state(self) -> dict:
        """The FIFO with every rank's rows (rank order) and the next step to generate; a
        collective. Saved in checkpoints (`rollouts.pt`), so nothing generated is lost or
        trained on twice (the rollouts the pool is making come back first)."""
        while self.asked:
            self._collect()
        return {"staleness": self.staleness, "next_step": self.next_step,
                "fifo": [(s, v, self.coord.gather_objects(rows)) for s, v, rows in self.fifo]}

    def load_state(self, state: dict | None, step: int) -> None:
        """Continue from a checkpoint at `step` (state None: one without a FIFO, written by
        an on-policy run): this rank takes its contiguous share of each buffered step's
        rows, as the coordinator shards a step's prompts (groups are never split)."""
        if state is None:
            self.next_step, self.fifo, self.asked = step + 1, deque(), deque()
            return
        self.next_step, self.asked = state["next_step"], deque()
        world, rank = self.coord.world_size, self.coord.rank
        self.fifo = deque()
        for s, v, rows in state["fifo"]:
            n = len(rows) // world
            self.fifo.append((s, v, rows[rank * n:(rank + 1) * n]))
