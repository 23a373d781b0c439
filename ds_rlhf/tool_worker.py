"""The process tool calls run in (episodes.Tools starts it; not an entry point of its own).

    python -I ds_rlhf/tool_worker.py SOCKET_FD PARENT_PID

It reads (sys.path, {tool name: import ref}) from the socket, imports the tools, says
("ready",), then answers each (name, arguments) with (result text, ok) until the parent
closes the socket. A call past its deadline is not this process' business: the parent kills
it (and its process group) and starts another. Only the standard library is imported here,
so a worker starts in milliseconds, not in the seconds of torch; `-I` keeps this file's
folder (ds_rlhf/, whose module names would shadow others) off sys.path.
"""

import ctypes
import importlib
import importlib.util
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

_PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
    """End when the parent (the rank) ends, however it ends, so no orphan keeps running.
    Linux: the kernel sends SIGKILL, even while a call holds the GIL in C. Elsewhere, and
    for the race where the parent died before prctl ran: a thread that watches it."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def load(ref: str):
    """The function of "package.module:function" or "path/to/file.py:function" (the parent
    imported it already with rewards.load_function, which gives the errors a user sees)."""
    module_name, _, fn_name = ref.rpartition(":")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"ds_rlhf_tool_{abs(hash(ref))}",
                                                      module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, fn_name)


def call(fn, name: str, arguments: dict) -> tuple[str, bool]:
    try:
        value = fn(**arguments)
    except BaseException as e:  # SystemExit too: the call failed, the worker goes on
        return f"error: {name} raised {type(e).__name__}: {e}", False
    if type(value) is not str:  # a str subclass may not even pickle
        if isinstance(value, str):
            return str.__str__(value), True
        return f"error: {name} returned {type(value).__name__}, not a string", False
    return value, True


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    die_with(int(sys.argv[2]))
    os.dup2(2, 1)  # a tool's print goes to the rank's stderr, never into the protocol
    path, refs = conn.recv()
    sys.path[:] = path  # the rank's, where its tools were found
    functions = {}
    for name, ref in refs.items():
        try:
            functions[name] = load(ref)
        except BaseException as e:  # the rank imported it: something differs here
            conn.send(("failed", f"{ref!r}: {type(e).__name__}: {e}"))
            return
    conn.send(("ready",))
    while True:
        try:
            name, arguments = conn.recv()
        except EOFError:  # the parent closed the pool
            return
        conn.send(call(functions[name], name, arguments))


if __name__ == "__main__":
    main()
