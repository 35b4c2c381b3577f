#!/bin/bash
# K x L sensitivity on validation, APEM with the tuned hyperparameters except K and L, the grid's settings.
B=/work/main/.venv/bin
S=/work/exp/split3ng
while pgrep -f "out exp_baselines" > /dev/null; do sleep 10; done
cd /work/exp/sens
/usr/bin/time -v $B/apem sensitivity --train $S/train --val $S/val --k 16,32,64 --l 1,2,4 --seeds 2 --epochs 5 \
  --patience 1 --threads 1 --tuned /work/exp/grid3/tuned_apem.json --out study > study.log 2>&1
