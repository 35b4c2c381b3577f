#!/bin/bash
# The comparison on the sparse funnel: 5 seeds, up to 5 epochs with early stopping (patience 1) on validation,
# the whole negative-downsampled training split (48,851 rows = every click of 801,067 training-day rows plus 2%
# of the rest), each model with its own tuned hyperparameters from this funnel (tuned.json).
# $1 models, $2 out
B=/work/main/.venv/bin
S=/work/exp/s4/split2w
cd /work/exp/s4
/usr/bin/time -v $B/apem experiment --train $S/train --val $S/val --test $S/test --models "$1" --seeds 5 \
  --epochs 5 --patience 1 --threads 1 --no-progress --tuned tuned.json --out "$2" > "$2.log" 2>&1
