#!/bin/bash
# K x L sensitivity on validation, APEM with the tuned hyperparameters except K and L, the grid's settings.
# One study per K (k16 alone on one core, then k32 and k64 in parallel, one core each).
B=/work/main/.venv/bin
S=/work/exp/split3ng
for k in 16 32 64; do
  $B/apem sensitivity --train $S/train --val $S/val --k $k --l 1,2,4 --seeds 2 --epochs 5 --patience 1 \
    --threads 1 --tuned /work/exp/grid3/tuned_apem.json --out study_k$k > study_k$k.log 2>&1
done
