#!/usr/bin/env bash
# One short GPU run (under 10 minutes on one H200, the device tool's limit per command). In $OUT (default gpu-out/):
#   gpu.txt      the GPU, driver, CPU cores, torch and torchvision
#   train.txt    train.py --minutes 5 on the full CIFAR-10 JPEG copy: what it planned, and its end
#   eval.txt     test.py on that run: linear, kNN, and the published figures beside the matching ones
#   bench*.txt   bench.py at batch 256, without and with --compile (the last line of each is its JSON)
#   log.jsonl, config.json, eval.json   the run's own files, to keep under results/
# The headline (train, then eval) runs first. Every step has its own time limit, and a step that fails or
# runs out lets the next one run. For a machine with no network, prepare here first, then run this there
# with .carry carried:
#   mkdir -p .carry && tar -czf .carry/cifar10-jpg.tgz -C path/to/parent-of cifar10-jpg
set -uo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1  # a step killed at its limit still leaves its output
OUT=${OUT:-gpu-out}
RUN=runs/gpu-minutes5
mkdir -p "$OUT"
python -c "import tqdm" 2>/dev/null || pip install --no-index --find-links .carry/wheels tqdm
if [ ! -d data/cifar10-jpg ]; then mkdir -p data && tar -xzf .carry/cifar10-jpg.tgz -C data; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "cpu cores: $(nproc)"
  python -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
step() {  # seconds, output file, command...: run one step under its own time limit
  local limit=$1 file=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$file" 2>&1 || echo "FAILED or past ${limit} s: $*" >> "$OUT/$file"
  echo "step took $((SECONDS - t0)) s" >> "$OUT/$file"
  tail -3 "$OUT/$file"
}
rm -rf "$RUN"
step 370 train.txt python train.py --data data/cifar10-jpg/train --minutes 5 --knn-every 25 --workers 16 --out "$RUN"
cp "$RUN"/{log.jsonl,config.json} "$OUT/" 2>/dev/null || true
step 60 eval.txt python test.py "$RUN" --data data/cifar10-jpg
cp "$RUN"/eval.json "$OUT/" 2>/dev/null || true
step 45 bench.txt python bench.py --batch-size 256 --workers 15 --device cuda --data data/cifar10-jpg/train
step 90 bench-compile.txt python bench.py --batch-size 256 --workers 15 --compile --device cuda \
  --data data/cifar10-jpg/train
