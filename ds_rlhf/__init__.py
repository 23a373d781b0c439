"""ds_rlhf: RLHF (SFT -> reward model -> PPO) on DeepSpeed.

Importing the package must stay cheap and must not import deepspeed: the pure modules
such as ``ds_rlhf.algo`` and ``ds_rlhf.rollout`` are used without it.
"""

__version__ = "0.1.0"
