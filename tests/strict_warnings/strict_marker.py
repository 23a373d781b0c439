"""The line tests/strict_warnings/sitecustomize.py prints before raising (a module of its own,
so that tests read it without installing the hook)."""

MARKER = "deprecated call from ds_rlhf:"
