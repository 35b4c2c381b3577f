"""Numerical-encoding comparison on Shared-Bottom (the same as `apem experiment ... --numerical-encoding E`)."""
import sys
from apem.research.experiment import ExperimentConfig, run_experiment

for encoding in sys.argv[1].split(","):
    config = ExperimentConfig(models=["shared_bottom"], seeds=5, epochs=2, patience=1, max_rows=100_000,
                              num_threads=1, progress=False, numerical_encoding=encoding)
    run_experiment("split3/train", "split3/val", "split3/test", f"report_enc_{encoding.replace(':', '-')}", config,
                   oracle_dir="synth3", log=print)
