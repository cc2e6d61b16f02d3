#!/usr/bin/env bash
# The GPU figures of the README's speed and results tables, as one run (about 10 minutes on an H200).
# For a machine with no network, prepare here first, then run this there with .carry carried:
#   mkdir -p .carry/wheels && tar -czf .carry/cifar10-jpg.tgz -C ../shared/data cifar10-jpg
#   pip download --no-deps -d .carry/wheels tqdm
# Results land in $OUT (default gpu-out/): nvidia-smi, bench output, the run's log and eval.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python -c "import tqdm" 2>/dev/null || pip install --no-index --find-links .carry/wheels tqdm
if [ ! -d data/cifar10-jpg ]; then mkdir -p data && tar -xzf .carry/cifar10-jpg.tgz -C data; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" | tee -a "$OUT/gpu.txt"
# Each step has a time limit, and a step that fails or runs out still lets the next one run, so that
# one stuck step cannot spend the whole device budget; what each wrote so far is already in $OUT.
timeout 300 python bench.py --device cuda --compile --data data/cifar10-jpg/train 2>&1 | tee "$OUT/bench.txt" \
  || echo "bench.py failed or ran past 300 s" | tee -a "$OUT/bench.txt"
# A short real run: 10 epochs of full CIFAR-10, kNN at the end, then the linear probe.
( time timeout 240 python train.py --data data/cifar10-jpg/train --epochs 10 --knn-every 5 --out runs/gpu10 ) 2>&1 \
  | tail -5 | tee "$OUT/train.txt" || true
cp runs/gpu10/log.jsonl "$OUT/" 2>/dev/null || true
timeout 120 python test.py runs/gpu10 --data data/cifar10-jpg 2>&1 | tail -4 | tee "$OUT/eval.txt" || true
cp runs/gpu10/eval.json "$OUT/" 2>/dev/null || true
