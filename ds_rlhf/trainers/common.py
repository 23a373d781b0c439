"""What the supervised loops (SFT, the reward model and DPO) share.

Batch arithmetic, the distributed start (with auto-resume), the loop itself (equal shards of a
seeded per-epoch permutation, eval before / every N steps / after, metrics, checkpoints and
preemption), the normalised backward, the eval reduction over ranks and the end of a run (HF
export, eval.json). The step-specific maths (token NLL, pairwise loss, DPO losses) stays in
sft.py, reward.py and dpo.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_rlhf import checkpoint, model_card, models
from ds_rlhf.config import (
    ConfigError,
    DPORunConfig,
    RMRunConfig,
    SFTRunConfig,
    TrainConfig,
    TrainEngineConfig,
    exact_div,
    save_yaml,
)
from ds_rlhf.coordinator import (
    Coordinator,
    PromptSampler,
    set_phase,
    setup_distributed_env,
    start_distributed,
)
from ds_rlhf.data.sources import check_resumed_split
from ds_rlhf.engines.export import export_hf
from ds_rlhf.engines.roles import init_engine
from ds_rlhf.errors import NonFiniteError
from ds_rlhf.tracking import Tracker

RunConfig = SFTRunConfig | RMRunConfig | DPORunConfig
# A micro-batch's loss: (sum of per-unit losses as a tensor, stats as sums of floats).
LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


def trained(cfg: RunConfig) -> tuple[str, TrainEngineConfig]:
    """(section name, settings) of the run's trained engine: `policy` in DPO, else `model`."""
    return ("policy", cfg.policy) if isinstance(cfg, DPORunConfig) else ("model", cfg.model)


def check_sizes(cfg: RunConfig) -> tuple[int, int]:
    """(world_size, grad_accum) from train.batch_size = micro_batch_size x grad_accum x world,
    each division exact; and data.max_len within the model's positions."""
    setup_distributed_env()
    world_size = int(os.environ["WORLD_SIZE"])
    role, engine_cfg = trained(cfg)
    unit = "rows" if isinstance(cfg, SFTRunConfig) else "pairs"
    per_rank = exact_div(
        cfg.train.batch_size, world_size, "train.batch_size",
        f"every one of the {world_size} ranks must get the same number of {unit}; use a "
        f"multiple of {world_size}")
    mbs = engine_cfg.micro_batch_size
    grad_accum = exact_div(
        per_rank, mbs, f"{role}.micro_batch_size",
        f"each rank's {per_rank} {unit} per step (train.batch_size / world size {world_size}) "
        f"must split into micro-batches of {mbs}; use a micro_batch_size that divides "
        f"{per_rank}, or change train.batch_size")
    limit = getattr(models.hf_config(engine_cfg.model, role), "max_position_embeddings", None)
    if limit is not None and cfg.data.max_len > limit:
        raise ConfigError(f"data.max_len: {cfg.data.max_len} exceeds the model's "
                          f"max_position_embeddings ({limit}); lower it")
    return world_size, grad_accum


