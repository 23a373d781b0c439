"""The Rollout: one batch of PPO experience, one field per tensor.

Per-token tensors are aligned to response tokens (``[B, R]``, position t = the t-th
generated token), see design/PPO_SPEC.md. Fields filled later in the pipeline
(logprobs, values, scores, rewards, advantages, returns) are None until computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The fields aligned to response tokens ([B, R]); the prompt fields are [B, P], the rest [B].
PER_TOKEN = ("response_ids", "response_mask", "action_mask", "sampler_logprobs",
             "old_logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns")


@dataclass(frozen=True)
class RowFailure:
    """Why one row of a rollout failed, so that the update drops it (rollout.
    max_failed_fraction): its episode's environment raised, or its reward call failed after
    the retries. `kind` is the error without the row (failures of one kind are reported
    together), `row` names the row."""

    SOURCES = ("episode", "reward")

    source: str  # one of SOURCES
    kind: str  # e.g. "environment 'env.py:Env' (rollout.environment): step() raised KeyError: 'x'"
    row: str  # e.g. "the row of prompt index 7 ('What is 2 + 2?')"


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, P] long, left padded
    prompt_mask: Tensor  # [B, P] 1 for real prompt tokens, 0 for left padding
    response_ids: Tensor  # [B, R] long, padded after EOS
    response_mask: Tensor  # [B, R] 1 for real response tokens including EOS, 0 after it
    prompt_index: Tensor  # [B] long, global index of the prompt in the dataset (sampling seed)
    sample_index: Tensor | None = None  # [B] long, which of its prompt's n samples (seed)
    action_mask: Tensor | None = None  # [B, R] long, multi-turn episodes: 1 on the tokens
    # the model wrote, 0 on tool / environment observations (context only); None: all
    # [B, R] float32, 0 on padding: log-prob of each sampled token under the distribution
    # that drew it, the behaviour policy mu (the sampler's logits / temperature, then top-k /
    # top-p renormalised over the kept tokens: generation.behaviour_logprobs; without them
    # log_softmax(logits / temperature) over the full vocabulary, the ops of old_logprobs).
    # The same quantity from both backends (vLLM's processed_logprobs), so that
    # exp(old_logprobs - sampler_logprobs) is pi_old / mu (ppo.rollout_correction). Filled by
    # the generation backend.
    sampler_logprobs: Tensor | None = None
    old_logprobs: Tensor | None = None  # [B, R] float32, actor at sampling time
    ref_logprobs: Tensor | None = None  # [B, R] float32, frozen reference model
    values: Tensor | None = None  # [B, R] float32, critic at sampling time (old values)
    scores: Tensor | None = None  # [B] float32, reward model, one per sequence
    rewards: Tensor | None = None  # [B, R] float32, KL-shaped per-token rewards
    advantages: Tensor | None = None  # [B, R] float32, GAE (whitened when configured)
    returns: Tensor | None = None  # [B, R] float32, critic targets

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def sequence_ids(self) -> Tensor:
        """[B, P + R] prompt then response, the input of every model forward."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def sequence_mask(self) -> Tensor:
        """[B, P + R] attention mask matching ``sequence_ids``."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def loss_mask(self) -> Tensor:
        """[B, R] the tokens the losses, KL terms and token counts see: the real response
        tokens the model wrote (``response_mask``, times ``action_mask`` in episodes)."""
        if self.action_mask is None:
            return self.response_mask
        return self.response_mask * self.action_mask

    @property
    def response_lengths(self) -> Tensor:
        """[B] long, number of real response tokens (EOS included)."""
        return self.response_mask.sum(dim=1).long()

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Rollout:
        # Apply fn to every set field; unset (None) fields stay None.
        return Rollout(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in dataclasses.fields(self)
            }
        )

    def select(self, idx: Tensor | Sequence[int] | slice) -> Rollout:
        """The rows ``idx`` (index tensor, list of ints, or slice) of every field."""
        if not isinstance(idx, (Tensor, slice)):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return self._map(lambda t: t[idx])

    def to(self, device: torch.device | str) -> Rollout:
        return self._map(lambda t: t.to(device))

    def trim(self) -> Rollout:
        """Drop the columns that are padding in every row: left of the longest prompt and
        after the longest response. Positions come from the masks, so results are the same
        on the kept columns; callers pad per-token outputs back to the full width."""
        first = int(self.prompt_mask.any(0).long().argmax())  # first column with a real token
        width = max(int(self.response_lengths.max()), 1)
        fields = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            if t is not None and f.name in PER_TOKEN:
                t = t[:, :width]
            elif t is not None and f.name in ("prompt_ids", "prompt_mask"):
                t = t[:, first:]
            fields[f.name] = t
        return Rollout(**fields)

    def pad(self, prompt_width: int, response_width: int) -> Rollout:
        """Widen to P = prompt_width (zeros on the left of the prompt fields) and
        R = response_width (zeros on the right of the per-token fields): masked out, so
        results are unchanged. Rollouts of several ranks can then be concatenated."""
        extra_p, extra_r = prompt_width - self.prompt_ids.shape[1], \
            response_width - self.response_ids.shape[1]
        fields = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            if t is not None and f.name in PER_TOKEN:
                t = torch.nn.functional.pad(t, (0, extra_r))
            elif t is not None and f.name in ("prompt_ids", "prompt_mask"):
                t = torch.nn.functional.pad(t, (extra_p, 0))
            fields[f.name] = t
        return Rollout(**fields)

    @classmethod
    def cat(cls, rollouts: Sequence[Rollout]) -> Rollout:
        """Concatenate along the batch. All rollouts need the same prompt width P and
        response width R, and the same fields set."""
        if not rollouts:
            raise ValueError("Rollout.cat needs at least one rollout")
        widths = {(r.prompt_ids.shape[1], r.response_ids.shape[1]) for r in rollouts}
        if len(widths) > 1:
            raise ValueError(
                f"Rollout.cat needs equal (prompt, response) widths, got {sorted(widths)}; "
                "pad the rollouts to a common P and R before concatenating"
            )
        fields = {}
        for f in dataclasses.fields(cls):
            tensors = [getattr(r, f.name) for r in rollouts]
            num_set = sum(t is not None for t in tensors)
            if num_set not in (0, len(tensors)):
                raise ValueError(
                    f"Rollout.cat: field {f.name!r} is set in {num_set} of {len(tensors)} "
                    "rollouts; compute it for all of them or for none"
                )
            fields[f.name] = torch.cat(tensors, dim=0) if num_set else None
        return cls(**fields)


def pack_by_tokens(prompt_lengths: Tensor, response_lengths: Tensor,
                   max_tokens: int) -> list[Tensor]:
    """Row indices of micro-batches holding at most `max_tokens` padded tokens each.

    A micro-batch of n rows costs n x (its longest prompt + its longest response): the shape
    of its forward after `Rollout.trim`. First-fit decreasing: rows are taken longest first,
    each into the first micro-batch it fits, so short rows fill the gaps. A row longer than
    `max_tokens` gets a micro-batch of its own.
    """
    prompt_lengths = prompt_lengths.tolist()
    response_lengths = [max(r, 1) for r in response_lengths.tolist()]  # trim keeps >= 1 column
    longest_first = sorted(range(len(prompt_lengths)), reverse=True,  # stable: ties keep order
                           key=lambda i: prompt_lengths[i] + response_lengths[i])
    groups: list[list[int]] = []
    widths: list[tuple[int, int]] = []  # (longest prompt, longest response) of each group
    for i in longest_first:
        p, r = prompt_lengths[i], response_lengths[i]
        for k, (wp, wr) in enumerate(widths):
            if (len(groups[k]) + 1) * (max(wp, p) + max(wr, r)) <= max_tokens:
                groups[k].append(i)
                widths[k] = (max(wp, p), max(wr, r))
                break
        else:
            groups.append([i])
            widths.append((p, r))
    return [torch.tensor(g, dtype=torch.long) for g in groups]


def split_to_count(groups: list[Tensor], count: int) -> list[Tensor]:
    """Split the largest micro-batches in two until there are `count` of them.

    Under ZeRO-3 every forward gathers parameters with collectives, so all ranks must run the
    same number of forwards: a rank that packed its rows into fewer micro-batches splits some.
    Splitting never raises a micro-batch's token count.
    """
    groups = list(groups)
    while len(groups) < count:
        k = max(range(len(groups)), key=lambda j: len(groups[j]))
        if len(groups[k]) < 2:
            raise ValueError(f"cannot split {sum(map(len, groups))} rows into {count} "
                             "micro-batches")
        half = (len(groups[k]) + 1) // 2
        groups[k:k + 1] = [groups[k][:half], groups[k][half:]]
    return groups


def minibatch_schedule(num_rows: int, num_minibatches: int, world_size: int,
                       generator: torch.Generator) -> Tensor:
    """One epoch's minibatches over the step's rows of ALL ranks: ``[num_minibatches,
    world_size, rows per rank and minibatch]`` global row ids; [k, r] are the rows rank r
    trains on in minibatch k.

    Global row g is row g % rows_per_rank of rank g // rows_per_rank (prompts are sharded
    contiguously, samples stay with their prompt), so the ids name the same rows on any
    number of ranks. Minibatch k is the k-th slice of one seeded permutation of all rows:
    the same rows whatever the world size, and each rank gets an equal share (ZeRO runs
    collectives in every pass). The shares are cut from the sorted ids, so with one
    minibatch every rank trains on its own rows, and with several mostly on its own.
    """
    order = torch.randperm(num_rows, generator=generator)
    minibatches = order.reshape(num_minibatches, -1).sort(dim=1).values
    return minibatches.reshape(num_minibatches, world_size, -1)
