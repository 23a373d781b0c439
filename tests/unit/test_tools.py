"""Tool calls run in worker processes that a deadline kills (episodes.Tools): hostile tools
(spinning in Python, stuck in C holding the GIL, crashing, printing) cannot hold a rank, slow
it down after their timeout, or outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_rlhf.episodes import EpisodeError, ToolCall, Tools

TOOLS_FILE = '''
import os
import re
import time
from pathlib import Path


def spin(x: int) -> str:
    """Spins in Python forever.

    Args:
        x: anything
    """
    while True:
        x += 1


def backtrack(x: int) -> str:
    """Catastrophic backtracking: re runs in C holding the GIL, for 2**60 steps.

    Args:
        x: anything
    """
    return str(re.match(r"(a+)+$", "a" * 60 + "b"))


def work(n: int) -> str:
    """A normal tool: some CPU work.

    Args:
        n: how much
    """
    return str(sum(i * i for i in range(n)))


def meet(folder: str, k: int) -> str:
    """Arrives in `folder` and waits (up to 10 s) until k calls are there; returns its pid.

    Args:
        folder: where the calls meet
        k: how many calls
    """
    Path(folder, f"{os.getpid()}-{time.monotonic_ns()}").touch()
    for _ in range(1000):
        if len(os.listdir(folder)) >= k:
            return str(os.getpid())
        time.sleep(0.01)
    return "alone"


def hang(path: str) -> str:
    """Writes its pid to `path`, then backtracks forever holding the GIL.

    Args:
        path: where the pid goes
    """
    Path(path).write_text(str(os.getpid()))
    return backtrack(0)


def crash(code: int) -> str:
    """Ends its process.

    Args:
        code: the exit code
    """
    os._exit(code)


def chatty(x: int) -> str:
    """Prints to stdout and stderr, then answers.

    Args:
        x: anything
    """
    print("hello from a tool", flush=True)
    print("and its stderr", file=__import__("sys").stderr)
    return "ok"
'''


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "hostile_tools.py"
    path.write_text(TOOLS_FILE)
    return path


def refs(path: Path, *names: str) -> list[str]:
    return [f"{path}:{name}" for name in names]


def gone(pid: int) -> bool:
    """The process has ended (absent, or a zombie that nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def worker_pids(tools: Tools) -> set[int]:
    return {w.proc.pid for w in tools.workers}


def test_a_tool_spinning_in_python_or_stuck_in_c_times_out_and_its_process_ends(tools_file):
    tools = Tools(refs(tools_file, "spin", "backtrack", "work"), timeout=0.4)
    try:
        assert tools.run([ToolCall("work", {"n": 10}), ToolCall("work", {"n": 10})]) == [
            ("285", True), ("285", True)]  # two workers started and ready
        for name in ("spin", "backtrack"):
            before = worker_pids(tools)
            start = time.monotonic()
            result = tools.run([ToolCall(name, {"x": 1})])
            elapsed = time.monotonic() - start
            assert result == [(f"error: {name} did not answer within 0.4 s", False)]
            assert elapsed < 0.4 + 1.0, elapsed  # the acceptance bound: tool_timeout + 1 s
            killed = before - worker_pids(tools)
            assert len(killed) == 1 and all(gone(pid) for pid in killed)  # no work left
        assert len(tools.workers) == 2  # the killed ones were replaced
        assert tools.run([ToolCall("work", {"n": 3})]) == [("5", True)]
    finally:
        tools.close()


def test_after_20_timeouts_normal_calls_run_as_fast_as_before(tools_file):
    """The step time of a normal call, before and after 20 calls that had to be killed, as
    a ratio: abandoned work that kept running (threads) made it 5x slower, and for good.
    Each time is the fastest of 15 calls (other work on the machine only ever adds time);
    a slowdown that stays is measured up to 3 times, a burst of other work is not."""
    tools = Tools(refs(tools_file, "spin", "backtrack", "work"), timeout=0.3)
    call = [ToolCall("work", {"n": 300_000})]
    answer = [(str(sum(i * i for i in range(300_000))), True)]

    def step_time() -> float:
        times = []
        for _ in range(15):
            start = time.perf_counter()
            assert tools.run(call) == answer
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        tools.run(call)  # the worker starts: a cost of the first use only
        before = step_time()
        for _ in range(10):
            results = tools.run([ToolCall("spin", {"x": 1}), ToolCall("backtrack", {"x": 1})])
            assert results == [(f"error: {n} did not answer within 0.3 s", False)
                               for n in ("spin", "backtrack")]
        tools.run(call)  # the replacements of the killed workers finish starting
        ratios = []
        while len(ratios) < 3 and (not ratios or ratios[-1] >= 1.1):
            ratios.append(step_time() / before)
        assert ratios[-1] < 1.1, (before, ratios)
    finally:
        tools.close()


def test_the_calls_of_one_turn_run_in_parallel_each_in_its_own_process(tools_file, tmp_path):
    folder = tmp_path / "meeting"
    folder.mkdir()
    tools = Tools(refs(tools_file, "meet"), timeout=20)
    try:
        results = tools.run([ToolCall("meet", {"folder": str(folder), "k": 3})] * 3)
        texts = [text for text, _ in results]
        assert "alone" not in texts  # all three ran at the same time
        assert len(set(texts)) == 3 and str(os.getpid()) not in texts
    finally:
        tools.close()
    assert all(gone(int(pid)) for pid in texts)  # close() ended the workers


def test_a_crashing_or_printing_tool_is_an_error_or_an_answer_and_the_pool_goes_on(tools_file,
                                                                                  capfd):
    tools = Tools(refs(tools_file, "crash", "chatty", "work"), timeout=5)
    try:
        results = tools.run([ToolCall("crash", {"code": 3}), ToolCall("chatty", {"x": 1}),
                             ToolCall("work", {"n": 4})])
        assert results == [("error: crash ended its process (exit code 3)", False),
                           ("ok", True), ("14", True)]  # a tool's print is not its answer
        assert "hello from a tool" in capfd.readouterr().err
        assert tools.run([ToolCall("crash", {"code": "x"})])[0] == (
            "error: crash raised TypeError: 'str' object cannot be interpreted as an integer",
            False)
        assert tools.run([ToolCall("work", {"n": 4})] * 4) == [("14", True)] * 4
    finally:
        tools.close()


def test_tools_that_a_worker_cannot_import_are_a_setup_error(tmp_path):
    """Only in the rank's process: the worker cannot import the tool, every call would fail
    the same way, so the run stops (EpisodeRunner.run raises it on every rank together)."""
    path = tmp_path / "rank_only.py"
    path.write_text('''import sys
if "ds_rlhf.episodes" not in sys.modules:
    raise ImportError("needs the rank")

def f(x: int) -> str:
    """F.

    Args:
        x: anything
    """
    return "f"
''')
    tools = Tools([f"{path}:f"], timeout=5)
    try:
        with pytest.raises(EpisodeError, match=r"rollout.tools: a tool worker process cannot "
                           r"import '.*rank_only.py:f': ImportError: needs the rank"):
            tools.run([ToolCall("f", {"x": 1})])
        assert tools.workers == []  # the failed worker was ended
    finally:
        tools.close()


HOLDER = """
import sys
from ds_rlhf.episodes import ToolCall, Tools
Tools([sys.argv[1]], timeout=600).run([ToolCall("hang", {"path": sys.argv[2]})])
"""


def test_a_worker_dies_with_its_rank_even_stuck_in_c(tools_file, tmp_path):
    """A rank killed (SIGKILL: no atexit, no finalizer) while its tool call is stuck in C
    holding the GIL: the worker process ends too, no orphan keeps a CPU busy."""
    pid_file = tmp_path / "worker.pid"
    rank = subprocess.Popen([sys.executable, "-c", HOLDER, f"{tools_file}:hang",
                             str(pid_file)])
    try:
        for _ in range(600):  # the rank imports torch, starts the worker, which writes its pid
            if pid_file.exists() and pid_file.read_text():
                break
            assert rank.poll() is None
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert worker != rank.pid and not gone(worker)
    finally:
        rank.send_signal(signal.SIGKILL)
        rank.wait()
    for _ in range(100):  # the kernel ends it (PR_SET_PDEATHSIG) at once; allow 10 s
        if gone(worker):
            break
        time.sleep(0.1)
    assert gone(worker)
