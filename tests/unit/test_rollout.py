"""ds_rlhf.rollout.Rollout: slicing, moving, concatenating."""

import dataclasses

import pytest
import torch

from ds_rlhf.rollout import Rollout, minibatch_schedule, pack_by_tokens, split_to_count


def make_rollout(batch=3, prompt_width=4, response_width=5, offset=0):
    """A rollout with distinct values per row; values and later fields left unset."""
    gen = torch.Generator().manual_seed(offset)
    prompt_lengths = torch.randint(1, prompt_width + 1, (batch,), generator=gen)
    response_lengths = torch.randint(0, response_width + 1, (batch,), generator=gen)
    return Rollout(
        prompt_ids=torch.randint(0, 100, (batch, prompt_width), generator=gen),
        # left padded: the last prompt_lengths[i] positions are real
        prompt_mask=(torch.arange(prompt_width) >= prompt_width - prompt_lengths[:, None]).long(),
        response_ids=torch.randint(0, 100, (batch, response_width), generator=gen),
        response_mask=(torch.arange(response_width) < response_lengths[:, None]).long(),
        prompt_index=torch.arange(offset, offset + batch),
        old_logprobs=-torch.rand(batch, response_width, generator=gen),
        ref_logprobs=-torch.rand(batch, response_width, generator=gen),
        scores=torch.randn(batch, generator=gen),
        sampler_logprobs=-torch.rand(batch, response_width, generator=gen),
    )


def assert_rollouts_equal(a, b):
    for f in dataclasses.fields(Rollout):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is None or y is None:
            assert x is None and y is None, f.name
        else:
            assert torch.equal(x, y), f.name


def test_len_sequence_and_lengths():
    r = Rollout(
        prompt_ids=torch.tensor([[0, 7, 8], [5, 6, 7]]),
        prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        response_ids=torch.tensor([[1, 2], [3, 0]]),
        response_mask=torch.tensor([[1, 1], [1, 0]]),
        prompt_index=torch.tensor([10, 11]),
    )
    assert len(r) == 2
    assert torch.equal(r.sequence_ids, torch.tensor([[0, 7, 8, 1, 2], [5, 6, 7, 3, 0]]))
    assert torch.equal(r.sequence_mask, torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]))
    assert torch.equal(r.response_lengths, torch.tensor([2, 1]))
    assert r.response_lengths.dtype == torch.long
    assert r.values is None and r.advantages is None


@pytest.mark.parametrize("idx", [[2, 0], torch.tensor([2, 0])])
def test_select_picks_rows_and_keeps_none(idx):
    r = make_rollout()
    s = r.select(idx)
    assert len(s) == 2
    for f in dataclasses.fields(Rollout):
        value = getattr(r, f.name)
        if value is None:
            assert getattr(s, f.name) is None, f.name
        else:
            assert torch.equal(getattr(s, f.name), value[[2, 0]]), f.name


def test_select_slice():
    r = make_rollout()
    assert_rollouts_equal(r.select(slice(1, 3)), r.select([1, 2]))


def test_cat_of_selections_round_trips():
    r = make_rollout(batch=5)
    parts = [r.select([0, 1]), r.select([2]), r.select([3, 4])]
    assert_rollouts_equal(Rollout.cat(parts), r)


def test_cat_of_different_rollouts_stacks_them():
    a, b = make_rollout(batch=2, offset=0), make_rollout(batch=3, offset=2)
    c = Rollout.cat([a, b])
    assert len(c) == 5
    assert torch.equal(c.prompt_index, torch.tensor([0, 1, 2, 3, 4]))
    assert_rollouts_equal(c.select([2, 3, 4]), b)


def test_cat_width_mismatch_explains():
    with pytest.raises(ValueError, match="widths"):
        Rollout.cat([make_rollout(response_width=5), make_rollout(response_width=6)])
    with pytest.raises(ValueError, match="widths"):
        Rollout.cat([make_rollout(prompt_width=4), make_rollout(prompt_width=3)])


def test_cat_partially_set_field_and_empty_list_raise():
    a, b = make_rollout(), make_rollout()
    b.values = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="values"):
        Rollout.cat([a, b])
    with pytest.raises(ValueError, match="at least one"):
        Rollout.cat([])


def test_to_moves_every_set_field_and_round_trips():
    r = make_rollout()
    moved = r.to("meta")  # a device other than cpu that exists everywhere
    for f in dataclasses.fields(Rollout):
        value = getattr(moved, f.name)
        assert value is None if getattr(r, f.name) is None else value.device.type == "meta"
    assert_rollouts_equal(r.to("cpu"), r)
    assert_rollouts_equal(r.to(torch.device("cpu")), r)


