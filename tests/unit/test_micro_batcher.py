"""MicroBatcher: rows or token-packed micro-batches, equal in number on every rank."""

import torch

from ds_rlhf.engines.roles import MicroBatcher, _forward_all
from ds_rlhf.rollout import Rollout


class FakeCoord:
    """Stands in for the other ranks: their largest micro-batch count."""

    def __init__(self, others_count: int):
        self.others_count = others_count

    def max(self, value: int) -> int:
        return max(value, self.others_count)


def rollout(prompt_lengths, response_lengths, width_p=8, width_r=8):
    b = len(prompt_lengths)
    p, r = torch.tensor(prompt_lengths), torch.tensor(response_lengths)
    return Rollout(
        prompt_ids=torch.arange(b)[:, None].repeat(1, width_p),
        prompt_mask=(torch.arange(width_p) >= width_p - p[:, None]).long(),
        response_ids=torch.arange(b)[:, None].repeat(1, width_r),
        response_mask=(torch.arange(width_r) < r[:, None]).long(),
        prompt_index=torch.arange(100, 100 + b))


def test_rows_mode_splits_in_order():
    split = MicroBatcher(rows=3).split(rollout([1] * 7, [1] * 7))
    assert [g.tolist() for g in split] == [[0, 1, 2], [3, 4, 5], [6]]


def test_tokens_mode_packs_then_matches_the_other_ranks_count():
    r = rollout([2, 2, 8, 2], [2, 2, 8, 2])  # one long row, three short ones
    alone = MicroBatcher(rows=1, tokens=16, coord=FakeCoord(0)).split(r)
    assert [g.tolist() for g in alone] == [[2], [0, 1, 3]]  # 16 and 3 x 4 = 12 tokens
    # Another rank needed 3 micro-batches: this rank splits its largest to run 3 as well.
    even = MicroBatcher(rows=1, tokens=16, coord=FakeCoord(3)).split(r)
    assert [g.tolist() for g in even] == [[2], [0, 1], [3]]


def test_forward_all_puts_outputs_back_in_row_order():
    r = rollout([5, 1, 7, 2, 3], [1, 6, 2, 8, 1])
    batcher = MicroBatcher(rows=1, tokens=16, coord=FakeCoord(0))
    assert len(batcher.split(r)) > 1 and torch.cat(batcher.split(r)).tolist() != list(range(5))

    def per_row(engine, chunk):  # [b, R] output that names its row
        return chunk.prompt_index[:, None].float() + torch.zeros(1, chunk.response_ids.shape[1])

    out = _forward_all(None, r, batcher, per_row)
    assert out.shape == (5, 8)
    assert out[:, 0].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0]
    scores = _forward_all(None, r, batcher, lambda e, c: c.prompt_index.float())  # [b]
    assert scores.tolist() == [100.0, 101.0, 102.0, 103.0, 104.0]
