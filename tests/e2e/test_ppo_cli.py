"""PPO through the real entry point, one process: bad input fails early with one clear message;
config switches that must not change results do not."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cpu_env, ppo_config, strict_warnings_env, write_yaml
from tests.strict_warnings.strict_marker import MARKER

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


def test_a_generation_pool_as_large_as_the_launch_is_one_line(assets, tmp_path):
    """rollout.placement separate on one process: no rank would train (exit 2, one line)."""
    cfg = ppo_config(assets, tmp_path / "out", rollout={"placement": "separate",
                                                        "generation_ranks": 1})
    proc = _ppo(cfg, tmp_path)
    _fails_with(proc, "rollout.generation_ranks: 1 leaves no training rank of the 1 ranks "
                "launched; launch more ranks or use fewer generation ranks")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


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


def test_no_progress_bars_when_stderr_is_a_file(assets, tmp_path):
    """transformers' "Loading weights" bars (a model.path run) write carriage returns into a
    Slurm output file: off when stderr is not a terminal, unless the user asks for them."""
    cfg = write_yaml(ppo_config(assets, tmp_path / "out"), tmp_path / "run.yaml")
    code = ("import sys; from ds_rlhf.cli import main; main(['ppo', '--config', sys.argv[1], "
            "'--print-config']); from transformers.utils import logging; "
            "print('bars', logging.is_progress_bar_enabled())")
    env = cpu_env()
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    for asked, expected in ((None, "bars False"), ("0", "bars True")):
        if asked is not None:
            env["HF_HUB_DISABLE_PROGRESS_BARS"] = asked
        proc = subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.stdout.splitlines()[-1] == expected, proc.stderr[-2000:]


def _tree(path: Path) -> dict[str, bytes]:
    """Every file a run left in `path` (relative name -> bytes), without the lock and the
    bundles of earlier runs."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.relative_to(path).parts[0] != "run.lock"
            and not p.relative_to(path).parts[0].startswith("previous-")}


