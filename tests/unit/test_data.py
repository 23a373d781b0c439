"""ds_rlhf.data on small local files shaped like popular hub datasets, with the demo tokenizer.

Demo token ids used below (ds_rlhf/demo/task.py VOCAB): <eos>=0 (also pad), good=2, great=3,
bad=22, poor=23, it=42, is=43, camera=84, phone=85, review=104, of=105, the=106, ":"=110,
user=112, assistant=113, Human=114, Assistant=115. The whitespace pre-tokenizer splits
"Human:" into Human, ":" and drops whitespace and newlines.
"""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from ds_rlhf.config import (
    ConfigError,
    DataConfig,
    DatasetSpec,
    PPORunConfig,
    check_values,
    load_config,
)
from ds_rlhf.data import (
    collate_left,
    collate_right,
    load_preferences,
    load_prompts,
    load_sft,
    prepare_tokenizer,
    split_state,
)
from ds_rlhf.data.sources import ChangedDataError, check_resumed_split, mix
from ds_rlhf.demo import VOCAB, build_tokenizer

EOS = 0
HH_PROMPT = [114, 110, 104, 105, 106, 84, 115, 110]  # Human : review of the camera Assistant :


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_for(*specs, **kw) -> DataConfig:
    return DataConfig(datasets=list(specs), **kw)


def test_vocab_ids_used_here():
    # the literal ids in this file come from the demo vocabulary; pin them
    words = {"<eos>": 0, "good": 2, "great": 3, "bad": 22, "poor": 23, "it": 42, "is": 43,
             "camera": 84, "phone": 85, "review": 104, "of": 105, "the": 106, ":": 110,
             "user": 112, "assistant": 113, "Human": 114, "Assistant": 115}
    assert {w: VOCAB[w] for w in words} == words


# ------------------------------------------------------------------------------ formats


def hh_rows():
    # Anthropic/hh-rlhf: full transcripts; row 1 is two turns and the responses share " g"
    return [
        {"chosen": "\n\nHuman: review of the camera\n\nAssistant: great camera",
         "rejected": "\n\nHuman: review of the camera\n\nAssistant: bad camera"},
        {"chosen": "\n\nHuman: review of the phone\n\nAssistant: good\n\nHuman: is it good"
                   "\n\nAssistant: great phone",
         "rejected": "\n\nHuman: review of the phone\n\nAssistant: good\n\nHuman: is it good"
                     "\n\nAssistant: good phone"},
    ]


def test_hh_transcripts(tmp_path, tok):
    spec = DatasetSpec(path=write_jsonl(tmp_path / "hh.jsonl", hh_rows()), format="hh")
    cfg = cfg_for(spec)
    # row 1: Human : review of the phone Assistant : good Human : is it good Assistant :
    prompt1 = [114, 110, 104, 105, 106, 85, 115, 110, 2, 114, 110, 43, 42, 2, 115, 110]

    pairs = load_preferences(cfg, tok)
    assert pairs.chosen_ids == [HH_PROMPT + [3, 84, EOS], prompt1 + [3, 85, EOS]]
    assert pairs.rejected_ids == [HH_PROMPT + [22, 84, EOS], prompt1 + [2, 85, EOS]]
    assert pairs.prompt_lens == [8, 16]
    assert pairs.num_filtered == 0

    prompts = load_prompts(cfg, tok)
    # the prompt ends at the last "\n\nAssistant:" of the common prefix, not inside " g"
    assert prompts.texts[0] == "\n\nHuman: review of the camera\n\nAssistant:"
    assert prompts.texts[1].endswith("is it good\n\nAssistant:")
    assert prompts.input_ids == [HH_PROMPT, prompt1]

    sft = load_sft(cfg, tok)  # chosen is the completion
    assert sft.input_ids[0] == HH_PROMPT + [3, 84, EOS]
    assert sft.loss_mask[0] == [0] * 8 + [1, 1, 1]


