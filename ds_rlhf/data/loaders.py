"""Tokenised data sets for the three steps: prompts (PPO), SFT rows, preference pairs (RM).

Token layout, the same in every step so that SFT, the reward model and PPO see one thing:
  prompt ids   = tokenizer(prompt) with the tokenizer's special tokens (e.g. BOS); for
                 rows the chat template renders (`messages`, conversational `preference`) it
                 writes them, so none are added
  response ids = the tokens after the prompt ids in tokenizer(prompt + response), i.e. the
                 response tokenised in context (right for SentencePiece's leading-space
                 handling); if that tokenisation does not start with the prompt ids (a merge
                 across the boundary), tokenizer(response) alone
  row          = prompt ids + response ids + [EOS]
This is exactly what PPO produces: generation continues the prompt ids and ends with EOS. A
rendered response (a conversational preference side) ends with the template's end of turn,
often EOS and a newline (SmolLM2: "<|im_end|>\n"): it is cut before its last EOS, so its row
ends at that EOS as a generated one does and the reward is read there.
Each loader first passes the tokenizer through `prepare_tokenizer` (pad = EOS if unset).

Lengths: a prompt over data.max_prompt_len is an error naming the row (or, with
data.overlong_prompts: filter, dropped and counted in `num_filtered`) in every step. An SFT
row over data.max_len is cut at the end (counted in `num_truncated`): its start still
teaches. A preference pair with either side over data.max_len is dropped and counted in
`num_filtered`: cutting it would remove the EOS where the reward is read and could make the
two sides equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ds_rlhf.config import DataConfig, DataError
from ds_rlhf.data import formats
from ds_rlhf.data.sources import mix, rows_of, where

Split = Literal["train", "eval"]


@dataclass
class PromptSet:
    """PPO prompts, in mixed order (train) or dataset order (eval)."""

    input_ids: list[list[int]]  # prompt token ids, no padding
    texts: list[str]  # the prompt texts (chat template applied for `messages`)
    num_filtered: int  # rows dropped for a prompt over data.max_prompt_len
    columns: dict[str, list] = field(default_factory=dict)  # the datasets' other columns
    # (e.g. a reference answer), one value per prompt; None where a row's dataset lacks one
    fingerprints: list[str] = field(default_factory=list)  # per dataset, of the rows this
    # split read (sources.Selection), for the checkpoint


@dataclass
class SFTSet:
    """SFT rows: prompt + completion + EOS, with the tokens to train on."""

    input_ids: list[list[int]]  # token ids, at most data.max_len
    loss_mask: list[list[int]]  # 1 where the token is a training target (completion
    # tokens and the EOS; every token with train_on_prompt or format text), else 0
    num_filtered: int  # rows dropped for a prompt over data.max_prompt_len
    num_truncated: int  # rows cut at data.max_len
    fingerprints: list[str] = field(default_factory=list)  # as in PromptSet


@dataclass
class PreferenceSet:
    """Reward-model pairs: prompt + response + EOS for each side."""

    chosen_ids: list[list[int]]  # prompt + chosen response + EOS
    rejected_ids: list[list[int]]  # prompt + rejected response + EOS
    prompt_lens: list[int]  # number of prompt tokens at the start of both sides
    num_filtered: int  # pairs dropped: prompt over data.max_prompt_len or a side over max_len
    fingerprints: list[str] = field(default_factory=list)  # as in PromptSet


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS as pad; error if it has no EOS either.

    Padding with EOS is safe here because every mask is built from lengths, never from
    `ids != pad_token_id`.
    """
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token, which ends every response "
            "and every training row; use a tokenizer with eos_token set, or add one "
            "(tokenizer.add_special_tokens({'eos_token': ...}) and resize the model embeddings)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _encode_responses(tokenizer: Any, prompts: list[str], prompt_ids: list[list[int]],
                      responses: list[str], chat: bool) -> list[list[int]]:
    """Response ids as tokenised after their prompt; `chat`: rendered by the chat template,
    cut before the last EOS (see the module doc)."""
    full = _encode(tokenizer, [p + r for p, r in zip(prompts, responses, strict=True)],
                   special=not chat)
    out = []
    for p_ids, f_ids, response in zip(prompt_ids, full, responses, strict=True):
        if f_ids[: len(p_ids)] == p_ids:
            ids = f_ids[len(p_ids):]
        else:
            ids = _encode(tokenizer, [response], False)[0]
        eos = tokenizer.eos_token_id
        if chat and eos in ids:
            ids = ids[: len(ids) - 1 - ids[::-1].index(eos)]
        out.append(ids)
    return out


