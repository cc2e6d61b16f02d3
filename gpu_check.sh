#!/usr/bin/env bash
# One short GPU run, one headline figure (about 9 minutes on one H200). In $OUT (default gpu-out/):
#   gpu.txt      the GPU, driver, torch and torchvision
#   bench*.txt   bench.py --quick, without and with --compile (the last line of each is its JSON)
#   train.txt    train.py --minutes 6 on the full CIFAR-10 JPEG copy: what it planned, and its end
#   eval.txt     test.py on that run: linear, kNN, and the published figures beside the matching ones
#   log.jsonl, config.json, eval.json   the run's own files, to keep under results/
# Every step has its own time limit, and a step that fails or runs out lets the next one run.
# For a machine with no network, prepare here first, then run this there with .carry carried:
#   mkdir -p .carry/wheels && tar -czf .carry/cifar10-jpg.tgz -C path/to/parent-of cifar10-jpg
#   pip download --no-deps -d .carry/wheels tqdm
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python -c "import tqdm" 2>/dev/null || pip install --no-index --find-links .carry/wheels tqdm
if [ ! -d data/cifar10-jpg ]; then mkdir -p data && tar -xzf .carry/cifar10-jpg.tgz -C data; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
step() {  # seconds, output file, command...: run one step under its own time limit
  local limit=$1 file=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$file" 2>&1 || echo "FAILED or past ${limit} s: $*" >> "$OUT/$file"
  tail -3 "$OUT/$file"
}
step 60 bench.txt python bench.py --quick --batch-size 256 --images 1024 --device cuda --data data/cifar10-jpg/train
step 150 bench-compile.txt python bench.py --quick --batch-size 256 --images 1024 --compile --device cuda \
  --data data/cifar10-jpg/train
rm -rf runs/gpu-minutes6
step 460 train.txt python train.py --data data/cifar10-jpg/train --minutes 6 --knn-every 50 --out runs/gpu-minutes6
step 90 eval.txt python test.py runs/gpu-minutes6 --data data/cifar10-jpg
cp runs/gpu-minutes6/{log.jsonl,config.json,eval.json} "$OUT/" 2>/dev/null || true