def test_rm_static_parquet(tmp_path, tok):
    # Dahoas/rm-static: prompt / response / chosen / rejected
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rm_static.parquet"
    pq.write_table(pa.table({
        "prompt": ["\n\nHuman: review of the camera\n\nAssistant:"],
        "response": [" good camera"], "chosen": [" great camera"], "rejected": [" poor camera"],
    }), path)
    pairs = load_preferences(cfg_for(DatasetSpec(path=str(path), format="preference")), tok)
    assert pairs.chosen_ids == [HH_PROMPT + [3, 84, EOS]]
    assert pairs.rejected_ids == [HH_PROMPT + [23, 84, EOS]]
    assert pairs.prompt_lens == [8]

    spec = DatasetSpec(path=str(path), format="prompt_completion", completion_column="response")
    sft = load_sft(cfg_for(spec), tok)
    assert sft.input_ids == [HH_PROMPT + [2, 84, EOS]]
    assert sft.loss_mask == [[0] * 8 + [1, 1, 1]]


def test_messages(tmp_path, tok):
    convs = [
        [{"role": "user", "content": "review of the camera"},
         {"role": "assistant", "content": "great camera"}],
        [{"role": "user", "content": "review of the camera"},
         {"role": "assistant", "content": "good"},
         {"role": "user", "content": "is it good"},
         {"role": "assistant", "content": "great"}],
    ]
    spec = DatasetSpec(path=write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs]),
                       format="messages")
    sft = load_sft(cfg_for(spec), tok)
    # "user : review of the camera assistant : great camera <eos> " -- the template's own
    # <eos> ends the assistant turn, so no second EOS is appended
    user = [112, 110, 104, 105, 106, 84]
    gen = [113, 110]  # the generation prompt "assistant :"
    assert sft.input_ids[0] == user + gen + [3, 84, EOS]
    assert sft.loss_mask[0] == [0] * 8 + [1, 1, 1]
    # two assistant turns are trained, the user turn between them is not
    second_user = [112, 110, 43, 42, 2]  # user : is it good
    assert sft.input_ids[1] == user + gen + [2, EOS] + second_user + gen + [3, EOS]
    assert sft.loss_mask[1] == [0] * 8 + [1, 1] + [0] * 7 + [1, 1]

    prompts = load_prompts(cfg_for(spec), tok)  # all but the last assistant turn
    assert prompts.input_ids == [user + gen, user + gen + [2, EOS] + second_user + gen]
    assert prompts.texts[0] == "user : review of the camera assistant : "


def test_messages_appends_eos_when_the_template_has_none(tmp_path, tok):
    tok2 = build_tokenizer()
    tok2.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                          "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
    conv = [{"role": "user", "content": "review of the camera"},
            {"role": "assistant", "content": "great camera"}]
    spec = DatasetSpec(path=write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}]),
                       format="messages")
    sft = load_sft(cfg_for(spec), tok2)
    assert sft.input_ids == [[112, 110, 104, 105, 106, 84, 113, 110, 3, 84, EOS]]
    assert sft.loss_mask == [[0] * 8 + [1, 1, 1]]


def test_csv_prompt_completion_truncation_and_train_on_prompt(tmp_path, tok):
    path = tmp_path / "sft.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerow(["review of the phone :", " good phone"])
    spec = DatasetSpec(path=str(path), format="prompt_completion")
    sft = load_sft(cfg_for(spec), tok)
    assert sft.input_ids == [[104, 105, 106, 85, 110, 2, 85, EOS]]
    assert sft.loss_mask == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert load_sft(cfg_for(spec), tok, train_on_prompt=True).loss_mask == [[1] * 8]

    cut = load_sft(cfg_for(spec, max_prompt_len=5, max_len=6), tok)  # cut at the end
    assert cut.input_ids == [[104, 105, 106, 85, 110, 2]]
    assert cut.loss_mask == [[0, 0, 0, 0, 0, 1]]
    assert cut.num_truncated == 1

    prompts = load_prompts(cfg_for(spec), tok)
    assert prompts.input_ids == [[104, 105, 106, 85, 110]]