def _check_prompt_lens(cfg: DataConfig, index: int, rows: list[int],
                       lengths: list[int]) -> list[bool]:
    """Which rows to keep; raises on an overlong prompt unless overlong_prompts is filter."""
    keep = [n <= cfg.max_prompt_len for n in lengths]
    num_over = keep.count(False)
    if num_over and cfg.overlong_prompts == "error":
        k = keep.index(False)
        raise DataError(
            f"{where(cfg.datasets[index], index)} row {rows[k]}: the prompt has {lengths[k]} "
            f"tokens, more than data.max_prompt_len={cfg.max_prompt_len} ({num_over} of "
            f"{len(rows)} rows are over it); raise data.max_prompt_len or set "
            "data.overlong_prompts: filter to drop such rows")
    return keep


def _combine(cfg: DataConfig, split: Split, per_dataset: list[list[Any]],
             num_rows: list[int]) -> list[Any]:
    """Mix training rows by weight; concatenate eval rows (see ds_rlhf/data/sources.py)."""
    if split == "eval":
        return [row for group in per_dataset for row in group]
    for i, (group, n) in enumerate(zip(per_dataset, num_rows, strict=True)):
        if not group:
            raise DataError(
                f"{where(cfg.datasets[i], i)}: all {n} training rows were dropped as too long "
                f"(data.max_prompt_len={cfg.max_prompt_len}, data.max_len={cfg.max_len}); "
                "raise the limits")
    return mix(per_dataset, [s.weight for s in cfg.datasets], cfg.seed)


def _load(cfg: DataConfig, tokenizer: Any, split: Split,
          rows_fn: Callable[[int, Any, list[int]], tuple[list[Any], int]]
          ) -> tuple[list, int, list[str]]:
    """Run `rows_fn(index, table, rows) -> (examples, num_filtered)` on every dataset; and
    the datasets' fingerprints."""
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    prepare_tokenizer(tokenizer)
    per_dataset, num_rows, num_filtered, fingerprints = [], [], 0, []
    for index in range(len(cfg.datasets)):
        chosen = rows_of(cfg, index, split)
        examples, filtered = (rows_fn(index, chosen.table, chosen.rows) if chosen.rows
                              else ([], 0))
        per_dataset.append(examples)
        num_rows.append(len(chosen.rows))
        num_filtered += filtered
        fingerprints.append(chosen.fingerprint)
    return _combine(cfg, split, per_dataset, num_rows), num_filtered, fingerprints


# Tokenised data is computed in memory on every rank, never cached on disk: a fast tokenizer
# handles ~1e5 rows in seconds, and with no shared cache there is nothing to lock, no stale
# entry after a tokenizer change and no race when many ranks on many nodes start at once.


