"""Response sampling for PPO: KV-cached decoding on a plain HF causal LM.

Used by the actor in generation mode (a hook-free copy of the gathered weights) and, with
``synced``, by the fallback that generates through the ZeRO-3 module itself. This module
imports neither deepspeed nor torch.distributed: the caller supplies ``synced``.

Sampling is reproducible per row (see ARCHITECTURE.md, "Conventions"): the uniform that
draws response token t of a row depends only on (seed, prompt index, sample index, step, t),
and each token is drawn by inverse-CDF sampling from that uniform. So a prompt's k-th sample
is the same response whatever rank it lands on, whichever prompts share its batch, in any
order and with any amount of left padding (up to float round-off in the model's forward).

Conventions of the outputs (``[B, R]``, position t = the t-th generated token):
``response_mask[i, t] = 1`` for real tokens including the EOS, 0 after it; positions after the
EOS hold ``pad_token_id``. Masks are built from EOS positions, never from ``ids != pad``.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import transformers
from torch import Tensor
from transformers.cache_utils import DynamicSlidingWindowLayer

__all__ = ["GenerationStats", "generate", "pad_responses", "prompt_uniforms", "row_seed",
           "sample_tokens", "behaviour_logprobs"]


def row_seed(seed: int, prompt_index: int, step: int, sample_index: int = 0) -> int:
    """A stable 63-bit seed from (seed, prompt_index, step, sample_index); never Python's
    ``hash``. Sample 0 keeps the payload of one sample per prompt, so n = 1 draws as before."""
    payload = b"ds_rlhf.sample:%d:%d:%d" % (int(seed), int(prompt_index), int(step))
    if sample_index:
        payload += b":%d" % int(sample_index)
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def prompt_uniforms(seed: int, prompt_index: Tensor, step: int, length: int,
                    sample_index: Tensor | None = None) -> Tensor:
    """Uniforms in [0, 1) for sampling: ``[B, length]`` float32 on CPU.

    Row i, column t depends only on (seed, prompt_index[i], sample_index[i], step, t): one
    CPU ``torch.Generator`` per row, seeded from a blake2b hash of those, draws the row
    serially, so the first k columns are the same for any ``length >= k``. sample_index
    (None: all 0) tells apart the samples of one prompt.
    """
    indices = torch.as_tensor(prompt_index).reshape(-1).tolist()
    samples = [0] * len(indices) if sample_index is None else \
        torch.as_tensor(sample_index).reshape(-1).tolist()
    out = torch.empty(len(indices), max(int(length), 0), dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    for row, (index, sample) in enumerate(zip(indices, samples, strict=True)):
        gen.manual_seed(row_seed(seed, index, step, sample))
        out[row] = torch.rand(out.shape[1], generator=gen, dtype=torch.float32)
    return out


def sample_tokens(
    logits: Tensor,
    u: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> Tensor:
    """Draw one token per row from ``logits [B, V]`` with the given uniforms ``u [B]``.

    ``greedy`` takes the argmax (temperature and filters ignored). Otherwise, in float32:
    logits / temperature, keep the ``top_k`` largest (0 = all), then the smallest set of the
    most likely tokens whose probability reaches ``top_p`` (the most likely token is always
    kept), then inverse-CDF: cumsum over the candidates (most likely first when filtering,
    token-id order otherwise) and pick the first whose cumulative mass exceeds ``u * total``.
    Tokens filtered out or with zero probability are never drawn. Returns ``[B]`` long on
    ``logits.device``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if greedy:
        return logits.argmax(dim=-1)
    _check_sampling(temperature, top_k, top_p)
    return _draw(_scaled(logits, temperature), u, top_k, top_p)[0]


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature in float32 (a division by 1 is exact: skipped)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / float(temperature)