def test_text_format_trains_every_token(tmp_path, tok):
    spec = DatasetSpec(path=write_jsonl(tmp_path / "t.jsonl", [{"text": "great camera"}]),
                       format="text")
    sft = load_sft(cfg_for(spec), tok)
    assert sft.input_ids == [[3, 84, EOS]] and sft.loss_mask == [[1, 1, 1]]
    with pytest.raises(ValueError, match="format 'text' has no prompts"):
        load_prompts(cfg_for(spec), tok)


def test_save_to_disk_dataset_dict_with_eval_split(tmp_path, tok):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["review of the camera :"] * 3}),
        "test": datasets.Dataset.from_dict({"prompt": ["review of the phone :"]}),
    }).save_to_disk(str(tmp_path / "saved"))
    cfg = cfg_for(DatasetSpec(path=str(tmp_path / "saved"), eval_split="test"), eval_fraction=0.5)
    assert load_prompts(cfg, tok, "train").input_ids == [[104, 105, 106, 84, 110]] * 3
    assert load_prompts(cfg, tok, "eval").input_ids == [[104, 105, 106, 85, 110]]

    missing = cfg_for(DatasetSpec(path=str(tmp_path / "saved"), split="validation"))
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_prompts(missing, tok)


def test_hub_style_directory_goes_through_load_dataset(tmp_path, tok, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", [{"prompt": "review of the camera :"}])
    write_jsonl(tmp_path / "repo" / "test.jsonl", [{"prompt": "review of the phone :"}])
    cfg = cfg_for(DatasetSpec(path=str(tmp_path / "repo"), eval_split="test"))
    assert load_prompts(cfg, tok, "eval").input_ids == [[104, 105, 106, 85, 110]]


# ------------------------------------------------------------------------------ collation


def test_collate_left_masks_from_lengths_with_pad_equal_eos():
    # row 0 ends with a real EOS (id 0 == pad): the mask must still count it
    ids, mask = collate_left([[5, EOS], [7]], pad_id=EOS)
    assert ids.tolist() == [[5, EOS], [EOS, 7]]
    assert mask.tolist() == [[1, 1], [0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_collate_right_with_extra():
    ids, mask, loss_mask = collate_right([[5, EOS], [7]], EOS, extra=[[0, 1], [1]])
    assert ids.tolist() == [[5, EOS], [7, EOS]]
    assert mask.tolist() == [[1, 1], [1, 0]]
    assert loss_mask.tolist() == [[0, 1], [1, 0]]
    assert len(collate_right([[1], [2, 3]], EOS)) == 2
    with pytest.raises(ValueError, match="as long as its row"):
        collate_right([[1, 2]], EOS, extra=[[1]])
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        collate_left([[1]], None)


# ------------------------------------------------------------------------------ lengths


def test_overlong_prompts_error_and_filter(tmp_path, tok):
    rows = [{"prompt": "review of the camera :"},  # 5 tokens
            {"prompt": "review of the camera : great great great great"},  # 9 tokens
            {"prompt": "review of the phone"}]  # 4 tokens
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError) as e:
        load_prompts(cfg_for(DatasetSpec(path=path), max_prompt_len=5), tok)
    msg = str(e.value)
    for part in (path, "row 1", "9 tokens", "data.max_prompt_len=5", "1 of 3",
                 "data.overlong_prompts: filter"):
        assert part in msg

    kept = load_prompts(cfg_for(DatasetSpec(path=path), max_prompt_len=5,
                                overlong_prompts="filter"), tok)
    assert kept.input_ids == [[104, 105, 106, 84, 110], [104, 105, 106, 85]]
    assert kept.num_filtered == 1


def test_overlong_pairs_are_dropped(tmp_path, tok):
    rows = [{"prompt": "review of the camera :", "chosen": " great", "rejected": " bad"},
            {"prompt": "review of the camera :", "chosen": " great great great",
             "rejected": " bad"}]  # chosen side: 5 + 3 + EOS = 9 tokens
    spec = DatasetSpec(path=write_jsonl(tmp_path / "p.jsonl", rows), format="preference")
    pairs = load_preferences(cfg_for(spec, max_prompt_len=5, max_len=8), tok)
    assert pairs.chosen_ids == [[104, 105, 106, 84, 110, 3, EOS]]
    assert pairs.num_filtered == 1


# ------------------------------------------------------------------------------ mixing, eval


def test_mix_counts_follow_weights():
    a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(30)]
    even = mix([a, b], [1, 1], seed=0)  # 40 rows, 20 each: a twice, a 20-row subset of b
    assert len(even) == 40 and even[:20] == a + a
    assert len(set(even[20:])) == 20 and set(even[20:]) <= set(b)
    skewed = mix([a, b], [3, 1], seed=0)  # 30 of a (three passes), 10 of b
    assert skewed[:30] == a * 3 and len(skewed[30:]) == 10
    assert mix([a, b], [3, 1], seed=0) == skewed  # seeded
    assert mix([a, b], [3, 1], seed=1) != skewed
    assert mix([a], [5.0], seed=0) == a  # one dataset: unchanged
    assert len(mix([a, b], [1, 2], seed=0)) == 40  # 13.33 + 26.67 rounds to 13 + 27
    assert [r[0] for r in mix([a, b], [1, 2], seed=0)].count("a") == 13


def test_mixing_through_load_prompts(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "review of the camera"}] * 10)
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "review of the phone"}] * 30)
    cfg = cfg_for(DatasetSpec(path=a, weight=3.0), DatasetSpec(path=b, weight=1.0))
    texts = load_prompts(cfg, tok).texts
    assert texts.count("review of the camera") == 30 and texts.count("review of the phone") == 10


