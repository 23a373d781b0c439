"""The demo task: short product "reviews" whose gold reward is their sentiment.

A prompt names an item ("review of the red camera :"); a response is 8-16 words drawn from a
tiny vocabulary of positive, negative and neutral words. The gold score of a response is the
share of positive words minus the share of negative words (in [-1, 1]). The SFT data is
sentiment-balanced (mean gold ~ 0), the preference pairs prefer the response with the higher
gold score, so a reward model can learn the sentiment and PPO can push the policy towards
positive reviews: the whole SFT -> RM -> PPO pipeline shows a measurable gain on a laptop CPU.

Everything here is deterministic and local: the tokenizer is built from the word lists below
(no hub download), and `tiny_model_config` gives a random-init llama config for it.
"""

from __future__ import annotations

import random
from typing import Any

EOS = "<eos>"  # also the pad token: pad == EOS on purpose, masks must never rely on pad ids
UNK = "<unk>"
SPECIAL_TOKENS = (EOS, UNK)

POSITIVE = (
    "good great excellent amazing wonderful superb fantastic lovely perfect brilliant "
    "nice solid reliable sturdy impressive pleasant awesome delightful superior outstanding"
).split()
NEGATIVE = (
    "bad poor terrible awful horrible flimsy broken cheap useless disappointing "
    "weak faulty noisy ugly worse worst annoying defective mediocre shoddy"
).split()
NEUTRAL = (
    "it is was and but with this that very quite really so for my its to in on after "
    "before day week month use bought got arrived works came seems looks feels size "
    "color box price battery screen design weight handle button"
).split()
ITEMS = "camera phone laptop blender chair lamp jacket backpack kettle speaker".split()
ADJECTIVES = "red blue black white green small large new old silver".split()
PROMPT_TEMPLATES = (
    "review of the {adj} {item} :",
    "write a review of the {adj} {item} :",
    "a short review of the {adj} {item} :",
)
# Words of the chat template (role names) and of hh-rlhf style transcripts.
FRAME_WORDS = "review of the write a short : system user assistant Human Assistant".split()

# Fixed order, so token ids are stable: <eos>=0, <unk>=1, then the word lists in order.
VOCAB: dict[str, int] = {
    w: i
    for i, w in enumerate(
        dict.fromkeys([*SPECIAL_TOKENS, *POSITIVE, *NEGATIVE, *NEUTRAL, *ITEMS, *ADJECTIVES,
                       *FRAME_WORDS])
    )
}

# "role : content" turns; an assistant turn ends with <eos>, so a multi-turn SFT row also
# learns to end each assistant turn, and the generation prompt is "assistant :".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} "
    "{% if message['role'] == 'assistant' %}" + EOS + " {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)

_POS, _NEG = frozenset(POSITIVE), frozenset(NEGATIVE)
SENTIMENT_SHARE = 0.6  # chance that a response word is a sentiment word
ITEM_SHARE = 0.1  # chance that it is the reviewed item (the rest are neutral words)


def gold_score(text: str) -> float:
    """Share of positive minus share of negative words among the words of a response.

    Special tokens (<eos>, <unk>) are not words; an empty response scores 0.
    """
    words = [w for w in text.split() if w not in SPECIAL_TOKENS]
    if not words:
        return 0.0
    pos = sum(w in _POS for w in words)
    neg = sum(w in _NEG for w in words)
    return (pos - neg) / len(words)


def all_prompts() -> list[tuple[str, str]]:
    """Every (prompt, item) of the task in a fixed order: 3 templates x 10 adjectives x 10 items."""
    return [
        (t.format(adj=a, item=i), i) for t in PROMPT_TEMPLATES for a in ADJECTIVES for i in ITEMS
    ]


def sample_response(rng: random.Random, item: str, sentiment: float) -> str:
    """8-16 words; each sentiment word is positive with probability (1 + sentiment) / 2.

    `sentiment` in [-1, 1] is the hidden mood of the review; the expected gold score is
    SENTIMENT_SHARE * sentiment, so drawing it symmetric around 0 gives balanced data.
    """
    words = []
    for _ in range(rng.randint(8, 16)):
        u = rng.random()
        if u < SENTIMENT_SHARE:
            words.append(rng.choice(POSITIVE if rng.random() < (1 + sentiment) / 2 else NEGATIVE))
        elif u < SENTIMENT_SHARE + ITEM_SHARE:
            words.append(item)
        else:
            words.append(rng.choice(NEUTRAL))
    return " ".join(words)


def build_tokenizer(vocab: dict[str, int] | None = None):
    """A word-level fast tokenizer over `vocab` (default VOCAB; it must start with <eos>,
    <unk>); eos == pad == "<eos>", with a chat template.

    Built locally with the `tokenizers` library, so no hub access is needed; the result
    round-trips through save_pretrained / AutoTokenizer.from_pretrained.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(vocab or VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=UNK,
        model_max_length=64,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_model_config(vocab_size: int) -> dict[str, Any]:
    """HF kwargs of a tiny llama (about 0.1M parameters) for `ModelConfig.init`."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        # the demo tokenizer has no BOS; generation must stop at its <eos> (id 0), not at
        # llama's default eos id 2 (a sentiment word here)
        "bos_token_id": VOCAB[EOS],
        "eos_token_id": VOCAB[EOS],
        "pad_token_id": VOCAB[EOS],
    }