def _candidates(scaled: Tensor, top_k: int, top_p: float
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The tokens top-k / top-p keep, most likely first: (their scaled logits [B, C], their
    ids [B, C] or None for the whole vocabulary in id order, the top-p mask [B, C] of the
    candidates dropped or None)."""
    vocab = scaled.shape[-1]
    # Order the candidates most likely first. A full sort of the vocabulary is the costliest
    # op of a decode step on small models, so only top-p pays for it; top-k sorts k entries.
    if 0 < top_k < vocab:
        cand_logits, cand_idx = torch.topk(scaled, top_k, dim=-1, sorted=True)
    elif top_p < 1.0:
        cand_logits, cand_idx = torch.sort(scaled, dim=-1, descending=True, stable=True)
    else:  # no filter: inverse-CDF sampling works in any fixed order, token-id order is free
        return scaled, None, None
    if top_p == 1.0:
        return cand_logits, cand_idx, None
    probs = torch.softmax(cand_logits, dim=-1)
    drop = torch.cumsum(probs, dim=-1) - probs >= top_p  # the more likely tokens reach top_p
    drop[:, 0] = False
    return cand_logits, cand_idx, drop


def _kept_logprobs(cand_logits: Tensor, drop: Tensor | None) -> Tensor:
    """log-probabilities of the candidates under the renormalised distribution (-inf on the
    dropped ones)."""
    kept = cand_logits if drop is None else cand_logits.masked_fill(drop, float("-inf"))
    return kept.log_softmax(dim=-1)


def _draw(scaled: Tensor, u: Tensor, top_k: int, top_p: float,
          with_logprob: bool = False) -> tuple[Tensor, Tensor | None]:
    """sample_tokens' draw from the scaled logits (checked there), and with `with_logprob`
    each drawn token's log-probability under the distribution it was drawn from
    (behaviour_logprobs, here without a second search for the token)."""
    cand_logits, cand_idx, drop = _candidates(scaled, top_k, top_p)
    probs = torch.softmax(cand_logits, dim=-1)
    if drop is not None:
        probs = probs.masked_fill(drop, 0.0)

    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    target = u.to(device=cdf.device, dtype=cdf.dtype).reshape(-1, 1) * total
    pos = torch.searchsorted(cdf, target, right=True)
    # u * total can round up to total; step back to the last token with non-zero mass.
    last = (probs > 0).cumsum(-1).argmax(-1, keepdim=True)
    pos = torch.minimum(pos, last)
    if cand_idx is None:
        token = pos.squeeze(-1)
        return token, _logprob_of(scaled, token) if with_logprob else None
    token = cand_idx.gather(-1, pos).squeeze(-1)
    if not with_logprob:
        return token, None
    return token, _kept_logprobs(cand_logits, drop).gather(-1, pos).squeeze(-1)


def behaviour_logprobs(logits: Tensor, token: Tensor, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``log mu(token)``, the log-probability of ``token [B]`` under the distribution that
    sample_tokens draws from given ``logits [B, V]``: softmax(logits / temperature), top-k /
    top-p applied, renormalised over the kept tokens (-inf for a token they drop), in float32.
    Without top-k / top-p it is ``log_softmax(logits / temperature)[token]`` over the full
    vocabulary, the same ops as the trainer's old_logprobs (algo.logprobs_from_logits).

    The behaviour policy's logprob, what both generation backends store as a Rollout's
    sampler_logprobs (vLLM's processed_logprobs are this quantity), so that
    algo.rollout_is_weights' exp(old_logprobs - sampler_logprobs) is pi_old / mu, the
    importance weight of the distribution that really drew the token.
    """
    scaled = _scaled(logits, temperature)
    cand_logits, cand_idx, drop = _candidates(scaled, top_k, top_p)
    if cand_idx is None:
        return _logprob_of(scaled, token)
    match = cand_idx == token.reshape(-1, 1)
    pos = match.long().argmax(-1, keepdim=True)
    logprob = _kept_logprobs(cand_logits, drop).gather(-1, pos).squeeze(-1)
    return torch.where(match.any(-1), logprob, float("-inf"))


def _model_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache, in and out: `cache` where the model takes it
    (newer transformers, where `past_key_values` is deprecated, to go in 5.40),
    `past_key_values` before (the lowest transformers setup.cfg allows). A LoRA model's
    forward takes **kwargs: its base model's signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if _accepts(base, "cache") else "past_key_values"


def _eos_tensor(eos_token_id: int | Iterable[int] | None, device: torch.device) -> Tensor:
    if eos_token_id is None:
        ids: list[int] = []
    elif isinstance(eos_token_id, int):
        ids = [eos_token_id]
    else:
        ids = [int(i) for i in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=device)


@dataclass
class GenerationStats:
    """What :func:`generate` calls cost, summed over the calls given it (the bench's split).

    ``prefill_s``: the prompt forward (and the copies of a shared prompt's cache);
    ``decode_s``: the rest, the draws and the one-token forwards (wall-clock, the device
    synchronised at both ends). ``row_steps``: rows fed to the one-token forwards, summed
    over them; ``finished_row_steps``: those of rows that had already ended (their outputs are
    discarded: the work compaction removes)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    row_steps: int = 0
    finished_row_steps: int = 0

    @property
    def finished_share(self) -> float:
        return self.finished_row_steps / self.row_steps if self.row_steps else 0.0


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompt_index: Tensor,
    *,
    step: int,
    seed: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    synced: Callable[[bool], bool] | None = None,
    static_cache: bool = False,
    decode: Callable | None = None,
    sample_index: Tensor | None = None,
    position_offset: Tensor | None = None,
    return_logprobs: bool = False,
    share_prompt_prefill: bool = True,
    compact_finished_rows: bool = True,
    stats: GenerationStats | None = None,
) -> tuple[Tensor, ...]:
    """Sample responses for left-padded prompts with a KV cache.

    Args:
        model: an HF causal LM (eval mode is the caller's job).
        prompt_ids, prompt_mask: ``[B, P]``, left padded (mask 1 on real prompt tokens).
        prompt_index: ``[B]`` global prompt indices; with ``seed``, ``step`` and
            ``sample_index`` they fix the random draws (see :func:`prompt_uniforms`).
        eos_token_id: one id, several ids, or None (never finish early).
        synced: optional ``synced(local_done) -> bool`` returning True once every rank is done.
            When given, decoding goes on (feeding pads, masked out) until it returns True or
            ``max_new_tokens`` is reached, so all ranks run the same number of forwards (needed
            when the forward runs collectives, e.g. a ZeRO-3 module). It is called once after
            each generated position except the last allowed one, identically on every rank.
        static_cache: preallocate the KV cache for P + max_new_tokens positions
            (transformers' StaticCache): every decode step has the same shapes, which is what
            torch.compile / CUDA graphs need.
        decode: the callable for the one-token decode forwards (default: ``model``), e.g.
            ``torch.compile(model)`` with ``static_cache``.
        sample_index: ``[B]`` which sample of its prompt each row is (None: all 0), so the
            n rows of one prompt draw differently.
        position_offset: ``[B]`` where in its episode's response each row's first new token
            sits (later turns of a multi-turn episode; None: all 0): token t of the row draws
            the uniform of response position offset + t, so a turn's draws do not repeat
            the first turn's.
        return_logprobs: also return the sampler's log-probability of each drawn token (see
            :func:`behaviour_logprobs`); the tokens drawn are the same either way.
        share_prompt_prefill: rows with the same prompt (ids and mask: the n samples of a
            prompt) run the prompt forward once; each row decodes from a copy of its cache.
        compact_finished_rows: once a quarter of the rows decoding have ended, the cache
            and the per-row state keep only the live rows (see :func:`_should_compact`). Not
            with a ``decode`` callable: a compiled step is built for one shape.
            Both need a cache generate builds from ``model.config`` whose layers hold only
            keys and values (full attention, sliding windows, static); other models (no
            config, linear attention layers...) run the plain loop.
        stats: add this call's prefill and decode seconds and row-steps to it.

    Both change what is computed, not what is drawn: each row's tokens depend on its own
    prompt, cache and uniforms only (up to float round-off of a forward over another number
    of rows).

    Returns:
        ``(response_ids, response_mask)``, ``[B, R]`` on the model's device, where R is the
        number of decode steps run (``<= max_new_tokens``). The mask is 1 up to and including
        each row's EOS, 0 after it; ids after the EOS are ``pad_token_id``. With
        ``return_logprobs``, a third ``[B, R]`` float32 tensor, 0 after the EOS.
    """
    device = _model_device(model)
    prompt_ids = prompt_ids.to(device=device, dtype=torch.long)
    prompt_mask = prompt_mask.to(device=device, dtype=torch.long)
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
            "must both be [B, P]"
        )
    batch, prompt_len = prompt_ids.shape
    if prompt_len == 0 or not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left padded and non-empty (prompt_mask[:, -1] == 1)")
    index = torch.as_tensor(prompt_index).reshape(-1)
    if index.numel() != batch:
        raise ValueError(f"prompt_index has {index.numel()} entries for {batch} prompts")

    if max_new_tokens <= 0:
        empty = torch.empty(batch, 0, dtype=torch.long, device=device)
        if return_logprobs:
            return empty, empty.clone(), empty.float()
        return empty, empty.clone()
    start = _clock(device) if stats is not None else 0.0

    uniforms = None
    if not greedy:
        _check_sampling(temperature, top_k, top_p)
        if position_offset is None:
            uniforms = prompt_uniforms(seed, index, step, max_new_tokens, sample_index)
        else:
            offset = torch.as_tensor(position_offset).reshape(-1, 1).long().cpu()
            uniforms = prompt_uniforms(seed, index, step, int(offset.max()) + max_new_tokens,
                                       sample_index)
            uniforms = uniforms.gather(1, offset + torch.arange(max_new_tokens))
        uniforms = uniforms.to(device)
    eos = _eos_tensor(eos_token_id, device)

    # Prompt forward: explicit positions so left padding does not shift them. The mask of
    # all positions is built once; each step opens the next column (a response token is
    # never masked: rows that are done feed pads, whose outputs are discarded).
    total = prompt_len + max_new_tokens
    full_mask = torch.nn.functional.pad(prompt_mask, (0, max_new_tokens), value=1)
    attention_mask = prompt_mask
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    if static_cache:
        cache = transformers.StaticCache(config=model.config, max_cache_len=total)
        kwargs["cache_position"] = torch.arange(prompt_len, device=device)
        # The mask covers the whole cache from the start; columns open as tokens arrive.
        attention_mask = torch.nn.functional.pad(prompt_mask, (0, max_new_tokens))
    else:
        cache = _in_place_cache(model, total)
        if cache is None:
            cache = _model_cache(model)
    cache_kwarg = _cache_kwarg(model)
    if cache is not None:
        kwargs[cache_kwarg] = cache
    # Shared prefill: the distinct prompts only, then each row gets a copy of its prompt's
    # cache and logits (the n samples of a prompt differ from their first draw on).
    shared = None
    if share_prompt_prefill and cache is not None and _rows_selectable(cache):
        shared = _distinct_rows(prompt_ids, prompt_mask)
    prefill = slice(None) if shared is None else shared[0]
    out = model(
        input_ids=prompt_ids[prefill],
        attention_mask=attention_mask[prefill],
        position_ids=position_ids[prefill],
        use_cache=True,
        **kwargs,
    )
    logits, cache = out.logits[:, -1, :], getattr(out, cache_kwarg)
    if shared is not None:
        logits = logits.index_select(0, shared[1])
        _select_rows(cache, shared[1])
    # Rows are dropped from caches built here (known layers) only, and not under a compiled
    # decode step: it is built for one batch shape.
    compact = compact_finished_rows and decode is None and cache_kwarg in kwargs \
        and _rows_selectable(cache)
    decode = decode or model
    next_position = prompt_mask.sum(-1, keepdim=True)  # [B, 1] position of response token 0
    if stats is not None:
        prefill_end = _clock(device)
        stats.prefill_s += prefill_end - start

    # Outputs by step, [max_new_tokens, B]: step t writes the rows still decoding (`rows`:
    # their place in the outputs); a row compacted away keeps pad / 0, what it would write.
    rows = torch.arange(batch, device=device)
    ids_by_step = torch.full((max_new_tokens, batch), int(pad_token_id), dtype=torch.long,
                             device=device)
    mask_by_step = torch.zeros(max_new_tokens, batch, dtype=torch.long, device=device)
    logprobs_by_step = torch.zeros(max_new_tokens, batch, device=device) \
        if return_logprobs else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = torch.full((batch,), int(pad_token_id), dtype=torch.long, device=device)
    num_steps = 0
    for t in range(max_new_tokens):
        # logits / temperature once for the draw and the logprob (sample_tokens and
        # behaviour_logprobs, the same ops)
        scaled = None if greedy and not return_logprobs else _scaled(logits, temperature)
        if greedy:
            token = logits.argmax(dim=-1)
            logprob = _logprob_of(scaled, token) if return_logprobs else None
        else:
            token, logprob = _draw(scaled, uniforms[:, t], top_k, top_p, return_logprobs)
        live = ~done
        token = torch.where(live, token, pad)
        ids_by_step[t].index_copy_(0, rows, token)
        mask_by_step[t].index_copy_(0, rows, live.long())
        if return_logprobs:
            logprobs_by_step[t].index_copy_(
                0, rows, torch.where(live, logprob, 0.0))
        if eos.numel():
            done = done | (live & torch.isin(token, eos))
        num_steps = t + 1

        if t + 1 >= max_new_tokens:
            break
        num_done = int(done.sum())
        local_done = num_done == len(done)
        if synced(local_done) if synced is not None else local_done:
            break
        if compact and _should_compact(num_done, len(done)):
            # The live rows, or one row to keep feeding while other ranks finish (synced).
            keep = (~done).nonzero().squeeze(1) if num_done < len(done) else rows.new_zeros(1)
            _select_rows(cache, keep)
            rows, done, token, next_position = rows[keep], done[keep], token[keep], \
                next_position[keep]
            full_mask, attention_mask = full_mask[keep], attention_mask[keep]
            uniforms = None if uniforms is None else uniforms[keep]
            pad, num_done = pad[:len(keep)], len(keep) if local_done else 0
        if stats is not None:
            stats.row_steps += len(done)
            stats.finished_row_steps += num_done

        if static_cache:
            attention_mask = attention_mask.clone()  # a compiled step may hold the old one
            attention_mask[:, prompt_len + t] = 1
            kwargs["cache_position"] = torch.tensor([prompt_len + t], device=device)
        else:
            attention_mask = full_mask[:, :prompt_len + t + 1]
        kwargs[cache_kwarg] = cache
        out = decode(
            input_ids=token.unsqueeze(-1),
            attention_mask=attention_mask,
            position_ids=next_position + t,
            use_cache=True,
            **kwargs,
        )
        logits = out.logits[:, -1, :]

    if stats is not None:
        stats.decode_s += _clock(device) - prefill_end
    out = ids_by_step[:num_steps].T.contiguous(), mask_by_step[:num_steps].T.contiguous()
    if return_logprobs:
        return *out, logprobs_by_step[:num_steps].T.contiguous()
    return out


def _clock(device: torch.device) -> float:
    """Wall-clock seconds once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _should_compact(num_done: int, num_rows: int) -> bool:
    """Drop the finished rows once they are a quarter of the rows decoding.

    A decode step costs each row at least the read of its KV cache (attention), on CPU and
    GPU alike, plus its share of the compute. Compacting copies the live rows' cache once
    (one read and one write). With a quarter of the rows gone each time, the rows copied over
    a whole call add up to at most 3 batches (3/4 + 9/16 + ... of B): about the cache reads
    of 3 decode steps, while every later step reads a quarter less. And no step runs with
    more than a quarter of its rows finished. Waiting for half would copy at most one batch
    but compute up to half wasted rows; compacting at every finished row would copy a batch
    per few rows (up to B compactions, each a kernel per layer on a GPU)."""
    return num_done > 0 and 4 * num_done >= num_rows and num_rows > 1


def _distinct_rows(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first, copy)`` when some rows repeat an earlier row's prompt (ids and mask):
    ``first`` [U] the row of each distinct prompt, in order of first appearance, ``copy`` [B]
    which of them each row is; None when all B prompts differ."""
    key = torch.where(prompt_mask.bool(), prompt_ids, -1)  # ids are >= 0: -1 marks padding
    distinct, copy = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == len(key):
        return None
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((len(distinct),), len(key), device=key.device).scatter_reduce(
        0, copy, rows, "amin")
    order = first.argsort()  # the distinct prompts by first appearance: the rows' order
    place = torch.empty_like(order)
    place[order] = torch.arange(len(order), device=key.device)
    return first[order], place[copy]


# Cache layers whose whole per-row state is `keys` and `values` [B, heads, positions, dim]
# (their lengths are shared by all rows), so rows are copied or dropped by indexing those.
_ROW_LAYERS = (transformers.DynamicLayer, DynamicSlidingWindowLayer, transformers.StaticLayer,
               transformers.StaticSlidingWindowLayer)


def _rows_selectable(cache) -> bool:
    return isinstance(cache, transformers.Cache) and bool(cache.layers) and all(
        isinstance(layer, _InPlaceLayer) or type(layer) in _ROW_LAYERS for layer in cache.layers)


def _select_rows(cache, index: Tensor) -> None:
    """Keep rows ``index`` of every layer of ``cache`` (repeats allowed: copies of a row)."""
    for layer in cache.layers:
        if isinstance(layer, _InPlaceLayer):
            layer.select_rows(index)
        elif layer.is_initialized:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
            if isinstance(layer, transformers.StaticLayer):
                layer.batch_size = len(index)
                # as StaticLayer.lazy_initialization marks its buffers (CUDA graphs)
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)


def _model_cache(model: torch.nn.Module):
    """The DynamicCache the model would build itself (None for a model without a config)."""
    config = getattr(model, "config", None)
    return None if config is None else transformers.DynamicCache(config=config)


def _logprob_of(scaled: Tensor, token: Tensor) -> Tensor:
    return scaled.gather(-1, token.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)


class _InPlaceLayer(transformers.DynamicLayer):
    """A full-attention KV cache layer written in place: one buffer per generate call for
    all prompt + new positions, each step writing its keys and values at the next position,
    where transformers' DynamicLayer concatenates the whole cache for every token (a fifth
    of a decode step on small models). Attention reads a view of the filled positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity  # positions the buffers hold
        self.length = 0  # positions filled

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self._keys = key_states.new_empty(b, h, self.capacity, d)
        self._values = value_states.new_empty(b, value_states.shape[1], self.capacity,
                                              value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        if self.length > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions got {self.length}")
        self._keys[:, :, start:self.length] = key_states
        self._values[:, :, start:self.length] = value_states
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, index: Tensor) -> None:
        """Keep rows ``index`` (repeats allowed), copying only the filled positions: fewer
        rows are written to the front of the buffers, more get new ones."""
        if not self.is_initialized:
            return
        for name in ("_keys", "_values"):
            buffer = getattr(self, name)
            kept = buffer[:, :, :self.length].index_select(0, index)
            if len(index) > buffer.shape[0]:
                buffer = buffer.new_empty(len(index), *buffer.shape[1:])
            buffer = buffer[:len(index)]
            buffer[:, :, :self.length] = kept
            setattr(self, name, buffer)
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]


