#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one command (about 9 minutes on one H100/H200),
# for a GPU that is lent for a short time. Run from the repository root:
#
#   OUT=bench_gpu bash benchmarks/gpu_checks.sh
#
# 1. versions and the GPU;
# 2. gpu_throughput.py, eager: SimCLR ResNet-50, DINO ViT-S/16 multi-crop, MAE ViT-B/16 on
#    JPEGs (decode + crop in workers, the rest batched on the GPU);
# 3. the same with train.compile=true;
# 4. gpu_throughput.py with data.cache=true (nothing decoded after the first pass);
# 5. `selfsight demo` (SimCLR on Fashion-MNIST, then kNN) for DEMO_MINUTES: does the GPU path learn?
#
# Environment: OUT (results folder, default bench_gpu), PYTHON (default python3), SELFSIGHT_DATA
# (a folder with the Fashion-MNIST idx .gz files, when the Debian package is not installed),
# FILES (JPEGs to make, default 4000), STEPS/WARMUP (timed and warm-up steps, default 20/10),
# DEMO_MINUTES (default 1; 0 skips the demo), EXTRA (extra arguments for every gpu_throughput.py call, e.g. --tiny
# for a CPU dry run). Each stage has its own timeout, so one that hangs cannot take the rest.
set -u
OUT=${OUT:-bench_gpu}
PY=${PYTHON:-python3}
FILES=${FILES:-4000}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-10}
DEMO_MINUTES=${DEMO_MINUTES:-1}
EXTRA=${EXTRA:-}
JPEGS=$(mktemp -d /tmp/gpu_checks_jpegs.XXXXXX)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BENCH="$PY benchmarks/gpu_throughput.py --steps $STEPS --warmup $WARMUP $EXTRA"
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "versions"
$PY -c "import torch, torchvision, timm; print('torch', torch.__version__, '| torchvision', torchvision.__version__,
'| timm', timm.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null

stage "eager"
timeout 600 $BENCH --make $JPEGS --files $FILES --timeout 150 --out $OUT/eager

stage "compile"
timeout 600 $BENCH --data $JPEGS --compile --timeout 180 --out $OUT/compile

stage "cache"
timeout 400 $BENCH --data $JPEGS --set data.cache=true --timeout 150 --out $OUT/cache

if [ "$DEMO_MINUTES" != 0 ]; then
  stage "demo, $DEMO_MINUTES min"
  timeout $(( ${DEMO_MINUTES%.*} * 60 + 240 )) $PY -m selfsight demo --minutes "$DEMO_MINUTES" \
    --out /tmp/gpu_checks_demo train.progress=false
fi

rm -rf "$JPEGS"
stage "done"
