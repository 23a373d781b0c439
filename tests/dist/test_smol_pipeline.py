"""The InstructGPT pipeline on a real pretrained instruct model, SmolLM2-135M-Instruct (the
`smol` fixture's converted copy): SFT on conversations -> a reward model on conversational
preference pairs -> PPO with all four engines, and DPO from the SFT model, on 2 CPU ranks
through the CLI (`deepspeed --module ds_rlhf COMMAND`), one step each on short sequences;
every export loads with plain transformers, and the causal ones generate. (GRPO with the
actor read straight from the package's GGUF, `actor.model.gguf_file`, is the smol demo's
test, tests/e2e/test_demo.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from tests.conftest import run_deepspeed, write_yaml

pytestmark = pytest.mark.dist

QUESTIONS = [(f"What is {a} + {b}?", str(a + b)) for a, b in
             ((2, 3), (4, 4), (7, 1), (5, 6), (3, 3), (8, 1), (2, 7), (6, 2))]


def _export(command: str, output_dir: str, pretrained: str) -> dict:
    """What plain transformers makes of a run's export; `moved`: the largest change of a
    weight of its first layer from the pretrained model."""
    root = Path(output_dir)
    folder = root / ("actor" if command == "ppo" else "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = tokenizer.apply_chat_template(_user("What is 2 + 3?"), add_generation_prompt=True,
                                         return_dict=True, return_tensors="pt")
    record = {"card": (folder / "README.md").is_file(),
              "gguf_mark": "gguf" in (folder / "config.json").read_text().lower()}
    if command == "rm":  # a sequence classifier: it scores text
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        with torch.no_grad():
            record["score"] = float(model(**chat).logits.reshape(-1)[0])
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            ids = model.generate(**chat, max_new_tokens=6, do_sample=False)
        record["answer"] = tokenizer.decode(ids[0, chat["input_ids"].shape[1]:])
        record["tied"] = (model.lm_head.weight.data_ptr()
                          == model.get_input_embeddings().weight.data_ptr())
    start = AutoModelForCausalLM.from_pretrained(pretrained)
    record["moved"] = float((model.base_model.layers[0].mlp.up_proj.weight
                             - start.model.layers[0].mlp.up_proj.weight).abs().max())
    return record


def _engine(path: str, **extra) -> dict:
    return {"model": {"path": path}, "zero_stage": 2, "micro_batch_size": 2, "lr": 1e-6,
            **extra}


def _user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def pipeline(smol, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol_pipeline")
    rows = {
        "sft.jsonl": [{"messages": _user(q) + [{"role": "assistant", "content": a}]}
                      for q, a in QUESTIONS],
        "prefs.jsonl": [{"chosen": _user(q) + [{"role": "assistant", "content": a}],
                         "rejected": _user(q) + [{"role": "assistant", "content": "I don't know"}]}
                        for q, a in QUESTIONS],
        "prompts.jsonl": [{"messages": _user(q)} for q, _ in QUESTIONS],
    }
    for name, lines in rows.items():
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = {"max_prompt_len": 64, "max_len": 80, "eval_fraction": 0.0}
    train = {"max_steps": 1, "batch_size": 4, "log_every": 1}
    out = {k: str(tmp / k) for k in ("sft", "rm", "ppo", "dpo")}
    sft_model, rm_model = f"{out['sft']}/model", f"{out['rm']}/model"

    def ds(name: str, fmt: str) -> dict:
        return {**data, "datasets": [{"path": str(tmp / name), "format": fmt}]}

    rl = {"generation": {"max_new_tokens": 6, "batch_size": 2},
          "ppo": {"steps": 1, "rollout_batch_size": 4, "num_minibatches": 1}}
    configs = [
        ("sft", {"output_dir": out["sft"], "model": _engine(smol["path"]),
                 "data": ds("sft.jsonl", "messages"), "train": train}),
        ("rm", {"output_dir": out["rm"], "model": _engine(sft_model),
                "data": ds("prefs.jsonl", "preference"), "train": train}),
        # ZeRO-2 for the trained engines, 0 for the frozen (ZeRO-3 gathers each of 30 layers'
        # weights at every forward, slow on CPU; tests/unit/test_smol.py runs it at ZeRO-3)
        ("ppo", {"output_dir": out["ppo"], "actor": _engine(sft_model),
                 "critic": _engine(rm_model),
                 "ref": {"zero_stage": 0, "micro_batch_size": 2},
                 "reward": {"model": {"path": rm_model}, "zero_stage": 0,
                            "micro_batch_size": 2},
                 "data": ds("prompts.jsonl", "messages"), **rl}),
        ("dpo", {"output_dir": out["dpo"], "policy": _engine(sft_model),
                 "ref": {"zero_stage": 0, "micro_batch_size": 2},
                 "data": ds("prefs.jsonl", "preference"), "train": train}),
    ]
    for i, (command, cfg) in enumerate(configs):  # as a user runs them, one after another
        path = write_yaml(cfg, tmp / f"{i}_{command}.yaml")
        proc = run_deepspeed(2, ["ds_rlhf", command, "--config", str(path)], timeout=600)
        assert proc.returncode == 0, (command, proc.stdout[-4000:] + proc.stderr[-4000:])
    return {f"{command}:{Path(cfg['output_dir']).name}": _export(command, cfg["output_dir"],
                                                                   smol["path"])
            for command, cfg in configs}


def test_every_step_of_the_pipeline_exports_a_model_transformers_loads(pipeline):
    assert sorted(pipeline) == ["dpo:dpo", "ppo:ppo", "rm:rm", "sft:sft"]
    for name, record in pipeline.items():
        assert record["card"], name  # the model card beside the weights
        assert not record["gguf_mark"], name  # an ordinary HF checkpoint
        # every run moved the pretrained weights, and little (lr 1e-6, Adam: about lr a step)
        assert 0 < record["moved"] < 1e-4, name
        if name == "rm:rm":
            assert math.isfinite(record["score"])
        else:
            assert record["answer"].strip(), name  # it writes something
            assert record["tied"], name  # the tied embedding is still one tensor
