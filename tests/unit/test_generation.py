"""ds_rlhf.generation: KV-cached sampling, reproducible draws, EOS masks, synced stopping."""

from __future__ import annotations

import pytest
import torch
import transformers

from ds_rlhf.algo import logprobs_from_logits
from ds_rlhf.generation import (
    behaviour_logprobs,
    generate,
    pad_responses,
    prompt_uniforms,
    sample_tokens,
)

VOCAB = 50
PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    # absolute position embeddings: wrong position ids change the output (RoPE would not see
    # a constant shift of all positions)
    torch.manual_seed(99)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    gpt = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make positions matter clearly
        gpt.transformer.wpe.weight.normal_(0.0, 1.0)
    return gpt


def left_pad(prompts: list[list[int]], width: int | None = None, pad: int = PAD):
    width = width or max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def real_tokens(ids: torch.Tensor, mask: torch.Tensor, row: int) -> list[int]:
    return ids[row][mask[row].bool()].tolist()


@torch.no_grad()
def naive_greedy(model, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    """Re-run the whole unpadded sequence without a cache at every step; take argmax."""
    seq = list(prompt)
    out = []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out


class ForceEos(torch.nn.Module):
    """Wraps a causal LM: at forward call ``at`` (0 = the prompt forward, which yields response
    token 0) EOS becomes certain for the chosen rows; ``ban`` rows never get EOS."""

    def __init__(self, inner, eos: int, rows_at: dict[int, int], ban: tuple[int, ...] = (),
                 ban_before_forced: bool = False):
        super().__init__()
        self.inner, self.eos, self.rows_at, self.ban = inner, eos, rows_at, ban
        self.ban_before_forced = ban_before_forced  # no chance EOS before the forced one
        self.calls = 0

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        logits = out.logits.clone()
        for row, at in self.rows_at.items():
            if self.ban_before_forced and self.calls < at:
                logits[row, -1, self.eos] = float("-inf")
            if self.calls == at:
                logits[row, -1, :] = -1e9
                logits[row, -1, self.eos] = 0.0
        for row in self.ban:
            logits[row, -1, self.eos] = float("-inf")
        out.logits = logits
        self.calls += 1
        return out


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [3]]


# ----------------------------------------------------------------------------- generate


