"""Padding token lists into batches; masks come from the lengths, never from `ids != pad`.

The pad id may equal the EOS id (see `prepare_tokenizer`), so a real EOS and a pad token can
hold the same id: only the lengths tell them apart.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pad(pad_id: int | None) -> int:
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token; call "
                         "ds_rlhf.data.prepare_tokenizer(tokenizer) first (it pads with EOS)")
    return pad_id


def collate_left(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad prompts for generation: (ids [B, L] long, mask [B, L] long, 1 = real token)."""
    pad_id = _check_pad(pad_id)
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[b, width - len(row):] = 1
    return ids, mask


def collate_right(rows: list[list[int]], pad_id: int, extra: list[list[int]] | None = None
                  ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Right-pad SFT / reward-model rows: (ids [B, L], mask [B, L]) both long.

    With `extra` (per-token lists as long as the rows, e.g. SFT loss masks) a third tensor
    [B, L] holds them right-padded with 0: `ids, mask, loss_mask = collate_right(...)`.
    """
    pad_id = _check_pad(pad_id)
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    if extra is None:
        return ids, mask
    if len(extra) != len(rows) or any(len(e) != len(r) for e, r in zip(extra, rows, strict=True)):
        raise ValueError("extra must hold one list per row, each as long as its row")
    extra_t = torch.zeros((len(rows), width), dtype=torch.long)
    for b, values in enumerate(extra):
        extra_t[b, : len(values)] = torch.tensor(values, dtype=torch.long)
    return ids, mask, extra_t
