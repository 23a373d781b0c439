"""The model card (README.md) written into every export, so an export can be uploaded to the
Hugging Face Hub as it is (`huggingface-cli upload NAME OUTPUT_DIR/actor`).

YAML front matter the Hub reads (base_model when known, library_name, pipeline_tag, tags),
then what made the model: the base model, the data, the algorithm, the key fields of the
resolved config (the whole config below them), the last logged metrics row and the command.
The trainers call `write` on rank 0 next to their export.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from ds_rlhf.config import (
    DPORunConfig,
    ModelConfig,
    PPORunConfig,
    RMRunConfig,
    SFTRunConfig,
    to_yaml,
)
from ds_rlhf.tracking import read_metrics

# The tag of each ppo.advantage_estimator: the algorithm's usual name on the Hub.
ESTIMATOR_TAGS = {"gae": "ppo", "grpo": "grpo", "dr_grpo": "grpo", "rloo": "rloo",
                  "reinforce_pp": "reinforce-plus-plus",
                  "reinforce_pp_baseline": "reinforce-plus-plus"}


@dataclasses.dataclass
class Kind:
    """What an export is: its Hub tag and pipeline, and a sentence on how it was trained."""

    tag: str
    pipeline: str  # the Hub's pipeline_tag
    algorithm: str


def kind(cfg: Any, role: str) -> Kind:
    if isinstance(cfg, SFTRunConfig):
        return Kind("sft", "text-generation", "supervised fine-tuning (`ds-rlhf sft`): the "
                    "next-token loss on the completion tokens" +
                    (" and the prompt" if cfg.train_on_prompt else ""))
    if isinstance(cfg, RMRunConfig):
        return Kind("reward-model", "text-classification", "a reward model (`ds-rlhf rm`): "
                    "a sequence classifier with one label, scored at the EOS, trained with "
                    "-log sigmoid(r_chosen - r_rejected - margin) on preference pairs")
    if isinstance(cfg, DPORunConfig):
        return Kind("dpo", "text-generation", f"direct preference optimisation (`ds-rlhf dpo`),"
                    f" dpo.loss_type {cfg.dpo.loss_type}, beta {cfg.dpo.beta}")
    estimator = cfg.ppo.advantage_estimator
    if role == "critic":
        return Kind("value-model", "text-classification", "the value model (critic) of a "
                    f"PPO run (`ds-rlhf ppo`, ppo.advantage_estimator {estimator})")
    return Kind(ESTIMATOR_TAGS[estimator], "text-generation", "the policy of an RL run "
                f"(`ds-rlhf ppo`), ppo.advantage_estimator {estimator}")


def key_fields(cfg: Any, role: str) -> dict[str, Any]:
    """The config fields that say most about how the model was trained (dotted names)."""
    names = ["seed", f"{role}.lr", f"{role}.warmup_steps", f"{role}.lora_rank",
             f"{role}.zero_stage", f"{role}.dtype"]
    if isinstance(cfg, PPORunConfig):
        names += ["ppo.steps", "ppo.rollout_batch_size", "ppo.advantage_estimator",
                  "ppo.kl_coef", "ppo.kl_loss_coef", "ppo.clip_eps", "ppo.ppo_epochs",
                  "ppo.num_minibatches", "generation.n_samples_per_prompt",
                  "generation.max_new_tokens", "generation.temperature",
                  "data.max_prompt_len"]
    else:
        names += ["train.batch_size", "train.epochs", "train.max_steps", "data.max_len"]
    if isinstance(cfg, DPORunConfig):
        names += ["dpo.loss_type", "dpo.beta", "dpo.label_smoothing", "dpo.sft_coef"]
    if isinstance(cfg, RMRunConfig):
        names.append("margin")
    values = {}
    for name in names:
        value: Any = cfg
        for part in name.split("."):
            value = getattr(value, part)
        values[name] = value
    return values


def base_model(model: ModelConfig) -> tuple[str, str | None]:
    """(the base model in words, its Hub id when known). A local folder's own card (an
    earlier export: the SFT model a PPO run started from) names its base in turn."""
    if model.path is None:
        return "initialised from config (`model.init`, random weights)", None
    words = f"`{model.path}`" + (f" (GGUF file `{model.gguf_file}`)" if model.gguf_file else "")
    folder = Path(model.path)
    if not folder.is_dir():
        return words, model.path  # a Hub name
    hub = front_matter(folder / "README.md").get("base_model")
    return (words + (f", itself from `{hub}`" if hub else "")), hub


def front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card ({} without one)."""
    if not readme.is_file():
        return {}
    text = readme.read_text()
    if not text.startswith("---\n"):
        return {}
    head = text[4:].split("\n---\n", 1)[0]
    loaded = yaml.safe_load(head)
    return loaded if isinstance(loaded, dict) else {}