def test_trim_drops_columns_that_are_padding_in_every_row():
    # Prompts left padded to 4 (longest real prompt: 3), responses right padded to 5
    # (longest real response: 2).
    r = Rollout(
        prompt_ids=torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9]]),
        prompt_mask=torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]),
        response_ids=torch.tensor([[1, 2, 0, 0, 0], [3, 0, 0, 0, 0]]),
        response_mask=torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]),
        prompt_index=torch.tensor([4, 5]),
        old_logprobs=torch.arange(10.0).reshape(2, 5),
        sampler_logprobs=-torch.arange(10.0).reshape(2, 5),
        scores=torch.tensor([1.0, 2.0]),
    )
    t = r.trim()
    assert t.prompt_ids.tolist() == [[0, 5, 6], [7, 8, 9]]
    assert t.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert t.response_ids.tolist() == [[1, 2], [3, 0]]
    assert t.old_logprobs.tolist() == [[0.0, 1.0], [5.0, 6.0]]
    assert t.sampler_logprobs.tolist() == [[-0.0, -1.0], [-5.0, -6.0]]
    assert t.scores.tolist() == [1.0, 2.0] and t.values is None
    assert t.response_lengths.tolist() == r.response_lengths.tolist()


def _cost(idx, prompt_lengths, response_lengths):
    """Padded tokens of a micro-batch after trim: rows x (longest prompt + longest response)."""
    return len(idx) * (int(prompt_lengths[idx].max()) + int(response_lengths[idx].max()))


def test_pack_by_tokens_first_fit_decreasing_by_hand():
    prompt_lengths = torch.tensor([3, 2, 5, 1, 2])
    response_lengths = torch.tensor([4, 1, 3, 1, 6])  # totals 7, 3, 8, 2, 8
    groups = pack_by_tokens(prompt_lengths, response_lengths, max_tokens=16)
    # Longest first: row 2 (5+3) opens group A, row 4 (2+6) can't join A (2 x (5+6) = 22),
    # opens B; row 0 (3+4) fits neither (18, 18), opens C; row 1 (2+1) joins A (2 x 8 = 16);
    # row 3 (1+1) can't join A (3 x 8 = 24) but joins B (2 x (2+6) = 16).
    assert [g.tolist() for g in groups] == [[2, 1], [4, 3], [0]]
    assert [_cost(g, prompt_lengths, response_lengths) for g in groups] == [16, 16, 7]


@pytest.mark.parametrize("seed", range(5))
def test_pack_by_tokens_covers_every_row_once_within_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(1, 64, (40,), generator=gen)
    response_lengths = torch.randint(0, 64, (40,), generator=gen)
    groups = pack_by_tokens(prompt_lengths, response_lengths, max_tokens=256)
    assert sorted(torch.cat(groups).tolist()) == list(range(40))
    for g in groups:
        assert _cost(g, prompt_lengths, response_lengths.clamp(min=1)) <= 256
    # Fewer passes than one row at a time, and no more than a row budget of the worst case
    # (256 // 127 = 2 rows per micro-batch) would need.
    assert len(groups) <= 20


def test_pack_by_tokens_overlong_row_alone():
    groups = pack_by_tokens(torch.tensor([2, 30, 2]), torch.tensor([2, 30, 2]), max_tokens=16)
    assert [g.tolist() for g in groups] == [[1], [0, 2]]


def test_split_to_count_splits_the_largest_until_count():
    groups = [torch.tensor([0, 1, 2, 3]), torch.tensor([4])]
    assert [g.tolist() for g in split_to_count(groups, 2)] == [[0, 1, 2, 3], [4]]
    assert [g.tolist() for g in split_to_count(groups, 3)] == [[0, 1], [2, 3], [4]]
    assert [g.tolist() for g in split_to_count(groups, 5)] == [[0], [1], [2], [3], [4]]
    with pytest.raises(ValueError, match="cannot split 5 rows into 6"):
        split_to_count(groups, 6)


def test_pad_widens_with_masked_zeros_and_trim_undoes_it():
    r = make_rollout(batch=3, prompt_width=4, response_width=5)
    wide = r.pad(6, 8)
    assert wide.prompt_ids.shape == (3, 6) and wide.response_ids.shape == (3, 8)
    assert wide.prompt_mask[:, :2].sum() == 0 and wide.response_mask[:, 5:].sum() == 0
    assert torch.equal(wide.prompt_ids[:, 2:], r.prompt_ids)  # prompts stay right-aligned
    assert torch.equal(wide.old_logprobs[:, :5], r.old_logprobs)
    assert torch.equal(wide.sampler_logprobs[:, :5], r.sampler_logprobs)
    assert wide.sampler_logprobs[:, 5:].abs().sum() == 0  # 0 on padding, like the others
    assert torch.equal(wide.scores, r.scores) and wide.values is None
    assert_rollouts_equal(wide.trim(), r.trim())


def test_minibatch_schedule_is_the_same_on_any_number_of_ranks():
    def schedule(world_size):
        return minibatch_schedule(16, 2, world_size, torch.Generator().manual_seed(3))

    one, two, four = schedule(1), schedule(2), schedule(4)
    assert one.shape == (2, 1, 8) and two.shape == (2, 2, 4) and four.shape == (2, 4, 2)
    # minibatch k holds the same rows whatever the world size; each rank an equal share
    for k in range(2):
        assert one[k].flatten().tolist() == two[k].flatten().tolist() == \
            four[k].flatten().tolist()
    assert sorted(one.flatten().tolist()) == list(range(16))  # every row once per epoch
    # one minibatch: rank r trains on exactly its own rows (r * 8 .. r * 8 + 7): no exchange
    single = minibatch_schedule(16, 1, 2, torch.Generator().manual_seed(3))
    assert single[0, 0].tolist() == list(range(8)) and single[0, 1].tolist() == list(range(8, 16))
