#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels bench/gpu_check.sh installs on an offline GPU
# machine that has torch, triton and transformers but not the test/bench extras.
#
#   bash bench/fetch_wheels.sh [DIR]      # default .whl (git-ignored), about 30 MB
#
# CPython 3.12, Linux x86_64 (the GPU machines' python); PY_VERSION=3.11 etc. for another.
# Pinned to setup.py's extras and to the versions their tests ran with; --no-deps, so torch
# and transformers are never pulled in (compressed-tensors depends on both).
set -euo pipefail
DIR=${1:-.whl}
PYV=${PY_VERSION:-3.12}
cd "$(dirname "$0")/.."
PKGS=(
    # bench extra: plots and kernel benchmarks
    matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1
    pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0
    pytest-benchmark==5.3.1 py-cpuinfo2==10.1.1
    # test extra
    pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0 pytest-timeout==2.4.0
    hypothesis==6.170.17 sortedcontainers==2.4.0
    compressed-tensors==0.19.0 loguru==0.7.3 psutil==7.2.2 pydantic==2.14.4
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
    gguf==0.19.0 sentencepiece==0.2.3
)
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform linux_x86_64 -d "$DIR" "${PKGS[@]}"
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