@pytest.fixture(scope="module")
def memory_runs(assets, tmp_path_factory) -> list[tuple[str, list[dict], str, dict]]:
    """The runs of test_memory_switches_change_memory_not_results, one after the other in one
    output_dir with checkpoint.resume: fresh, so each moves the one before aside
    (test_fresh_moves_the_previous_run_aside_whole): (name, metrics, stdout, files left)."""
    from ds_rlhf.tracking import read_metrics

    tmp = tmp_path_factory.mktemp("memory")
    out = tmp / "out"
    base = ppo_config(assets, out)
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
    runs = []
    for name, sections in variants.items():
        cfg = ppo_config(assets, out, checkpoint={"resume": "fresh", "export_critic": True},
                         **sections)
        # no deprecated call from ds_rlhf on any of these paths (issue 28 item 6)
        proc = _ppo(cfg, tmp, **strict_warnings_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert MARKER not in proc.stderr
        runs.append((name, read_metrics(out / "metrics.jsonl"), proc.stdout, _tree(out)))
    return runs


def test_memory_switches_change_memory_not_results(memory_runs):
    """Gradient checkpointing, ZeRO-3, CPU offload of parameters and optimizer states, and a
    kept generation copy with a static KV cache."""
    (_, plain, _, _), *others = memory_runs
    for name, metrics, _, _ in others:
        for a, b in zip(plain, metrics, strict=True):
            for key in ("objective/scores", "objective/kl", "loss/policy_avg",
                        "loss/value_avg"):
                assert a[key] == pytest.approx(b[key], abs=1e-6), (name, key)


def test_fresh_moves_the_previous_run_aside_whole(memory_runs):
    """The issue's case: resume fresh moved only checkpoints/ aside and the new run deleted
    metrics.jsonl and samples.jsonl and overwrote config.yaml and the exports. Each fresh start
    moves every file of the run before it (checkpoints, metrics, samples, config.yaml,
    engines.json, the actor and critic exports) byte for byte into one previous-<time>/ that
    its message names; earlier bundles stay beside it."""
    assert "moved the previous run" not in memory_runs[0][2]  # nothing there before
    bundles = []
    pairs = zip(memory_runs[:-1], memory_runs[1:], strict=True)
    for (_, _, _, before), (name, metrics, stdout, _) in pairs:
        [bundle] = re.findall(r"checkpoint: resume is fresh; moved the previous run aside to "
                              r"(\S+) \(.*\); nothing was deleted\n", stdout)
        assert _tree(Path(bundle)) == before, name
        assert {"metrics.jsonl", "samples.jsonl", "config.yaml", "engines.json",
                "actor/config.json", "critic/config.json", "checkpoints/latest",
                "actor/README.md", "critic/README.md"} <= set(before)
        assert [m["step"] for m in metrics] == [1, 2]  # the new run's own record
        bundles.append(Path(bundle))
    out = bundles[0].parent
    assert sorted(p for p in out.iterdir() if p.name.startswith("previous-")) == bundles


def test_console_line_and_model_cards_of_a_run(memory_runs):
    """A line per step: step k/N, elapsed, eta (none before a measured step), samples/s and
    the metrics; no carriage return. Each export has its model card, naming the command."""
    _, _, stdout, files = memory_runs[0]
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and "\r" not in stdout
    assert re.fullmatch(r"step 1/2 \| elapsed \d+s \| eta \? \| samples/s [\d.]+ \| score .*",
                        lines[0]), lines[0]
    assert re.fullmatch(r"step 2/2 \| elapsed \d+s \| eta 0s \| samples/s [\d.]+ \| .*",
                        lines[1]), lines[1]
    for role, tag in (("actor", "ppo"), ("critic", "value-model")):
        card = files[f"{role}/README.md"].decode()
        assert card.startswith("---\nlibrary_name: transformers\n") and f"- {tag}\n" in card
        assert "\nds-rlhf ppo --config " in card and "| ppo.advantage_estimator | gae |" in card


def test_tool_without_schema_fails_before_any_engine(assets, tmp_path):
    (tmp_path / "tools.py").write_text("def lookup(key):\n    return key\n")
    cfg = ppo_config(assets, tmp_path / "out",
                     rollout={"tools": [f"{tmp_path / 'tools.py'}:lookup"],
                              "max_total_tokens": 24})
    _fails_with(_ppo(cfg, tmp_path), "rollout.tools[0]", "no JSON schema", "docstring")


def flaky_config(assets, tmp_path, failing: int) -> dict:
    """GRPO on Flaky episodes (tests/dist/test_grpo_dist.py) whose environment fails the
    second sample of `failing` of the 4 prompts: `failing` of the 16 rows of every step."""
    from tests.dist.test_grpo_dist import FLAKY, four_prompts

    prompts, texts = four_prompts(assets, tmp_path)
    (tmp_path / "flaky.py").write_text(FLAKY.format(failing=texts[:failing]))
    cfg = ppo_config(assets, tmp_path / "out",
                     ppo={"steps": 2, "rollout_batch_size": 4, "advantage_estimator": "grpo",
                          "kl_coef": 0.0},
                     generation={"max_new_tokens": 8, "batch_size": 8, "n_samples_per_prompt": 4},
                     data={"datasets": [{"path": prompts}], "max_prompt_len": 16},
                     rollout={"environment": f"{tmp_path / 'flaky.py'}:Flaky", "max_turns": 3,
                              "max_total_tokens": 24, "max_failed_fraction": 0.1})
    del cfg["critic"], cfg["reward"]
    return cfg


FAILED_3_OF_16 = ("ds-rlhf ppo: stopped: 3 of 16 rows failed at PPO step 1, more than "
                  "rollout.max_failed_fraction (0.1): environment '{env}' (rollout.environment): "
                  "step() raised KeyError: 'the flaky environment lost its state' (3 rows, first "
                  "the row of prompt index")


def test_too_many_failed_episodes_stop_the_run_with_exit_3(assets, tmp_path):
    """3 of the 16 episodes of step 1 fail, more than rollout.max_failed_fraction 0.1 allows:
    exit 3, one message naming the environment, its error and the count; no traceback, no
    checkpoint of the step (the 2-rank case: tests/dist/test_run_safety.py)."""
    proc = _ppo(flaky_config(assets, tmp_path, failing=3), tmp_path)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    text = proc.stdout + proc.stderr
    assert text.count(FAILED_3_OF_16.format(env=tmp_path / "flaky.py:Flaky")) == 1, text[-3000:]
    assert "rows failed" not in proc.stdout  # the stop's message only
    assert not (tmp_path / "out" / "checkpoints" / "step_1").exists()


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


def test_a_resume_checks_the_rows_not_where_they_live(assets, tmp_path):
    """The issue's cluster case: a job stages its data to node-local scratch, a new folder at
    every requeue. The same rows in another folder resume (the split depends on the rows, not
    the path); with a row added the resume stops before any engine with one message naming
    the dataset (exit 2); data.allow_changed_data: true goes on, saying so."""
    lines = Path(assets["prompts"]).read_text().splitlines(keepends=True)

    def staged(folder: str, rows: list[str]) -> str:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "prompts.jsonl").write_text("".join(rows))
        return str(tmp_path / folder / "prompts.jsonl")

    def resume(path: str, steps: int, *extra: str) -> subprocess.CompletedProcess:
        cfg = ppo_config(assets, tmp_path / "out", ppo={"steps": steps},
                         data={"datasets": [{"path": path, "format": "prompt"}],
                               "eval_fraction": 0.25})
        return _ppo(cfg, tmp_path, *extra)

    first = resume(staged("scratch-1", lines), 1)
    assert first.returncode == 0, first.stderr[-3000:]
    added = staged("scratch-2", [*lines, json.dumps({"prompt": "review of the phone"}) + "\n"])
    proc = resume(added, 2)
    _fails_with(proc, f"error: dataset {added!r} (data.datasets[0]) (train rows): not the rows "
                      "of the checkpoint's run at step 1", "data.allow_changed_data: true")
    assert proc.stderr.count("not the rows of the checkpoint's run") == 1
    proc = resume(added, 1, "--data.allow_changed_data", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data: warning: dataset {added!r}" in proc.stdout and "resumed from" in proc.stdout
    proc = resume(staged("scratch-3", lines), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "data: " not in proc.stdout
    assert "step 2/2" in proc.stdout
