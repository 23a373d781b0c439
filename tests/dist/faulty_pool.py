"""`ds-rlhf` whose generation ranks (rollout.placement separate) raise when asked for the
rollout of step FAIL_AT_STEP, or with FAULT=stall hang there: run by
tests/dist/test_run_safety.py under the launcher.

    python tests/dist/faulty_pool.py ppo --config run.yaml
"""

import os
import signal
import sys
import time

from ds_rlhf import cli, pool

real = pool.sample_responses


def failing(gen, g, device, prompt_ids, prompt_mask, prompt_index, step, *args, **kwargs):
    if step == int(os.environ["FAIL_AT_STEP"]):
        if os.environ.get("FAULT") == "stall":  # hangs (a deadlocked kernel, a lost node)
            # and dies at the launcher's SIGTERM once the training ranks gave up (not 30 s
            # later at its SIGKILL, as a rank that ignores SIGTERM would)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(120)
        raise RuntimeError("the generation rank's accelerator fell off the bus")
    return real(gen, g, device, prompt_ids, prompt_mask, prompt_index, step, *args, **kwargs)


pool.sample_responses = failing

if __name__ == "__main__":
    sys.exit(cli.main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
