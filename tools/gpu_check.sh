#!/usr/bin/env bash
# The GPU measurements, one prepared call per mode, each under the device tool's 10 minutes a call, every
# stage under its own time limit (a stage that fails or runs out lets the next run), the summary last.
#   tools/gpu_check.sh speed      # call 1 (about 7 min): the CUDA graph's checks, then bench.py at batch 256, 512
#                             # and 1024 (eager, graph), with cudnn.benchmark, with compile; one minute of
#                             # train.py --cuda-graph for the whole epoch (checkpoint and kNN check included)
#   tools/gpu_check.sh schedule   # call 2 (about 9 min): the short-budget comparison, one minute of training
#                             # each (--minutes 1 --cuda-graph), scored by the kNN and online probe at the end
#   tools/gpu_check.sh headline   # a later lease: --minutes 8 --cuda-graph, then test.py (about 9.5 min)
# The files land in $OUT (default gpu-out/): gpu.txt (GPU, driver, versions), one .txt per stage (the last
# line of a bench or check is its JSON), and for a training run its log.jsonl, config.json and eval.json.
# For a machine with no network, prepare here first, then run it there with .carry carried:
#   mkdir -p .carry && tar -czf .carry/cifar10-jpg.tgz -C path/to/parent-of cifar10-jpg
set -uo pipefail
case ${1:-} in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac  # this header
cd "$(dirname "$0")/.."  # the project root
export PYTHONUNBUFFERED=1  # a stage killed at its limit still leaves its output
MODE=${1:-speed}
OUT=${OUT:-gpu-out}
DATA=data/cifar10-jpg
mkdir -p "$OUT"
python -c "import tqdm" 2>/dev/null || pip install --no-index --find-links .carry/wheels tqdm
if [ ! -d $DATA ]; then mkdir -p data && tar -xzf .carry/cifar10-jpg.tgz -C data; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "cpu cores: $(nproc)"
  python -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
T0=$SECONDS
stage() {  # seconds, output file, command...: one stage under its own time limit
  local limit=$1 file=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$file" 2>&1 || echo "FAILED or past ${limit} s: $*" >> "$OUT/$file"
  echo "stage took $((SECONDS - t0)) s" >> "$OUT/$file"
  echo "== $file: $(tail -2 "$OUT/$file" | head -1 | cut -c1-160)"
}
train_run() {  # name, seconds, train.py flags...: a run in runs/gpu-<name>, its files kept in $OUT/<name>/
  local name=$1 limit=$2; shift 2
  rm -rf "runs/gpu-$name"
  stage "$limit" "train-$name.txt" python train.py --data $DATA/train --workers 16 --out "runs/gpu-$name" "$@"
  mkdir -p "$OUT/$name" && cp runs/gpu-"$name"/{log.jsonl,config.json,eval.json} "$OUT/$name/" 2>/dev/null
}
BENCH="python tools/bench.py --device cuda --workers 15 --data $DATA/train"
case $MODE in
speed)
  stage 120 graph_check.txt python tools/graph_check.py --device cuda
  for b in 256 512 1024; do stage 75 "bench-$b.txt" $BENCH --batch-size $b --graph; done
  stage 75 bench-256-cudnn.txt python -c "import runpy, sys, torch; torch.backends.cudnn.benchmark = True; \
sys.argv = ['tools/bench.py'] + sys.argv[1:]; runpy.run_path('tools/bench.py', run_name='__main__')" \
    --device cuda --workers 15 --data $DATA/train --batch-size 256 --graph
  stage 150 bench-256-compile.txt $BENCH --batch-size 256 --graph --compile
  train_run epoch 100 --minutes 1 --cuda-graph --knn-every 5
  ;;
schedule)  # name, then the flags that differ from the recipe; one minute each, scored at its end
  while read -r name flags; do
    [ $((SECONDS - T0)) -gt 480 ] && { echo "== $name: skipped, the call's time is spent"; continue; }
    train_run "$name" 85 --minutes 1 --cuda-graph --knn-every 1000000 $flags
  done <<'RUNS'
recipe
lightly --optimizer sgd --base-lr 0.12 --weight-decay 5e-4 --warmup-epochs 0 --tau-schedule constant --hidden-dim 1024
tau0.98 --tau-base 0.98
tau0.996 --tau-base 0.996
warmup0 --warmup-epochs 0
batch512 --batch-size 512
crop0.2 --crop-min-scale 0.2
RUNS
  ;;
headline)
  train_run headline 520 --minutes 8 --cuda-graph --knn-every 25
  stage 60 eval-headline.txt python test.py runs/gpu-headline --data $DATA
  cp runs/gpu-headline/eval.json "$OUT/headline/" 2>/dev/null
  ;;
*) echo "usage: tools/gpu_check.sh speed|schedule|headline"; exit 2 ;;
esac
echo "== summary ($MODE, $((SECONDS - T0)) s):"
python - "$OUT" "$MODE" <<'PY'
import json, os, sys
out, mode = sys.argv[1], sys.argv[2]
def last_json(name):
    try:
        return json.loads([l for l in open(os.path.join(out, name)) if l.startswith("{")][-1])
    except (OSError, IndexError, ValueError):
        return None
if mode == "speed":
    print("graph check:", (last_json("graph_check.txt") or {}).get("checks"))
    for f in sorted(f for f in os.listdir(out) if f.startswith("bench-")):
        r = last_json(f) or {}
        print(f, "step", {k: round(v) for k, v in (r.get("step_images_per_s") or {}).items() if v},
              "end to end", round(r.get("end_to_end_images_per_s") or 0),
              "graph", {k: round(v) for k, v in (r.get("graph_images_per_s") or {}).items()})
for run in sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))):
    log = [json.loads(l) for l in open(os.path.join(out, run, "log.jsonl"))] if os.path.isfile(os.path.join(out, run, "log.jsonl")) else []
    cfg = json.load(open(os.path.join(out, run, "config.json"))) if os.path.isfile(os.path.join(out, run, "config.json")) else {}
    last = next((r for r in reversed(log) if "knn_top1" in r), log[-1] if log else {})
    ev = json.load(open(os.path.join(out, run, "eval.json"))) if os.path.isfile(os.path.join(out, run, "eval.json")) else {}
    print(run, "epochs", cfg.get("epochs"), "train min", round(cfg.get("train_minutes", 0), 2),
          "median images/s", sorted(r["images_per_s"] for r in log)[len(log) // 2] if log else None,
          "kNN", last.get("knn_top1"), "probe", last.get("probe_test_top1"), "linear", ev.get("top1"))
PY
