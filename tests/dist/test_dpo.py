"""`ds-rlhf dpo` on real DeepSpeed engines: one launch of 2 CPU ranks runs every 2-rank check
(tests/dist/dpo_checks.py builds the trainers one after another), one launch of 1 rank the
rank-count comparison. Bad input is checked in-process: it must fail before any engine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_rlhf.config import ConfigError, DataError, DPORunConfig, load_config
from ds_rlhf.data import load_preferences
from ds_rlhf.demo import make_data
from ds_rlhf.plot import plot_metrics
from ds_rlhf.tracking import read_metrics
from ds_rlhf.trainers import dpo
from tests.conftest import REPO, cpu_env, run_deepspeed, tiny_init, write_yaml
from tests.e2e.test_tracking import offline_runs, read_run

pytestmark = pytest.mark.dist

TRL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def pairs(assets, tmp_path_factory) -> str:
    """72 preference pairs of the demo task (a 10% eval hold-out: 7, odd, so a rank pads)."""
    path = tmp_path_factory.mktemp("pairs") / "prefs.jsonl"
    rows = make_data.make_rows(seed=0)["prefs.jsonl"][:72]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dpo_config(assets: dict, pairs: str, out, **sections) -> dict:
    model = {"init": tiny_init(assets["vocab_size"]), "tokenizer": assets["tokenizer"]}
    cfg = {
        "output_dir": str(out), "seed": 3,
        "policy": {"model": model, "zero_stage": 2, "micro_batch_size": 2, "lr": 1e-3},
        "ref": {"zero_stage": 3, "micro_batch_size": 4},
        "data": {"datasets": [{"path": pairs, "format": "preference"}], "max_prompt_len": 16,
                 "max_len": 32, "eval_fraction": 0.1},
        "train": {"max_steps": 2, "batch_size": 8, "eval_every": 1, "log_every": 1},
        "dpo": {"beta": 0.5},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def _launch(nproc: int, runs: list[dict], tmp, **env) -> tuple[dict, str]:
    spec = tmp / f"runs{nproc}.json"
    spec.write_text(json.dumps(runs))
    result = tmp / f"result{nproc}.json"
    proc = run_deepspeed(nproc, ["tests/dist/dpo_checks.py", str(spec), str(result)],
                         module=False, timeout=600, **env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(result.read_text()), proc.stdout


@pytest.fixture(scope="module")
def runs(assets, pairs, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dpo")
    lora = {"zero_stage": 3, "lora_rank": 4, "lora_alpha": 8.0, "lr": 1e-2}

    def run(name, reference="own", **sections):
        return {"name": name, "reference": reference,
                "config": dpo_config(assets, pairs, tmp / name, **sections)}

    smoothed = {"beta": 0.5, "label_smoothing": 0.1}
    ipo = {"loss_type": "ipo", "beta": 0.5}
    resumable = {"max_steps": 4, "eval_every": 0, "log_every": 1}
    two_ranks = [
        run("first", dpo=smoothed),
        run("precompute", dpo={**smoothed, "precompute_ref": True}),
        run("zero3", policy={"zero_stage": 3},
            dpo={"loss_type": "hinge", "beta": 0.5, "sft_coef": 0.5}),
        run("lora_engine", "engine", policy=lora, train={"max_steps": 3}),
        run("lora", policy=lora, train={"max_steps": 3}),
        run("lora_zero2", policy={**lora, "zero_stage": 2}, train={"max_steps": 3}),
        run("lora_precompute", policy=lora, train={"max_steps": 3},
            dpo={"beta": 0.5, "precompute_ref": True}),
        run("straight", dpo=ipo, train=resumable),
        {**run("cut", dpo=ipo, train=resumable, tracking={"wandb_project": "ds-rlhf-tests"},
               checkpoint={"keep_last": 1}), "preempt_at": 2},
        # 2 micro-batches per step and rank: the 3rd is the first of step 2.
        {**run("nan", data={"eval_fraction": 0.0}, checkpoint={"save_every": 1}), "nan_at": 3},
    ]
    seen, stdout = _launch(2, two_ranks, tmp, WANDB_MODE="offline", WANDB_SILENT="true")
    one_rank, _ = _launch(1, [run("n1", dpo=smoothed)], tmp)
    return {"tmp": tmp, "seen": {**seen, **one_rank}, "stdout": stdout}


def metrics(runs, name) -> list[dict]:
    return read_metrics(runs["tmp"] / name / "metrics.jsonl")


def weights(runs, name) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(runs["tmp"] / name / "model").state_dict()


def assert_same_weights(runs, a: str, b: str, atol: float = 1e-5) -> None:
    wa, wb = weights(runs, a), weights(runs, b)
    assert wa.keys() == wb.keys()
    for key, value in wa.items():
        torch.testing.assert_close(value, wb[key], atol=atol, rtol=0, msg=key)


def assert_same_steps(runs, a: str, b: str, atol: float = 1e-5) -> None:
    """Losses, implicit rewards, margins and log-probs of every step and eval agree. Not the
    accuracies: before the first update every margin is 0 up to round-off, so which side
    wins a tie is noise."""
    ma, mb = metrics(runs, a), metrics(runs, b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    keys = [k for k in TRL_KEYS if k != "rewards/accuracies"]
    for x, y in zip(ma, mb, strict=True):
        for key in ("train/loss", "eval/loss", *keys, *(f"eval/{k}" for k in keys)):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=atol), (x["step"], key)


def test_zero2_and_zero3_runs_have_finite_trl_metrics(runs):
    # Before any update the policy is the reference: h = 0 for every pair, so the loss is
    # log 2 (sigmoid, any label smoothing: (1 - ls) log 2 + ls log 2), 1 (hinge: relu(1 - 0)
    # plus sft_coef x the chosen NLL, which is positive).
    for name, loss_at_zero in (("first", math.log(2)), ("zero3", 1.0)):
        rows = metrics(runs, name)
        assert [m["step"] for m in rows] == [0, 1, 2]  # eval before training, then every step
        for row in rows:
            assert all(math.isfinite(v) for v in row.values()), row
        first = rows[1]
        assert set(TRL_KEYS) <= set(first) and {f"eval/{k}" for k in TRL_KEYS} <= set(rows[0])
        # Zero up to float round-off (the reference runs other batch shapes).
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
        if name == "first":
            assert first["train/loss"] == pytest.approx(loss_at_zero, abs=1e-5)
            assert rows[0]["eval/loss"] == pytest.approx(loss_at_zero, abs=1e-5)
        else:  # RPO's term on top of the hinge
            assert first["train/loss"] == pytest.approx(1.0 + 0.5 * first["nll_loss"], abs=1e-5)
        assert rows[2]["rewards/margins"] != 0.0  # the first update moved the policy
        saved = json.loads((runs["tmp"] / name / "eval.json").read_text())
        assert saved["step"] == 2
        assert saved["rewards/accuracies"] == rows[2]["eval/rewards/accuracies"]


def test_one_rank_equals_two_ranks(runs):
    """1 rank x 4 micro-batches and 2 ranks x 2 take the same steps: the loss is the mean over
    the global batch of pairs."""
    assert_same_steps(runs, "n1", "first")
    assert_same_weights(runs, "n1", "first")


def test_precomputed_reference_takes_the_same_steps(runs):
    seen = runs["seen"]["precompute"]
    assert seen["precomputed"] and seen["reference_freed"]
    assert_same_steps(runs, "precompute", "first")
    assert_same_weights(runs, "precompute", "first")


def test_lora_reference_is_the_policy_without_adapters(runs):
    seen = runs["seen"]
    assert seen["lora"]["reference_is_policy"] and not seen["lora_engine"]["reference_is_policy"]
    assert seen["lora_precompute"]["precomputed"]
    # The same steps as a separate frozen engine; at ZeRO-2 too, where switching the adapters
    # off and on again every step must leave DeepSpeed's gradient hooks working.
    for name in ("lora", "lora_precompute", "lora_zero2"):
        assert_same_steps(runs, name, "lora_engine")
        assert_same_weights(runs, name, "lora_engine")
    # The reference stays the initial model while the adapters move the policy away from it.
    assert metrics(runs, "lora")[-1]["rewards/margins"] != 0.0
    exported = weights(runs, "lora")
    assert not any("lora" in key for key in exported)  # adapters merged into the export


def test_preempted_and_resumed_run_is_bit_identical(runs):
    assert runs["seen"]["cut"]["resumed_at"] == 2
    assert "preempted: saved step 2" in runs["stdout"]
    straight, cut = metrics(runs, "straight"), metrics(runs, "cut")
    assert [m["step"] for m in cut] == [0, 1, 2, 3, 4]  # no step logged twice
    for a, b in zip(straight, cut, strict=True):
        for key in a:
            if not key.startswith(("timing/", "perf/")):  # clocks
                assert a[key] == b[key], (a["step"], key)  # bit-identical in fp32
    assert_same_weights(runs, "straight", "cut", atol=0.0)
    eval_json = [json.loads((runs["tmp"] / n / "eval.json").read_text()) for n in
                 ("straight", "cut")]
    assert eval_json[0] == eval_json[1]
    # W&B: the resumed process continued the same run, and it logged the TRL names.
    state = json.loads((runs["tmp"] / "cut" / "checkpoints" / "step_4" /
                        "trainer_state.json").read_text())
    halves = offline_runs(runs["tmp"] / "cut", state["wandb_run_id"])
    assert len(halves) == 2
    history = {s: row for d in halves for s, row in read_run(d)["history"].items()}
    assert sorted(history) == [0, 1, 2, 3, 4]
    assert history[4]["rewards/accuracies"] == pytest.approx(cut[4]["rewards/accuracies"])


def test_nonfinite_loss_on_one_rank_stops_every_rank(runs):
    # Rank 0's loss was finite: it stopped because the ranks agree, before any gradient.
    assert runs["seen"]["nan"]["stopped"].startswith(
        "non-finite loss on 1 rank(s) at optimizer step 2; the last checkpoint is intact")
    assert runs["seen"]["nan"]["stopped"].endswith("or lower policy.lr")
    root = runs["tmp"] / "nan" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_1"
    assert (root / "step_1" / "trainer_state.json").is_file()
    assert not (runs["tmp"] / "nan" / "model").exists()


def test_export_loads_and_generates_and_plot_draws_the_metrics(runs, tmp_path):
    path = runs["tmp"] / "first" / "model"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("review of the red camera :", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    png = plot_metrics(runs["tmp"] / "first", tmp_path / "dpo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- bad input, before engines


@pytest.fixture
def one_process(monkeypatch):
    """A 1-process world in the environment, restored after the test."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")):
        monkeypatch.setenv(key, value)


