"""Run by tests/dist/test_nonfinite.py under `deepspeed --num_gpus 2` (actor at ZeRO-2, with
a warm-up scheduler):

    python tests/dist/nonfinite_checks.py CONFIG.yaml RESULT.json

1. After two healthy steps (AdamW has momentum now, and the warm-up, whose first two steps
   DeepSpeed's WarmupLR runs at lr 0, a learning rate > 0),
   a PPO step where every actor micro-batch on both ranks has a NaN loss: the actor takes no
   optimizer step (weights bit-identical, global step and scheduler unchanged; AdamW's
   momentum would otherwise move the weights) while the critic trains.
2. The next step trains the actor, at the learning rate of its third step.
3. Every score NaN: each step drops every row and trains nothing, and after
   ppo.max_untrained_steps such steps the run stops with NonFiniteError.
4. Under ppo.nonfinite: stop, one NaN score stops the step on every rank (NonFiniteError,
   which `ds-rlhf` turns into exit code 3: see tests/dist/test_faults.py).
Rank 0 writes what each rank saw to RESULT.json.
"""

import json
import sys
from pathlib import Path

import torch

from ds_rlhf import algo
from ds_rlhf.config import load_config
from ds_rlhf.coordinator import exit_process, stop_distributed
from ds_rlhf.engines.roles import RewardModel
from ds_rlhf.errors import NonFiniteError
from ds_rlhf.trainers.ppo import build_ppo

policy_loss = algo.policy_loss


def nan_policy_loss(*args, **kwargs):
    loss, stats = policy_loss(*args, **kwargs)
    return loss * float("nan"), stats


def snapshot(engine) -> dict:
    return {"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "global_steps": engine.global_steps, "lr": engine.get_lr()[0],
            "scheduler": engine.lr_scheduler.state_dict()}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    trainer = build_ppo(load_config(args[0]))
    actor, critic, out = trainer.actor.engine, trainer.critic.engine, {}

    for _ in range(2):
        trainer.step += 1
        trainer.ppo_step(trainer.step)
    # 1. NaN policy loss in every actor micro-batch, on every rank.
    algo.policy_loss = nan_policy_loss
    before = snapshot(actor)
    trainer.step += 1
    metrics = trainer.ppo_step(trainer.step)
    after = snapshot(actor)
    out["skip"] = {
        "identical": all(torch.equal(before["params"][n], p) for n, p in after["params"].items()),
        "global_steps": [before["global_steps"], after["global_steps"]],
        "lr": [before["lr"], after["lr"]],
        "scheduler_same": before["scheduler"] == after["scheduler"],
        "critic_steps": critic.global_steps, "critic_lr": critic.get_lr()[0],
        "skipped_minibatches": metrics["train/skipped_minibatches"],
        "skipped_microbatches": metrics["train/skipped_microbatches"]}

    # 2. Healthy again: the actor's third optimizer step.
    algo.policy_loss = policy_loss
    trainer.step += 1
    metrics = trainer.ppo_step(trainer.step)
    again = snapshot(actor)
    out["next"] = {
        "changed": any(not torch.equal(after["params"][n], p)
                       for n, p in again["params"].items()),
        "global_steps": again["global_steps"], "lr": again["lr"],
        "skipped_minibatches": metrics["train/skipped_minibatches"]}

    # 3. Every score NaN: stop after ppo.max_untrained_steps steps that trained nothing.
    RewardModel.scores = lambda self, rollout: torch.full((len(rollout),), float("nan"))
    trainer.cfg.ppo.steps = trainer.step + 10
    start = trainer.step
    try:
        trainer.train()
        out["stopped"] = None
    except NonFiniteError as e:
        out["stopped"] = {"message": str(e), "steps": trainer.step - start,
                          "actor_steps": actor.global_steps}

    # 4. ppo.nonfinite: stop, one NaN row (on rank 1 only).
    trainer.cfg.ppo.nonfinite = "stop"
    rank = trainer.coord.rank
    RewardModel.scores = lambda self, rollout: torch.tensor(
        [float("nan") if rank == 1 and i == 0 else 0.5 for i in range(len(rollout))])
    try:
        trainer.step += 1
        trainer.ppo_step(trainer.step)
        out["stop"] = None
    except NonFiniteError as e:
        out["stop"] = str(e)
    ranks = trainer.coord.gather_objects([out])
    if trainer.coord.is_main:
        Path(args[1]).write_text(json.dumps(ranks))
    stop_distributed()
    exit_process(0)  # see its docstring


if __name__ == "__main__":
    main()
