#!/usr/bin/env bash
# Wheels for a GPU machine without network whose Python already has torch, torchvision, numpy,
# Pillow, scipy, tqdm, safetensors, tensorboard, psutil, packaging, ninja, pyyaml and pytest
# (the lent H100/H200 image and most cluster images do): everything else dbot-ds needs, at the
# versions tested here. Run where pip reaches PyPI, carry DIR over, and there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site:$PWD      # then: python3 -m dbot_ds bench ...
# Usage: bench/offline_wheels.sh DIR [PYTHON_VERSION (default 3.12)]
set -euo pipefail
dir=${1:?usage: bench/offline_wheels.sh DIR [PYTHON_VERSION]}
py=${2:-3.12}
mkdir -p "$dir"
version() { python3 -c "from importlib.metadata import version; print(version('$1'))"; }
pure=(deepspeed hjson pydantic annotated-types typing-inspection webdataset braceexpand timm py-cpuinfo einops msgpack)
binary=(pydantic-core simplejpeg)
pins=()
for name in "${pure[@]}" "${binary[@]}"; do pins+=("$name==$(version "$name")"); done
# deepspeed is published as an sdist only: build its pure-Python wheel (ops compile at run time)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$dir" "${pins[0]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "${pins[@]:1}"
ls "$dir"
