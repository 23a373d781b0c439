"""The schedule of rollout.staleness (ds_rlhf/schedule.py): the rollout of step t is made by
the actor after step t - 1 - k, exactly; the FIFO round-trips through a checkpoint bit for
bit, and onto another number of ranks with the same rows."""

from __future__ import annotations

import pytest
import torch

from ds_rlhf.episodes import Episode, Episodes
from ds_rlhf.rollout import Rollout
from ds_rlhf.schedule import Schedule, from_rows, to_rows

PAD = 0


class Ranks:
    """Stands in for the Coordinator: `world_size` ranks, this one `rank`; gather_objects
    sees every rank's rows as `others` says (rank order)."""

    def __init__(self, world_size: int = 1, rank: int = 0, others=None):
        self.world_size, self.rank, self.others = world_size, rank, others

    def gather_objects(self, items: list) -> list:
        return items if self.others is None else [x for part in self.others(items) for x in part]


class Actor:
    """Generates step s's rows with its current version: each row's first response token is
    the version that sampled it, the second the step whose seeds it drew with. Rows have
    lengths 1..3 and the prompts 1 or 2 tokens, so collation pads both sides."""

    def __init__(self, rows: int = 4, episodes: bool = False, first_prompt: int = 0):
        self.version, self.rows, self.episodes, self.calls = 0, rows, episodes, []
        self.first_prompt = first_prompt

    def generate(self, step: int):
        self.calls.append(step)
        n = self.rows
        lengths = torch.tensor([2 + i % 2 for i in range(n)])
        response = torch.full((n, 3), PAD, dtype=torch.long)
        response[:, 0], response[:, 1] = self.version, step
        response[lengths == 3, 2] = 9
        mask = (torch.arange(3)[None, :] < lengths[:, None]).long()
        prompt_mask = torch.tensor([[0, 1] if i % 2 else [1, 1] for i in range(n)])
        rollout = Rollout(prompt_ids=(torch.arange(2 * n).reshape(n, 2) + 1) * prompt_mask,
                          prompt_mask=prompt_mask, response_ids=response, response_mask=mask,
                          prompt_index=torch.arange(n) + 100 * step + self.first_prompt,
                          sample_index=torch.arange(n) % 2,
                          sampler_logprobs=torch.randn(n, 3) * mask,
                          action_mask=mask.clone() if self.episodes else None)
        episodes = Episodes([Episode([1], env_reward=float(step)) for _ in range(n)], 0.5) \
            if self.episodes else None
        return rollout, episodes


def _train(schedule: Schedule, actor: Actor, steps: range) -> list:
    """Steps of a run: rollout_for(t), then the update that makes the actor W_t."""
    out = []
    for t in steps:
        generated = schedule.rollout_for(t)
        out.append(generated)
        actor.version = t
    return out


@pytest.mark.parametrize("k", [0, 1, 2])
def test_the_rollout_of_step_t_is_sampled_by_the_actor_after_step_t_minus_1_minus_k(k):
    actor = Actor()
    schedule = Schedule(k, actor.generate, Ranks(), PAD)
    for t, generated in zip(range(1, 7), _train(schedule, actor, range(1, 7)), strict=True):
        version = max(t - 1 - k, 0)
        assert generated.version == version
        assert generated.rollout.response_ids[:, 0].tolist() == [version] * 4
        assert generated.rollout.response_ids[:, 1].tolist() == [t] * 4  # step t's seeds
    # each step generated once, in step order; the last k steps generate steps 7..6+k
    assert actor.calls == list(range(1, 7 + k))


