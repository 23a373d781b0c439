"""Conversational preference rows (TRL's format: chosen / rejected message lists, the prompt
explicit or their common prefix) for the reward model and DPO, rendered with the chat
template of a real tokenizer (SmolLM2's: a default system prompt, pad == EOS == <|im_end|>),
and an RM and a DPO run on such a file that learn an easy preference."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from ds_rlhf.cli import main as cli_main
from ds_rlhf.config import DataConfig, DataError, DatasetSpec
from ds_rlhf.data import load_preferences, load_prompts, load_sft
from ds_rlhf.data.formats import split_conversations
from ds_rlhf.tracking import read_metrics
from tests.conftest import free_port, tiny_init, write_yaml

EOS = "<|im_end|>"


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


ROWS = [  # (prompt, chosen response, rejected response)
    ([_user("What is 12 + 7?")], [_bot("12 + 7 = 19.")], [_bot("12 + 7 = 9.")]),
    ([{"role": "system", "content": "Answer in one word."}, _user("Capital of France?")],
     [_bot("Paris")], [_bot("Lyon")]),
    ([_user("Hi!"), _bot("Hello! How can I help?"), _user("Name a colour.")],
     [_bot("Blue.")], [_bot("I cannot.")]),
]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _data(path: str, **extra) -> DataConfig:
    return DataConfig(datasets=[DatasetSpec(path=path, format="preference")], max_len=128,
                      max_prompt_len=96, **extra)


def test_split_conversations_by_hand():
    u, a, b = _user("q"), _bot("yes"), _bot("no")
    assert split_conversations(None, [u, a], [u, b]) == ([u], [a], [b])
    assert split_conversations([u], [a], [b]) == ([u], [a], [b])  # responses only
    assert split_conversations([u], [u, a], [u, b]) == ([u], [a], [b])  # whole conversations
    # Multi-turn: the prompt runs up to the first differing message.
    u2 = _user("again")
    assert split_conversations(None, [u, a, u2, a], [u, a, u2, b]) == ([u, a, u2], [a], [b])
    assert "share no prompt" in split_conversations(None, [a], [b])
    assert "no response of its own" in split_conversations(None, [u, a], [u, a, u2, b])
    assert "assistant" in split_conversations(None, [u, a, u2], [u, b])


def test_rows_render_as_the_tokenizer_renders_them_explicit_or_implicit(smol, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smol["path"])
    explicit = _write(tmp_path / "explicit.jsonl",
                      [{"prompt": p, "chosen": c, "rejected": j} for p, c, j in ROWS])
    # As HuggingFaceH4/ultrafeedback_binarized: whole conversations, a text prompt column.
    implicit = _write(tmp_path / "implicit.jsonl",
                      [{"prompt": p[-1]["content"], "chosen": p + c, "rejected": p + j}
                       for p, c, j in ROWS])
    a = load_preferences(_data(explicit), tokenizer)
    b = load_preferences(_data(implicit), tokenizer)
    assert (a.chosen_ids, a.rejected_ids, a.prompt_lens) == \
        (b.chosen_ids, b.rejected_ids, b.prompt_lens)
    # Training mixes rows: match each back to its source by the prompt text.
    for k in range(len(ROWS)):
        prompt_text = tokenizer.decode(a.chosen_ids[k][: a.prompt_lens[k]])
        p, c, j = next(r for r in ROWS if prompt_text == tokenizer.apply_chat_template(
            r[0], tokenize=False, add_generation_prompt=True))
        assert "<|im_start|>system\n" in prompt_text  # the default one, or the row's own
        for ids, response in ((a.chosen_ids[k], c), (a.rejected_ids[k], j)):
            text = tokenizer.apply_chat_template(p + response, tokenize=False)
            assert text.endswith(EOS + "\n")
            # The row is the rendered conversation up to its last EOS, where the reward is read.
            assert tokenizer.decode(ids) == text[: -len("\n")]
            assert ids == tokenizer.apply_chat_template(p + response, tokenize=True,
                                                        return_dict=False)[:-1]
            assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) \
                == text.count(EOS)
    # The prompts for PPO and the chosen side for SFT come out rendered the same way.
    prompts = load_prompts(_data(implicit), tokenizer)
    assert sorted(prompts.input_ids) == sorted(
        x[:n] for x, n in zip(a.chosen_ids, a.prompt_lens, strict=True))
    sft = load_sft(_data(explicit), tokenizer)
    assert sorted(sft.input_ids) == sorted(a.chosen_ids)


def test_bad_conversational_rows_are_named(smol, tmp_path):
    u = _user("q")
    cases = [
        ([{"chosen": [_bot("a")], "rejected": [_bot("b")]}], "share no prompt"),
        ([{"chosen": [u, _bot("a")], "rejected": [u, _bot("a"), u]}],
         "no response of its own"),
        ([{"chosen": [u, _bot("a"), u], "rejected": [u, _bot("b"), u]}], "assistant message"),
        ([{"chosen": [u, _bot("a")], "rejected": [u, {"role": "assistant"}]}],
         "column 'rejected': expected a non-empty list"),
    ]
    tokenizer = AutoTokenizer.from_pretrained(smol["path"])
    for k, (rows, needle) in enumerate(cases):
        with pytest.raises(DataError, match=needle) as info:
            load_preferences(_data(_write(tmp_path / f"bad{k}.jsonl", rows)), tokenizer)
        assert "row 0" in str(info.value)
    path = _write(tmp_path / "ok.jsonl", [{"chosen": [u, _bot("a")], "rejected": [u, _bot("b")]}])
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        load_preferences(_data(path), tokenizer)


@pytest.fixture
def one_process(monkeypatch):
    """A 1-process world in the environment for in-process runs of `ds-rlhf`."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(key, value)


