"""Run by tests/dist/test_ppo_dist.py under `deepspeed --num_gpus 2` on CPU ranks.

    python tests/dist/ppo_checks.py CONFIG.yaml RESULT.json

Builds the real PPO trainer, then on real engines (actor/critic ZeRO-3, frozen ZeRO-3):
1. reward position: the score is read at the last real token, found from lengths, for a
   response that ends in EOS (followed by pads == EOS) and one that hits the length limit;
2. uneven lengths: rank 0's rows stop at once, rank 1's run to the limit; generation (gathered
   copy and ZeRO-3 fallback) and a whole PPO step complete without hanging;
3. the HybridEngine's copy: equal to the gathered training weights before and after an
   update, tied embeddings in one storage, no weights held after leaving generation mode;
4. after a second PPO step the trained engines' prefetch traces are complete (the scoring
   forwards no longer make every step re-record them);
5. the all-gathers of a third step: these tiny models' parameters are all kept whole by
   ZeRO-3 (persistent), so only each trained engine's re-gather after its optimizer step
   remains, one coalesced collective, and the scoring and training forwards gather nothing.
Rank 0 writes what it saw to RESULT.json; the test asserts on it.
"""

import json
import sys

import deepspeed
import torch

from ds_rlhf.config import load_config
from ds_rlhf.coordinator import exit_process, stop_distributed
from ds_rlhf.engines.hybrid import _gather_into
from ds_rlhf.models import sequence_inputs
from ds_rlhf.rollout import Rollout
from ds_rlhf.trainers.ppo import build_ppo


def reward_position(trainer) -> dict:
    eos = trainer.tokenizer.eos_token_id
    assert trainer.tokenizer.pad_token_id == eos
    prompt_ids = torch.tensor([[eos, 5, 6, 7], [8, 9, 10, 11]])  # row 0 left padded
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    # Row 0 ends in EOS at t=2, then pads (== EOS). Row 1 fills the whole length (no EOS).
    response_ids = torch.tensor([[12, 13, eos, eos, eos], [14, 15, 16, 17, 18]])
    response_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.arange(2))
    scores = trainer.reward.scores(rollout)
    engine = trainer.reward.engine
    with torch.no_grad():
        ids, attn, pos = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        per_token = engine(input_ids=ids.to(engine.device), attention_mask=attn.to(engine.device),
                           position_ids=pos.to(engine.device)).cpu()
    return {"scores": scores.tolist(), "per_token": per_token.tolist()}


def uneven(trainer, vocab_size: int) -> dict:
    rank = trainer.coord.rank
    actor = trainer.actor
    # Rank 0: every token is an EOS, so its rows stop after one token. Rank 1: no EOS can be
    # sampled (an id outside the vocabulary), so its rows run to max_new_tokens.
    actor.eos_token_id = list(range(vocab_size)) if rank == 0 else [vocab_size + 7]
    lengths = {}
    for gather in (True, False):
        actor.hybrid.gather_weights = gather
        idx = torch.arange(4) + 4 * rank
        prompt_ids, prompt_mask = torch.full((4, 3), 5), torch.ones(4, 3, dtype=torch.long)
        with actor.generation_mode():
            rollout = actor.generate(prompt_ids, prompt_mask, idx, step=1)
        lengths[f"gather={gather}"] = rollout.response_lengths.tolist()
    actor.hybrid.gather_weights = True
    trainer.step += 1
    metrics = trainer.ppo_step(trainer.step)
    return {"lengths": lengths, "metrics": metrics}


def hybrid_copy(trainer) -> dict:
    module = trainer.actor.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        expected = {name: p.detach().clone() for name, p in module.named_parameters()}
    # The all-gather path of the copy's fill, for every parameter: these tiny models' are all
    # kept whole by ZeRO-3 (persistent), which the fill copies instead.
    params = list(module.named_parameters())
    world = trainer.coord.world_size
    dests = [torch.zeros(p.ds_tensor.numel() * world, dtype=p.dtype) for _, p in params]
    _gather_into([(p, d) for (_, p), d in zip(params, dests, strict=True)],
                 trainer.actor.engine.device)
    gathered = all(torch.equal(d[:p.ds_numel].view(p.ds_shape), expected[name])
                   for (name, p), d in zip(params, dests, strict=True))
    with trainer.actor.hybrid.generation_mode() as gen:
        copy = gen.model
        equal = sorted(expected) == sorted(n for n, _ in copy.named_parameters()) and all(
            torch.equal(p, expected[name]) for name, p in copy.named_parameters())
        tied = (copy.get_input_embeddings().weight.data_ptr()
                == copy.get_output_embeddings().weight.data_ptr())
    return {"equal": equal, "tied": tied, "gathered": gathered,
            "numel_after": sum(p.numel() for p in copy.parameters())}


def traces_complete(trainer) -> dict:
    trainer.step += 1
    trainer.ppo_step(trainer.step)
    return {role: getattr(trainer, role).engine.optimizer.parameter_offload
            .get_param_coordinator().is_complete_trace() for role in ("actor", "critic")}


def all_gathers_per_step(trainer) -> dict:
    """The elements each rank contributes to every all-gather of one PPO step (DeepSpeed's
    collectives all go through its backend object, `cdb`)."""
    backend = deepspeed.comm.comm.cdb
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["input_tensor"].numel())
        return type(backend).all_gather_into_tensor(backend, *args, **kwargs)

    backend.all_gather_into_tensor = counted
    try:
        trainer.step += 1
        trainer.ppo_step(trainer.step)
    finally:
        del backend.all_gather_into_tensor
    persistent = {role: sum(p.ds_tensor.numel() for p in getattr(trainer, role).engine
                            .optimizer.persistent_parameters) for role in ("actor", "critic")}
    return {"calls": calls, "persistent_numel": persistent}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(args[0])
    trainer = build_ppo(cfg)
    vocab_size = len(trainer.tokenizer)
    result = {"reward_position": reward_position(trainer),
              "hybrid_before": hybrid_copy(trainer),
              "uneven": uneven(trainer, vocab_size),
              "hybrid_after": hybrid_copy(trainer),
              "traces_complete": traces_complete(trainer),
              "all_gathers": all_gathers_per_step(trainer)}
    lengths = trainer.coord.gather_objects([result["uneven"]["lengths"]])
    if trainer.coord.is_main:
        result["uneven"]["lengths_by_rank"] = lengths
        with open(args[1], "w") as f:
            json.dump(result, f)
    stop_distributed()
    exit_process(0)  # see its docstring


if __name__ == "__main__":
    main()