class Pool:
    """Stands in for pool.PoolClient: the generation pool holds the last weights sent;
    `submit` records (step, version) and makes the rows at once (as Actor does with the
    version it was asked for), `collect` hands them back; `log` is the call order."""

    def __init__(self, actor: Actor):
        self.actor, self.log, self.made = actor, [], {}

    def submit(self, step: int, version: int, prompt_index: torch.Tensor) -> None:
        assert version == self.actor.version  # the actor now: what the weights are
        self.log.append(("submit", step, version))
        self.made[step] = to_rows(*self.actor.generate(step))

    def collect(self, step: int) -> list:
        self.log.append(("collect", step))
        return self.made.pop(step)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_the_pool_is_asked_k_steps_ahead_with_the_actor_of_now(k):
    """rollout.placement separate: the same rows and versions as colocated; step t's rows
    come back before step t + k is asked for (with W_{t-1}): the pool makes step t + k's
    while step t trains. A checkpoint first takes back what the pool is making."""
    colocated, actor = Actor(), Actor()
    pool = Pool(actor)
    separate = Schedule(k, None, Ranks(), PAD, pool=pool, next_prompts=lambda: torch.arange(4))
    for a, b in zip(_train(Schedule(k, colocated.generate, Ranks(), PAD), colocated,
                           range(1, 5)),
                    _train(separate, actor, range(1, 5)), strict=True):
        assert a.version == b.version
        assert torch.equal(a.rollout.response_ids, b.rollout.response_ids)
    # step 1 asks for its own rows, takes them, then asks for steps 2..1+k, all with W_0;
    # then step t collects t and asks for t + k
    expected = [("submit", 1, 0), ("collect", 1)] + [("submit", s, 0) for s in range(2, 2 + k)]
    for t in range(2, 5):
        expected += [("collect", t)] + ([] if k == 0 else [("submit", t + k, t - 1)])
        if k == 0:
            expected[-1:] = [("submit", t, t - 1), ("collect", t)]
    assert pool.log == expected
    state = separate.state()  # the pool's steps 5..4+k come back into the checkpoint
    assert [(s, v) for s, v, _ in state["fifo"]] == [(s, s - 1 - k) for s in range(5, 5 + k)]
    assert pool.log[len(expected):] == [("collect", s) for s in range(5, 5 + k)]


def test_a_rollout_through_the_fifo_is_the_generated_one():
    actor = Actor(episodes=True)
    rollout, episodes = actor.generate(3)
    back, back_episodes = from_rows(to_rows(rollout, episodes), PAD)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "prompt_index",
                 "sample_index", "sampler_logprobs", "action_mask"):
        assert torch.equal(getattr(back, name), getattr(rollout, name)), name
    assert back_episodes.env_rewards() == [3.0] * 4


def test_a_resumed_fifo_trains_on_the_same_tensors():
    """Cut after step 2 (k = 2: steps 3 and 4 buffered), resumed in a new Schedule: steps 3-5
    get the tensors of the uninterrupted run bit for bit, and nothing is generated twice."""
    torch.manual_seed(0)
    actor = Actor()
    full = _train(Schedule(2, actor.generate, Ranks(), PAD), actor, range(1, 6))
    torch.manual_seed(0)
    actor = Actor()
    first = Schedule(2, actor.generate, Ranks(), PAD)
    _train(first, actor, range(1, 3))
    state = first.state()
    assert [s for s, _, _ in state["fifo"]] == [3, 4] and state["next_step"] == 5
    second = Schedule(2, actor.generate, Ranks(), PAD)
    second.load_state(state, step=2)
    resumed = _train(second, actor, range(3, 6))
    assert actor.calls == [1, 2, 3, 4, 5, 6, 7]
    for a, b in zip(full[2:], resumed, strict=True):
        assert a.version == b.version
        for name in ("prompt_ids", "response_ids", "response_mask", "sampler_logprobs"):
            assert torch.equal(getattr(a.rollout, name), getattr(b.rollout, name)), name


def test_a_fifo_saved_by_2_ranks_resumes_on_1_and_on_4_with_the_same_rows():
    actors = [Actor(first_prompt=0), Actor(first_prompt=50)]  # rank 1: other prompts
    saved = {}

    def gather(rank):
        def others(items):
            saved[rank] = items
            return [saved.get(r, items) for r in range(2)]
        return others
    schedules = [Schedule(1, actors[r].generate, Ranks(2, r, gather(r)), PAD)
                 for r in range(2)]
    for s in schedules:
        s.rollout_for(1)
    schedules[0].state()  # rank 0 then rank 1 gather: rank 1 sees both
    state = schedules[1].state()
    global_rows = [r.prompt_index for r in state["fifo"][0][2]]
    assert global_rows == [200, 201, 202, 203, 250, 251, 252, 253]  # step 2, rank order
    one = Schedule(1, Actor().generate, Ranks(1, 0), PAD)
    one.load_state(state, step=1)
    assert one.rollout_for(2).rollout.prompt_index.tolist() == global_rows
    for rank in range(4):
        four = Schedule(1, Actor().generate, Ranks(4, rank), PAD)
        four.load_state(state, step=1)
        rows = four.rollout_for(2).rollout.prompt_index.tolist()
        assert rows == global_rows[2 * rank:2 * rank + 2]


def test_a_checkpoint_without_a_fifo_continues_from_the_next_step():
    """An on-policy run's checkpoint (no rollouts.pt) resumed with k = 1: steps 4 and 5 are
    generated at step 4 with the actor as it is."""
    actor = Actor()
    actor.version = 3
    schedule = Schedule(1, actor.generate, Ranks(), PAD)
    schedule.load_state(None, step=3)
    assert schedule.rollout_for(4).version == 3
    assert actor.calls == [4, 5]