def load_prompts(cfg: DataConfig, tokenizer: Any, split: Split = "train",
                 tools: list[dict] | None = None) -> PromptSet:
    """Prompts of every dataset (formats prompt, prompt_completion, preference, hh, messages),
    with the datasets' other columns for reward functions (`PromptSet.columns`). `tools`:
    JSON schemas the chat template renders into `messages` prompts (multi-turn tool runs).

    Mixed datasets with different columns: `columns` has the union, and a row whose dataset
    lacks a column gets None there (so a reward function can tell "no answer" from any answer)
    rather than an error: a math set with answers mixes with a chat set without them.
    """

    names: dict[str, None] = {}  # the other columns of all datasets, in order of appearance

    def rows_fn(index: int, table: Any, rows: list[int]) -> tuple[list, int]:
        spec = cfg.datasets[index]
        texts = formats.prompts(spec, index, table, rows, tokenizer, tools)
        ids = _encode(tokenizer, texts, special=not formats.uses_chat_template(spec, table))
        keep = _check_prompt_lens(cfg, index, rows, [len(x) for x in ids])
        other = formats.other_columns(spec, table)
        names.update(dict.fromkeys(other))
        values = {c: table.read_column(c) for c in other}
        extra = [{c: values[c][r] for c in other} for r in rows]
        return ([(x, t, e) for x, t, e, k in zip(ids, texts, extra, keep, strict=True) if k],
                keep.count(False))

    examples, num_filtered, fingerprints = _load(cfg, tokenizer, split, rows_fn)
    columns = {c: [e.get(c) for _, _, e in examples] for c in names}
    return PromptSet([x for x, _, _ in examples], [t for _, t, _ in examples], num_filtered,
                     columns, fingerprints)