def _in_place_cache(model: torch.nn.Module, capacity: int):
    """A KV cache of _InPlaceLayer for models whose every layer is plain full attention
    (what transformers would give them: DynamicLayer); None (the model's own cache) for
    the others (sliding windows, linear attention...)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    cache = transformers.DynamicCache(config=config)  # what the model would build itself
    if not cache.layers or any(type(layer) is not transformers.DynamicLayer
                               for layer in cache.layers):
        return None
    cache.layers = [_InPlaceLayer(capacity) for _ in cache.layers]
    return cache


def pad_responses(
    chunks: Sequence[tuple[Tensor, ...]], pad_token_id: int
) -> tuple[Tensor, ...]:
    """Concatenate ``(ids [b, r_i], mask [b, r_i], *per_token [b, r_i])`` chunks along the
    batch, right-padding each to the widest ``r`` with ``pad_token_id`` (ids) and 0 (mask
    and the other per-token tensors, e.g. the sampler's logprobs)."""
    if not chunks:
        raise ValueError("pad_responses needs at least one chunk")
    width = max(chunk[0].shape[1] for chunk in chunks)
    columns = []
    for k, parts in enumerate(zip(*chunks, strict=True)):
        value = int(pad_token_id) if k == 0 else 0
        columns.append(torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]),
                                                          value=value) for x in parts]))
    return tuple(columns)
