"""A synthetic review-sentiment task for a laptop-sized SFT -> RM -> PPO demo (see task.py)."""

from ds_rlhf.demo.task import (
    EOS,
    VOCAB,
    build_tokenizer,
    gold_score,
    sample_response,
    tiny_model_config,
)

__all__ = ["EOS", "VOCAB", "build_tokenizer", "gold_score", "sample_response",
           "tiny_model_config"]
