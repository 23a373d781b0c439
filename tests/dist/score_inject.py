"""`ds-rlhf` with NaN reward scores injected on every rank: the rows whose prompt index is a
multiple of SCORE_NAN_EVERY (default 6: 11 of the 64 test prompts, about 17%) score NaN.

Run by tests/dist/test_nonfinite.py under `deepspeed --num_gpus 2`; arguments as for ds-rlhf.
"""

import os
import sys

import torch

from ds_rlhf.cli import main
from ds_rlhf.coordinator import exit_process
from ds_rlhf.engines.roles import RewardModel

scores = RewardModel.scores
every = int(os.environ.get("SCORE_NAN_EVERY", "6"))


def poisoned(self, rollout):
    return torch.where(rollout.prompt_index % every == 0, float("nan"), scores(self, rollout))


RewardModel.scores = poisoned
exit_process(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
