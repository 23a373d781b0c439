"""The model card of an export: front matter the Hub reads, base model, data, algorithm, key
settings, the last metrics row and the command."""

from __future__ import annotations

import json

from ds_rlhf import model_card
from ds_rlhf.config import (
    DataConfig,
    DatasetSpec,
    ModelConfig,
    SFTRunConfig,
    TrainEngineConfig,
    load_config,
)
from tests.conftest import ppo_config, write_yaml

ARGV = ["/venv/lib/ds_rlhf/__main__.py", "--local_rank=0", "ppo", "--config", "run.yaml",
        "--ppo.steps", "2", "--actor.lr", "1e-05"]


def test_grpo_actor_card(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = load_config(write_yaml(ppo_config(
        assets, out, ppo={"steps": 2, "rollout_batch_size": 8, "advantage_estimator": "grpo",
             "kl_coef": 0.0},
        generation={"n_samples_per_prompt": 4, "max_new_tokens": 8}), tmp_path / "run.yaml"))
    out.mkdir()
    rows = [{"step": 1, "objective/scores": 0.25}, {"step": 2, "objective/scores": 0.5,
                                                     "objective/kl": 0.0125}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "actor").mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    model_card.write(out / "actor", cfg, "actor", argv=ARGV)

    text = (out / "actor" / "README.md").read_text()
    assert model_card.front_matter(out / "actor" / "README.md") == {
        "library_name": "transformers", "pipeline_tag": "text-generation",
        "tags": ["ds_rlhf", "rlhf", "grpo"]}  # no base_model: random init
    assert "- Base model: initialised from config" in text
    assert f"  - `{assets['prompts']}` (prompt)" in text
    assert "ppo.advantage_estimator grpo" in text
    assert "| ppo.advantage_estimator | grpo |" in text and "| ppo.steps | 2 |" in text
    assert "| generation.n_samples_per_prompt | 4 |" in text
    # the last row of metrics.jsonl, and the command without the launcher's --local_rank
    assert "Step 2, the last row" in text and "| objective/kl | 0.0125 |" in text
    assert "On 2 ranks:\n\n```\nds-rlhf ppo --config run.yaml --ppo.steps 2 --actor.lr 1e-05\n```"\
        in text
    assert "rollout_batch_size: 8" in text  # the whole resolved config, too


def test_base_model_is_the_hub_name_or_the_base_of_an_earlier_export(tmp_path):
    def card(path: str) -> str:
        cfg = SFTRunConfig(output_dir=str(tmp_path / "sft"),
                           model=TrainEngineConfig(model=ModelConfig(path=path)),
                           data=DataConfig(datasets=[DatasetSpec("a.jsonl", format="text"),
                                                     DatasetSpec("b.jsonl", weight=3.0)]))
        return model_card.render(cfg, "model", None, ["ds-rlhf", "sft"], 1)

    hub = card("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "tags:\n- ds_rlhf\n- rlhf\n- sft\n---\n" in hub
    assert "  - `a.jsonl` (text, weight 1)\n  - `b.jsonl` (prompt, weight 3)" in hub
    assert "No metrics were logged." in hub and "On 1 rank:\n\n```\nds-rlhf sft\n```" in hub
    # a local folder: its own card names the base (an SFT export a PPO run starts from)
    export = tmp_path / "sft_model"
    export.mkdir()
    (export / "README.md").write_text(hub)
    local = card(str(export))
    assert model_card.front_matter(export / "README.md")["base_model"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert local.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert f"- Base model: `{export}`, itself from `HuggingFaceTB/SmolLM2-135M-Instruct`" in local
    (export / "README.md").unlink()  # a folder without a card: no base_model to give the Hub
    assert card(str(export)).startswith("---\nlibrary_name: transformers\n")
