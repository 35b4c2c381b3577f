#!/bin/bash
# Fair tuning budget, the same for every model: 4 trials x up to 2 epochs (patience 1) on the first
# 20,000 rows of the negative-downsampled training split, scored on validation only. Seed 0.
B=/work/main/.venv/bin
S=/work/exp/split3ng
cd /work/exp/grid3
/usr/bin/time -v $B/apem tune --train $S/train --val $S/val --models "$1" --trials 4 --epochs 2 --patience 1 \
  --max-rows 20000 --threads 1 --seed 0 --mlflow-uri sqlite:////work/exp/grid3/tune_mlflow.db --out "$2" > "$2.log" 2>&1
