"""Build the four RLHF models from HF checkpoints or from config dicts (random weights).

- actor / reference: any `AutoModelForCausalLM`.
- critic / reward: `ScalarHeadModel`, a wrapper around `AutoModelForSequenceClassification`
  with `num_labels=1`, read per token (critic values) or at the last real token (reward score).
  Any reward checkpoint trained as a sequence classifier loads as is; a causal-LM checkpoint
  (the SFT model) loads its backbone and gets a fresh head.

A role with `model.gguf_file` (a GGUF checkpoint inside `model.path`) is built from the
GGUF's config and its de-quantized weights are loaded into it: transformers' own GGUF-loaded
model is marked quantized and refuses save_pretrained, this one is a normal model whose
exports are plain HF checkpoints. `convert_gguf` writes such a copy once.

Dropout is switched off everywhere: PPO's ratio must be exactly 1 before the first update.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path

import torch
import transformers
from torch import nn

from ds_rlhf.config import ConfigError, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _no_dropout(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    # Names vary by family (dropout, attention_dropout, hidden_dropout_prob, resid_pdrop...).
    for key, value in config.to_dict().items():
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def disable_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # HF's messages span lines; ours are one line


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, gguf_file: str) -> transformers.PretrainedConfig:
    # Reading a GGUF's metadata takes seconds, and a run asks for a role's config several times.
    return transformers.AutoConfig.from_pretrained(path, gguf_file=gguf_file)


def hf_config(model_cfg: ModelConfig, role: str, **overrides) -> transformers.PretrainedConfig:
    """The HF config of a role, from its checkpoint or from `model.init`, dropout off."""
    if model_cfg.gguf_file is not None:
        config = copy.deepcopy(_gguf_config(model_cfg.path, model_cfg.gguf_file))
        for key, value in overrides.items():
            setattr(config, key, value)
    elif model_cfg.path is not None:
        try:
            config = transformers.AutoConfig.from_pretrained(model_cfg.path, **overrides)
        except (OSError, ValueError) as e:  # unreadable config.json, unknown model_type...
            raise ConfigError(f"{role}.model.path: cannot read the model config of "
                              f"{model_cfg.path!r}: {_one_line(e)}") from None
    else:
        init = dict(model_cfg.init or {})
        if "model_type" not in init:
            raise ConfigError(f"{role}.model.init: needs a model_type (e.g. llama, gpt2)")
        config = transformers.AutoConfig.for_model(init.pop("model_type"), **init, **overrides)
    return _no_dropout(config)


def load_tokenizer(model_cfg: ModelConfig, role: str):
    """The role's tokenizer, with pad == EOS when it has no pad token (masks never use pad)."""
    source = model_cfg.tokenizer or model_cfg.path
    if source is None:
        raise ConfigError(f"{role}.model.tokenizer: a model built from `init` needs a tokenizer "
                          "path (a directory written by save_pretrained, or a hub name)")
    gguf = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file and not \
        model_cfg.tokenizer else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **gguf)
    except (OSError, ValueError) as e:  # a model directory without tokenizer files...
        field = "tokenizer" if model_cfg.tokenizer else "path"
        raise ConfigError(f"{role}.model.{field}: cannot load a tokenizer from {source!r} "
                          f"({type(e).__name__}: {_one_line(e)}); set {role}.model.tokenizer to a "
                          "directory written by tokenizer.save_pretrained or a hub name") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{role}.model.tokenizer: tokenizer {source!r} has no EOS token, so "
                          "responses could never end; use a tokenizer with an eos_token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(actor_tok, other_tok, role: str, actor: str = "actor") -> None:
    """Scores, values and reference logprobs are read from the actor's (the policy's) token
    ids, so the vocabularies must agree; `actor` names that role in the error."""
    a, b = actor_tok.get_vocab(), other_tok.get_vocab()
    if a == b and actor_tok.eos_token_id == other_tok.eos_token_id:
        return
    diff = sorted(set(a.items()) ^ set(b.items()))[:3]
    raise ConfigError(
        f"{role}.model: its tokenizer differs from the {actor}'s (vocab sizes {len(a)} vs "
        f"{len(b)}, eos ids {actor_tok.eos_token_id} vs {other_tok.eos_token_id}, e.g. {diff}); "
        f"it must read the {actor}'s token ids: use a model with the {actor}'s tokenizer")


