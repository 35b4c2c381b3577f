#!/bin/bash
# The comparison: 5 seeds, up to 5 epochs with early stopping (patience 1) on validation, the whole
# negative-downsampled training split (34,628 rows = every positive of 238,906 rows), tuned hyperparameters.
# $1 models, $2 tuned JSON, $3 out
B=/work/main/.venv/bin
S=/work/exp/split3ng
cd /work/exp/grid3
/usr/bin/time -v $B/apem experiment --train $S/train --val $S/val --test $S/test --models "$1" --seeds 5 \
  --epochs 5 --patience 1 --threads 1 --no-progress --tuned "$2" --out "$3" > "$3.log" 2>&1
