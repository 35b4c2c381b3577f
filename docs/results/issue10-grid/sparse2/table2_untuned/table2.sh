#!/bin/bash
# Untuned APEM at the paper's Table 2 sizes (K=64, L=4, lr 1e-3, log_round), 3 seeds, the grid's split and settings:
# does the tuned APEM's convert result come from its tuning (K=16, L=1)?
B=/work/main/.venv/bin
S=/work/exp/s4/split2w
cd /work/exp/s4
/usr/bin/time -v $B/apem experiment --train $S/train --val $S/val --test $S/test --models apem --seeds 3 \
  --epochs 5 --patience 1 --threads 1 --no-progress --out exp_apem_table2 > exp_apem_table2.log 2>&1