def build_causal_lm(model_cfg: ModelConfig, role: str, dtype: str, seed: int) -> nn.Module:
    config = hf_config(model_cfg, role)
    torch.manual_seed(seed)  # same seed, same init: actor and reference start equal
    if model_cfg.path is not None and model_cfg.gguf_file is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_cfg.path, config=config, dtype=DTYPES[dtype])
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        _load_gguf(model, model_cfg, role)
    return disable_dropout(model)


def _load_gguf(model: nn.Module, model_cfg: ModelConfig, role: str) -> None:
    """Load the de-quantized GGUF weights (a causal LM's) into `model`, a causal LM or a
    sequence classifier whose fresh `score` head the GGUF lacks; no-op without gguf_file."""
    if model_cfg.gguf_file is None:
        return
    gguf_lm = transformers.AutoModelForCausalLM.from_pretrained(
        model_cfg.path, gguf_file=model_cfg.gguf_file)
    missing, _ = model.load_state_dict(gguf_lm.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith("score.")]
    if missing:
        raise ConfigError(f"{role}.model.gguf_file: {model_cfg.gguf_file!r} lacks {len(missing)} "
                          f"weights of {type(model).__name__} (e.g. {missing[:3]}); use a GGUF "
                          "of a decoder model family that transformers converts")


def convert_gguf(path: str | Path, gguf_file: str, out_dir: str | Path) -> Path:
    """Write the GGUF checkpoint `path/gguf_file` as a normal HF checkpoint (float32
    safetensors, config and tokenizer) in `out_dir`, to use as a role's `model.path`.

    Written into a temporary sibling and renamed, so a reader never sees half a checkpoint;
    when another process got there first, its copy is kept.
    """
    out = Path(out_dir)
    cfg = ModelConfig(path=str(path), gguf_file=gguf_file)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    build_causal_lm(cfg, "model", "fp32", seed=0).save_pretrained(tmp)
    load_tokenizer(cfg, "model").save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # out exists: written meanwhile by another process
        shutil.rmtree(tmp)
    return out


class ScalarHeadModel(nn.Module):
    """A causal-LM backbone with a linear head giving one scalar per token.

    Holds an `AutoModelForSequenceClassification(num_labels=1)` so that reward checkpoints of
    that class load as they are, and `save_pretrained` writes one back. We bypass its pooled
    forward (which finds the last token through `pad_token_id`, wrong when pad == EOS) and
    apply the head to every hidden state.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if not hasattr(hf_model, "score"):
            raise ConfigError(f"{type(hf_model).__name__} has no `score` head; use a decoder "
                              "model family whose ForSequenceClassification class has one")
        self.hf_model = hf_model
        self.config = hf_model.config

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:  # -> [B, T]
        backbone = getattr(self.hf_model, self.hf_model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False).last_hidden_state
        return self.hf_model.score(hidden).squeeze(-1).float()

    def save_pretrained(self, path: str) -> None:
        self.hf_model.save_pretrained(path)


def build_scalar_model(model_cfg: ModelConfig, role: str, dtype: str, seed: int,
                       pad_token_id: int) -> ScalarHeadModel:
    config = hf_config(model_cfg, role, num_labels=1)
    config.pad_token_id = pad_token_id  # HF requires one; we never use it to find tokens
    torch.manual_seed(seed)
    cls = transformers.AutoModelForSequenceClassification
    if model_cfg.path is not None and model_cfg.gguf_file is None:
        model = cls.from_pretrained(model_cfg.path, config=config, dtype=DTYPES[dtype])
    else:
        model = cls.from_config(config, dtype=DTYPES[dtype])
        _load_gguf(model, model_cfg, role)
    return ScalarHeadModel(disable_dropout(model))


def sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask):
    """Concatenate left-padded prompts and right-padded responses for one forward pass.

    Returns input_ids, attention_mask and position_ids ([B, P+R]); positions count real tokens
    only, so a prompt gets the same positions whatever its left padding.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids
