#!/bin/bash
# The comparison: 3 seeds, up to 4 epochs with early stopping (patience 1) on validation, the whole
# negative-downsampled training split (50,304 rows = every click of 796,580 rows plus 2% of the rest), tuned hyperparameters.
# $1 models, $2 tuned JSON, $3 out
B=/work/main/.venv/bin
S=/work/exp/split2ng
cd /work/exp/grid2
/usr/bin/time -v $B/apem experiment --train $S/train --val $S/val --test $S/test --models "$1" --seeds 3 \
  --epochs 4 --patience 1 --threads 1 --no-progress --tuned "$2" --out "$3" > "$3.log" 2>&1
