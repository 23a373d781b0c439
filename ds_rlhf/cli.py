"""The `ds-rlhf` command.

    ds-rlhf {sft,rm,ppo,dpo} --config run.yaml [--section.key VALUE ...] [--print-config]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module ds_rlhf ppo --config run.yaml
    torchrun --nproc_per_node 2 -m ds_rlhf ppo --config run.yaml
    ds-rlhf plot RUN_DIR [--out plot.png]       # curves of RUN_DIR/metrics.jsonl as a PNG
    ds-rlhf bench ppo --preset tiny             # one JSON line: throughput, time split, memory
    ds-rlhf generate --model OUT/actor "prompt" # answers from an export (--chat: a conversation)

Any `--section.key VALUE` (or `--section.key=VALUE`) overrides the YAML; values are parsed as
YAML (`null`, `true`, `0.1`, `[a, b]`). `--local_rank=N` from the deepspeed launcher is accepted.

Exit codes: 0 finished, or stopped by a signal (see "preempted:"); 1 a bug (a traceback); 2 bad
input (config, data, environment variables, checkpoint, output_dir in use or not shared by
every node, no space for a checkpoint); 3 stopped: a non-finite loss, too many failed rows
(rollout.max_failed_fraction) or steps without an update; 4 another rank stalled past
distributed.timeout_minutes or died.

Errors on some ranks only: every rank runs the checks, and the ranks compare them before any
engine is built; rank 0 prints each distinct message once, naming the ranks and hosts that
had it, and every rank exits. Later, an error that one rank alone has is printed by that rank
with its rank and host, and it exits at once; the others stop within seconds (exit 4, see
`_after_error`).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback

from ds_rlhf.config import (
    DistributedConfig,
    DPORunConfig,
    PPORunConfig,
    RMRunConfig,
    SFTRunConfig,
    UserInputError,
    load_config,
    to_yaml,
)
from ds_rlhf.errors import RanksFailedError, StopRunError

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


def _fail(command: str, label: str, error: BaseException, code: int) -> int:
    """Print an error every rank raised together (see ds_rlhf/errors.py) once, on rank 0, a
    line per distinct message, and return the exit code for every rank."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank == "0":
        # a RanksFailedError has a line per distinct message: each gets the prefix
        lines = str(error).splitlines() if isinstance(error, RanksFailedError) else [error]
        for line in lines:
            print(f"ds-rlhf {command}: {label}: {line}", file=sys.stderr, flush=True)
    return code


