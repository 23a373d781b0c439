"""The four PPO roles as DeepSpeed engines with batch-in / batch-out verbs.

    actor.generate(prompts)  -> Rollout          (inside `with actor.generation_mode():`)
    actor.logprobs(rollout), ref.logprobs(rollout), critic.values(rollout), reward.scores(rollout)
    actor.train_step(minibatch, scale), critic.train_step(minibatch, scale) -> stats

The PPO loop composes these verbs and never reaches into DeepSpeed. Forward passes run in
micro-batches of the role's `micro_batch_size` rows, or packed by `micro_batch_tokens`;
every rank runs the same number of them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import deepspeed
import torch
from torch import nn

from ds_rlhf import algo, generation
from ds_rlhf.config import EngineConfig, GenerationConfig, PPOConfig, TrainEngineConfig
from ds_rlhf.engines.ds_config import deepspeed_config
from ds_rlhf.engines.export import export_hf
from ds_rlhf.engines.hybrid import GenerationModel, HybridEngine, keep_prefetch_trace, linear_for
from ds_rlhf.errors import NonFiniteError
from ds_rlhf.models import sequence_inputs
from ds_rlhf.rollout import Rollout, pack_by_tokens, split_to_count


def _checkpoint_activations(hf_model) -> None:
    """Recompute activations in the backward, never with the reentrant variant (it drops the
    gradients of ZeRO-3 parameters). transformers renamed gradient_checkpointing_enable to
    activation_checkpointing_enable (the old name warns from 5.2x, goes in v6)."""
    kwargs = {"use_reentrant": False}
    if hasattr(hf_model, "activation_checkpointing_enable"):
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def init_engine(model: nn.Module, engine_cfg: EngineConfig, grad_accum: int, world_size: int,
                micro_batch_size: int | None = None, load_universal: bool = False):
    """Wrap `model` in a DeepSpeed engine; frozen roles (plain EngineConfig) get no optimizer.
    `micro_batch_size` (default: the config's) only feeds DeepSpeed's sample counters;
    `load_universal`: it will resume from a universal checkpoint (checkpoint.is_universal)."""
    trainable = isinstance(engine_cfg, TrainEngineConfig)
    on_cpu = deepspeed.get_accelerator().device_name() == "cpu"
    ds_config = deepspeed_config(engine_cfg, micro_batch_size or engine_cfg.micro_batch_size,
                                 grad_accum, world_size, on_cpu, load_universal)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    else:
        hf_model = getattr(model, "hf_model", model)  # ScalarHeadModel wraps an HF model
        if engine_cfg.lora_rank:
            add_lora(hf_model, engine_cfg.lora_rank, engine_cfg.lora_alpha)
        if engine_cfg.gradient_checkpointing:
            _checkpoint_activations(hf_model)
    # Not with LoRA: peft's adapter layers inside a ZeRO-3 leaf lose their weights before
    # the backward (a 0-size weight there; tests/dist/test_lora.py).
    if engine_cfg.zero_stage == 3 and not getattr(engine_cfg, "lora_rank", 0):
        set_leaf_layers(model)
    params = [p for p in model.parameters() if p.requires_grad] if trainable else None
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    if engine_cfg.zero_stage == 3 and trainable:
        gather_persistent_at_once(engine.optimizer)
    return engine


def gather_persistent_at_once(zero3_optimizer) -> None:
    """After every optimizer step ZeRO-3 re-gathers the parameters it keeps whole on every rank
    (`stage3_param_persistence_threshold`), one collective per parameter: about 70 for a
    4-layer model, a latency each, and most of the ZeRO-3 step's extra cost on small models.
    Route that gather (`persistent_parameters[0].all_gather(list)`, also run after a checkpoint
    is saved or loaded) through DeepSpeed's coalesced all-gather, the one its forward prefetch
    uses: one flat collective, the same values."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    persistent = getattr(zero3_optimizer, "persistent_parameters", None)
    if not persistent:
        return
    first = persistent[0]
    per_parameter = first.all_gather

    def all_gather(param_list=None, async_op=False, hierarchy=0):
        missing = [p for p in param_list or [] if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        # Not the post-step gather, or quantized weights (zero_quantized_weights), which the
        # plain coalesced gather would not dequantize: DeepSpeed's own path.
        if param_list is None or async_op or any(
                hasattr(p.ds_tensor, "ds_quant_scale") for p in missing):
            return per_parameter(param_list, async_op=async_op, hierarchy=hierarchy)
        if missing:
            first.all_gather_coalesced(missing).wait()

    first.all_gather = all_gather


def set_leaf_layers(model: nn.Module) -> None:
    """Make each decoder layer a ZeRO-3 leaf: its weights are fetched together when the layer
    starts and ZeRO-3 hooks stop there, instead of at each of its linears and norms (a
    Python hook pair per sub-module and pass, and a longer trace to follow). The layer
    classes are the ones HF keeps on one device (`_no_split_modules`)."""
    hf_model = getattr(model, "hf_model", model)  # ScalarHeadModel wraps an HF model
    classes = getattr(hf_model, "_no_split_modules", None) or []
    if classes:
        deepspeed.utils.set_z3_leaf_modules(model, list(classes), raise_if_not_found=False)


def add_lora(hf_model: nn.Module, rank: int, alpha: float) -> None:
    """Inject LoRA adapters (Hu et al. 2021) into every linear layer but the LM head, in place,
    and train only them (plus a scalar head, which is new and small)."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    # GPT-2-family layers are Conv1D, weights stored [in, out]: peft calls that fan_in_fan_out
    # (it would set the flag itself, with a warning); merged_weights honours it.
    conv1d = any(isinstance(m, Conv1D) for m in hf_model.modules())
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                       target_modules="all-linear", fan_in_fan_out=conv1d),
                            hf_model)
    for name, p in hf_model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("score."))


@contextmanager
def adapters_disabled(module: nn.Module):
    """Run `module` as its base model: every LoRA layer's adapters off inside the block, back
    on (and trainable) after it. What peft's `PeftModel.disable_adapter()` does, for models
    whose adapters `add_lora` injected without a PeftModel around them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@dataclass(frozen=True)
class MicroBatcher:
    """Splits one rank's rows into micro-batches: `rows` at a time, or, when `tokens` > 0,
    packed to at most `tokens` padded tokens each (see rollout.pack_by_tokens), so the memory
    of a pass follows sequence length instead of a worst-case row count.

    Every rank runs the same number of micro-batches: ZeRO-3 gathers parameters with
    collectives in every forward, and ZeRO-2 reduces gradients in every backward, so a rank
    with one pass fewer would hang the others. Packed ranks agree on the largest count and
    split micro-batches to reach it; by rows, all ranks hold equally many rows already.
    """

    rows: int
    tokens: int = 0
    coord: object = None  # Coordinator (its max over ranks); needed when tokens > 0

    def split(self, rollout: Rollout) -> list[torch.Tensor]:
        """Row indices of each micro-batch of `rollout`."""
        if not self.tokens:
            return list(torch.arange(len(rollout)).split(self.rows))
        groups = pack_by_tokens(rollout.prompt_mask.sum(1), rollout.response_lengths,
                                self.tokens)
        return split_to_count(groups, self.coord.max(len(groups)))


def _inputs(engine, chunk: Rollout):
    """Model inputs of a micro-batch, its all-padding columns dropped (see Rollout.trim)."""
    chunk = chunk.trim().to(engine.device)
    ids, attention_mask, position_ids = sequence_inputs(
        chunk.prompt_ids, chunk.prompt_mask, chunk.response_ids, chunk.response_mask)
    return chunk, dict(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))  # zeros, masked out anyway


def _token_logprobs(engine, chunk: Rollout, temperature: float) -> torch.Tensor:
    """[b, R] log pi(response_t | prompt, response_<t) at the sampling temperature."""
    width = chunk.response_ids.shape[1]
    chunk, inputs = _inputs(engine, chunk)
    num_response = chunk.response_ids.shape[1]
    # Keep only the logits that predict response tokens: positions P-1 .. P+R-2.
    logits = engine(**inputs, use_cache=False, logits_to_keep=num_response + 1).logits[:, :-1]
    return _pad_to(algo.logprobs_from_logits(logits, chunk.response_ids, temperature), width)


def _token_values(engine, chunk: Rollout) -> torch.Tensor:
    """[b, R] V(prompt + response_<t), read where the logprob of token t is read."""
    width = chunk.response_ids.shape[1]
    chunk, inputs = _inputs(engine, chunk)
    prompt_len, num_response = chunk.prompt_ids.shape[1], chunk.response_ids.shape[1]
    return _pad_to(engine(**inputs)[:, prompt_len - 1:prompt_len - 1 + num_response], width)


@dataclass(frozen=True)
class LossScale:
    """How the per-token losses of one optimizer minibatch add up (ppo.loss_agg), with the
    counts of the whole minibatch over all ranks, so that any split into ranks and
    micro-batches takes the same step (see algo.loss_normalizer)."""

    loss_agg: str
    num_tokens: float  # valid response tokens of the global minibatch (Rollout.loss_mask)
    num_sequences: int  # rows of the global minibatch that are in the update (not dropped)
    max_len: int  # generation.max_new_tokens (rollout.max_total_tokens for episodes)

    def denominators(self, mask: torch.Tensor) -> torch.Tensor:
        """The losses' num_tokens for the rows of `mask` (0-d, or [b, 1] per row)."""
        return algo.loss_normalizer(mask, self.loss_agg, self.num_tokens, self.num_sequences,
                                    self.max_len)


@torch.no_grad()
def _forward_all(engine, rollout: Rollout, batcher: MicroBatcher, fn: Callable) -> torch.Tensor:
    """fn over the micro-batches, each output row put back at its row of `rollout`."""
    out = None
    with keep_prefetch_trace(engine), linear_for(engine, grad=False):
        for idx in batcher.split(rollout):
            result = fn(engine, rollout.select(idx)).cpu()
            if out is None:
                out = result.new_zeros((len(rollout), *result.shape[1:]))
            out[idx] = result
    return out


class _Trainable:
    """Micro-batched backward + step with the loss normalised by global counts (LossScale)."""

    def __init__(self, engine, grad_accum: int, coord, nonfinite: str, batcher: MicroBatcher):
        self.engine = engine
        self.grad_accum = grad_accum  # DeepSpeed's gradient_accumulation_steps (loss scaling)
        self.batcher = batcher
        self.coord = coord  # ranks must agree on skipping, or none would skip
        self.nonfinite = nonfinite  # "skip" or "stop"

    def _loss_denominator(self, denominators: torch.Tensor) -> torch.Tensor:
        # DeepSpeed divides each micro-batch loss by grad_accum and averages gradients over
        # ranks. Dividing by denominators / (world_size * grad_accum) undoes both, so the step
        # follows sum(per-token loss / denominator) over the whole global minibatch, however
        # many micro-batches each rank splits it into.
        return denominators / (self.coord.world_size * self.grad_accum)

    def _guard(self, loss: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Agree over ranks on a non-finite loss before any gradient can carry it.

        A NaN/inf loss with finite model outputs (bad advantages, an exploding ratio) is
        replaced on every rank by a zero-gradient loss, so the micro-batch is skipped
        everywhere. Non-finite outputs mean the weights or activations are broken: stop.
        """
        bad_output = not bool(torch.isfinite(output).all())
        flags = self.coord.sum(torch.tensor([float(bad_output),
                                             float(not bool(torch.isfinite(loss)))]))
        if flags.sum() == 0:
            return loss
        what = "model outputs" if flags[0] > 0 else "loss"
        if self.nonfinite == "stop" or flags[0] > 0:
            raise NonFiniteError(
                f"non-finite {what} on {int(flags.max())} rank(s) at optimizer step "
                f"{self.engine.global_steps + 1} of {type(self).__name__.lower()}; the last "
                "checkpoint is intact. Lower the learning rate, check rewards for NaN/inf, or "
                "set ppo.nonfinite: skip to skip such micro-batches")
        self.skipped += 1
        return (torch.where(torch.isfinite(output), output, 0.0) * 0.0).sum()

    def _run(self, minibatch: Rollout, scale: LossScale, loss_fn) -> dict[str, float]:
        """Returns sums over this rank's micro-batches, token-weighted where they are means."""
        totals: dict[str, float] = {"skipped_microbatches": 0.0, "optimizer_steps": 0.0}
        micro_batches = self.batcher.split(minibatch)
        num_skipped = 0
        for i, idx in enumerate(micro_batches):
            chunk = minibatch.select(idx)
            self.skipped = 0
            denominator = self._loss_denominator(scale.denominators(chunk.loss_mask))
            with linear_for(self.engine, grad=True):
                loss, stats, output = loss_fn(chunk, idx, denominator)
            loss = self._guard(loss, output)
            num_skipped += self.skipped
            # The optimizer steps after the last micro-batch, however many there are (packed
            # by tokens, their number changes from step to step), unless every micro-batch
            # was skipped (on every rank: _guard agrees). Then no boundary is declared: the
            # zero gradients stay accumulated, and neither AdamW (whose momentum would move
            # the weights) nor the scheduler steps. Declared here, before the backward,
            # which is where DeepSpeed reads it.
            stepping = i == len(micro_batches) - 1 and num_skipped < len(micro_batches)
            self.engine.set_gradient_accumulation_boundary(stepping)
            self.engine.backward(loss)
            self.engine.step()
            totals["optimizer_steps"] += stepping / self.coord.world_size  # summed later
            if self.skipped:
                totals["skipped_microbatches"] += 1 / self.coord.world_size  # summed later
                continue
            num_chunk_tokens = float(chunk.loss_mask.sum())
            totals["loss"] = totals.get("loss", 0.0) + loss.item() / (
                self.coord.world_size * self.grad_accum)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value * num_chunk_tokens
        return totals


class Actor(_Trainable):
    def __init__(self, engine, grad_accum: int, coord, gen_cfg: GenerationConfig,
                 ppo: PPOConfig, batcher: MicroBatcher, tokenizer, seed: int,
                 max_model_len: int = 0):
        super().__init__(engine, grad_accum, coord, ppo.nonfinite, batcher)
        # generation.backend vllm: a colocated vLLM engine generates (max_model_len: its
        # longest sequence); hf: the HybridEngine's copy of the actor
        self.vllm = None
        if gen_cfg.backend == "vllm":
            from ds_rlhf.engines.vllm_backend import VllmGenerator
            self.vllm = VllmGenerator(engine.module, gen_cfg, tokenizer, seed, max_model_len)
        self.hybrid = HybridEngine(engine, gen_cfg.gather_weights, synced=coord.all,
                                   reuse_copy=gen_cfg.reuse_copy, compile=gen_cfg.compile)
        self.gen_cfg = gen_cfg
        self.clip_eps, self.clip_eps_high = ppo.clip_eps, ppo.clip_eps_high
        self.kl_loss_coef, self.kl_loss_estimator = ppo.kl_loss_coef, ppo.kl_loss_estimator
        self.rollout_correction, self.rollout_is_cap = ppo.rollout_correction, ppo.rollout_is_cap
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.seed = seed
        self._gen: GenerationModel | None = None
        # hf backend: set to a GenerationStats to have generate calls add their prefill and
        # decode seconds and row-steps to it (the bench's time split); None: not measured
        self.generation_stats: generation.GenerationStats | None = None

    @property
    def switch_seconds(self) -> float:
        """Entering + leaving generation mode, last time (the vllm weight sync included)."""
        return (self.vllm or self.hybrid).switch_seconds

    @property
    def weight_sync_seconds(self) -> float:
        """Loading the weights into vLLM, last switch (0 with the hf backend)."""
        return self.vllm.weight_sync_seconds if self.vllm else 0.0

    @contextmanager
    def generation_mode(self):
        if self.vllm is not None:
            with self.vllm.generation_mode():
                yield self
            return
        with self.hybrid.generation_mode() as gen:
            self._gen = gen
            try:
                yield self
            finally:
                self._gen = None

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, prompt_index, step: int,
                 greedy: bool = False, sample_index=None, position_offset=None,
                 max_new_tokens: int | None = None) -> Rollout:
        """Sample responses for left-padded prompts ([B, P]); reproducible per row: a row's
        draws follow its (prompt_index, sample_index) (sample_index None: all 0) and, for a
        later turn of an episode, position_offset ([B], see generation.generate).
        max_new_tokens: this call's limit (default generation.max_new_tokens). The Rollout
        carries the behaviour logprobs of the drawn tokens (sampler_logprobs: temperature,
        top-k / top-p renormalised; generation.behaviour_logprobs), from either backend."""
        if self.vllm is not None:
            return self.vllm.generate(prompt_ids, prompt_mask, prompt_index, step, greedy,
                                      sample_index, position_offset, max_new_tokens)
        if self._gen is None:
            raise RuntimeError("Actor.generate must run inside `with actor.generation_mode():`")
        return sample_responses(self._gen, self.gen_cfg, self.engine.device, prompt_ids,
                                prompt_mask, prompt_index, step, self.seed, self.eos_token_id,
                                self.pad_token_id, greedy, sample_index, position_offset,
                                max_new_tokens, self.generation_stats)

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return _forward_all(self.engine, rollout, self.batcher,
                            lambda e, c: _token_logprobs(e, c, self.gen_cfg.temperature))

    def export(self, path, tokenizer, is_main: bool) -> None:
        """HF format (save_pretrained + tokenizer), loadable by AutoModelForCausalLM."""
        export_hf(self.engine, self.engine.module, tokenizer, path, is_main)

    def train_step(self, minibatch: Rollout, scale: LossScale) -> dict[str, float]:
        """One optimizer step on `minibatch`. Without old_logprobs (the on-policy shortcut,
        PPOConfig.takes_on_policy_shortcut) they are this step's own forward, detached, and
        are left in minibatch.old_logprobs."""
        on_policy = minibatch.old_logprobs is None
        if on_policy:
            minibatch.old_logprobs = torch.zeros(minibatch.response_ids.shape)

        def loss_fn(chunk: Rollout, idx: torch.Tensor, denominator: torch.Tensor):
            logprobs = _token_logprobs(self.engine, chunk, self.gen_cfg.temperature)
            if on_policy:  # the weights that sampled: a scoring forward would give these
                chunk.old_logprobs = logprobs.detach()
                minibatch.old_logprobs[idx] = chunk.old_logprobs.cpu()
            chunk, denominator = chunk.to(logprobs.device), denominator.to(logprobs.device)
            is_weights = None  # from the chunk's own old_logprobs, however they were computed
            if self.rollout_correction == "tis":  # the sampler drew the tokens (Yao et al. 2025)
                is_weights, _ = algo.rollout_is_weights(chunk.old_logprobs, chunk.sampler_logprobs,
                                                        chunk.loss_mask, self.rollout_is_cap)
            loss, stats = algo.policy_loss(
                logprobs, chunk.old_logprobs, chunk.advantages, chunk.loss_mask,
                self.clip_eps, num_tokens=denominator, clip_eps_high=self.clip_eps_high,
                is_weights=is_weights)
            if self.kl_loss_coef:  # GRPO's beta * KL(actor || reference), in the loss
                kl, kl_stats = algo.kl_loss(logprobs, chunk.ref_logprobs, chunk.loss_mask,
                                            self.kl_loss_estimator, num_tokens=denominator)
                loss, stats["ref_kl"] = loss + self.kl_loss_coef * kl, kl_stats["kl"]
            return loss, stats, logprobs
        return self._run(minibatch, scale, loss_fn)


@torch.no_grad()
def sample_responses(gen: GenerationModel, g: GenerationConfig, device: torch.device,
                     prompt_ids, prompt_mask, prompt_index, step: int, seed: int,
                     eos_token_id: int, pad_token_id: int, greedy: bool = False,
                     sample_index=None, position_offset=None, max_new_tokens: int | None = None,
                     stats: generation.GenerationStats | None = None) -> Rollout:
    """The hf backend's sampling of `Actor.generate` with the model `gen`: the actor's copy in
    generation mode, or a generation rank's own (ds_rlhf/pool.py)."""
    # Prompts of similar length share a generate call and each call drops the left
    # padding all its rows share: less padded compute. Sampling is per prompt, so the
    # order changes nothing but speed. The sort is stable: the n rows of a prompt stay
    # adjacent, in one call as far as batch_size allows (they prefill the prompt once).
    order = torch.argsort(prompt_mask.sum(1), stable=True)
    if sample_index is None:
        sample_index = torch.zeros_like(prompt_index)
    max_new_tokens = g.max_new_tokens if max_new_tokens is None else max_new_tokens
    pieces = []
    for start in range(0, len(prompt_ids), g.batch_size):
        rows = order[start:start + g.batch_size]
        first = int(prompt_mask[rows].any(0).long().argmax())
        pieces.append(generation.generate(
            gen.model, prompt_ids[rows, first:].to(device),
            prompt_mask[rows, first:].to(device), prompt_index[rows], step=step,
            seed=seed, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, temperature=g.temperature, top_k=g.top_k,
            top_p=g.top_p, greedy=greedy, synced=gen.synced,
            static_cache=g.static_cache, decode=gen.decode,
            sample_index=sample_index[rows], return_logprobs=True,
            position_offset=None if position_offset is None else position_offset[rows],
            share_prompt_prefill=g.share_prompt_prefill,
            compact_finished_rows=g.compact_finished_rows, stats=stats))
    unsort = torch.argsort(order).to(device)
    response_ids, response_mask, sampler_logprobs = (
        x[unsort].cpu() for x in generation.pad_responses(pieces, pad_token_id))
    return Rollout(prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(),
                   response_ids=response_ids, response_mask=response_mask,
                   prompt_index=prompt_index.cpu(), sample_index=sample_index.cpu(),
                   sampler_logprobs=sampler_logprobs)


class Critic(_Trainable):
    def __init__(self, engine, grad_accum: int, coord, ppo: PPOConfig, batcher: MicroBatcher):
        super().__init__(engine, grad_accum, coord, ppo.nonfinite, batcher)
        self.clip_eps = ppo.value_clip_eps

    def values(self, rollout: Rollout) -> torch.Tensor:
        return _forward_all(self.engine, rollout, self.batcher, _token_values)

    def export(self, path, tokenizer, is_main: bool) -> None:
        """HF format, loadable by AutoModelForSequenceClassification (num_labels=1)."""
        export_hf(self.engine, self.engine.module.hf_model, tokenizer, path, is_main)

    def train_step(self, minibatch: Rollout, scale: LossScale) -> dict[str, float]:
        def loss_fn(chunk: Rollout, idx: torch.Tensor, denominator: torch.Tensor):
            values = _token_values(self.engine, chunk)
            chunk, denominator = chunk.to(values.device), denominator.to(values.device)
            return (*algo.value_loss(values, chunk.values, chunk.returns, chunk.loss_mask,
                                     self.clip_eps, num_tokens=denominator), values)
        return self._run(minibatch, scale, loss_fn)


class Reference:
    def __init__(self, engine, batcher: MicroBatcher, temperature: float):
        self.engine = engine
        self.batcher = batcher
        self.temperature = temperature  # the actor's: both logprobs come from one distribution

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return _forward_all(self.engine, rollout, self.batcher,
                            lambda e, c: _token_logprobs(e, c, self.temperature))


class RewardModel:
    def __init__(self, engine, batcher: MicroBatcher):
        self.engine = engine
        self.batcher = batcher

    @staticmethod
    def _score(engine, chunk: Rollout) -> torch.Tensor:
        # The score is read at the last real token, found from lengths (never from pad ids):
        # the prompt is left padded, so it is at P - 1 + response length.
        chunk, inputs = _inputs(engine, chunk)
        last = chunk.prompt_ids.shape[1] - 1 + chunk.response_lengths
        return engine(**inputs).gather(1, last[:, None]).squeeze(1)

    def scores(self, rollout: Rollout) -> torch.Tensor:
        return _forward_all(self.engine, rollout, self.batcher, self._score)
