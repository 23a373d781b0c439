"""Row formats: which columns a format reads and how a row becomes prompt / response texts.

  format             prompt                          completion (SFT)    chosen / rejected (RM)
  prompt             prompt_column                   -                   -
  prompt_completion  prompt_column                   completion_column   -
  text               - (SFT only: all text trained)  text_column         -
  preference         prompt_column                   chosen_column       chosen_/rejected_column
  hh                 common prefix of the two        rest of chosen      rest of each transcript
                     transcripts up to and including
                     the last "\\n\\nAssistant:"
  messages           all turns but the last          every assistant     -
                     assistant turn, rendered with   turn (see
                     add_generation_prompt=True      loaders.load_sft)
  preference with    prompt_column's messages, or    rest of chosen      rest of each
  message lists      the messages chosen and                             conversation
                     rejected begin with alike;
                     add_generation_prompt=True

Conversational preference rows (TRL's format, e.g. trl-lib/ultrafeedback_binarized) hold
message lists in chosen_column/rejected_column: whole conversations, or only the responses
after an explicit prompt list in prompt_column. A prompt column of text beside them (as in
HuggingFaceH4/ultrafeedback_binarized, a copy of the first user turn) is not read: the prompt
is then the common prefix. A response is the rendered conversation after the rendered prompt.

Every error names the dataset (path and config entry), the row and the column.
"""

from __future__ import annotations

import os
from typing import Any

from ds_rlhf.config import DataError, DatasetSpec
from ds_rlhf.data.sources import Table, where

HH_ASSISTANT = "\n\nAssistant:"


def column(spec: DatasetSpec, index: int, table: Table, field: str, rows: list[int]) -> list:
    """Values of the column named by `spec.<field>` at `rows`; raises if the column is absent."""
    name = getattr(spec, field)
    if name not in table.columns:
        raise DataError(
            f"{where(spec, index)}: no column {name!r} (data.datasets[{index}].{field}, format "
            f"{spec.format!r}) in split {table.split!r}; its columns are {table.columns}; set "
            f"data.datasets[{index}].{field} to the right one or fix .format")
    values = table.read_column(name)
    return [values[r] for r in rows]


def text_column(spec: DatasetSpec, index: int, table: Table, field: str,
                rows: list[int]) -> list[str]:
    """Like `column`, and every value must be a string."""
    values = column(spec, index, table, field, rows)
    for r, v in zip(rows, values, strict=True):
        if not isinstance(v, str):
            raise DataError(f"{where(spec, index)} row {r}, column {getattr(spec, field)!r}: "
                             f"expected text, got {type(v).__name__} {str(v)[:80]!r}")
    return values


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) of two hh-rlhf transcripts, or None.

    The prompt is the common prefix of both transcripts cut after its last "\\n\\nAssistant:";
    cutting at the marker (not at the raw common prefix) keeps response words that happen
    to start the same in the responses.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _hh_rows(spec: DatasetSpec, index: int, table: Table,
             rows: list[int]) -> tuple[list[str], list[str], list[str]]:
    chosen = text_column(spec, index, table, "chosen_column", rows)
    rejected = text_column(spec, index, table, "rejected_column", rows)
    out: tuple[list[str], list[str], list[str]] = ([], [], [])
    for r, c, j in zip(rows, chosen, rejected, strict=True):
        parts = split_hh(c, j)
        if parts is None:
            raise DataError(
                f"{where(spec, index)} row {r}, columns {spec.chosen_column!r}/"
                f"{spec.rejected_column!r}: the transcripts share no prefix ending in "
                f"{HH_ASSISTANT!r}, so there is no prompt; format 'hh' needs hh-rlhf style "
                f"'\\n\\nHuman: ...\\n\\nAssistant: ...' dialogues (data.datasets[{index}].format)")
        for part, value in zip(out, parts, strict=True):
            part.append(value)
    return out


