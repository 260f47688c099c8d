#!/usr/bin/env bash
# The wheels benchmarks/device_check.py needs on the GPU machine that its image lacks (Python 3.12, x86_64,
# manylinux; no package registry there), built into DIR (default .whl/, git-ignored):
#
#   deepspeed       built here from its sdist with DS_BUILD_OPS=0 (pure Python; ops are JIT-built if ever used)
#   pydantic        + pydantic-core (cp312 binary), annotated-types, typing-inspection, typing-extensions
#   hjson           (deepspeed; its other needs: einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo,
#                   torch, tqdm are in the image)
#   mergekit        + immutables (cp312 binary); its datasets is never imported on spunge's merge path
#   rouge-score     built here from its sdist, + nltk and nltk's defusedxml (the qa suite's ROUGE-L)
#
# Versions are the project's own (this checkout's .venv, else the pins below). The image's torch, transformers,
# peft, accelerate, safetensors, tokenizers, numpy, scipy, pyyaml, click, absl-py, six, joblib, regex, tqdm are
# used as they are. The project itself travels as the working tree (PYTHONPATH=. ; no src layout).
# On the GPU machine (DIR carried):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 benchmarks/device_check.py
#
#   bash benchmarks/device_bundle.sh [DIR]        # PYTHON=... to build the sdists with another interpreter
# Fails when DIR's wheels reach 64 MiB (what a device call may carry, the working tree included).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
limit=$((64 * 1024 * 1024))

# name==version: the version installed in the project's environment, else the pin given
pin() {
  local v
  v=$("$py" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null) || v=$2
  echo "$1==$v"
}
binary=(
  "$(pin pydantic 2.14.4)" "$(pin pydantic-core 2.50.5)" "$(pin annotated-types 0.8.0)"
  "$(pin typing-inspection 0.4.5)" "$(pin typing-extensions 4.16.0)" "$(pin hjson 3.1.0)"
  "$(pin mergekit 0.1.5)" "$(pin immutables 0.21)" "$(pin nltk 3.10.4)" "$(pin defusedxml 0.7.1)"
)
sdist=("$(pin deepspeed 0.19.8)" "$(pin rouge-score 0.1.2)")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
echo "== downloading ${binary[*]}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$tmp/wheels" "${binary[@]}"
for req in "${sdist[@]}"; do
  echo "== building $req from its sdist"
  # no build isolation: the sdists build with this interpreter's setuptools (deepspeed's setup.py imports torch
  # when it can, only to record its version); neither compiles anything with DS_BUILD_OPS=0
  DS_BUILD_OPS=0 DS_BUILD_STRING="" "$py" -m pip wheel -q --no-deps --no-build-isolation --no-binary=:all: \
    -w "$tmp/wheels" "$req"
done
for w in "$tmp"/wheels/*.whl; do  # a wheel Python 3.12 on x86-64 Linux cannot install is a failed build
  case $(basename "$w") in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-cp312-*manylinux*x86_64*.whl) ;;
    *) echo "device_bundle: $(basename "$w") is not for CPython 3.12 x86_64 manylinux" >&2; exit 1 ;;
  esac
done
mkdir -p "$dir"
rm -f "$dir"/*.whl  # one version of each: two stop the whole install there
mv "$tmp"/wheels/*.whl "$dir"/
ls -l "$dir"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(cat "$dir"/*.whl | wc -c)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "wheels: $(ls "$dir"/*.whl | wc -l) files, $(mib "$total") MiB"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # what else travels: tracked files and untracked files git does not ignore
  tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
          | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
  echo "working tree that travels: $(mib "$tree") MiB; with the wheels: $(mib $((tree + total))) MiB (limit 64 MiB)"
  total=$((total + tree))
fi
if [ "$total" -ge "$limit" ]; then
  echo "device_bundle: $total bytes reach the 64 MiB a device call may carry" >&2
  exit 1
fi