def test_eval_fraction_is_seeded_and_disjoint(tmp_path, tok):
    words = ["good", "great", "bad", "poor", "it", "is", "camera", "phone", "review", "of"]
    rows = [{"prompt": f"{w} {v}"} for w in words for v in words[:2]]  # 20 distinct prompts
    spec = DatasetSpec(path=write_jsonl(tmp_path / "p.jsonl", rows))
    cfg = cfg_for(spec, eval_fraction=0.25)
    train, held = load_prompts(cfg, tok, "train").texts, load_prompts(cfg, tok, "eval").texts
    assert len(held) == 5 and len(train) == 15
    assert sorted(train + held) == sorted(r["prompt"] for r in rows)
    assert load_prompts(cfg, tok, "eval").texts == held  # same every call (and every rank)
    other = load_prompts(cfg_for(spec, eval_fraction=0.25, seed=1), tok, "eval").texts
    assert other != held
    assert load_prompts(cfg_for(spec), tok, "eval").input_ids == []  # eval_fraction 0: none


def split_rows():
    words = ["good", "great", "bad", "poor", "it", "is", "camera", "phone", "review", "of"]
    return [{"prompt": f"{w} {v} {u}"} for w in words for v in words[:4] for u in words[:2]]


def test_moving_a_dataset_keeps_its_split(tmp_path, tok):
    """The issue's case: the hold-out was seeded with the path, so the same file in another
    folder (demo data inside OUTPUT_DIR, data staged to node-local scratch) split differently.
    The split depends on the seed and the rows: moved, or reordered, the same rows are held
    out; the fingerprint follows the rows in order."""
    rows = split_rows()  # 80 distinct prompts
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "scratch").mkdir(parents=True)
    here, there = (write_jsonl(tmp_path / d / "p.jsonl", rows) for d in ("a", "b/scratch"))
    sets = [{split: load_prompts(cfg_for(DatasetSpec(path=p), eval_fraction=0.25), tok, split)
             for split in ("train", "eval")} for p in (here, there)]
    for split in ("train", "eval"):
        assert sets[0][split].texts == sets[1][split].texts
        assert sets[0][split].fingerprints == sets[1][split].fingerprints
    assert len(sets[0]["eval"].texts) == 20
    reordered = write_jsonl(tmp_path / "r.jsonl", rows[::-1])
    held = load_prompts(cfg_for(DatasetSpec(path=reordered), eval_fraction=0.25), tok, "eval")
    assert sorted(held.texts) == sorted(sets[0]["eval"].texts)  # the same rows held out
    assert held.fingerprints != sets[0]["eval"].fingerprints  # in another order


