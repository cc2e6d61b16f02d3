#!/usr/bin/env bash
# The paper's Table 5a ablations: train each setting, then evaluate it with test.py.
#   EPOCHS=100 tools/ablate.sh                                    # CIFAR-10, the recipe otherwise
#   EPOCHS=2 tools/ablate.sh --data ../shared/data/cifar10-jpg/train --subset 1000 --batch-size 64
# Extra arguments go to train.py; test.py then evaluates on the run's own data.
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac  # this header
cd "$(dirname "$0")/.."  # the project root
EPOCHS=${EPOCHS:-100}
run() {  # name, then the train.py flags of that setting
  local name=$1; shift
  python train.py --epochs "$EPOCHS" --out "runs/ablate-$name" "$@"
  python test.py "runs/ablate-$name"
}
run default "$@"                                                   # tau_base 0.99, predictor
run tau1 --tau-base 1 "$@"                                         # target stays random (paper: 18.8%)
run tau0 --tau-base 0 --tau-schedule constant "$@"                 # target = online (paper: 0.3%)
run tau0.999 --tau-base 0.999 "$@"
run no-predictor --no-predictor "$@"                               # collapses (paper: Table 5)