@pytest.mark.parametrize("eos_from_row0", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_greedy_matches_naive_loop_with_left_padding(request, arch, eos_from_row0):
    model = request.getfixturevalue({"llama": "model", "gpt2": "gpt2"}[arch])
    max_new = 10
    eos = None
    if eos_from_row0:  # an EOS the model really emits, so rows stop at different steps
        eos = naive_greedy(model, PROMPTS[0], max_new, None)[3]
    ids, mask = left_pad(PROMPTS)
    resp, rmask = generate(
        model, ids, mask, torch.arange(len(PROMPTS)), step=0, seed=0,
        max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD, greedy=True,
    )
    assert resp.shape == rmask.shape and resp.dtype == torch.long
    for row, prompt in enumerate(PROMPTS):
        expected = naive_greedy(model, prompt, max_new, eos)
        assert real_tokens(resp, rmask, row) == expected, row
        assert rmask[row].tolist() == [1] * len(expected) + [0] * (resp.shape[1] - len(expected))
    if eos_from_row0:
        assert rmask[0].sum() <= 4 and resp[0, int(rmask[0].sum()) - 1] == eos


def _sample(model, prompts, index, *, width=None, step=3, seed=11, max_new=8, **kw):
    ids, mask = left_pad(prompts, width)
    return generate(
        model, ids, mask, torch.tensor(index), step=step, seed=seed, max_new_tokens=max_new,
        eos_token_id=None, pad_token_id=PAD, temperature=1.0, **kw,
    )


def test_sampling_is_reproducible_per_prompt(model):
    a = PROMPTS[2]
    alone, _ = _sample(model, [a], [7])
    assert alone.shape == (1, 8)
    batch, _ = _sample(model, [PROMPTS[0], a, PROMPTS[1]], [2, 7, 9])
    reordered, _ = _sample(model, [PROMPTS[1], PROMPTS[0], a], [9, 2, 7])
    padded, _ = _sample(model, [a], [7], width=len(a) + 6)
    assert batch[1].tolist() == alone[0].tolist()
    assert reordered[2].tolist() == alone[0].tolist()
    assert padded[0].tolist() == alone[0].tolist()
    # the other prompts too are unaffected by order
    assert batch[0].tolist() == reordered[1].tolist()
    assert batch[2].tolist() == reordered[0].tolist()

    other_step, _ = _sample(model, [a], [7], step=4)
    other_index, _ = _sample(model, [a], [8])
    other_seed, _ = _sample(model, [a], [7], seed=12)
    for other in (other_step, other_index, other_seed):
        assert other[0].tolist() != alone[0].tolist()


def test_sampling_with_top_k_one_is_greedy(model):
    ids, mask = left_pad(PROMPTS)
    kw = dict(step=0, seed=5, max_new_tokens=6, eos_token_id=None, pad_token_id=PAD)
    greedy, _ = generate(model, ids, mask, torch.arange(4), greedy=True, **kw)
    topk1, _ = generate(model, ids, mask, torch.arange(4), temperature=0.7, top_k=1, **kw)
    assert torch.equal(greedy, topk1)


@pytest.mark.parametrize("pad_id", [PAD, 4])  # 4 == EOS: pad equal to EOS
def test_eos_mask_includes_eos_and_pads_after(model, pad_id):
    eos = 4
    ids, mask = left_pad(PROMPTS[:3], pad=pad_id)
    wrapped = ForceEos(model, eos, rows_at={0: 2, 2: 0}, ban=(1,))
    max_new = 6
    resp, rmask = generate(
        wrapped, ids, mask, torch.arange(3), step=1, seed=3, max_new_tokens=max_new,
        eos_token_id=eos, pad_token_id=pad_id,
    )
    assert resp.shape == (3, max_new)
    assert rmask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert resp[0, 2] == eos and (resp[0, 3:] == pad_id).all()
    assert (resp[0, :2] != eos).all()
    assert rmask[2].tolist() == [1, 0, 0, 0, 0, 0]
    assert resp[2, 0] == eos and (resp[2, 1:] == pad_id).all()
    # row 1 never emits EOS: it hits the length limit with an all-ones mask
    assert rmask[1].tolist() == [1] * max_new
    assert (resp[1] != eos).all()


def test_stops_when_all_rows_finished(model):
    ids, mask = left_pad(PROMPTS[:2])
    wrapped = ForceEos(model, eos=4, rows_at={0: 2, 1: 1}, ban_before_forced=True)
    resp, rmask = generate(
        wrapped, ids, mask, torch.arange(2), step=0, seed=0, max_new_tokens=20,
        eos_token_id=4, pad_token_id=PAD,
    )
    assert resp.shape == (2, 3) and wrapped.calls == 3
    assert rmask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert resp[1, 2] == PAD


def test_synced_keeps_decoding_until_all_ranks_done(model):
    ids, mask = left_pad(PROMPTS[:2])
    calls: list[bool] = []

    def synced(local_done: bool) -> bool:  # other ranks report "not done" before step 5
        calls.append(local_done)
        return local_done and len(calls) - 1 >= 5

    wrapped = ForceEos(model, eos=4, rows_at={0: 0, 1: 0})
    kw = dict(step=0, seed=0, max_new_tokens=20, eos_token_id=4, pad_token_id=PAD)
    resp, rmask = generate(wrapped, ids, mask, torch.arange(2), synced=synced, **kw)
    assert resp.shape == (2, 6)
    assert wrapped.calls == 6  # one forward per generated position, the same on every rank
    assert calls == [True] * 6
    assert (resp[:, 0] == 4).all() and (rmask[:, 0] == 1).all()
    assert (resp[:, 1:] == PAD).all() and (rmask[:, 1:] == 0).all()

    # without synced: stops as soon as the local rows are done
    wrapped = ForceEos(model, eos=4, rows_at={0: 0, 1: 0})
    resp, rmask = generate(wrapped, ids, mask, torch.arange(2), **kw)
    assert resp.shape == (2, 1) and wrapped.calls == 1

    # never all done: capped at max_new_tokens
    wrapped = ForceEos(model, eos=4, rows_at={0: 0, 1: 0})
    kw["max_new_tokens"] = 7
    resp, rmask = generate(wrapped, ids, mask, torch.arange(2), synced=lambda d: False, **kw)
    assert resp.shape == (2, 7) and wrapped.calls == 7
    assert rmask.sum().item() == 2


def test_generate_rejects_right_padding_and_handles_zero_tokens(model):
    ids, mask = left_pad(PROMPTS[:2])
    with pytest.raises(ValueError, match="left padded"):
        generate(model, ids.flip(1), mask.flip(1), torch.arange(2), step=0, seed=0,
                 max_new_tokens=3, eos_token_id=None, pad_token_id=PAD)
    resp, rmask = generate(model, ids, mask, torch.arange(2), step=0, seed=0,
                           max_new_tokens=0, eos_token_id=None, pad_token_id=PAD)
    assert resp.shape == (2, 0) and rmask.shape == (2, 0)
    *_, logprobs = generate(model, ids, mask, torch.arange(2), step=0, seed=0, max_new_tokens=0,
                            eos_token_id=None, pad_token_id=PAD, return_logprobs=True)
    assert logprobs.shape == (2, 0) and logprobs.dtype == torch.float32


@pytest.mark.parametrize("sampling", [dict(temperature=0.7, top_k=20, top_p=0.9),
                                      dict(temperature=1.3, greedy=True)])
def test_sampler_logprobs_keep_the_tokens_and_are_the_behaviour_policys(model, sampling):
    """return_logprobs draws the very same tokens, and the sampler's logprobs are the
    behaviour policy's from a full forward of the trainer's view (behaviour_logprobs: top-k /
    top-p renormalised; greedy and unfiltered: the trainer's log_softmax(logits / T)), up to
    round-off; 0 after the EOS."""
    ids, mask = left_pad(PROMPTS)
    kw = dict(step=2, seed=7, max_new_tokens=10, eos_token_id=list(range(1, 12)),
              pad_token_id=PAD, **sampling)
    resp, rmask = generate(model, ids, mask, torch.arange(4), **kw)
    resp2, rmask2, logprobs = generate(model, ids, mask, torch.arange(4), return_logprobs=True,
                                       **kw)
    assert torch.equal(resp, resp2) and torch.equal(rmask, rmask2)
    assert logprobs.shape == resp.shape and logprobs.dtype == torch.float32
    lengths = rmask.sum(1).tolist()
    assert min(lengths) < resp.shape[1]  # some row ended early: padding is exercised
    assert (logprobs[rmask == 0] == 0).all()
    for row, prompt in enumerate(PROMPTS):  # the trainer's view: one unpadded forward
        response = resp[row, :lengths[row]]
        seq = torch.cat([torch.tensor(prompt), response])[None]
        with torch.no_grad():
            logits = model(input_ids=seq).logits[:, len(prompt) - 1:-1]
        trainer = logprobs_from_logits(logits, response[None], kw["temperature"])[0]
        if "top_k" in sampling:
            behaviour = behaviour_logprobs(logits[0], response, kw["temperature"],
                                           kw["top_k"], kw["top_p"])
            torch.testing.assert_close(logprobs[row, :lengths[row]], behaviour, atol=1e-5,
                                       rtol=1e-5)
            # the check can fail: the filter removed mass (the full softmax's logprobs are
            # lower on some token)
            assert (trainer < behaviour - 1e-3).any()
        else:
            torch.testing.assert_close(logprobs[row, :lengths[row]], trainer, atol=1e-5,
                                       rtol=1e-5)


def test_behaviour_logprobs_by_hand():
    logits = torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    # row 0, T = 2: logits / 2 = 0, 0, 1; log p(2) = 1 - log(1 + 1 + e) = -0.5514448
    # row 1: uniform, log p = -log 3 = -1.0986123 for any token
    expected = torch.tensor([-0.5514448, -1.0986123])
    torch.testing.assert_close(behaviour_logprobs(logits, torch.tensor([2, 0]), 2.0), expected)


def test_behaviour_logprobs_renormalise_over_what_top_k_and_top_p_keep():
    """PROBS = 0.25, 0.10, 0.50, 0.15: top_k=2 and top_p=0.7 keep tokens 2 and 0 (mass 0.75),
    top_p=0.8 also token 3 (0.9); a dropped token has probability 0."""
    logits = PROBS.log().expand(4, -1)
    tokens = torch.tensor([2, 0, 1, 3])
    kept_two = torch.tensor([0.5 / 0.75, 0.25 / 0.75, 0.0, 0.0]).log()
    for kw in (dict(top_k=2), dict(top_p=0.7), dict(top_k=3, top_p=0.7)):
        torch.testing.assert_close(behaviour_logprobs(logits, tokens, **kw), kept_two)
    kept_three = torch.tensor([0.5 / 0.9, 0.25 / 0.9, 0.0, 0.15 / 0.9]).log()
    torch.testing.assert_close(behaviour_logprobs(logits, tokens, top_p=0.8), kept_three)
    torch.testing.assert_close(behaviour_logprobs(logits, tokens, top_k=4), PROBS[tokens].log())


def test_pad_responses_right_pads_and_concatenates():
    a = (torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    b = (torch.tensor([[7]]), torch.tensor([[1]]))
    ids, mask = pad_responses([a, b], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 6], [7, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    # more per-token tensors (the sampler's logprobs) are padded with 0
    _, _, logprobs = pad_responses([(*a, -torch.ones(2, 3)), (*b, torch.tensor([[-2.0]]))], 9)
    assert logprobs.tolist() == [[-1, -1, -1], [-1, -1, -1], [-2, 0, 0]]


# ----------------------------------------------------------------------------- uniforms


def test_prompt_uniforms_depend_only_on_seed_index_step_position():
    u = prompt_uniforms(1, torch.tensor([3, 7, 9]), step=2, length=16)
    assert u.shape == (3, 16) and u.dtype == torch.float32
    assert (u >= 0).all() and (u < 1).all()
    alone = prompt_uniforms(1, torch.tensor([7]), step=2, length=16)
    assert torch.equal(alone[0], u[1])
    shorter = prompt_uniforms(1, torch.tensor([9, 3]), step=2, length=5)
    assert torch.equal(shorter, u[[2, 0], :5])  # prefix-stable, order-free
    assert not torch.equal(prompt_uniforms(1, torch.tensor([7]), 3, 16)[0], u[1])
    assert not torch.equal(prompt_uniforms(2, torch.tensor([7]), 2, 16)[0], u[1])
    assert not torch.equal(u[0], u[1])
    assert prompt_uniforms(1, torch.tensor([7]), 2, 0).shape == (1, 0)


def test_prompt_uniforms_are_pinned():
    # Pinned so that a resumed run (or a new version) repeats the original draws: changing the
    # hash or the generator silently changes every sampled response.
    expected = [
        [0.6015862822532654, 0.8942596912384033, 0.7981167435646057],
        [0.5051279664039612, 0.6974122524261475, 0.8528507947921753],
    ]
    got = prompt_uniforms(5, torch.tensor([11, 12]), 4, 3)
    assert torch.allclose(got, torch.tensor(expected), rtol=0, atol=1e-7)


def test_prompt_uniforms_sample_index_draws_apart_and_zero_is_the_old_draw():
    u = prompt_uniforms(5, torch.tensor([11, 11, 11, 12]), 4, 3,
                        sample_index=torch.tensor([0, 1, 2, 0]))
    # sample 0 is exactly the one-sample draw pinned above (n = 1 runs are unchanged)
    assert torch.equal(u[[0, 3]], prompt_uniforms(5, torch.tensor([11, 12]), 4, 3))
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[1], u[2])
    # a row depends on (prompt, sample), not on its neighbours
    alone = prompt_uniforms(5, torch.tensor([11]), 4, 3, sample_index=torch.tensor([2]))
    assert torch.equal(alone[0], u[2])


# ----------------------------------------------------------------------------- sample_tokens

N_DRAWS = 20000
# token ids 2, 0, 3, 1 carry probabilities 0.5, 0.25, 0.15, 0.1 (sorting must matter)
PROBS = torch.tensor([0.25, 0.1, 0.5, 0.15])


def _frequencies(probs: torch.Tensor, **kw) -> torch.Tensor:
    u = torch.rand(N_DRAWS, generator=torch.Generator().manual_seed(0))
    logits = probs.log().expand(N_DRAWS, -1)
    tokens = sample_tokens(logits, u, **kw)
    return torch.bincount(tokens, minlength=probs.numel()).float() / N_DRAWS


def test_inverse_cdf_matches_probabilities():
    freq = _frequencies(PROBS, temperature=1.0)
    assert (freq - PROBS).abs().max() < 0.02


def test_inverse_cdf_is_exact_on_known_uniforms():
    # No filter: the CDF runs in token-id order, 0.25 | 0.35 | 0.85 | 1.0.
    u = torch.tensor([0.0, 0.24, 0.26, 0.34, 0.36, 0.84, 0.86, 0.9999999, 1.0])
    tokens = sample_tokens(PROBS.log().expand(len(u), -1), u, temperature=1.0)
    assert tokens.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    # With a filter the CDF runs most likely first: top_p=0.999 keeps all, 0.5|0.75|0.9|1.0.
    u = torch.tensor([0.0, 0.49, 0.51, 0.74, 0.76, 0.89, 0.91, 1.0])
    tokens = sample_tokens(PROBS.log().expand(len(u), -1), u, temperature=1.0, top_p=0.999)
    assert tokens.tolist() == [2, 2, 0, 0, 3, 3, 1, 1]


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_temperature_reshapes_distribution(temperature):
    expected = PROBS ** (1.0 / temperature)
    expected = expected / expected.sum()
    assert (expected - PROBS).abs().max() > 0.08  # the test can tell them apart
    freq = _frequencies(PROBS, temperature=temperature)
    assert (freq - expected).abs().max() < 0.02


def test_top_k_and_top_p_renormalise_the_kept_tokens():
    two = torch.tensor([1 / 3, 0.0, 2 / 3, 0.0])  # tokens 2 and 0 kept
    assert (_frequencies(PROBS, temperature=1.0, top_k=2) - two).abs().max() < 0.02
    assert (_frequencies(PROBS, temperature=1.0, top_p=0.7) - two).abs().max() < 0.02
    three = torch.tensor([0.25, 0.0, 0.5, 0.15]) / 0.9
    assert (_frequencies(PROBS, temperature=1.0, top_p=0.8) - three).abs().max() < 0.02


def test_top_k_one_tiny_top_p_and_greedy_equal_argmax():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 50, generator=gen) * 3
    u = torch.rand(500, generator=gen)
    argmax = logits.argmax(-1)
    assert torch.equal(sample_tokens(logits, u, temperature=1.3, top_k=1), argmax)
    assert torch.equal(sample_tokens(logits, u, temperature=1.3, top_p=1e-6), argmax)
    assert torch.equal(sample_tokens(logits, u, temperature=99.0, greedy=True), argmax)
    # and plain sampling does not
    assert not torch.equal(sample_tokens(logits, u, temperature=1.0), argmax)


def test_tokens_outside_top_k_or_with_zero_probability_never_sampled():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4000, 50, generator=gen)
    u = torch.rand(4000, generator=gen)
    u[:100] = 1.0 - 2**-24  # the largest float32 below 1
    tokens = sample_tokens(logits, u, temperature=1.0, top_k=5)
    allowed = logits.topk(5, dim=-1).indices
    assert (allowed == tokens[:, None]).any(-1).all()
    assert len(set(tokens.tolist())) > 5  # different rows keep different tokens

    masked = logits.clone()
    masked[:, 10:] = float("-inf")
    tokens = sample_tokens(masked, u, temperature=0.8)
    assert (tokens < 10).all()
    assert set(tokens.tolist()) == set(range(10))
    # u * total rounding up to total (u == 1 here) must still land on a token with mass
    ones = torch.ones(len(u))
    assert (sample_tokens(masked, ones, temperature=0.8) < 10).all()
    tokens = sample_tokens(logits, ones, temperature=1.0, top_k=5)
    assert (allowed == tokens[:, None]).any(-1).all()


