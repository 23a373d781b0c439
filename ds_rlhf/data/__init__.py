"""Datasets for SFT, the reward model and PPO: loading, formats, tokenisation, collation.

    from ds_rlhf.data import load_prompts, load_sft, load_preferences, collate_left
    prompts = load_prompts(cfg.data, tokenizer, split="train")      # PPO
    sft = load_sft(cfg.data, tokenizer, split="train")              # step 1
    pairs = load_preferences(cfg.data, tokenizer, split="train")    # step 2

Modules: sources.py (files / save_to_disk / hub, eval hold-out, mixing by weight),
formats.py (columns and texts of each row format), loaders.py (tokenisation, length limits,
the three data sets), collate.py (left / right padding with masks from lengths).

Caching: none on disk. Every rank tokenises in memory, which is fast enough for RLHF-sized
data and has nothing to race on or go stale when many ranks on many nodes start together.
"""

from ds_rlhf.data.collate import collate_left, collate_right
from ds_rlhf.data.loaders import (
    PreferenceSet,
    PromptSet,
    SFTSet,
    load_preferences,
    load_prompts,
    load_sft,
    prepare_tokenizer,
)
from ds_rlhf.data.sources import split_state

__all__ = [
    "PreferenceSet", "PromptSet", "SFTSet", "collate_left", "collate_right", "load_preferences",
    "load_prompts", "load_sft", "prepare_tokenizer", "split_state",
]