def test_rm_and_dpo_learn_a_conversational_preference(assets, tmp_path, one_process):
    """The demo task's sentiment pairs (the tests' tokenizer: word-level, with a chat
    template), as whole conversations: a positive review is preferred to a negative one. A
    few dozen steps of a tiny model separate held-out pairs far above chance (0.5)."""
    from ds_rlhf.demo.task import all_prompts, sample_response

    rng = random.Random(0)
    rows = []
    for prompt, item in rng.sample(all_prompts(), 200):
        user = [_user(prompt)]
        rows.append({"chosen": user + [_bot(sample_response(rng, item, 0.9))],
                     "rejected": user + [_bot(sample_response(rng, item, -0.9))]})
    path = _write(tmp_path / "prefs.jsonl", rows)
    model = {"init": {**tiny_init(assets["vocab_size"]), "hidden_size": 64},
             "tokenizer": assets["tokenizer"]}
    data = {"datasets": [{"path": path, "format": "preference"}], "max_prompt_len": 24,
            "max_len": 48, "eval_fraction": 0.2, "seed": 1}
    train = {"epochs": 2, "batch_size": 16, "eval_every": 1000, "log_every": 1000}
    trained = {"model": model, "zero_stage": 0, "micro_batch_size": 16, "lr": 3e-3}
    rm = {"output_dir": str(tmp_path / "rm"), "model": trained, "data": data, "train": train}
    assert cli_main(["rm", "--config", str(write_yaml(rm, tmp_path / "rm.yaml"))]) == 0
    dpo = {"output_dir": str(tmp_path / "dpo"), "policy": trained,
           "ref": {"zero_stage": 0, "micro_batch_size": 16}, "data": data, "train": train,
           "dpo": {"beta": 0.5}}
    assert cli_main(["dpo", "--config", str(write_yaml(dpo, tmp_path / "dpo.yaml"))]) == 0
    rm_eval = [m for m in read_metrics(tmp_path / "rm" / "metrics.jsonl") if "eval/accuracy" in m]
    dpo_eval = [m for m in read_metrics(tmp_path / "dpo" / "metrics.jsonl")
                if "eval/rewards/accuracies" in m]
    # 40 held-out pairs, evaluated at step 0 and after the last step (20).
    assert [m["step"] for m in rm_eval] == [m["step"] for m in dpo_eval] == [0, 20]
    assert rm_eval[0]["eval/accuracy"] < 0.9 <= rm_eval[-1]["eval/accuracy"]
    assert dpo_eval[0]["eval/rewards/accuracies"] < 0.9 <= dpo_eval[-1]["eval/rewards/accuracies"]