def _fails(cfg: dict, error: type, *needles: str) -> None:
    out = cfg["output_dir"]
    with pytest.raises(error) as info:
        dpo.run(load_config(None, cfg, cls=DPORunConfig))
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not Path(out).exists()  # nothing was built or written


def test_pairs_over_max_len_fail_before_any_engine(assets, pairs, tmp_path, one_process):
    cfg = dpo_config(assets, pairs, tmp_path / "out",
                     data={"datasets": [{"path": pairs, "format": "preference"}],
                           "max_prompt_len": 12, "max_len": 16})
    _fails(cfg, DataError, "data.max_len=16", "data.overlong_prompts: filter")
    cfg["data"]["overlong_prompts"] = "filter"  # ... or dropped, when asked
    data_cfg = load_config(None, cfg, cls=DPORunConfig).data
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    kept = load_preferences(data_cfg, tokenizer, "train", overlong_pairs="error")
    assert 0 < len(kept.chosen_ids) and kept.num_filtered > 0


def test_dataset_without_chosen_fails_before_any_engine(assets, tmp_path, one_process):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "review of the red camera :", "answer": "good"}\n' * 20)
    cfg = dpo_config(assets, str(path), tmp_path / "out")
    _fails(cfg, DataError, "no column 'chosen'", "data.datasets[0].chosen_column")


def test_reference_with_another_tokenizer_fails_before_any_engine(assets, pairs, tmp_path,
                                                                    one_process):
    other = AutoTokenizer.from_pretrained(assets["tokenizer"])
    other.add_tokens(["zebra"])
    other.save_pretrained(tmp_path / "other_tokenizer")
    cfg = dpo_config(assets, pairs, tmp_path / "out")
    cfg["ref"]["model"] = {"init": tiny_init(len(other)), "tokenizer": str(tmp_path /
                                                                           "other_tokenizer")}
    _fails(cfg, ConfigError, "ref.model: its tokenizer differs from the policy's")


def test_cli_reports_bad_beta_in_one_line(assets, pairs, tmp_path):
    cfg = write_yaml(dpo_config(assets, pairs, tmp_path / "out"), tmp_path / "dpo.yaml")
    proc = subprocess.run([sys.executable, "-m", "ds_rlhf", "dpo", "--config", str(cfg),
                           "--dpo.beta", "0"], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("ds-rlhf dpo: error: dpo.beta: must be > 0, got 0.0; "
                                   "typical values are 0.01-0.5")
    assert not (tmp_path / "out").exists()
