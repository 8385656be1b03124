#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels bench/gpu/run.sh installs on the GPU machine, whose image
# (Python 3.12, torch 2.11 + CUDA 13) lacks DeepSpeed, megatron-core and pydantic.
#
# Pinned to the versions of our own environment. Each package's Requires-Dist was checked against the
# image's package list (/work/.library/device/KINDS.md): einops, msgpack, ninja, numpy, psutil,
# py-cpuinfo, tqdm, pyyaml, torch are there; hjson, annotated-types, typing-inspection are not;
# typing-extensions (pydantic wants >= 4.16) and packaging (megatron-core wants >= 24.2) come along
# because the image's versions are not known to be new enough. DeepSpeed has only an sdist on PyPI:
# it is built here into a pure-Python wheel with its C++/CUDA ops left to JIT (DS_BUILD_OPS=0).
#
# Usage, from the repository root: bash bench/gpu/prepare_wheels.sh   (about 8 MiB, a minute)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.whl
# The building python needs torch (DeepSpeed's setup.py imports it), hence no build isolation.
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# Pure-Python or cp312 manylinux wheels, fetched as the device README says.
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" \
    megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0 packaging==26.4

DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DEST"

ls -1 "$DEST"
du -sh "$DEST"