def command(argv: list[str]) -> str:
    """The command as a user gives it: `ds-rlhf` and its arguments, without the launcher's
    --local_rank (each rank's sys.argv[0] is the entry point or ds_rlhf/__main__.py)."""
    args = [a for a in argv[1:] if not a.startswith(("--local_rank=", "--local-rank="))]
    return shlex.join(["ds-rlhf", *args])


def render(cfg: Any, role: str, metrics: dict | None, argv: list[str], world_size: int) -> str:
    k = kind(cfg, role)
    words, hub = base_model(getattr(cfg, role).model)
    meta = {**({"base_model": hub} if hub else {}), "library_name": "transformers",
            "pipeline_tag": k.pipeline, "tags": ["ds_rlhf", "rlhf", k.tag]}
    data = [f"- `{d.path}` ({d.format}" + (f", weight {d.weight:g}" if len(cfg.data.datasets) > 1
                                          else "") + ")" for d in cfg.data.datasets]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(cfg.output_dir).name}/{'model' if role in ('model', 'policy') else role}",
             "", f"Trained with ds_rlhf as {k.algorithm}.", "",
             f"- Base model: {words}", "- Data:", *[f"  {line}" for line in data]]
    if isinstance(cfg, PPORunConfig):
        rewards = [f"reward model `{cfg.reward.model.path}`"] if cfg.reward.model.path else []
        rewards += [f"`{r.display_name}` (weight {r.weight:g})" for r in cfg.rewards]
        lines.append(f"- Rewards: {', '.join(rewards) or 'none'}")
    lines += ["", "## Key settings", "", "| field | value |", "|---|---|",
              *[f"| {name} | {value} |" for name, value in key_fields(cfg, role).items()]]
    lines += ["", "## Final metrics", ""]
    if metrics:
        lines += [f"Step {metrics['step']}, the last row of metrics.jsonl:", "",
                  "| metric | value |", "|---|---|",
                  *[f"| {key} | {_number(value)} |" for key, value in metrics.items()
                    if key != "step"]]
    else:
        lines.append("No metrics were logged.")
    lines += ["", "## Command", "", f"On {world_size} rank{'s' if world_size > 1 else ''}:", "",
              "```", command(argv), "```", ""]
    if k.pipeline == "text-generation":
        lines += ["Try it: `ds-rlhf generate --model PATH \"your prompt\"`, or plain "
                  "`AutoModelForCausalLM.from_pretrained(PATH)`.", ""]
    lines += ["<details><summary>The resolved config</summary>", "", "```yaml",
              to_yaml(cfg).strip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write(path: str | Path, cfg: Any, role: str, argv: list[str] | None = None) -> None:
    """Write PATH/README.md for the export of `role` ("model", "policy", "actor", "critic")
    of the run `cfg`; metrics from OUTPUT_DIR/metrics.jsonl. Rank 0 only."""
    metrics_file = Path(cfg.output_dir) / "metrics.jsonl"
    rows = read_metrics(metrics_file) if metrics_file.is_file() else []
    text = render(cfg, role, rows[-1] if rows else None, sys.argv if argv is None else argv,
                  int(os.environ.get("WORLD_SIZE", "1")))
    (Path(path) / "README.md").write_text(text)