def num_steps(train: TrainConfig, num_rows: int) -> int:
    """Optimizer steps of the run: train.max_steps, or whole batches in train.epochs."""
    if num_rows < train.batch_size:
        raise ConfigError(f"train.batch_size: {train.batch_size} is larger than the {num_rows} "
                          "training rows; lower it or add data")
    return train.max_steps or train.epochs * (num_rows // train.batch_size)


@dataclass
class Session:
    """A started run: the ranks, the engine, and the checkpoint state it resumed from."""

    coord: Coordinator
    engine: Any
    preempted: checkpoint.PreemptionFlag
    resume_state: dict | None  # trainer_state.json of the loaded checkpoint (None: fresh)
    data_split: list[dict[str, str]]  # fingerprints of the rows (sources.split_state)


def start(cfg: RunConfig, build_model: Callable[[], nn.Module], grad_accum: int,
          world_size: int, data_split: list[dict[str, str]]) -> Session:
    """init_distributed, save config.yaml, build the ZeRO engine, load the newest checkpoint
    of OUTPUT_DIR/checkpoints if there is one (and checkpoint.resume is on) once its data
    fingerprints match `data_split` (or data.allow_changed_data)."""
    preempted = checkpoint.preemption_flag()  # a signal now waits for a step boundary
    coord = start_distributed(cfg.distributed.timeout_minutes)
    resume_dir, state = checkpoint.open_run(cfg.output_dir, cfg.checkpoint.resume, coord)
    check_resumed_split(cfg.data, state, data_split, coord.is_main)
    if coord.is_main:
        save_yaml(cfg, Path(cfg.output_dir) / "config.yaml")
    engine = init_engine(build_model(), trained(cfg)[1], grad_accum, world_size,
                         load_universal=checkpoint.is_universal(state, world_size))
    if resume_dir is not None:
        checkpoint.load(resume_dir, {"model": engine}, coord, state)
        if coord.is_main:
            print(f"resumed from {resume_dir} at step {state['step']}", flush=True)
    return Session(coord, engine, preempted, state, data_split)


def backward_step(engine, batches: list, loss_fn: LossFn, num_global: float,
                  coord: Coordinator, lr_field: str = "model.lr") -> dict[str, float]:
    """One optimizer step over this rank's micro-batches, normalised by a global count.

    `loss_fn(batch)` gives the *sum* of per-token (SFT) or per-pair (RM) losses and `num_global`
    is the count of those units in the whole optimizer batch over all ranks. DeepSpeed divides
    each micro-batch loss by grad_accum and averages gradients over ranks; scaling by
    world_size * grad_accum / num_global undoes both, so the step follows
    sum(losses) / num_global whatever the number of ranks or micro-batches.
    Returns this rank's sums ("loss" and the stats); `Coordinator.sum_dict` totals them.
    A non-finite loss on any rank stops every rank before its gradient exists (exit code 3):
    in SFT, reward and DPO training it means broken data or divergence, not a rare bad
    sample. `lr_field` names the learning rate in the error.
    """
    scale = coord.world_size * len(batches) / max(num_global, 1.0)
    totals: dict[str, float] = {}
    for batch in batches:
        loss_sum, stats = loss_fn(batch)
        bad = coord.sum(torch.tensor([float(not bool(torch.isfinite(loss_sum)))]))
        if bad.item() > 0:
            raise NonFiniteError(
                f"non-finite loss on {int(bad.item())} rank(s) at optimizer step "
                f"{engine.global_steps + 1}; the last checkpoint is intact. Check the data for "
                f"empty targets or bad values, or lower {lr_field}")
        engine.backward(loss_sum * scale)
        engine.step()
        for key, value in {"loss": loss_sum.item(), **stats}.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


@torch.no_grad()
def eval_sums(engine, coord: Coordinator, num_rows: int, micro_batch_size: int,
              fn: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
              ) -> dict[str, float]:
    """Sums of `fn(rows, weights)` over every eval row once, totalled over ranks.

    Rank r takes rows r, r + W, ...; a rank with one row fewer repeats a row with weight 0, so
    every rank runs the same number of forwards (ZeRO-3 forwards are collective). `fn` must
    weight each row's contribution by `weights`.
    """
    rows = torch.arange(coord.rank, num_rows, coord.world_size)
    per_rank = math.ceil(num_rows / coord.world_size)
    weights = torch.cat([torch.ones(len(rows)), torch.zeros(per_rank - len(rows))])
    rows = torch.cat([rows, rows.new_zeros(per_rank - len(rows))])
    totals: dict[str, float] = {}
    engine.eval()
    try:
        for r, w in zip(rows.split(micro_batch_size), weights.split(micro_batch_size),
                        strict=True):
            for key, value in fn(r, w).items():
                totals[key] = totals.get(key, 0.0) + float(value)
    finally:
        engine.train()
    return coord.sum_dict(totals)


def fit(cfg: RunConfig, session: Session, num_train: int, total_steps: int,
        train_step: Callable[[list[torch.Tensor]], dict[str, float]],
        evaluate: Callable[[], dict[str, float]] | None) -> dict[str, float] | None:
    """The loop: eval, then train_step(this rank's micro-batches of row ids) to total_steps.

    Each step takes the next train.batch_size rows of a seeded per-epoch permutation (an
    epoch's leftover is skipped) and gives rank r the r-th equal share, cut into micro-batches.
    Eval runs before training, every train.eval_every steps and after the last. Checkpoints
    every checkpoint.save_every steps, at the end, and when any rank got a preemption signal
    (then returns None). Returns the last eval metrics ({} without eval rows).
    """
    t, coord, engine = cfg.train, session.coord, session.engine
    sampler = PromptSampler(num_train, t.batch_size, cfg.data.seed)
    step = saved = 0
    if session.resume_state is not None:
        sampler.load_state_dict(session.resume_state["sampler"])
        step = saved = session.resume_state["step"]
    resumed = session.resume_state or {}
    # W&B where the run has a tracking section (DPO); SFT and RM log to metrics.jsonl only.
    tracker = Tracker(cfg.output_dir, coord.is_main, t.log_every, total_steps, start_step=step,
                      tracking=getattr(cfg, "tracking", None), config=cfg,
                      run_id=resumed.get("wandb_run_id"))

    def save() -> None:
        nonlocal saved
        if step != saved:
            checkpoint.save(cfg.output_dir, step, {"model": engine},
                            {"sampler": sampler.state_dict(), "wandb_run_id": tracker.run_id,
                             "data_split": session.data_split},
                            coord, cfg.checkpoint.keep_last)
            saved = step

    def run_eval() -> dict[str, float]:
        set_phase(f"eval after step {step}")
        start = time.perf_counter()
        metrics = evaluate()
        if coord.is_main:
            cells = " | ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items())
            print(f"eval step {step}/{total_steps} | {cells}", flush=True)
        return {**metrics, "timing/eval": time.perf_counter() - start}

    final: dict[str, float] = {}
    if evaluate and step == 0:
        final = run_eval()
        tracker.log(0, final)
    while step < total_steps:
        if coord.any(bool(session.preempted)):  # all ranks agree, then save together
            save()
            checkpoint.preempted_exit(saved, coord.is_main)
            tracker.finish()
            return None
        step += 1
        set_phase(f"step {step} train")
        start = time.perf_counter()
        lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step uses
        rows = coord.shard(sampler.next_batch())
        micro_rows = list(rows.split(trained(cfg)[1].micro_batch_size))
        metrics = {**train_step(micro_rows), "train/lr": lr}
        grad_norm = engine.get_global_grad_norm()  # before clipping; None where not computed
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics["timing/step"] = time.perf_counter() - start
        # rows (SFT) or pairs (RM, DPO) of the global batch, as PPO counts its rows
        metrics["perf/samples_per_s"] = t.batch_size / metrics["timing/step"]
        if evaluate and (step == total_steps or (t.eval_every and step % t.eval_every == 0)):
            final = run_eval()
            metrics.update(final)
        tracker.log(step, metrics)
        if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0:
            save()
    save()
    if evaluate and not final:  # resumed from the last step: nothing was evaluated yet
        final = run_eval()
    tracker.finish()
    return {k: v for k, v in final.items() if k.startswith("eval/")}


def finish(cfg: RunConfig, coord: Coordinator, engine, hf_model: nn.Module, tokenizer,
           final: dict[str, float], step: int) -> None:
    """HF export to OUTPUT_DIR/model (with its model card) and the last eval metrics to
    OUTPUT_DIR/eval.json."""
    out = Path(cfg.output_dir)
    set_phase("export")
    export_hf(engine, hf_model, tokenizer, out / "model", coord.is_main)
    if coord.is_main:
        model_card.write(out / "model", cfg, trained(cfg)[0])
        if final:
            metrics = {"step": step, **{k.removeprefix("eval/"): v for k, v in final.items()}}
            (out / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"exported {out / 'model'}", flush=True)
