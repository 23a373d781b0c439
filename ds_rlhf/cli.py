"""The `ds-rlhf` command.

    ds-rlhf {sft,rm,ppo,dpo} --config run.yaml [--section.key VALUE ...] [--print-config]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module ds_rlhf ppo --config run.yaml
    torchrun --nproc_per_node 2 -m ds_rlhf ppo --config run.yaml
    ds-rlhf plot RUN_DIR [--out plot.png]       # curves of RUN_DIR/metrics.jsonl as a PNG
    ds-rlhf bench ppo --preset tiny             # one JSON line: throughput, time split, memory

Any `--section.key VALUE` (or `--section.key=VALUE`) overrides the YAML; values are parsed as
YAML (`null`, `true`, `0.1`, `[a, b]`). `--local_rank=N` from the deepspeed launcher is accepted.

Exit codes: 0 finished, or stopped by a signal (see "preempted:"); 2 bad input (config, data,
checkpoint, output_dir in use, no space for a checkpoint); 3 non-finite loss; 4 another rank
stalled past distributed.timeout_minutes or died.
"""

from __future__ import annotations

import argparse
import os
import sys

from ds_rlhf.config import (
    DPORunConfig,
    PPORunConfig,
    RMRunConfig,
    SFTRunConfig,
    UserInputError,
    load_config,
    to_yaml,
)
from ds_rlhf.errors import NonFiniteError

COMMANDS = {"sft": SFTRunConfig, "rm": RMRunConfig, "ppo": PPORunConfig, "dpo": DPORunConfig}


def _run_ppo(cfg: PPORunConfig) -> None:
    from ds_rlhf.trainers import ppo  # imports deepspeed: only when a run starts

    ppo.run(cfg)


def _run_sft(cfg: SFTRunConfig) -> None:
    from ds_rlhf.trainers import sft

    sft.run(cfg)


def _run_rm(cfg: RMRunConfig) -> None:
    from ds_rlhf.trainers import reward

    reward.run(cfg)


def _run_dpo(cfg: DPORunConfig) -> None:
    from ds_rlhf.trainers import dpo

    dpo.run(cfg)


RUNNERS = {"sft": _run_sft, "rm": _run_rm, "ppo": _run_ppo, "dpo": _run_dpo}


def _fail(command: str, label: str, error: Exception, code: int) -> int:
    """Print the error once, on rank 0 (every rank meets the same config and data, and
    raises the same error), and return the exit code for every rank."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank == "0":
        print(f"ds-rlhf {command}: {label}: {error}", file=sys.stderr, flush=True)
    return code


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
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from ds_rlhf.checks import check_inputs

        check_inputs(cfg)  # every model, tokenizer and dataset, before anything is written
    except UserInputError as e:
        return _fail(args.command, "error", e, 2)
    from ds_rlhf.checkpoint import preemption_flag
    from ds_rlhf.coordinator import stop_distributed

    preemption_flag()  # SIGTERM / SIGUSR1 from here on mean "save at the next step boundary"
    try:
        RUNNERS[args.command](cfg)
    except UserInputError as e:  # checks that need data, tokenizers, the world size, the
        # output_dir or a checkpoint: raised by every rank together (Coordinator.on_main)
        code = _fail(args.command, "error", e, 2)
        stop_distributed()
        return code
    except NonFiniteError as e:  # every rank raises it together
        code = _fail(args.command, "stopped", e, 3)
        stop_distributed()
        return code
    except RuntimeError as e:
        from ds_rlhf.coordinator import is_collective_failure

        if not is_collective_failure(e):
            raise
        _exit_after_collective_failure(args.command, cfg, e)
    stop_distributed()
    return 0


def _exit_after_collective_failure(command: str, cfg, e: RuntimeError) -> None:
    """Another rank stalled (past distributed.timeout_minutes) or died: say where this rank was
    waiting and leave at once (exit 4), without the collectives of a normal exit, which would
    wait for the missing rank again."""
    from ds_rlhf.coordinator import current_phase

    first = next((line for line in str(e).splitlines() if line.strip()), repr(e))
    print(f"ds-rlhf {command}: error: rank {os.environ.get('RANK', '0')} gave up waiting for "
          f"the other ranks in phase '{current_phase()}': another rank stalled for longer than "
          f"distributed.timeout_minutes={cfg.distributed.timeout_minutes} or died ({first}). "
          "Saved checkpoints are intact; check that rank's log, then run the same command to "
          "resume", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(4)


def entry() -> None:
    """`ds-rlhf` and `python -m ds_rlhf`: main(), then the process ends with its exit code
    (see coordinator.exit_process)."""
    code = main()
    from ds_rlhf.coordinator import exit_process

    exit_process(code)


if __name__ == "__main__":
    entry()
