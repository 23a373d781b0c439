"""Importing the package and its pure modules must not import deepspeed (nor torch.distributed
work): they are used in tools, tests and notebooks without a distributed runtime."""

from __future__ import annotations

import subprocess
import sys


def test_pure_modules_do_not_import_deepspeed():
    code = ("import sys, ds_rlhf, ds_rlhf.config, ds_rlhf.algo, ds_rlhf.rollout, "
            "ds_rlhf.generation, ds_rlhf.data, ds_rlhf.tracking, ds_rlhf.cli, ds_rlhf.rewards; "
            "print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