def test_split_fingerprint_follows_rows_not_formats(tmp_path, tok):
    """One fingerprint per dataset, the same for the rows as JSON Lines, a JSON list or CSV,
    and for a missing value as for null; an edited row, an added row or another seed changes
    it (and only that dataset's)."""
    rows = split_rows()[:20]

    def fps(*paths, **kw):
        cfg = cfg_for(*(DatasetSpec(path=p) for p in paths), eval_fraction=0.25, **kw)
        train, held = (load_prompts(cfg, tok, split).fingerprints for split in ("train", "eval"))
        return list(zip(train, held, strict=True))

    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    as_list = tmp_path / "p.json"
    as_list.write_text(json.dumps([{**r, "note": None} for r in rows]))
    with open(tmp_path / "p.csv", "w", newline="") as f:
        csv.DictWriter(f, ["prompt"]).writeheader()
        csv.DictWriter(f, ["prompt"]).writerows(rows)
    [base] = fps(jsonl)
    assert fps(str(as_list)) == fps(str(tmp_path / "p.csv")) == [base]
    edited = write_jsonl(tmp_path / "e.jsonl", [*rows[:-1], {"prompt": "good good good"}])
    added = write_jsonl(tmp_path / "n.jsonl", [*rows, {"prompt": "good good good"}])
    assert fps(jsonl, edited) == [base, fps(edited)[0]] and fps(edited)[0] != base
    assert fps(added)[0] != base and fps(jsonl, seed=1)[0] != base


def test_a_resume_on_changed_rows_stops_naming_the_dataset(tmp_path, tok, capsys):
    """The checkpoint's fingerprints against this run's: the same rows elsewhere go on; a
    dataset with a row edited stops the resume in one line naming it (not the unchanged one);
    data.allow_changed_data goes on with a warning; an old checkpoint without fingerprints
    resumes with a note."""
    rows = split_rows()[:20]
    (tmp_path / "moved").mkdir()
    a, b = write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", rows[:8])
    moved = write_jsonl(tmp_path / "moved" / "a.jsonl", rows)
    edited = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "it is good"}, *rows[1:]])

    def recorded(*paths, **kw) -> list[dict[str, str]]:
        cfg = cfg_for(*(DatasetSpec(path=p) for p in paths), eval_fraction=0.25, **kw)
        train, held = (load_prompts(cfg, tok, split).fingerprints for split in ("train", "eval"))
        return split_state(train, held)

    state = {"step": 6, "data_split": recorded(a, b)}
    check_resumed_split(cfg_for(DatasetSpec(path=moved), DatasetSpec(path=b)), state,
                        recorded(moved, b), True)
    changed = cfg_for(DatasetSpec(path=edited), DatasetSpec(path=b))
    with pytest.raises(ChangedDataError) as e:
        check_resumed_split(changed, state, recorded(edited, b), True)
    message = str(e.value)
    assert message.startswith(f"dataset {edited!r} (data.datasets[0]) (")
    assert b not in message and "\n" not in message and "step 6" in message
    assert "data.allow_changed_data: true" in message
    with pytest.raises(ChangedDataError, match="datasets has 1 entries, the checkpoint's run "
                                               "had 2"):
        check_resumed_split(changed, state, [{"train": "x"}], True)
    capsys.readouterr()
    check_resumed_split(cfg_for(DatasetSpec(path=edited), DatasetSpec(path=b),
                                allow_changed_data=True), state, recorded(edited, b), True)
    assert "data: warning: dataset" in capsys.readouterr().out
    check_resumed_split(changed, {"step": 6}, recorded(edited, b), True)
    assert "records no fingerprint" in capsys.readouterr().out


# ------------------------------------------------------------------------------ bad input


def test_missing_column_names_dataset_and_column(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "review of the camera"}])
    with pytest.raises(ValueError) as e:
        load_prompts(cfg_for(DatasetSpec(path=path)), tok)
    for part in (path, "'prompt'", "data.datasets[0].prompt_column", "['question']"):
        assert part in str(e.value)


