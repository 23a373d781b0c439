"""`ds-rlhf` with a NaN policy loss injected on rank 1 only, at its 3rd actor micro-batch.

Run by tests/dist/test_faults.py under `deepspeed --num_gpus 2`; arguments as for ds-rlhf.
"""

import os
import sys

from ds_rlhf import algo
from ds_rlhf.cli import main
from ds_rlhf.coordinator import exit_process

policy_loss = algo.policy_loss
calls = 0


def poisoned(*args, **kwargs):
    global calls
    loss, stats = policy_loss(*args, **kwargs)
    calls += 1
    if os.environ["RANK"] == "1" and calls == 3:
        loss = loss * float("nan")
    return loss, stats


algo.policy_loss = poisoned
exit_process(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
