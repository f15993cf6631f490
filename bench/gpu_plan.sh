#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md as numbered steps that fit a short lease of one GPU, the most
# important first. Each step runs under its own `timeout`; as each finishes its log is appended to
# OUT/plan.log and OUT/report.json and OUT/report.md are rewritten from every result so far, so a
# command killed at its limit still returns what it measured. OUT gets five files in all (the
# device tool returns eight at most); the JSON of each step and the shards stay in WORK.
#
#   bench/gpu_plan.sh OUT STEP...      STEP: setup 1 2 3 4 5 6 7, or a group:
#                                      A = setup 1 2,  B = setup 3 4 7,  C = setup 5 6
#   1  ViT-B ZeRO-1 smoke bench (the first number)        5  compile=inductor, ViT-B
#   2  ViT-B/L/H MFU, teacher CUDA graph off/on            6  end to end: CPU decode, device decode
#   3  DeepSpeed vs plain PyTorch, host syncs, accum 1/4   7  ZeRO-2, overlap_comm off/on
#   4  DBOT_TEST_GPU=1 pytest tests/test_gpu.py
#   setup: installs the wheels in $WHEELS (bench/offline_wheels.sh) when deepspeed is missing
#
# Environment: CASES (model:micro, default "vit_base:256 vit_large:128 vit_huge:64"), IMG (224),
# STEPS (10), E2E_IMAGES (4096), WORKERS (cores - 2), WHEELS (.whl), WORK (/tmp/dbot-plan),
# LIMIT_<step> (seconds, e.g. LIMIT_step5=400).
# CPU smoke run of every step at tiny size:
#   CASES=tiny_test:8 IMG=32 STEPS=2 E2E_IMAGES=96 bench/gpu_plan.sh /tmp/plan A B C
set -uo pipefail
out=${1:?usage: bench/gpu_plan.sh OUT STEP...}; shift
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=${WORK:-/tmp/dbot-plan}; mkdir -p "$work" && work=$(cd "$work" && pwd)
cd "$(dirname "$0")/.."
CASES=${CASES:-"vit_base:256 vit_large:128 vit_huge:64"}
IMG=${IMG:-224} STEPS=${STEPS:-10} E2E_IMAGES=${E2E_IMAGES:-4096} WHEELS=${WHEELS:-.whl}
cores=$(nproc); WORKERS=${WORKERS:-$(( cores > 3 ? cores - 2 : 1 ))}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"  # loader workers pass file descriptors
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
first=${CASES%% *} size0=${first%:*} micro0=${first#*:}
extra=(); [[ $CASES == tiny_test* ]] && extra=(--set model.decoder_width=32 --set model.decoder_depth=1 --set model.decoder_heads=2)
bench=(python3 -m dbot_ds bench --img-size "$IMG" --steps "$STEPS" --warmup 3 ${extra[@]+"${extra[@]}"})
status=0

report() {  # OUT/report.json and report.md from every step's JSON so far
  python3 -c '
import json, sys
from pathlib import Path
from dbot_ds.commands.bench import markdown_table
work, out = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(work.glob("step*.json"))
reports = [json.loads(p.read_text()) for p in files]
results = [dict(r, step=p.stem) for p, rep in zip(files, reports) for r in rep["results"]]
head = {k: reports[0][k] for k in ("device", "torch", "peak_tflops", "date")} if reports else {}
(out / "report.json").write_text(json.dumps({**head, "results": results}, indent=2) + "\n")
(out / "report.md").write_text(markdown_table(results) + "\n")
' "$work" "$out" || status=1
}

limited() {  # limited NAME SECONDS CMD...: CMD under its own timeout, then the report so far
  local name=$1 limit=$2; shift 2
  local var="LIMIT_$name"; limit=${!var:-$limit}
  echo "== $(date -u +%H:%M:%S) $name (limit ${limit} s): $*" | tee -a "$out/plan.log"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  cat "$work/$name.log" >> "$out/plan.log"
  echo "   $name: exit $rc after $(( SECONDS - t0 )) s" | tee -a "$out/times.txt"
  [ $rc -eq 0 ] || { status=1; tail -n 5 "$work/$name.log"; }
  report
}

run_step() {
  case $1 in
    setup)
      if ! python3 -c 'import deepspeed, webdataset' 2>/dev/null; then
        limited setup 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target /tmp/site "$WHEELS"/*.whl
      fi
      { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
        python3 -c 'import torch, deepspeed; print("torch", torch.__version__, "cuda", torch.version.cuda, "deepspeed", deepspeed.__version__)'
        echo "dbot-ds $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $WORKERS loader workers"
      } > "$out/env.txt" 2>&1 ;;
    1) limited step1 150 "${bench[@]}" --sizes "$size0" --micro "$micro0" --zero 1 --repeats 1 --no-plain \
           --json "$work/step1.json" ;;
    2) for case in $CASES; do
         limited "step2_${case%:*}" 240 "${bench[@]}" --sizes "${case%:*}" --micro "${case#*:}" --zero 1 --repeats 1 \
             --no-plain --teacher-graph off,on --json "$work/step2_${case%:*}.json"
       done ;;
    3) limited step3 240 "${bench[@]}" --sizes "$size0" --micro "$micro0" --zero 1 --accum 1,4 --repeats 3 \
           --json "$work/step3.json" ;;
    4) limited step4 240 env DBOT_TEST_GPU=1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
    5) limited step5 360 "${bench[@]}" --sizes "$size0" --micro "$micro0" --zero 1 --repeats 1 --no-plain \
           --compile inductor --teacher-graph off,on --json "$work/step5.json" ;;
    6) [ -f "$work/shards/manifest.json" ] || limited step6_shards 180 python3 -m dbot_ds shards synthetic \
           --out "$work/shards" --images "$E2E_IMAGES" --workers "$WORKERS"
       for decode in cpu device; do
         limited "step6_$decode" 180 "${bench[@]}" --sizes "$size0" --micro "$micro0" --zero 1 --repeats 1 --no-plain \
             --data shards --shards "$work/shards/manifest.json" --workers "$WORKERS" --decode "$decode" \
             --json "$work/step6_$decode.json"
       done ;;
    7) limited step7 200 "${bench[@]}" --sizes "$size0" --micro "$micro0" --zero 2 --overlap-comm off,on --repeats 1 \
           --json "$work/step7.json" ;;
    *) echo "unknown step $1"; status=1 ;;
  esac
}

for arg in "$@"; do
  case $arg in
    A) steps="setup 1 2" ;; B) steps="setup 3 4 7" ;; C) steps="setup 5 6" ;; *) steps=$arg ;;
  esac
  for s in $steps; do run_step "$s"; done
done
exit $status
