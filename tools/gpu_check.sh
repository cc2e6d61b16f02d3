#!/usr/bin/env bash
# The GPU calls, one prepared call of the device tool per mode. A call ends within CALL_S seconds (default 570;
# the tool allows 600), every stage under its own time limit (a stage that fails or runs out lets the next run),
# the summary printed last. The next lease's procedure, step by step: docs/speed.md, "The next lease".
#   tools/gpu_check.sh lease      # call 1, the one that pays if it is the only one: graph_check.py's five checks
#                                 # (90 s at most), then train.py --minutes M --cuda-graph if they all hold, eager
#                                 # if not, M as large as the call allows once test.py's time is set aside;
#                                 # then test.py on that run (the full test split, the default protocol)
#   CALL_S=S tools/gpu_check.sh matrix   # call 2, in the S seconds the lease has left: bench.py at batch 256,
#                                 # 512 and 1024, eager and graph; then with compile; then cudnn.benchmark at 256.
#                                 # In that order, each stage only if its time limit still fits
#   tools/gpu_check.sh schedule   # a later lease, once the headline exists: the short-budget comparison, one
#                                 # minute of training each (--minutes 1 --cuda-graph), scored at its end
#   tools/gpu_check.sh summary DIR  # the summary again, from a call's files fetched into DIR
# $OUT (default gpu-out/) gets gpu.txt (GPU, driver, versions), one .txt per stage (its output and time; a check's
# or a bench's last line is its JSON) and, per training run, a folder with its log.jsonl, config.json, eval.json.
# The tool returns at most 8 files: a call that wrote more packs all but gpu.txt into $OUT/files.tgz.
# The machine has no network and no ../shared: prepare the data here, then carry .carry with the call:
#   mkdir -p .carry && tar -czf .carry/cifar10-jpg.tgz -C ../shared/data cifar10-jpg
# The CPU trial of a mode's stages (tiny sizes, short limits): DEVICE=cpu TRIAL=1 DATA=<a folder with train/
# and test/ ImageFolders> CALL_S=420 CHECK_S=150 OUT=/tmp/trial tools/gpu_check.sh lease (CHECK_S=1: the checks
# fail, so the headline runs eagerly).
set -uo pipefail
case ${1:-} in -h|--help|"") sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac  # this header
T0=$SECONDS
MODE=$1
summary() {  # DIR: what a call measured, from its files (also those packed into files.tgz)
python - "$1" <<'PY'
import json, os, re, sys, tarfile, tempfile
roots = [sys.argv[1]]
if os.path.isfile(os.path.join(roots[0], "files.tgz")):
    roots.append(tempfile.mkdtemp())
    with tarfile.open(os.path.join(roots[0], "files.tgz")) as t:
        t.extractall(roots[1], filter="data")
def path(*name):
    return next((os.path.join(r, *name) for r in roots if os.path.exists(os.path.join(r, *name))), None)
def text(*name):
    p = path(*name)
    return open(p, errors="replace").read().replace("\r", "\n") if p else ""
def last_json(*name):
    for line in reversed(text(*name).splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
def pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}%"
names = sorted({f for r in roots for f in os.listdir(r)},  # bench-256 before bench-1024
               key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f)])
gpu = text("gpu.txt").splitlines()
print("gpu:", " | ".join(gpu[1:]) or "no gpu.txt")
stages = []
for f in (f for f in names if f.endswith(".txt") and f != "gpu.txt"):
    took, failed = re.findall(r"^stage took (\d+) s", text(f), re.M), re.findall(r"^FAILED \((.*?)\)", text(f), re.M)
    stages.append(f"{f[:-4]} {took[-1] if took else '?'} s" + (f" ({failed[-1]})" if failed else ""))
print("stages:", "; ".join(stages) or "none")
if "graph_check.txt" in names:
    r = last_json("graph_check.txt")
    if r is None:
        print("graph check: no result (stopped or failed before its JSON line)")
    else:
        failed = [name for name, ok in r["checks"].items() if not ok]
        print("graph check:", "all hold" if r["all_hold"] else f"FAILED: {'; '.join(failed)}", "|",
              ", ".join(f"{k} {v:.3g}" for k, v in r.items() if isinstance(v, float)),
              "| loss eager {:.3f} -> {:.3f}, graph {:.3f} -> {:.3f}".format(
                  *r.get("loss_eager_first_last", [0, 0]), *r.get("loss_graph_first_last", [0, 0])))