def conversations(spec: DatasetSpec, index: int, table: Table, rows: list[int],
                  field: str = "messages_column") -> list[list[dict[str, str]]]:
    """The column of `field`, checked: each value a list of {role, content}, text content."""
    values = column(spec, index, table, field, rows)
    for r, conv in zip(rows, values, strict=True):
        ok = isinstance(conv, list) and len(conv) > 0 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in conv)
        if not ok:
            raise DataError(f"{where(spec, index)} row {r}, column {getattr(spec, field)!r}: "
                             "expected a non-empty list of {'role': str, 'content': str} "
                             f"messages, got {str(conv)[:120]!r}")
    return values


def is_conversational(spec: DatasetSpec, table: Table) -> bool:
    """Format preference with message lists in the chosen column (see the module doc)."""
    if spec.format != "preference" or spec.chosen_column not in table.columns or \
            not table.num_rows:
        return False
    return isinstance(table.read_column(spec.chosen_column)[0], list)


def uses_chat_template(spec: DatasetSpec, table: Table) -> bool:
    """Rows rendered by the chat template, which writes the special tokens (BOS...) itself."""
    return spec.format == "messages" or is_conversational(spec, table)


def split_conversations(prompt: list[dict] | None, chosen: list[dict], rejected: list[dict]
                        ) -> tuple[list[dict], list[dict], list[dict]] | str:
    """(prompt, chosen response, rejected response) messages of a conversational pair, or why
    there are none. Without `prompt` it is the longest common prefix of the two; with one,
    sides that begin with it are whole conversations and lose it."""
    if prompt is None:
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        prompt = chosen[:k]
    if chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    if not prompt:
        return "chosen and rejected share no prompt (their first messages differ)"
    if not chosen or not rejected:
        return "one side is the other's beginning, so it has no response of its own"
    for side in (chosen, rejected):
        if side[0]["role"] != "assistant" or side[-1]["role"] != "assistant":
            return (f"a response must begin and end with an assistant message, got roles "
                    f"{[m['role'] for m in side]} after the prompt")
    return prompt, chosen, rejected


def _conversational_triples(spec: DatasetSpec, index: int, table: Table, rows: list[int],
                            tokenizer: Any) -> tuple[list[str], list[str], list[str]]:
    """(prompts, chosen, rejected) texts of conversational rows: the prompt rendered with
    add_generation_prompt=True, each response the rest of its rendered conversation."""
    chosen = conversations(spec, index, table, rows, "chosen_column")
    rejected = conversations(spec, index, table, rows, "rejected_column")
    explicit = spec.prompt_column in table.columns and isinstance(
        table.read_column(spec.prompt_column)[0], list)
    prompt = conversations(spec, index, table, rows, "prompt_column") if explicit else \
        [None] * len(rows)
    out: tuple[list[str], list[str], list[str]] = ([], [], [])
    for r, p, c, j in zip(rows, prompt, chosen, rejected, strict=True):
        parts = split_conversations(p, c, j)
        if isinstance(parts, str):
            raise DataError(f"{where(spec, index)} row {r}, columns {spec.chosen_column!r}/"
                             f"{spec.rejected_column!r}: {parts}; conversational preference "
                             "rows are a prompt (in prompt_column or the messages both sides "
                             "begin with) followed by assistant responses")
        text = render(tokenizer, parts[0], True)
        out[0].append(text)
        for part, response in zip(out[1:], parts[1:], strict=True):
            full = render(tokenizer, parts[0] + response, False)
            if not full.startswith(text):
                raise DataError(f"{where(spec, index)} row {r}: the chat template renders the "
                                 "prompt differently alone than in the conversation, so the "
                                 "response cannot be cut from it")
            part.append(full[len(text):])
    return out


def render(tokenizer: Any, conv: list[dict[str, str]], generation_prompt: bool,
           tools: list[dict] | None = None) -> str:
    if tokenizer.chat_template is None:
        raise DataError(f"chat messages (format 'messages', or 'preference' with message "
                         f"lists) need a tokenizer with a chat template; "
                         f"{tokenizer.name_or_path!r} has none: use another format or set "
                         "tokenizer.chat_template")
    return tokenizer.apply_chat_template(conv, tokenize=False, tools=tools,
                                         add_generation_prompt=generation_prompt)


