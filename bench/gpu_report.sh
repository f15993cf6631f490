#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run on one GPU (about 8 minutes on an H100/H200):
#   1. tests/test_gpu.py (CUDA-graph teacher, prefetch, nvJPEG decode, bf16 runs, bench paths);
#   2. `dbot-ds bench` for each model: bf16, ZeRO-1 (and 2 for the first), teacher CUDA graph
#      off/on, DeepSpeed step vs a plain PyTorch loop (interleaved), host synchronisations per
#      step; then compile=inductor for the first model;
#   3. end to end with generated ImageNet-like shards (500x375 JPEGs): CPU decode for every
#      model, device decode for the first.
# Writes OUT_DIR/{env.txt, gpu_tests.log, report.log, report.json, report.md}.
#
#   bench/gpu_report.sh OUT_DIR
#   CASES="vit_base:256" STEPS=10 bench/gpu_report.sh OUT_DIR             # a shorter run
#   CASES="tiny_test:8" IMG=32 E2E_IMAGES=256 STEPS=2 bench/gpu_report.sh /tmp/r   # CPU smoke run
#
# Each step runs on if an earlier one failed; the exit status says whether any failed.
set -uo pipefail
mkdir -p "${1:?usage: bench/gpu_report.sh OUT_DIR}" && out=$(cd "$1" && pwd)
CASES=${CASES:-"vit_base:256 vit_large:128 vit_huge:64"}   # model:micro-batch
IMG=${IMG:-224}
STEPS=${STEPS:-20}
E2E_IMAGES=${E2E_IMAGES:-8192}
WORKERS=${WORKERS:-$(nproc)}
if [ -n "${WORK:-}" ]; then  # kept: generated shards can be reused
  mkdir -p "$WORK" && work=$(cd "$WORK" && pwd)
else
  work=$(mktemp -d /tmp/dbot-gpu-report.XXXX) && trap 'rm -rf "$work"' EXIT
fi
rm -rf "$work/json" && mkdir -p "$work/json"  # a reused WORK must not add old results
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
failed=0
step() { echo "== $(date -u +%H:%M:%S) $*"; }
run() { "$@" || echo "!! failed ($?): $*"; }  # steps run in a piped subshell: the log is the record
bench() { python3 -m dbot_ds bench --img-size "$IMG" --steps "$STEPS" "$@"; }
# tiny sizes get a small decoder too (the smoke run)
extra=(); [[ $CASES == tiny_test* ]] && extra=(--set model.decoder_width=32 --set model.decoder_depth=1 --set model.decoder_heads=2)

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import sys, torch, deepspeed, timm, torchvision
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "deepspeed", deepspeed.__version__, "timm", timm.__version__, "torchvision", torchvision.__version__)'
  echo "dbot-ds $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$out/env.txt"
cat "$out/env.txt"

{
step "GPU tests"
run env DBOT_TEST_GPU=1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"

first=${CASES%% *}
for case in $CASES; do
  size=${case%:*} micro=${case#*:} zero=1
  [[ $case == "$first" ]] && zero=1,2   # BF16_Optimizer (ZeRO-1) against the ZeRO-2 optimizer
  step "$size, micro-batch $micro, ZeRO $zero: teacher graph off/on, DeepSpeed vs plain"
  run bench --sizes "$size" --micro "$micro" --zero "$zero" --teacher-graph off,on \
      --json "$work/json/1_$size.json" ${extra[@]+"${extra[@]}"}
done

size=${first%:*} micro=${first#*:}
step "$size, micro-batch $micro: compile=inductor"
run bench --sizes "$size" --micro "$micro" --zero 1 --compile inductor --teacher-graph off,on \
    --json "$work/json/2_${size}_inductor.json" ${extra[@]+"${extra[@]}"}

step "generating $E2E_IMAGES ImageNet-like JPEGs as shards"
run python3 -m dbot_ds shards synthetic --out "$work/shards" --images "$E2E_IMAGES" --workers "$WORKERS"
for case in $CASES; do
  size=${case%:*} micro=${case#*:}
  for decode in cpu device; do
    [[ $decode == device && $case != "$first" ]] && continue
    step "$size end to end, $decode decode, $WORKERS workers"
    run bench --sizes "$size" --micro "$micro" --zero 1 --no-plain --data shards --shards "$work/shards/manifest.json" \
        --workers "$WORKERS" --decode "$decode" --json "$work/json/3_${size}_$decode.json" ${extra[@]+"${extra[@]}"}
  done
done
} 2>&1 | tee "$out/report.log"

python3 - "$work/json" "$out" <<'EOF' || failed=1
import json, sys
from pathlib import Path
from dbot_ds.bench import markdown_table
reports = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))]
results = [r for rep in reports for r in rep["results"]]
head = {k: reports[0][k] for k in ("device", "torch", "peak_tflops", "date")} if reports else {}
Path(sys.argv[2], "report.json").write_text(json.dumps({**head, "results": results}, indent=2) + "\n")
Path(sys.argv[2], "report.md").write_text(markdown_table(results) + "\n")
print(markdown_table(results))
EOF
grep -q '^!! failed' "$out/report.log" && failed=1
exit $failed