for f in (f for f in names if f.startswith("bench-")):
    r = last_json(f) or {}
    ips = lambda d: ", ".join(f"{k} {v:,.0f}" for k, v in (d or {}).items() if v) or "n/a"  # noqa: E731
    print(f"{f[:-4]}: step {ips(r.get('step_images_per_s'))}; end to end {ips({'eager': r.get('end_to_end_images_per_s')})}"
          f", {ips(r.get('graph_images_per_s'))}" if r else f"{f[:-4]}: no result")
for run in (d for d in names if path(d, "config.json")):
    cfg = json.loads(text(run, "config.json"))
    log = []
    for line in text(run, "log.jsonl").splitlines():
        try:
            log.append(json.loads(line))
        except ValueError:
            pass
    ev = json.loads(text(run, "eval.json") or "{}")
    check = next((r for r in reversed(log) if "probe_test_top1" in r), {})
    speeds = sorted(r["images_per_s"] for r in log if "images_per_s" in r)
    flags = f"--minutes {cfg['minutes']:g}" if cfg.get("minutes") else f"--epochs {cfg.get('epochs')}"
    print(f"{run}: train.py {flags}{' --cuda-graph' if cfg.get('cuda_graph') else ''} (batch {cfg.get('batch_size')}): "
          f"{cfg.get('epochs')} epochs, planned {cfg.get('planned_minutes', 0):.2f} min, trained "
          f"{cfg.get('train_minutes') or (log[-1].get('minutes', 0) if log else 0):.2f} min, median {speeds[len(speeds) // 2] if speeds else 0:,.0f} images/s, "
          f"last loss {log[-1]['loss'] if log else float('nan'):.4f} | test.py: linear {pct(ev.get('top1'))} (top-5 "
          f"{pct(ev.get('top5'))}), kNN {pct(ev.get('knn_top1'))} | train.py's last check (epoch "
          f"{check.get('epoch', 0):g}): kNN {pct(check.get('knn_top1'))}, online probe {pct(check.get('probe_test_top1'))}")
PY
}
case $MODE in
lease|matrix|schedule) ;;
summary) summary "${2:?usage: tools/gpu_check.sh summary DIR}"; exit ;;
*) echo "usage: tools/gpu_check.sh lease|matrix|schedule|summary DIR (--help: what each does)"; exit 2 ;;
esac
cd "$(dirname "$0")/.."  # the project root

export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10  # a stage killed at its limit still leaves its output; short logs
OUT=${OUT:-gpu-out} DEVICE=${DEVICE:-cuda} DATA=${DATA:-data/cifar10-jpg} TRIAL=${TRIAL:-} CALL_S=${CALL_S:-570}
TAIL_S=10  # seconds kept for the end: packing $OUT, the summary
# bench.py's batches, each with its time limit (3 repeats, not 5: the matrix call gets what the lease has left)
CHECK_FLAGS="" TRAIN_FLAGS="" BENCH_FLAGS="--workers 15 --repeats 3" BENCHES="256:60 512:75 1024:100"
if [ -n "$TRIAL" ]; then  # the CPU trial: every stage at toy sizes
  CHECK_FLAGS="--batch-size 8 --hidden-dim 32 --steps 4 --images 64"
  TRAIN_FLAGS="--batch-size 16 --hidden-dim 32 --proj-dim 16 --log-every 2 --save-minutes 0"
  BENCH_FLAGS="--quick --workers 1" BENCHES="8:60 16:60 32:60"
