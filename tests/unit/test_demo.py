"""The demo task: gold score by hand, deterministic data files, tokenizer round-trip."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from ds_rlhf.demo import VOCAB, build_tokenizer, gold_score, tiny_model_config
from ds_rlhf.demo.make_data import MIN_GOLD_GAP, main, make_rows
from ds_rlhf.demo.task import NEGATIVE, NEUTRAL, POSITIVE


def test_gold_score_by_hand():
    # great, good = positive; bad = negative; camera, it = neutral
    assert gold_score("great good bad camera") == pytest.approx((2 - 1) / 4)  # 0.25
    assert gold_score("bad poor it") == pytest.approx((0 - 2) / 3)  # -0.667
    assert gold_score("great") == 1.0
    assert gold_score("camera it") == 0.0
    assert gold_score("") == 0.0
    assert gold_score("  ") == 0.0
    assert gold_score("great <eos> <eos>") == 1.0  # special tokens are not words
    assert gold_score("great zebra") == 0.5  # unknown words count as neutral


def test_word_lists():
    assert len(POSITIVE) == len(NEGATIVE) == 20 and len(NEUTRAL) == 42
    assert not (set(POSITIVE) & set(NEGATIVE)) and not (set(NEUTRAL) & set(POSITIVE + NEGATIVE))
    assert len(VOCAB) < 200 and VOCAB["<eos>"] == 0


@pytest.fixture(scope="module")
def rows():
    return make_rows(seed=0)


def test_make_data_is_deterministic(tmp_path, rows):
    main([str(tmp_path / "a"), "--seed", "3"])
    main([str(tmp_path / "b"), "--seed", "3"])
    for name in ("sft.jsonl", "prefs.jsonl", "prompts.jsonl", "eval_prompts.jsonl",
                 "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    first = json.loads((tmp_path / "a" / "prefs.jsonl").read_text().splitlines()[0])
    assert first == make_rows(seed=3)["prefs.jsonl"][0]
    assert make_rows(seed=0) == rows
    assert make_rows(seed=1)["sft.jsonl"] != rows["sft.jsonl"]


def test_sizes_and_lengths(rows):
    assert [len(rows[n]) for n in ("sft.jsonl", "prefs.jsonl", "prompts.jsonl",
                                   "eval_prompts.jsonl")] == [4000, 4000, 1000, 64]
    tok = build_tokenizer()
    prompts = {r["prompt"] for name in rows for r in rows[name]}
    assert max(len(tok(p)["input_ids"]) for p in prompts) <= 8
    for r in rows["sft.jsonl"]:
        assert 8 <= len(r["completion"].split()) <= 16
    assert all(VOCAB.get(w) not in (None, 1) for p in prompts for w in p.split())  # no <unk>


def test_sft_is_balanced(rows):
    golds = [gold_score(r["completion"]) for r in rows["sft.jsonl"]]
    assert abs(sum(golds) / len(golds)) < 0.02
    assert min(golds) < -0.4 and max(golds) > 0.4  # both moods are well represented


def test_pairs_prefer_higher_gold(rows):
    for r in rows["prefs.jsonl"]:
        assert r["chosen"] != r["rejected"]
        assert gold_score(r["chosen"]) >= gold_score(r["rejected"]) + MIN_GOLD_GAP - 1e-9


def test_eval_prompts_are_held_out(rows):
    held = {r["prompt"] for r in rows["eval_prompts.jsonl"]}
    assert len(held) == 64
    for name in ("sft.jsonl", "prefs.jsonl", "prompts.jsonl"):
        assert not held & {r["prompt"] for r in rows[name]}


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    assert tok.eos_token == tok.pad_token == "<eos>" and tok.eos_token_id == 0
    text = "review of the camera : great camera <eos>"
    assert tok(text)["input_ids"] == [104, 105, 106, 84, 110, 3, 84, 0]
    assert tok("zebra")["input_ids"] == [VOCAB["<unk>"]]
    conv = [{"role": "user", "content": "review of the camera"},
            {"role": "assistant", "content": "great"}]
    assert tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True) == (
        "user : review of the camera assistant : ")

    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.get_vocab() == tok.get_vocab() == VOCAB
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<eos>", "<eos>", "<unk>")
    assert loaded.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(
        conv, tokenize=False) == "user : review of the camera assistant : great <eos> "
    assert loaded.decode([3, 84, 0], skip_special_tokens=True) == "great camera"


def test_tiny_model_config_builds_a_llama():
    import transformers

    cfg = transformers.AutoConfig.for_model(**tiny_model_config(len(VOCAB)))
    assert cfg.model_type == "llama" and cfg.vocab_size == len(VOCAB)
    assert cfg.eos_token_id == cfg.pad_token_id == VOCAB["<eos>"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings) == (64, 2, 64)


def test_largest_task_rule_data_and_tokenizer(tmp_path):
    from ds_rlhf.demo import largest

    assert largest.answer_of("largest of 3 9 4 1 :") == "9"
    # exact match, spaces aside: right, right with spaces, wrong digit, two digits, empty
    assert largest.reward(["p"] * 5, ["9", " 9 ", "4", "9 9", ""], ["9"] * 5) == [
        1.0, 1.0, 0.0, 0.0, 0.0]
    rows = largest.make_rows(seed=0)
    assert rows == largest.make_rows(seed=0) and rows != largest.make_rows(seed=1)
    held_out = {r["prompt"] for r in rows["eval_prompts.jsonl"]}
    seen = {r["prompt"] for name in ("sft.jsonl", "prompts.jsonl") for r in rows[name]}
    assert len(held_out) == largest.NUM_EVAL and not held_out & seen
    for r in rows["prompts.jsonl"] + rows["eval_prompts.jsonl"]:
        assert r["answer"] == largest.answer_of(r["prompt"])
    # imperfect demonstrations: 0.35 + 0.40 / 4 + 0.25 / 4 = 0.51 of them are right
    right = [r["completion"].strip() == largest.answer_of(r["prompt"]) for r in rows["sft.jsonl"]]
    assert abs(sum(right) / len(right) - 0.5125) < 0.03
    largest.write(tmp_path, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = tokenizer("largest of 3 9 4 1 :")["input_ids"]
    assert len(ids) == 7 and tokenizer.unk_token_id not in ids
    assert len(tokenizer) == len(largest.VOCAB) == 15  # ds_rlhf/demo/largest_sft.yaml's vocab
    assert tokenizer.decode(tokenizer(" 9")["input_ids"] + [tokenizer.eos_token_id],
                            skip_special_tokens=True) == "9"


def test_calculator_task_data_tool_and_tokenizer(tmp_path):
    """The tool-use demo: held-out pairs, imperfect demonstrations, a tool call that survives
    decode for the hermes parser, and the chat template's SFT rows match the episodes."""
    from ds_rlhf.demo import calculator
    from ds_rlhf.episodes import ToolCall, hermes_parser, render_delta

    assert calculator.add(37, 45) == "82"
    assert calculator.reward(["p"] * 3, ["82", " 82 ", "37"], ["82"] * 3) == [1.0, 1.0, 0.0]
    rows = calculator.make_rows(seed=0)
    assert rows == calculator.make_rows(seed=0)
    question = {r["messages"][0]["content"] for name in ("sft.jsonl", "prompts.jsonl")
                for r in rows[name]}
    held_out = {r["messages"][0]["content"] for r in rows["eval_prompts.jsonl"]}
    assert len(held_out) == calculator.NUM_EVAL and not held_out & question
    uses_tool = [len(r["messages"]) == 4 for r in rows["sft.jsonl"]]
    assert abs(sum(uses_tool) / len(uses_tool) - calculator.SFT_RULES["tool"]) < 0.03
    calculator.write(tmp_path, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    call = tokenizer(calculator.tool_call(37, 45), add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in call and len(call) == 19
    assert hermes_parser(tokenizer.decode(call)) == [ToolCall("add", {"a": 37, "b": 45})]
    # an SFT conversation renders to the tokens an episode is built of
    sft = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is 37 + 45 ?"},
         {"role": "assistant", "content": calculator.tool_call(37, 45)},
         {"role": "tool", "content": "82"}, {"role": "assistant", "content": "82"}],
        tokenize=False)
    episode = (tokenizer.apply_chat_template([{"role": "user", "content": "what is 37 + 45 ?"}],
                                             tokenize=False, add_generation_prompt=True)
               + calculator.tool_call(37, 45) + " <eos> "
               + render_delta(tokenizer, [{"role": "tool", "name": "add", "content": "82"}])
               + "82 <eos> ")
    assert tokenizer(sft)["input_ids"] == tokenizer(episode)["input_ids"]
    assert len(tokenizer) == 220  # ds_rlhf/demo/tools_sft.yaml's vocab_size
