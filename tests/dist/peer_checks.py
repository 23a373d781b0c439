"""How the ranks wait for and warn each other, without a trainer. One mode per launch:

    untimed   with a 3 s distributed timeout, rank 0 works for 8 s inside
              Coordinator.on_main_untimed while rank 1 waits for it, and both go on
    engine, vllm_tp  with a 3 s distributed timeout, rank 1 stalls (sleeps 25 s) while rank 0
              waits in a collective of a process group the run made besides the world's: the
              gradient reduction of a ZeRO-2 engine (DeepSpeed's clone of the world group), or
              an all-reduce in the vLLM backend's tensor-parallel group. Rank 0 must give up
              after about 3 s, not after torch's default 30 minutes for new groups.
    told0, told1  rank 0 (1) fails alone, tells the others (coordinator.tell_peers) and exits;
              the other rank, busy for 150 s outside any collective, is stopped by its
              watcher within seconds. Rank 0 hosts the rendezvous store: it must stay until
              the others have read the message.

Run by tests/dist/test_run_safety.py under `deepspeed --num_gpus 2`; prints one line per rank.
"""

import sys
import time

from ds_rlhf.coordinator import exit_process, setup_distributed_env, start_distributed, tell_peers

mode = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
setup_distributed_env()
coord = start_distributed(timeout_minutes=0.05 if mode in ("untimed", "engine", "vllm_tp") else 30)
start = time.time()
if mode == "untimed":
    def slow() -> str:
        time.sleep(8)
        return "converted"

    result = coord.on_main_untimed(slow)
    coord.barrier()  # the ordinary group still works afterwards
    print(f"rank {coord.rank}: {result} after {time.time() - start:.1f} s", flush=True)
elif mode in ("engine", "vllm_tp"):
    import deepspeed
    import torch

    if mode == "engine":
        model = torch.nn.Linear(8, 8)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 2},
                                                  "optimizer": {"type": "AdamW",
                                                                "params": {"lr": 1e-3},
                                                                "torch_adam": True}})

        def collective() -> None:
            engine.backward(engine(torch.ones(1, 8)).sum())
            engine.step()
    else:
        from ds_rlhf.engines.vllm_backend import VllmGenerator

        group = VllmGenerator._tp_group(2)

        def collective() -> None:
            torch.distributed.all_reduce(torch.ones(4), group=group)
    coord.barrier()
    if coord.rank == 1:
        time.sleep(25)
    start = time.time()
    try:
        collective()
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        print(f"rank {coord.rank}: gave up after {time.time() - start:.1f} s: {first}", flush=True)
        exit_process(4)
    print(f"rank {coord.rank}: done after {time.time() - start:.1f} s", flush=True)
elif coord.rank == int(mode[-1]):
    tell_peers(f"rank {coord.rank} (host h{coord.rank}) failed: the grader crashed")
else:  # busy: only its watcher can end it (exit code 0 from the teller: the launcher waits)
    time.sleep(150)
    print(f"rank {coord.rank}: not stopped after {time.time() - start:.1f} s", flush=True)
exit_process(0)
