"""Bad input through `ds-rlhf` (cli.main, one process): one line naming the field or file,
exit code 2, before any engine is built and before anything in output_dir changes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ds_rlhf.cli import main
from tests.conftest import ppo_config, tiny_init, write_yaml


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """An output_dir holding a previous run's files, which a failed start must not touch."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 1\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


def _snapshot(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _fails(capsys, out: Path, args: list[str], *needles: str) -> str:
    before = _snapshot(out)
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ds-rlhf "), err  # one line
    for needle in needles:
        assert needle in err, err
    assert _snapshot(out) == before
    return err


def _ppo(assets, run_dir, tmp_path, capsys, *needles, extra=(), **sections) -> str:
    cfg = write_yaml(ppo_config(assets, run_dir, **sections), tmp_path / "run.yaml")
    return _fails(capsys, run_dir, ["ppo", "--config", str(cfg), *extra], *needles)


def _model_dir(assets, path: Path, weights: bool = True, config: bool = True) -> str:
    """A tiny llama saved with save_pretrained, then stripped of weights or config."""
    import transformers

    init = dict(tiny_init(assets["vocab_size"]))
    config_obj = transformers.AutoConfig.for_model(init.pop("model_type"), **init)
    transformers.AutoModelForCausalLM.from_config(config_obj).save_pretrained(path)
    if not weights:
        for f in path.glob("*.safetensors"):
            f.unlink()
    if not config:
        (path / "config.json").unlink()
    return str(path)


def test_missing_local_model_directory(assets, run_dir, tmp_path, capsys):
    missing = str(tmp_path / "no" / "such" / "model")
    _ppo(assets, run_dir, tmp_path, capsys, "actor.model.path", missing, "not found",
         actor={"model": {"path": missing}})


def test_reward_directory_without_weights(assets, run_dir, tmp_path, capsys):
    path = _model_dir(assets, tmp_path / "rm", weights=False)
    _ppo(assets, run_dir, tmp_path, capsys, "reward.model.path", "no weights",
         reward={"model": {"path": path}, "zero_stage": 3})


def test_model_directory_without_config(assets, run_dir, tmp_path, capsys):
    path = _model_dir(assets, tmp_path / "critic", config=False)
    _ppo(assets, run_dir, tmp_path, capsys, "critic.model.path", "no config.json",
         critic={"model": {"path": path}})


def test_missing_hub_model_fails_fast_offline(assets, run_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    _ppo(assets, run_dir, tmp_path, capsys, "actor.model.path", "nobody/no-such-model",
         "HF_HUB_OFFLINE", actor={"model": {"path": "nobody/no-such-model"}})
    assert time.perf_counter() - start < 5


def test_missing_hub_model_fails_fast_online(assets, run_dir, tmp_path, capsys, monkeypatch):
    """One request decides (no retries): the hub says no, or (here, no network) is
    unreachable. from_pretrained spends ~25 s on retries before failing."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    _ppo(assets, run_dir, tmp_path, capsys, "reward.model.path", "nobody/no-such-model",
         "not in the local Hugging Face cache", reward={"model": {"path": "nobody/no-such-model"},
                                                        "zero_stage": 3})
    assert time.perf_counter() - start < 15


def test_missing_tokenizer_directory(assets, run_dir, tmp_path, capsys):
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    model = {"init": tiny_init(assets["vocab_size"]), "tokenizer": str(empty)}
    _ppo(assets, run_dir, tmp_path, capsys, "critic.model.tokenizer", "holds no tokenizer",
         critic={"model": model})


def test_model_directory_without_tokenizer_files(assets, run_dir, tmp_path, capsys, monkeypatch):
    """Weights and config are there but no tokenizer: found when the tokenizer loads, still
    before any engine or file."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    path = _model_dir(assets, tmp_path / "policy")
    _ppo(assets, run_dir, tmp_path, capsys, "actor.model.path", "cannot load a tokenizer",
         actor={"model": {"path": path}})


@pytest.mark.parametrize("suffix, content, needles", [
    (".jsonl", '{"prompt": "caf\u00e9 review"}\n'.encode("latin-1"),
     ["not UTF-8", "byte 0xe9 at offset 15 (line 1)", "latin-1"]),
    (".jsonl", bytes(range(256)) * 4, ["not UTF-8", "looks binary"]),
    (".json", '[{"prompt": "hi"}]'.encode("utf-16"), ["not UTF-8", "UTF-16"]),
    (".csv", b"prompt\nok\n\xff\xfe\n", ["not UTF-8", "line 3"]),
    (".parquet", b'{"prompt": "hi"}\n', ["not a parquet file"]),
])
def test_undecodable_dataset_names_file_and_encoding(assets, run_dir, tmp_path, capsys, suffix,
                                                     content, needles):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content)
    _ppo(assets, run_dir, tmp_path, capsys, str(path), "data.datasets[0]", *needles,
         data={"datasets": [{"path": str(path)}]})


def test_missing_dataset_file(assets, run_dir, tmp_path, capsys):
    path = str(tmp_path / "nowhere" / "prompts.txt")
    _ppo(assets, run_dir, tmp_path, capsys, path, "file not found",
         data={"datasets": [{"path": path}]})


def test_malformed_yaml_names_file_line_and_column(run_dir, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"output_dir: {run_dir}\nppo:\n  steps: 3\n  kl_coef: [0.1\n")
    _fails(capsys, run_dir, ["ppo", "--config", str(cfg)], f"{cfg}, line 5, column 1",
           "not valid YAML")


def test_malformed_override_names_flag_and_column(assets, run_dir, tmp_path, capsys):
    _ppo(assets, run_dir, tmp_path, capsys, "--ppo.kl_coef '{0.1'", "column 5",
         "not a valid YAML value", extra=["--ppo.kl_coef", "{0.1"])


def test_kl_coef_zero_with_kl_target(assets, run_dir, tmp_path, capsys):
    _ppo(assets, run_dir, tmp_path, capsys, "ppo.kl_coef", "kl_target",
         ppo={"kl_coef": 0.0, "kl_target": 6.0})


def test_supervised_steps_check_their_paths(assets, run_dir, tmp_path, capsys):
    """sft and rm go through the same checks (the config walk finds model and data)."""
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(json.dumps({"prompt": "x", "chosen": "\u00e9", "rejected": "b"})
                     .encode("utf-8").replace(b"\\u00e9", b"\xe9"))
    model = {"init": tiny_init(assets["vocab_size"]), "tokenizer": assets["tokenizer"]}
    for step, fmt in (("sft", "preference"), ("rm", "preference")):
        cfg = {"output_dir": str(run_dir), "model": {"model": model},
               "data": {"datasets": [{"path": str(path), "format": fmt}]}}
        _fails(capsys, run_dir, [step, "--config", str(write_yaml(cfg, tmp_path / "s.yaml"))],
               str(path), "not UTF-8")
    cfg = {"output_dir": str(run_dir), "model": {"model": {"path": str(tmp_path / "gone")}},
           "data": {"datasets": [{"path": assets["prompts"], "format": "preference"}]}}
    _fails(capsys, run_dir, ["rm", "--config", str(write_yaml(cfg, tmp_path / "r.yaml"))],
           "model.model.path")


def test_good_inputs_pass_the_checks(assets, tmp_path):
    from ds_rlhf.checks import check_inputs
    from ds_rlhf.config import load_config

    path = _model_dir(assets, tmp_path / "model")
    (tmp_path / "p.jsonl").write_text('{"prompt": "caf\u00e9"}\n', encoding="utf-8")
    cfg = ppo_config(assets, tmp_path / "out", data={"datasets": [{"path": str(tmp_path /
                                                                                "p.jsonl")}]})
    cfg["reward"]["model"] = {"path": path, "tokenizer": assets["tokenizer"]}
    check_inputs(load_config(write_yaml(cfg, tmp_path / "ok.yaml")))
