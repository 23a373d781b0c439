"""Imported at start-up by every Python process whose PYTHONPATH holds this folder
(tests/conftest.py strict_warnings_env), the deepspeed launcher's ranks included: a
FutureWarning or DeprecationWarning for a call made from ds_rlhf becomes an error, printed
with MARKER.

"Made from ds_rlhf": walking out of the frame that warned, past the rest of its package and
the call plumbing (nn.Module.__call__, imports, decorators), the first frame is ds_rlhf's.
So transformers deprecating a forward argument we pass is ours, wherever transformers says
the warning is (a module filter would miss it: the warning names torch's module.py), and
DeepSpeed calling a deprecated torch function is DeepSpeed's.
"""

import sys
import warnings

from strict_marker import MARKER  # this folder is on sys.path: PYTHONPATH

_PLUMBING = ("warnings", "importlib", "functools", "contextlib", "torch.nn.modules.module",
             "torch.utils._contextlib")


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "") or ""


def _is_plumbing(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _PLUMBING)


def _caller_of_warning(frame) -> str:
    """The module that called into the package that warned."""
    while frame is not None and _is_plumbing(_module(frame)):
        frame = frame.f_back  # the warnings module's own frames
    if frame is None:
        return ""
    package = _module(frame).split(".")[0]
    while frame is not None and (_module(frame).split(".")[0] == package
                                 or _is_plumbing(_module(frame))):
        frame = frame.f_back
    return "" if frame is None else _module(frame)


_show = warnings.showwarning


def _showwarning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, (FutureWarning, DeprecationWarning)):
        caller = _caller_of_warning(sys._getframe(1))
        if caller == "ds_rlhf" or caller.startswith("ds_rlhf."):
            text = f"{MARKER} {caller}: {category.__name__}: {message} ({filename}:{lineno})"
            print(text, file=sys.stderr, flush=True)
            raise category(text)
    _show(message, category, filename, lineno, file, line)


warnings.showwarning = _showwarning
warnings.filterwarnings("default", category=DeprecationWarning)  # shown, hence checked
warnings.filterwarnings("default", category=FutureWarning)
