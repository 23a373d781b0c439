"""The `ds-rlhf` command.

    ds-rlhf {sft,rm,ppo} --config run.yaml [--section.key VALUE ...] [--print-config]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module ds_rlhf ppo --config run.yaml
    torchrun --nproc_per_node 2 -m ds_rlhf ppo --config run.yaml
    ds-rlhf plot RUN_DIR [--out plot.png]       # curves of RUN_DIR/metrics.jsonl as a PNG
    ds-rlhf bench ppo --preset tiny             # one JSON line: throughput, time split, memory

Any `--section.key VALUE` (or `--section.key=VALUE`) overrides the YAML; values are parsed as
YAML (`null`, `true`, `0.1`, `[a, b]`). `--local_rank=N` from the deepspeed launcher is accepted.
"""

from __future__ import annotations

import argparse
import sys

from ds_rlhf.config import (
    PPORunConfig,
    RMRunConfig,
    SFTRunConfig,
    UserInputError,
    load_config,
    to_yaml,
)
from ds_rlhf.errors import NonFiniteError

COMMANDS = {"sft": SFTRunConfig, "rm": RMRunConfig, "ppo": PPORunConfig}


def _run_ppo(cfg: PPORunConfig) -> None:
    from ds_rlhf.trainers import ppo  # imports deepspeed: only when a run starts

    ppo.run(cfg)


def _run_sft(cfg: SFTRunConfig) -> None:
    from ds_rlhf.trainers import sft

    sft.run(cfg)


def _run_rm(cfg: RMRunConfig) -> None:
    from ds_rlhf.trainers import reward

    reward.run(cfg)


RUNNERS = {"sft": _run_sft, "rm": _run_rm, "ppo": _run_ppo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The deepspeed launcher puts --local_rank=N before our arguments; LOCAL_RANK is in the
    # environment too, which is what we read.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if argv[:1] == ["plot"]:  # reads a finished run's files, loads no config
        from ds_rlhf import plot

        return plot.main(argv[1:])
    if argv[:1] == ["bench"]:  # builds its own workload from presets and flags
        from ds_rlhf import bench

        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="ds-rlhf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS), help="which step to run")
    parser.add_argument("--config", help="YAML file; dotted flags override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides, cls=COMMANDS[args.command])
    except UserInputError as e:
        print(f"ds-rlhf {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from ds_rlhf.checkpoint import preemption_flag
    from ds_rlhf.coordinator import stop_distributed

    preemption_flag()  # SIGTERM / SIGUSR1 from here on mean "save at the next step boundary"
    try:
        RUNNERS[args.command](cfg)
    except UserInputError as e:  # checks that need data, tokenizers or the world size
        print(f"ds-rlhf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # every rank raises it together
        print(f"ds-rlhf {args.command}: stopped: {e}", file=sys.stderr)
        stop_distributed()
        return 3
    stop_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
