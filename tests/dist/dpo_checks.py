"""Run by tests/dist/test_dpo.py under `deepspeed --num_gpus N`: several DPO runs in one launch.

    python tests/dist/dpo_checks.py RUNS.json RESULT.json

RUNS.json is a list of {"name", "config" (a DPORunConfig as a dict), "reference" ("own": as
the trainer builds it; "engine": a frozen reference engine of the policy's initial model,
replacing the LoRA policy's adapters-off reference), "preempt_at" (optional: rank 1 gets
SIGUSR1 after that step, the run saves and stops, and a freshly built trainer resumes it),
"nan_at" (optional: rank 1's loss turns NaN at its nth micro-batch; every rank must stop)}.
Each run trains, evaluates and exports OUTPUT_DIR/model; rank 0 writes what it saw of each
run's reference to RESULT.json. Building several trainers in one process saves a launcher
start (about 10 s) per run.
"""

import gc
import json
import os
import signal
import sys

from ds_rlhf import checkpoint, models
from ds_rlhf.config import DPORunConfig, load_config
from ds_rlhf.coordinator import exit_process, stop_distributed
from ds_rlhf.engines.roles import init_engine
from ds_rlhf.errors import NonFiniteError
from ds_rlhf.trainers.dpo import Reference, build_dpo


def frozen_reference(cfg: DPORunConfig, pad_id: int) -> Reference:
    engine = init_engine(models.build_causal_lm(cfg.policy.model, "ref", cfg.ref.dtype, cfg.seed),
                         cfg.ref, 1, int(os.environ["WORLD_SIZE"]))
    return Reference(engine, False, cfg.ref.micro_batch_size, pad_id)


def preempt_after(trainer, step: int) -> None:
    """Rank 1 signals itself after optimizer step `step`, as a scheduler's warning would."""
    train_step = trainer.train_step

    def step_then_signal(micro_rows):
        metrics = train_step(micro_rows)
        if trainer.session.coord.rank == 1 and trainer.session.engine.global_steps == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return metrics

    trainer.train_step = step_then_signal


def poison(trainer, nth: int) -> None:
    """Rank 1's loss is NaN at its nth micro-batch (rank 0's stays finite)."""
    pair_losses, calls = trainer.pair_losses, [0]

    def poisoned(*args):
        losses, stats = pair_losses(*args)
        calls[0] += 1
        if trainer.session.coord.rank == 1 and calls[0] == nth:
            losses = losses * float("nan")
        return losses, stats

    trainer.pair_losses = poisoned


def release(trainer) -> None:
    trainer.session.engine.destroy()
    if trainer.reference.model is not None and trainer.reference.model is not \
            trainer.session.engine:
        trainer.reference.model.destroy()
    gc.collect()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    runs = json.loads(open(args[0]).read())
    seen = {}
    for run in runs:
        cfg = load_config(None, run["config"], cls=DPORunConfig)
        trainer = build_dpo(cfg)
        if run.get("reference") == "engine":
            trainer.reference = frozen_reference(cfg, trainer.tokenizer.pad_token_id)
        seen[run["name"]] = {
            "reference_is_policy": trainer.reference.model is trainer.session.engine,
            "reference_freed": trainer.reference.model is None,
            "precomputed": trainer.train_set.ref_logps is not None}
        if run.get("preempt_at"):
            preempt_after(trainer, run["preempt_at"])
            assert trainer.fit() is None  # preempted: saved and stopped
            release(trainer)
            checkpoint.preemption_flag().signalled = None  # a new process would start clean
            trainer = build_dpo(cfg)
            seen[run["name"]]["resumed_at"] = trainer.session.resume_state["step"]
        if run.get("nan_at"):
            poison(trainer, run["nan_at"])
            try:
                trainer.fit()
            except NonFiniteError as e:
                seen[run["name"]]["stopped"] = str(e)
            release(trainer)
            continue
        final = trainer.fit()
        trainer.finish(final)
        release(trainer)
    if trainer.session.coord.is_main:
        with open(args[1], "w") as f:
            json.dump(seen, f)
    stop_distributed()
    exit_process(0)  # see its docstring


if __name__ == "__main__":
    main()
