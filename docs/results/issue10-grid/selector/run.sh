#!/bin/bash
# Selector reading and gamma schedule, chosen on validation: APEM, 300k funnel (seed 0), training split negative-downsampled at 0.1 (34,628 rows), 3 seeds.
B=/work/main/.venv/bin
S=/work/exp/split3n
cd /work/exp/selector
for name in planned_nothing planned_uniform fixed_uniform; do
  /usr/bin/time -v $B/apem experiment --train $S/train --val $S/val --test $S/test --oracle $S/test \
    --models apem --seeds 3 --epochs 5 --patience 1 --threads 1 --no-progress \
    --tuned $name.json --out out_$name > $name.log 2>&1
done