def test_sample_tokens_rejects_bad_arguments():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError):
        sample_tokens(logits, torch.zeros(2), temperature=0.0)
    with pytest.raises(ValueError):
        sample_tokens(logits, torch.zeros(2), top_p=0.0)


@pytest.mark.parametrize("greedy", [True, False])
def test_static_cache_gives_the_same_tokens(model, greedy):
    ids, mask = left_pad(PROMPTS)
    common = dict(step=3, seed=5, max_new_tokens=9, eos_token_id=4, pad_token_id=PAD,
                  greedy=greedy)
    dynamic = generate(model, ids, mask, torch.arange(len(PROMPTS)), **common)
    static = generate(model, ids, mask, torch.arange(len(PROMPTS)), static_cache=True, **common)
    assert torch.equal(dynamic[0], static[0]) and torch.equal(dynamic[1], static[1])


# ------------------------------------------------- shared prompt prefill, finished-row compaction


def _tiny(arch: str):
    """Tiny random causal LMs of several layouts: GQA (llama, qwen2), learned absolute
    positions (gpt2, opt: OPT's offset of 2), sliding windows smaller than prompt + response
    (mistral on every layer, qwen2 on its second layer only)."""
    torch.manual_seed(7)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "mistral_window": lambda: transformers.MistralConfig(**common, sliding_window=5),
        "qwen2_window": lambda: transformers.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=5, max_window_layers=1),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2,
                                                n_head=4, n_positions=128),
        "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              word_embed_proj_dim=32,
                                              max_position_embeddings=128),
    }[arch]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


