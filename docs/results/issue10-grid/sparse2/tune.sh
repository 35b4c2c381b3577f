#!/bin/bash
# Fair tuning budget on the sparse funnel, the same for every model: 4 trials x up to 2 epochs (patience 1)
# on the whole negative-downsampled training split (48,851 rows), scored on the whole validation split
# (194,549 rows, 63 conversions; --max-rows would also cut validation to a handful of conversions). Seed 0.
# $1 models, $2 out JSON
B=/work/main/.venv/bin
S=/work/exp/s4/split2w
cd /work/exp/s4
/usr/bin/time -v $B/apem tune --train $S/train --val $S/val --models "$1" --trials 4 --epochs 2 --patience 1 \
  --threads 1 --seed 0 --mlflow-uri sqlite:////work/exp/s4/tune_$(basename $2 .json).db --out "$2" > "$2.log" 2>&1