def prompt_messages(conv: list[dict[str, str]]) -> list[dict[str, str]]:
    """All turns but the last one when that is the assistant's (the turn to generate)."""
    return conv[:-1] if conv[-1]["role"] == "assistant" else conv


def prompts(spec: DatasetSpec, index: int, table: Table, rows: list[int],
            tokenizer: Any, tools: list[dict] | None = None) -> list[str]:
    """The prompt text of each row (rendered with the chat template for `messages`, with
    the JSON schemas of `tools` when given)."""
    fmt = spec.format
    if is_conversational(spec, table):
        return _conversational_triples(spec, index, table, rows, tokenizer)[0]
    if fmt in ("prompt", "prompt_completion", "preference"):
        return text_column(spec, index, table, "prompt_column", rows)
    if fmt == "hh":
        return _hh_rows(spec, index, table, rows)[0]
    if fmt == "messages":
        convs = conversations(spec, index, table, rows)
        return [render(tokenizer, prompt_messages(c), True, tools) for c in convs]
    raise DataError(f"{where(spec, index)}: format {fmt!r} has no prompts; use prompt, "
                     f"prompt_completion, preference, hh or messages (data.datasets[{index}]"
                     ".format)")


def other_columns(spec: DatasetSpec, table: Table) -> list[str]:
    """The columns the prompt is not read from (e.g. a reference answer), for reward
    functions; a completion or chosen column stays (it may be the reference), hh transcripts
    do not (the prompt is cut from them)."""
    read = {"prompt": ["prompt_column"], "prompt_completion": ["prompt_column"],
            "preference": ["prompt_column"], "hh": ["chosen_column", "rejected_column"],
            "messages": ["messages_column"]}.get(spec.format, [])
    used = {getattr(spec, f) for f in read}
    return [c for c in table.columns if c not in used]


def prompt_completions(spec: DatasetSpec, index: int, table: Table, rows: list[int],
                       tokenizer: Any) -> tuple[list[str], list[str]]:
    """(prompts, completions) for SFT: formats prompt_completion, preference and hh (chosen)."""
    fmt = spec.format
    if is_conversational(spec, table):
        return _conversational_triples(spec, index, table, rows, tokenizer)[:2]
    if fmt == "prompt_completion":
        return (text_column(spec, index, table, "prompt_column", rows),
                text_column(spec, index, table, "completion_column", rows))
    if fmt == "preference":
        return (text_column(spec, index, table, "prompt_column", rows),
                text_column(spec, index, table, "chosen_column", rows))
    if fmt == "hh":
        p, c, _ = _hh_rows(spec, index, table, rows)
        return p, c
    raise DataError(f"{where(spec, index)}: format {fmt!r} has no completions for SFT; use "
                     f"prompt_completion, text, messages, preference or hh "
                     f"(data.datasets[{index}].format)")


def preference_triples(spec: DatasetSpec, index: int, table: Table, rows: list[int],
                       tokenizer: Any) -> tuple[list[str], list[str], list[str]]:
    """(prompts, chosen responses, rejected responses); identical responses are an error."""
    fmt = spec.format
    if is_conversational(spec, table):
        out = _conversational_triples(spec, index, table, rows, tokenizer)
    elif fmt == "preference":
        out = (text_column(spec, index, table, "prompt_column", rows),
               text_column(spec, index, table, "chosen_column", rows),
               text_column(spec, index, table, "rejected_column", rows))
    elif fmt == "hh":
        out = _hh_rows(spec, index, table, rows)
    else:
        raise DataError(f"{where(spec, index)}: format {fmt!r} has no chosen/rejected pairs "
                         f"for the reward model; use preference or hh "
                         f"(data.datasets[{index}].format)")
    for r, c, j in zip(rows, out[1], out[2], strict=True):
        if c == j:
            raise DataError(
                f"{where(spec, index)} row {r}: columns {spec.chosen_column!r} and "
                f"{spec.rejected_column!r} hold the same response, which teaches the reward "
                "model nothing; remove such rows from the data")
    return out
