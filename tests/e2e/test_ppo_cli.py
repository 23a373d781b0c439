"""PPO through the real entry point, one process: bad input fails early with one clear message;
config switches that must not change results do not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, cpu_env, ppo_config, write_yaml

pytestmark = pytest.mark.e2e


def _ppo(cfg: dict, tmp_path, *extra: str, **env) -> subprocess.CompletedProcess:
    path = write_yaml(cfg, tmp_path / "run.yaml")
    return subprocess.run([sys.executable, "-m", "ds_rlhf", "ppo", "--config", str(path), *extra],
                          cwd=REPO, env=cpu_env(**env), capture_output=True, text=True,
                          timeout=120)


def _fails_with(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "deepspeed.initialize" not in proc.stdout  # nothing heavy was built


def test_reward_tokenizer_differs_from_actor(assets, tmp_path):
    from ds_rlhf.demo.task import build_tokenizer

    other = build_tokenizer()
    other.add_tokens(["zebra"])  # one extra word: ids the actor never produces
    other.save_pretrained(tmp_path / "other_tok")
    cfg = ppo_config(assets, tmp_path / "out")
    cfg["reward"]["model"] = {**cfg["reward"]["model"], "tokenizer": str(tmp_path / "other_tok")}
    _fails_with(_ppo(cfg, tmp_path), "reward.model", "tokenizer differs from the actor's")


def test_prompt_longer_than_limit(assets, tmp_path):
    prompts = tmp_path / "long.jsonl"
    words = " ".join(["good"] * 40)
    prompts.write_text(json.dumps({"prompt": "review of the camera :"}) + "\n" +
                       json.dumps({"prompt": words}) + "\n")
    cfg = ppo_config(assets, tmp_path / "out", data={"datasets": [{"path": str(prompts)}],
                                                     "max_prompt_len": 16})
    _fails_with(_ppo(cfg, tmp_path), str(prompts), "row 1", "data.max_prompt_len",
                "overlong_prompts")


def test_batch_arithmetic_that_does_not_divide(assets, tmp_path):
    cfg = ppo_config(assets, tmp_path / "out", ppo={"rollout_batch_size": 6, "steps": 1})
    # Two ranks as the launcher would declare them: 6 prompts split 3 + 3, but the actor's
    # micro-batch of 2 does not divide a minibatch of 3.
    _fails_with(_ppo(cfg, tmp_path, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"),
                "actor.micro_batch_size", "divides 3")


def test_prompt_plus_response_longer_than_model(assets, tmp_path):
    cfg = ppo_config(assets, tmp_path / "out", generation={"max_new_tokens": 60})
    _fails_with(_ppo(cfg, tmp_path), "max_position_embeddings", "generation.max_new_tokens")


def test_print_config_round_trips(assets, tmp_path):
    cfg = ppo_config(assets, tmp_path / "out")
    proc = _ppo(cfg, tmp_path, "--print-config", "--ppo.kl_coef", "0.3")
    assert proc.returncode == 0, proc.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    from ds_rlhf.config import load_config

    assert load_config(printed).ppo.kl_coef == 0.3
    assert load_config(printed) == load_config(tmp_path / "run.yaml", ["--ppo.kl_coef", "0.3"])


def test_memory_switches_change_memory_not_results(assets, tmp_path):
    """Gradient checkpointing, ZeRO-3, CPU offload of parameters and optimizer states, and a
    kept generation copy with a static KV cache."""
    from ds_rlhf.tracking import read_metrics

    base = ppo_config(assets, tmp_path)
    variants = {
        "plain": {},
        "checkpointing": {"actor": {**base["actor"], "gradient_checkpointing": True},
                          "critic": {**base["critic"], "gradient_checkpointing": True}},
        "offload": {"actor": {**base["actor"], "zero_stage": 3, "offload_params": True,
                              "offload_optimizer": True},
                    "critic": {**base["critic"], "offload_optimizer": True},
                    "ref": {**base["ref"], "offload_params": True}},
        "generation": {"actor": {**base["actor"], "zero_stage": 3},
                       "generation": {**base["generation"], "reuse_copy": True,
                                      "static_cache": True}},
    }
    runs = {}
    for name, sections in variants.items():
        out = tmp_path / name
        proc = _ppo(ppo_config(assets, out, **sections), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = read_metrics(out / "metrics.jsonl")
    for name in ("checkpointing", "offload", "generation"):
        for a, b in zip(runs["plain"], runs[name], strict=True):
            for key in ("objective/scores", "objective/kl", "loss/policy_avg",
                        "loss/value_avg"):
                assert a[key] == pytest.approx(b[key], abs=1e-6), (name, key)


def test_tool_without_schema_fails_before_any_engine(assets, tmp_path):
    (tmp_path / "tools.py").write_text("def lookup(key):\n    return key\n")
    cfg = ppo_config(assets, tmp_path / "out",
                     rollout={"tools": [f"{tmp_path / 'tools.py'}:lookup"],
                              "max_total_tokens": 24})
    _fails_with(_ppo(cfg, tmp_path), "rollout.tools[0]", "no JSON schema", "docstring")


def test_environment_failure_ends_the_run_with_exit_2(assets, tmp_path):
    """An environment whose step() raises mid-episode: exit 2, one message naming the
    environment, the method and the row; no traceback."""
    (tmp_path / "env.py").write_text(
        "class Broken:\n"
        "    def reset(self, row):\n"
        "        return row['prompt']\n"
        "    def step(self, action):\n"
        "        raise ZeroDivisionError('no moves left')\n")
    cfg = ppo_config(assets, tmp_path / "out", ppo={"steps": 1, "rollout_batch_size": 2,
                                                    "advantage_estimator": "reinforce_pp"},
                     rollout={"environment": f"{tmp_path / 'env.py'}:Broken",
                              "max_total_tokens": 24})
    del cfg["critic"], cfg["reward"]
    proc = _ppo(cfg, tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (f"error: environment '{tmp_path / 'env.py'}:Broken' (rollout.environment): step() "
            "raised ZeroDivisionError: no moves left on the row of prompt index") in proc.stderr


def test_resume_false_on_an_output_dir_with_checkpoints_is_refused(assets, tmp_path):
    """A new run (checkpoint.resume: false) in a directory holding another run's checkpoints
    would rotate them with its own: refused in one line, before any engine, nothing moved."""
    root = tmp_path / "out" / "checkpoints"
    for step in (100, 200):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "trainer_state.json").write_text("{}")
    cfg = ppo_config(assets, tmp_path / "out", checkpoint={"resume": False})
    proc = _ppo(cfg, tmp_path)
    _fails_with(proc, f"error: checkpoint.resume is false but {root} holds checkpoints "
                      "(step_100, step_200). Set checkpoint.resume: true")
    assert proc.stderr.count("checkpoint.resume is false") == 1
    assert sorted(p.name for p in root.iterdir()) == ["step_100", "step_200"]
