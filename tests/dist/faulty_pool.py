"""`ds-rlhf` whose generation ranks (rollout.placement separate) misbehave: run by
tests/dist/test_run_safety.py and tests/dist/test_resume.py under the launcher.

    FAULT=raise (default), FAIL_AT_STEP=s   raise when asked for the rollout of step s
    FAULT=stall, FAIL_AT_STEP=s             hang there
    FAULT=die, FAIL_AT_STEP=s               die there (SIGKILL: no word to anyone)
    FAULT=slow_weights, SLOW_VERSION=v, IN_TRANSIT=path
        on receiving the weights W_v, touch `path`, then wait 3 s before taking the
        buckets: training rank 0 is blocked sending them meanwhile (weights in transit)

    python tests/dist/faulty_pool.py ppo --config run.yaml
"""

import os
import signal
import sys
import time
from pathlib import Path

from ds_rlhf import cli, pool

real_sample, real_receive = pool.sample_responses, pool.receive_weights
FAULT = os.environ.get("FAULT", "raise")


def failing(gen, g, device, prompt_ids, prompt_mask, prompt_index, step, *args, **kwargs):
    if step == int(os.environ["FAIL_AT_STEP"]):
        if FAULT == "die":  # the OOM killer, a lost node
            os.kill(os.getpid(), signal.SIGKILL)
        if FAULT == "stall":  # hangs (a deadlocked kernel, a lost node)
            # and dies at the launcher's SIGTERM once the training ranks gave up (not 30 s
            # later at its SIGKILL, as a rank that ignores SIGTERM would)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(120)
        raise RuntimeError("the generation rank's accelerator fell off the bus")
    return real_sample(gen, g, device, prompt_ids, prompt_mask, prompt_index, step, *args,
                       **kwargs)


def slow(bridge, model, header):
    if header["version"] == int(os.environ["SLOW_VERSION"]):
        Path(os.environ["IN_TRANSIT"]).touch()
        time.sleep(3)
    return real_receive(bridge, model, header)


if FAULT == "slow_weights":
    pool.receive_weights = slow
else:
    pool.sample_responses = failing

if __name__ == "__main__":
    sys.exit(cli.main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