fi
mkdir -p "$OUT"
python -c "import tqdm" 2>/dev/null || pip install --no-index --find-links .carry/wheels tqdm
if [ ! -d "$DATA" ]; then mkdir -p data && tar -xzf .carry/cifar10-jpg.tgz -C data; fi
if [ ! -d "$DATA/train" ]; then
  echo "error: no $DATA/train. Carry the data: mkdir -p .carry && tar -czf .carry/cifar10-jpg.tgz -C ../shared/data \
cifar10-jpg, then call with carry [\".carry\"]"; exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "(no nvidia-smi)"
  echo "cpu cores: $(nproc)"
  python -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
} > "$OUT/gpu.txt" 2>&1
stage() {  # seconds, output file, command...: one stage under its own time limit; returns its exit status
  local limit=$1 file=$2 t0=$SECONDS rc; shift 2
  timeout -k 15 "$limit" "$@" < /dev/null > "$OUT/$file" 2>&1; rc=$?
  [ $rc -eq 0 ] || echo "FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ", past its $limit s")): $*" >> "$OUT/$file"
  echo "stage took $((SECONDS - t0)) s" >> "$OUT/$file"
  echo "== $file ($((SECONDS - t0)) s): $(tr '\r' '\n' < "$OUT/$file" | grep -v '^stage took' | grep . | tail -1 | cut -c1-150)"
  return $rc
}
fits() {  # seconds, what: whether a stage of that limit still fits in the call (else says it is skipped)
  [ $((CALL_S - (SECONDS - T0) - TAIL_S)) -ge "$1" ] || { echo "== $2: skipped, its $1 s no longer fit"; return 1; }
}
train_run() {  # name, seconds, train.py flags...: a run in runs/gpu-<name>, its files kept in $OUT/<name>/
  local name=$1 limit=$2 rc; shift 2
  rm -rf "runs/gpu-$name"
  stage "$limit" "train-$name.txt" python train.py --device "$DEVICE" --data "$DATA/train" --workers "$(nproc)" \
    --out "runs/gpu-$name" $TRAIN_FLAGS "$@"; rc=$?
  mkdir -p "$OUT/$name" && cp runs/gpu-"$name"/{log.jsonl,config.json} "$OUT/$name/" 2>/dev/null
  return $rc
}
BENCH="python tools/bench.py --device $DEVICE --data $DATA/train $BENCH_FLAGS"
case $MODE in
lease)
  # The budget, in seconds (the 5-minute eager run of 2026-11-29 spent 22 s beyond its --minutes and test.py
  # finished within its 60 s; the limits keep twice that and more): what is left after the checks is training.
  CHECK_S=${CHECK_S:-90}          # graph_check.py: 4 checks, then 300 steps graph and 300 eager (about 45 s)
  TEST_S=${TEST_S:-75}            # test.py: cached splits, features, kNN, 100 epochs of the linear probe
  TRAIN_EXTRA_S=${TRAIN_EXTRA_S:-45}  # train.py beyond --minutes: start, decoding, the --minutes trial, last save
  if stage "$CHECK_S" graph_check.txt python tools/graph_check.py --device "$DEVICE" --data "$DATA/train" $CHECK_FLAGS
  then GRAPH=--cuda-graph WHY="the graph's checks hold"
  else GRAPH="" WHY="the graph's checks failed or did not finish: eager"
  fi
  LEFT=$((CALL_S - (SECONDS - T0) - TEST_S - TRAIN_EXTRA_S - TAIL_S))
  M=$(awk -v s="$LEFT" 'BEGIN { m = s / 60; printf "%.2f", m < 0.5 ? 0.5 : m }')
  echo "budget: $CALL_S s - $((SECONDS - T0)) s spent - $TEST_S s test.py - $TRAIN_EXTRA_S s train.py's start and end" \
    "- $TAIL_S s = $LEFT s: --minutes $M $GRAPH ($WHY)"
  # --knn-every 10: about a dozen points for the curve at a graph's pace, each check about half a second.
  train_run headline "$(awk -v m="$M" -v x="$TRAIN_EXTRA_S" 'BEGIN { printf "%d", 60 * m + x }')" \
    --minutes "$M" --knn-every 10 $GRAPH
  stage "$TEST_S" eval-headline.txt python test.py runs/gpu-headline --data "$DATA" --device "$DEVICE"
  cp runs/gpu-headline/eval.json "$OUT/headline/" 2>/dev/null
  ;;
matrix)  # what matters most first; a compile stage compiles twice (the step, and the step in the graph)
  for bl in $BENCHES; do b=${bl%:*} l=${bl#*:}; fits "$l" "bench-$b" && stage "$l" "bench-$b.txt" $BENCH --batch-size "$b" --graph; done
  for bl in $BENCHES; do b=${bl%:*}
    fits 180 "bench-$b-compile" && stage 180 "bench-$b-compile.txt" $BENCH --batch-size "$b" --graph --compile
  done
  bl=${BENCHES%% *} b=${bl%:*} l=${bl#*:}
  fits "$l" "bench-$b-cudnn" && stage "$l" "bench-$b-cudnn.txt" python -c "import runpy, sys, torch; \
torch.backends.cudnn.benchmark = True; sys.argv = ['tools/bench.py'] + sys.argv[1:]; \
runpy.run_path('tools/bench.py', run_name='__main__')" --device "$DEVICE" --data "$DATA/train" $BENCH_FLAGS \
    --batch-size "$b" --graph
  ;;
schedule)  # name, then the flags that differ from the recipe; one minute each, scored at its end
  while read -r name flags; do
    fits 85 "$name" && train_run "$name" 85 --minutes 1 --cuda-graph --knn-every 1000000 $flags
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
esac
REPORT=$(summary "$OUT")
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then  # the tool returns 8 files: the rest as one archive
  (cd "$OUT" && find . -type f ! -name gpu.txt ! -name files.tgz | tar -czf files.tgz -T - &&
   find . -mindepth 1 ! -name gpu.txt ! -name files.tgz -delete)
fi
echo "== summary ($MODE, $((SECONDS - T0)) s):"
echo "$REPORT"