def _messages_sft(cfg: DataConfig, index: int, table: Any, rows: list[int], tokenizer: Any,
                  eos: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(ids, assistant masks, prompt lengths) of conversations: train on assistant turns.

    Each assistant turn's characters are found by rendering the conversation prefix-wise
    (turns before it with the generation prompt, then including it); tokens of the full
    rendering whose first character lies in such a span are trained. So a template's
    end-of-turn tokens are trained too, and EOS is appended only when the last assistant
    turn has none.
    """
    spec = cfg.datasets[index]
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where(spec, index)}: format 'messages' needs a fast tokenizer "
                         "(offsets mapping) to find the assistant tokens")
    all_ids, all_masks, prompt_lens = [], [], []
    for r, conv in zip(rows, formats.conversations(spec, index, table, rows), strict=True):
        turns = [j for j, m in enumerate(conv) if m["role"] == "assistant"]
        if not turns:
            raise DataError(f"{where(spec, index)} row {r}, column {spec.messages_column!r}: "
                             "no assistant message to train on")
        full = formats.render(tokenizer, conv, False)
        spans = []
        for j in turns:
            before = formats.render(tokenizer, conv[:j], True)
            after = formats.render(tokenizer, conv[: j + 1], False)
            if not (after.startswith(before) and full.startswith(after)):
                raise DataError(
                    f"{where(spec, index)} row {r}: the chat template does not render this "
                    "conversation prefix-wise (the first turns render differently alone), so "
                    "the assistant tokens cannot be located; use format prompt_completion")
            spans.append((len(before), len(after)))
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        mask = [int(any(s <= start < e for s, e in spans)) for start, _ in offsets]
        if conv[-1]["role"] == "assistant":
            s, e = spans[-1]
            last_turn = [t for t, (start, _) in zip(ids, offsets, strict=True) if s <= start < e]
            if eos not in last_turn:
                ids.append(eos)
                mask.append(1)
        all_ids.append(ids)
        all_masks.append(mask)
        prompt_lens.append(sum(start < spans[-1][0] for start, _ in offsets))
    return all_ids, all_masks, prompt_lens


def load_sft(cfg: DataConfig, tokenizer: Any, split: Split = "train",
             train_on_prompt: bool = False) -> SFTSet:
    """SFT rows (formats prompt_completion, text, messages, preference/hh with chosen).

    `loss_mask[t] = 1` marks token t as a target (predicted from tokens < t); with
    `train_on_prompt` every token is a target.
    """
    num_truncated = 0

    def rows_fn(index: int, table: Any, rows: list[int]) -> tuple[list, int]:
        nonlocal num_truncated
        spec, eos = cfg.datasets[index], tokenizer.eos_token_id
        if spec.format == "text":
            texts = formats.text_column(spec, index, table, "text_column", rows)
            ids = [x + [eos] for x in _encode(tokenizer, texts, special=True)]
            masks = [[1] * len(x) for x in ids]
            keep = [True] * len(ids)  # no prompt
        elif spec.format == "messages":
            ids, masks, plens = _messages_sft(cfg, index, table, rows, tokenizer, eos)
            keep = _check_prompt_lens(cfg, index, rows, plens)
        else:
            prompts, completions = formats.prompt_completions(spec, index, table, rows,
                                                              tokenizer)
            chat = formats.uses_chat_template(spec, table)
            p_ids = _encode(tokenizer, prompts, special=not chat)
            keep = _check_prompt_lens(cfg, index, rows, [len(x) for x in p_ids])
            c_ids = _encode_responses(tokenizer, prompts, p_ids, completions, chat)
            ids = [p + c + [eos] for p, c in zip(p_ids, c_ids, strict=True)]
            masks = [[0] * len(p) + [1] * (len(c) + 1) for p, c in zip(p_ids, c_ids, strict=True)]
        out = []
        for x, m, k in zip(ids, masks, keep, strict=True):
            if not k:
                continue
            if train_on_prompt:
                m = [1] * len(x)
            if len(x) > cfg.max_len:
                num_truncated += 1
                x, m = x[: cfg.max_len], m[: cfg.max_len]
            out.append((x, m))
        return out, keep.count(False)

    examples, num_filtered, fingerprints = _load(cfg, tokenizer, split, rows_fn)
    return SFTSet([x for x, _ in examples], [m for _, m in examples], num_filtered,
                  num_truncated, fingerprints)


def _check_pair_lens(cfg: DataConfig, index: int, rows: list[int], lengths: list[int],
                     keep: list[bool]) -> None:
    """Raise on a kept pair with a side over data.max_len unless overlong_prompts is filter."""
    over = [k and n > cfg.max_len for n, k in zip(lengths, keep, strict=True)]
    if any(over) and cfg.overlong_prompts == "error":
        k = over.index(True)
        raise DataError(
            f"{where(cfg.datasets[index], index)} row {rows[k]}: a side of the pair has "
            f"{lengths[k]} tokens (prompt + response + EOS), more than data.max_len="
            f"{cfg.max_len} ({sum(over)} of {len(rows)} pairs are over it); raise data.max_len "
            "(up to the model's max_position_embeddings) or set data.overlong_prompts: filter "
            "to drop such pairs")


def load_preferences(cfg: DataConfig, tokenizer: Any, split: Split = "train",
                     overlong_pairs: Literal["filter", "error"] = "filter") -> PreferenceSet:
    """Chosen/rejected pairs (formats preference, text or message lists, and hh) for the
    reward model and DPO.

    A pair with a side over data.max_len is dropped (`overlong_pairs="filter"`, the reward
    model), or (`"error"`, DPO) raises unless data.overlong_prompts is filter.
    """

    def rows_fn(index: int, table: Any, rows: list[int]) -> tuple[list, int]:
        spec, eos = cfg.datasets[index], tokenizer.eos_token_id
        prompts, chosen, rejected = formats.preference_triples(spec, index, table, rows,
                                                               tokenizer)
        chat = formats.uses_chat_template(spec, table)
        p_ids = _encode(tokenizer, prompts, special=not chat)
        keep = _check_prompt_lens(cfg, index, rows, [len(x) for x in p_ids])
        c_ids = _encode_responses(tokenizer, prompts, p_ids, chosen, chat)
        r_ids = _encode_responses(tokenizer, prompts, p_ids, rejected, chat)
        pairs = [(p + c + [eos], p + j + [eos], len(p))
                 for p, c, j in zip(p_ids, c_ids, r_ids, strict=True)]
        if overlong_pairs == "error":
            _check_pair_lens(cfg, index, rows, [max(len(c), len(j)) for c, j, _ in pairs], keep)
        out = [(c, j, n) for (c, j, n), k in zip(pairs, keep, strict=True)
               if k and max(len(c), len(j)) <= cfg.max_len]
        return out, len(rows) - len(out)

    examples, num_filtered, fingerprints = _load(cfg, tokenizer, split, rows_fn)
    return PreferenceSet([c for c, _, _ in examples], [j for _, j, _ in examples],
                         [n for _, _, n in examples], num_filtered, fingerprints)
