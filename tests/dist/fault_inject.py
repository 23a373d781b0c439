"""`ds-rlhf` with one fault injected, chosen by environment variables:

    UNSET_ON_RANK=R VARS=A,B   rank R starts without the variables A, B (a node that lacks
                               what the launcher did not forward)
    FAIL_MANIFEST_STEP=N       rank 0's manifest write of step N's checkpoint raises OSError
                               (a full disk between the barriers of a save)
    RAISE_ON_RANK=R            rank R's first PPO step raises a DataError (an error of one
                               rank outside any agreement of the ranks)

Run by tests/dist/test_run_safety.py under `deepspeed --num_gpus 2`; arguments as for ds-rlhf.
"""

import errno
import os
import sys

from ds_rlhf import checkpoint
from ds_rlhf.cli import main
from ds_rlhf.config import DataError
from ds_rlhf.coordinator import exit_process
from ds_rlhf.trainers.ppo import PPOTrainer

if os.environ.get("RANK") == os.environ.get("UNSET_ON_RANK"):
    for name in os.environ["VARS"].split(","):
        os.environ.pop(name, None)

write_manifest = checkpoint.write_manifest


def failing_manifest(step_dir):
    if step_dir.name == f"step_{os.environ['FAIL_MANIFEST_STEP']}":
        raise OSError(errno.ENOSPC, "No space left on device", str(step_dir / "manifest.json"))
    write_manifest(step_dir)


if "FAIL_MANIFEST_STEP" in os.environ:
    checkpoint.write_manifest = failing_manifest


def failing_step(self, step):
    raise DataError("prompt 3: cannot be read on this rank")


if os.environ.get("RANK") == os.environ.get("RAISE_ON_RANK"):
    PPOTrainer.ppo_step = failing_step
exit_process(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
