"""Run by tests/dist/test_lora.py under `deepspeed --num_gpus 2`: PPO with a LoRA actor.

    python tests/dist/lora_checks.py CONFIG.yaml RESULT.json

Trains a few PPO steps, then generates greedily with the HybridEngine (adapters merged into a
plain copy) and through the training module itself (adapters unmerged), and exports the actor.
"""

import json
import sys
from pathlib import Path

import torch

from ds_rlhf import generation
from ds_rlhf.config import load_config
from ds_rlhf.coordinator import exit_process, stop_distributed
from ds_rlhf.trainers.ppo import build_ppo


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(args[0])
    trainer = build_ppo(cfg)
    trainer.train()
    actor, coord = trainer.actor, trainer.coord
    module = actor.engine.module
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()
                    if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    prompt_ids, prompt_mask = torch.randint(2, 100, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    prompt_mask[0, :2] = 0
    index = torch.arange(4) + 4 * coord.rank
    with actor.generation_mode():
        merged = actor.generate(prompt_ids, prompt_mask, index, step=99, greedy=True)
    module.eval()
    unmerged, _ = generation.generate(
        module, prompt_ids, prompt_mask, index, step=99, seed=cfg.seed,
        max_new_tokens=cfg.generation.max_new_tokens, eos_token_id=actor.eos_token_id,
        pad_token_id=actor.pad_token_id, greedy=True,
        synced=coord.all if actor.hybrid.zero3 else None)
    module.train()
    actor.export(Path(cfg.output_dir) / "actor", trainer.tokenizer, coord.is_main)
    results = coord.gather_objects([{
        "merged": merged.response_ids.tolist(), "unmerged": unmerged.cpu().tolist(),
        "merged_mask": merged.response_mask.tolist(), "trainable": trainable, "total": total}])
    if coord.is_main:
        Path(args[1]).write_text(json.dumps(results))
    stop_distributed()
    exit_process(0)  # see its docstring


if __name__ == "__main__":
    main()
