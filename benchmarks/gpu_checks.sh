#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one command, for a GPU that is lent for a short
# time. Run from the repository root:
#
#   OUT=bench_gpu bash benchmarks/gpu_checks.sh                      # every stage, ~12 minutes on an H200
#   OUT=bench_gpu STAGES="cache device" DEMO_MINUTES=0 bash benchmarks/gpu_checks.sh
#
# 1. versions and the GPU;
# 2. the stages named in STAGES (default "syncs eager compile device cache"), each gpu_throughput.py
#    over SimCLR ResNet-50, DINO ViT-S/16 multi-crop and MAE ViT-B/16 on the same JPEG folder:
#    syncs:   the uint8 cache, eager, every host-device synchronisation of the timed steps counted
#             with the code line that caused it (--syncs; zero is the target);
#    eager:   JPEGs decoded and cropped in DataLoader workers, the rest batched on the GPU;
#    compile: the same with train.compile=true;
#    device:  train.compile=true and data.decode=device (nvJPEG decodes, the GPU crops);
#    cache:   train.compile=true and data.cache=true (decoded once into a uint8 memmap);
#    the first compiled stage fills torch's compile cache, so later ones compile faster;
# 3. `selfsight demo` (SimCLR on Fashion-MNIST, then kNN) for DEMO_MINUTES: does the GPU path learn?
#
# Environment: OUT (results folder, default bench_gpu), PYTHON (default python3), SELFSIGHT_DATA
# (a folder with the Fashion-MNIST idx .gz files, when the Debian package is not installed),
# FILES (JPEGs to make, default 4000), STEPS/WARMUP (timed and warm-up steps, default 20/10),
# STAGES, DEMO_MINUTES (default 1; 0 skips the demo), EXTRA (extra arguments for every
# gpu_throughput.py call, e.g. --tiny for a CPU dry run). Each stage has its own timeout, so one
# that hangs cannot take the rest.
set -u
OUT=${OUT:-bench_gpu}
PY=${PYTHON:-python3}
FILES=${FILES:-4000}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-10}
DEMO_MINUTES=${DEMO_MINUTES:-1}
EXTRA=${EXTRA:-}
STAGES=${STAGES:-syncs eager compile device cache}
JPEGS=$(mktemp -d /tmp/gpu_checks_jpegs.XXXXXX)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BENCH="$PY benchmarks/gpu_throughput.py --steps $STEPS --warmup $WARMUP $EXTRA"
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "versions"
$PY -c "import torch, torchvision, timm; print('torch', torch.__version__, '| torchvision', torchvision.__version__,
'| timm', timm.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null

src="--make $JPEGS --files $FILES"          # the first stage makes the JPEGs, the others reuse them
for s in $STAGES; do
  case $s in
    syncs)   flags="--set data.cache=true --syncs" ;;
    eager)   flags="" ;;
    compile) flags="--compile" ;;
    device)  flags="--compile --set data.decode=device" ;;
    cache)   flags="--compile --set data.cache=true" ;;
    *) echo "unknown stage $s (syncs, eager, compile, device, cache)"; continue ;;
  esac
  stage "$s: $flags"
  timeout 600 $BENCH $src $flags --timeout 240 --out $OUT/$s
  src="--data $JPEGS"
done

if [ "$DEMO_MINUTES" != 0 ]; then
  stage "demo, $DEMO_MINUTES min"
  timeout $(( ${DEMO_MINUTES%.*} * 60 + 240 )) $PY -m selfsight demo --minutes "$DEMO_MINUTES" \
    --out /tmp/gpu_checks_demo train.progress=false
fi

rm -rf "$JPEGS"
stage "done"