ARCHS = ["llama", "qwen2", "gpt2", "opt", "mistral_window", "qwen2_window"]
EOS = 4


class EosBias(torch.nn.Module):
    """A causal LM whose EOS is likely (its logit raised by `bias`), so rows end at different
    steps, each by its own draws: unlike ForceEos, nothing depends on where a row sits in
    the batch. Keeps the inner model's config (generate builds its cache from it)."""

    def __init__(self, inner, bias: float):
        super().__init__()
        self.inner, self.bias, self.config = inner, bias, inner.config
        self.batch_sizes: list[int] = []  # rows of each forward

    def forward(self, **kwargs):
        self.batch_sizes.append(kwargs["input_ids"].shape[0])
        out = self.inner(**kwargs)
        out.logits = out.logits.clone()
        out.logits[..., EOS] += self.bias
        return out


def _groups(prompts: list[list[int]], n: int):
    """The trainer's layout: rows g*n .. g*n+n-1 are the n samples of prompt g."""
    ids, mask = left_pad([p for p in prompts for _ in range(n)])
    index = torch.arange(len(prompts)).repeat_interleave(n)
    return ids, mask, index, torch.arange(n).repeat(len(prompts))


def _run(model, ids, mask, index, sample_index, **kw):
    kw = dict(step=3, seed=11, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD,
              return_logprobs=True, sample_index=sample_index) | kw
    return generate(model, ids, mask, index, **kw)


