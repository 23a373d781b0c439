"""The optional packages a run may need, and the setup.cfg extra that installs each.

The core install trains from local .json / .jsonl / .csv files and logs to metrics.jsonl, so
that an air-gapped node's wheelhouse stays small (README: "Air-gapped nodes"); `bash
launch/install.sh` installs the `full` extra, every package below. Where a run asks for one
that is missing, `require` says so, with the extra to install, before any engine starts
(ds_rlhf/checks.py) and again where the package is imported (a path checks.py does not see).
"""

from __future__ import annotations

import importlib.util

from ds_rlhf.config import UserInputError

EXTRA = {"datasets": "hub", "pyarrow": "hub", "wandb": "wandb", "matplotlib": "plot"}


def require(module: str, what: str, error: type[UserInputError] = UserInputError) -> None:
    """Raise `error` naming `what` needs `module` and how to install it, if it is missing.
    Looks the module up without importing it (wandb and datasets take seconds to import)."""
    if importlib.util.find_spec(module) is None:
        extra = EXTRA[module]
        raise error(f"{what} needs the {module} package, which is not installed: install the "
                    f"`{extra}` extra (bash launch/install.sh {extra}, or pip install -e "
                    f"\".[{extra}]\" in the ds_rlhf checkout; `full` brings every extra)")