def _exit_code(e: BaseException) -> int:
    if isinstance(e, RanksFailedError):
        return e.code
    return 3 if isinstance(e, StopRunError) else 2


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
    if argv[:1] == ["generate"]:  # answers from an export, one process
        from ds_rlhf import chat

        return chat.main(argv[1:])
    parser = argparse.ArgumentParser(prog="ds-rlhf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS), help="which step to run")
    parser.add_argument("--config", help="YAML file; dotted flags override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    args, overrides = parser.parse_known_args(argv)
    if not sys.stderr.isatty():
        # A file (a Slurm job's output): the progress bars of transformers, the hub and
        # datasets would fill it with carriage returns. Read when they are first imported.
        for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(name, "1")
    from ds_rlhf.coordinator import launched_with_peers

    peers = launched_with_peers()  # before anything fills in RANK and WORLD_SIZE
    cfg = None
    try:
        cfg = load_config(args.config, overrides, cls=COMMANDS[args.command])
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if isinstance(cfg, PPORunConfig):  # the training ranks' world, before any check
            from ds_rlhf.coordinator import setup_distributed_env, split_world

            setup_distributed_env()
            split_world(cfg.rollout.placement, cfg.rollout.generation_ranks)
        from ds_rlhf.checks import check_environment, check_inputs

        check_inputs(cfg)  # every model, tokenizer and dataset, before anything is written
        check_environment(cfg)  # every variable the run reads (this node may lack some)
        from ds_rlhf.checkpoint import preemption_flag

        preemption_flag()  # SIGTERM / SIGUSR1 from here on mean "save at the next step boundary"
        RUNNERS[args.command](cfg)
    except Exception as e:  # noqa: BLE001 (every error ends here: the ranks must all leave)
        return _after_error(args.command, cfg, e, peers)
    from ds_rlhf.coordinator import stop_distributed

    stop_distributed()
    return 0


def _after_error(command: str, cfg, e: Exception, peers: bool) -> int:
    """End this rank after `e`, so that no rank waits for another that stopped:

    - before the ranks met (config, inputs, the checks before any engine): this rank still
      meets the others, and every rank stops with the failing ranks' messages (exit 2);
    - an error every rank raised together (`every_rank`): rank 0 prints it, all leave;
    - a collective that gave up on another rank: exit 4 at once;
    - any other error is this rank's alone: it prints it, naming its rank and host, tells the
      others through the rendezvous store (coordinator.tell_peers: they stop with exit 4
      within seconds) and exits at once.
    """
    import torch.distributed as dist

    from ds_rlhf.coordinator import (
        exit_process,
        is_collective_failure,
        pool_index,
        start_distributed,
        stop_distributed,
        tell_peers,
        tell_pool,
    )

    if pool_index() is not None:
        _pool_error(command, cfg, e)
    if not dist.is_initialized() and peers:
        timeout = (cfg.distributed if cfg is not None else DistributedConfig()).timeout_minutes
        try:
            start_distributed(timeout, failed=e)
        except RanksFailedError as agreed:
            e = agreed
        except Exception:  # noqa: BLE001 (the others never came: report this rank's own)
            pass
    if getattr(e, "every_rank", False) or (isinstance(e, UserInputError) and not peers):
        code = _fail(command, "stopped" if isinstance(e, StopRunError) else "error", e,
                     _exit_code(e))
        tell_pool(code)
        stop_distributed()
        return code
    if is_collective_failure(e):
        _exit_after_collective_failure(command, cfg, e)
    if not peers:
        raise e  # one process, a bug: Python prints the traceback
    where = f"rank {os.environ.get('RANK', '0')} (host {socket.gethostname()})"
    message = str(e) if isinstance(e, UserInputError) else f"{type(e).__name__}: {e}"
    print(f"ds-rlhf {command}: error: {where}: {message}", file=sys.stderr, flush=True)
    if not isinstance(e, UserInputError):
        traceback.print_exc()
    if dist.is_initialized():
        tell_peers(f"{where} failed: {message}")
    exit_process(2 if isinstance(e, UserInputError) else 1)


def _pool_error(command: str, cfg, e: Exception) -> None:
    """A generation rank (rollout.placement separate) after `e`: it never joined the training
    ranks' world. An error of the start-up checks that the training ranks had too is theirs to
    print (rank 0 tells the pool, coordinator.tell_pool): this rank leaves silently with their
    exit code. Any other is this rank's alone: printed with its rank and host, and told to the
    training ranks through the rendezvous store (they stop with exit 4)."""
    import time

    from ds_rlhf import coordinator
    from ds_rlhf.coordinator import STOPPED_KEY, exit_process, start_pool, tell_peers

    timeout = (cfg.distributed if cfg is not None else DistributedConfig()).timeout_minutes
    checking = coordinator._STORE[0] is None  # still in the checks the training ranks share
    try:
        store = start_pool(timeout)
        if checking and isinstance(e, UserInputError):
            for _ in range(60):  # the training ranks' own checks: as long as they may take
                if store.check([STOPPED_KEY]):
                    exit_process(int(store.get(STOPPED_KEY)))
                time.sleep(1.0)
    except Exception:  # noqa: BLE001 (no store: nothing to wait for or to tell)
        store = None
    where = f"generation rank {os.environ.get('RANK', '0')} (host {socket.gethostname()})"
    message = str(e) if isinstance(e, UserInputError) else f"{type(e).__name__}: {e}"
    print(f"ds-rlhf {command}: error: {where}: {message}", file=sys.stderr, flush=True)
    if not isinstance(e, UserInputError):
        traceback.print_exc()
    if store is not None:
        tell_peers(f"{where} failed: {message}")
    exit_process(2 if isinstance(e, UserInputError) else 1)


def _exit_after_collective_failure(command: str, cfg, e: RuntimeError) -> None:
    """Another rank stalled (past distributed.timeout_minutes) or died: say where this rank was
    waiting and leave at once (exit 4), without the collectives of a normal exit, which would
    wait for the missing rank again."""
    from ds_rlhf.coordinator import current_phase, told_failure

    told = told_failure()
    if told is not None:  # the rank that died said why first (as the watcher would repeat it)
        if os.environ.get("RANK", "0") == "0":
            print(f"ds-rlhf: stopping every rank: {told}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(4)
    timeout = (cfg.distributed if cfg is not None else DistributedConfig()).timeout_minutes
    first = next((line for line in str(e).splitlines() if line.strip()), repr(e))
    print(f"ds-rlhf {command}: error: rank {os.environ.get('RANK', '0')} gave up waiting for "
          f"the other ranks in phase '{current_phase()}': another rank stalled for longer than "
          f"distributed.timeout_minutes={timeout} or died ({first}). "
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