def test_empty_dataset_names_it(tmp_path, tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="has no rows") as e:
        load_prompts(cfg_for(DatasetSpec(path=str(path))), tok)
    assert str(path) in str(e.value) and "data.datasets[0]" in str(e.value)


def test_identical_pair_names_dataset_row_and_columns(tmp_path, tok):
    rows = [{"prompt": "review of the camera :", "chosen": " great", "rejected": " bad"},
            {"prompt": "review of the camera :", "chosen": " great", "rejected": " great"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError) as e:
        load_preferences(cfg_for(DatasetSpec(path=path, format="preference")), tok)
    for part in (path, "row 1", "'chosen'", "'rejected'", "same response"):
        assert part in str(e.value)


def test_non_text_value_and_bad_hh_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "review"}, {"prompt": None}])
    with pytest.raises(ValueError, match=r"row 1, column 'prompt': expected text, got NoneType"):
        load_prompts(cfg_for(DatasetSpec(path=path)), tok)
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "great", "rejected": "bad"}])
    with pytest.raises(ValueError, match=r"row 0, columns 'chosen'/'rejected'.*Assistant"):
        load_preferences(cfg_for(DatasetSpec(path=path, format="hh")), tok)


def test_format_without_pairs_and_unknown_file_type(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "review"}])
    with pytest.raises(ValueError, match="format 'prompt' has no chosen/rejected"):
        load_preferences(cfg_for(DatasetSpec(path=path)), tok)
    with pytest.raises(ValueError, match="file not found"):
        load_prompts(cfg_for(DatasetSpec(path=str(tmp_path / "nope.jsonl"))), tok)
    with pytest.raises(ValueError, match="one split, 'train', not 'test'"):
        load_prompts(cfg_for(DatasetSpec(path=path, split="test")), tok)


# ------------------------------------------------------------------------------ tokenizer, config


def test_prepare_tokenizer(tok):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    t = build_tokenizer()
    t.pad_token = None
    assert t.pad_token_id is None
    assert prepare_tokenizer(t).pad_token_id == t.eos_token_id == EOS

    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(ValueError, match="no EOS token"):
        prepare_tokenizer(bare)


def test_config_data_checks():
    cfg = PPORunConfig()
    for role in ("actor", "critic", "reward"):
        getattr(cfg, role).model.path = "some/model"
    cfg.data = cfg_for(DatasetSpec(path="p.jsonl"))
    check_values(cfg)  # valid
    for data, field in [
        (cfg_for(), "data.datasets"),
        (cfg_for(DatasetSpec(path="")), "data.datasets[0].path"),
        (cfg_for(DatasetSpec(path="p", weight=0)), "data.datasets[0].weight"),
        (cfg_for(DatasetSpec(path="p", eval_split="train")), "data.datasets[0].eval_split"),
        (cfg_for(DatasetSpec(path="p", format="text")), "data.datasets[0].format"),
        (cfg_for(DatasetSpec(path="p"), max_prompt_len=64, max_len=64), "data.max_len"),
        (cfg_for(DatasetSpec(path="p"), eval_fraction=1.0), "data.eval_fraction"),
    ]:
        cfg.data = data
        with pytest.raises(ConfigError, match="^" + re.escape(field) + ":"):
            check_values(cfg)


def test_config_yaml_builds_dataset_specs(tmp_path):
    models = "".join(f"{r}: {{model: {{path: m}}}}\n" for r in ("actor", "critic", "reward"))
    path = tmp_path / "run.yaml"
    path.write_text(
        models + "data:\n  datasets:\n    - {path: a.jsonl, format: hh, weight: 2}\n"
        "    - {path: Dahoas/rm-static, format: preference, completion_column: response}\n"
        "  eval_fraction: 0.1\n")
    data = load_config(path).data
    assert data.datasets[0] == DatasetSpec(path="a.jsonl", format="hh", weight=2.0)
    assert data.datasets[1].completion_column == "response"
    assert data.eval_fraction == 0.1
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].format: 'chat' is not allowed"):
        load_config(path, {"data.datasets": [{"path": "a", "format": "chat"}]})