def _assert_same(a, b):
    """Tokens and masks equal; sampler logprobs equal up to the round-off of a forward over
    another number of rows (a few float32 ulps)."""
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("static_cache", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefill_gives_the_plain_loops_tokens(arch, static_cache):
    """The n samples of each prompt prefill it once: 3 prompts of 3 lengths (left padding),
    n = 3, one prompt forward of 3 rows; the tokens, masks and logprobs of the plain loop."""
    model = EosBias(_tiny(arch), bias=1.0)
    ids, mask, index, sample = _groups(PROMPTS[:3], 3)
    kw = dict(static_cache=static_cache, compact_finished_rows=False)
    plain = _run(model, ids, mask, index, sample, share_prompt_prefill=False, **kw)
    model.batch_sizes.clear()
    shared = _run(model, ids, mask, index, sample, **kw)
    assert model.batch_sizes[0] == 3 and set(model.batch_sizes[1:]) == {9}
    _assert_same(shared, plain)
    assert len(set(map(tuple, shared[0].tolist()))) >= 7  # the samples of a prompt differ


@pytest.mark.parametrize("n", [1, 2, 5])
def test_shared_prefill_any_n_and_any_order(n):
    """Repeated prompts wherever they sit in the batch (Actor.generate sorts rows by length
    and cuts calls of generation.batch_size rows, so a group may be split or interleaved),
    with top-k / top-p and a position offset (a later turn); n = 1 prefills every row."""
    model = EosBias(_tiny("llama"), bias=1.0)
    ids, mask, index, sample = _groups(PROMPTS, n)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    ids, mask, index, sample = ids[order], mask[order], index[order], sample[order]
    kw = dict(top_k=20, top_p=0.9, temperature=0.8, compact_finished_rows=False,
              position_offset=torch.arange(len(ids)) % 3)
    plain = _run(model, ids, mask, index, sample, share_prompt_prefill=False, **kw)
    model.batch_sizes.clear()
    _assert_same(_run(model, ids, mask, index, sample, **kw), plain)
    assert model.batch_sizes[0] == len(PROMPTS)


def test_distinct_rows_in_order_of_first_appearance():
    from ds_rlhf.generation import _distinct_rows

    ids, mask = left_pad([[5, 6], [7], [5, 6], [3, 7], [7], [5, 6]])
    ids[1, 0] = 9  # under the padding: the same prompt as row 4
    first, copy = _distinct_rows(ids, mask)
    assert first.tolist() == [0, 1, 3] and copy.tolist() == [0, 1, 0, 2, 1, 0]
    assert _distinct_rows(*left_pad(PROMPTS)) is None


@pytest.mark.parametrize("static_cache", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_compaction_gives_the_plain_loops_tokens(arch, static_cache):
    """Rows that ended leave the decode batch: with a likely EOS most of 12 rows end early and
    the forwards shrink; tokens, masks and logprobs are the plain loop's, and the finished
    rows' share of the decode row-steps falls below a quarter."""
    from ds_rlhf.generation import GenerationStats

    model = EosBias(_tiny(arch), bias=2.0)
    ids, mask, index, sample = _groups(PROMPTS[:3], 4)
    kw = dict(static_cache=static_cache, max_new_tokens=24)
    before, after = GenerationStats(), GenerationStats()
    plain = _run(model, ids, mask, index, sample, compact_finished_rows=False, stats=before,
                 **kw)
    model.batch_sizes.clear()
    compact = _run(model, ids, mask, index, sample, stats=after, **kw)
    _assert_same(compact, plain)
    lengths = plain[1].sum(1)
    assert lengths.min() < 6 and lengths.max() > 12  # some end early, some run long
    sizes = model.batch_sizes[1:]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 12 // 2
    assert len(sizes) == plain[0].shape[1] - 1  # one forward per step all the same
    assert after.row_steps == sum(sizes) < before.row_steps
    assert after.finished_share < 0.25 < before.finished_share
    assert before.prefill_s > 0 and before.decode_s > 0


def test_compaction_with_synced_runs_every_ranks_forwards():
    """Under `synced` (a ZeRO-3 module) the local rows may all end while other ranks decode:
    the batch shrinks to one row, and the forwards go on until every rank is done."""
    model = EosBias(_tiny("llama"), bias=6.0)
    ids, mask, index, sample = _groups(PROMPTS[:2], 3)
    calls: list[bool] = []

    def synced(local_done: bool) -> bool:  # the other ranks finish at step 12
        calls.append(local_done)
        return local_done and len(calls) >= 12

    kw = dict(max_new_tokens=20, synced=synced)
    plain = _run(model, ids, mask, index, sample, compact_finished_rows=False, **kw)
    assert len(calls) == 12 and calls[-1] and plain[0].shape[1] == 12
    calls.clear()
    model.batch_sizes.clear()
    compact = _run(model, ids, mask, index, sample, **kw)
    _assert_same(compact, plain)
    assert len(model.batch_sizes) == 12 and model.batch_sizes[-1] == 1


def test_compiled_decode_keeps_its_shape():
    """A `decode` callable (a compiled step: one shape) decodes every row to the end."""
    model = EosBias(_tiny("llama"), bias=3.0)
    ids, mask, index, sample = _groups(PROMPTS[:2], 3)
    sizes = []

    def decode(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return model(**kwargs)

    out = _run(model, ids, mask, index, sample, static_cache=True, decode=decode)
    assert set(sizes) == {6} and out[1].sum(1).min() < out[1].shape[1]
