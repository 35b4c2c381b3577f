"""Per-field embedding weight decay on user_id, on Shared-Bottom (= `apem experiment ... --embedding-l2-field user_id=1e-3`)."""
from apem.research.experiment import ExperimentConfig, run_experiment

for tag, per_field in (("off", {}), ("user_id_1e-3", {"user_id": 1e-3})):
    config = ExperimentConfig(models=["shared_bottom"], seeds=3, epochs=3, patience=3, max_rows=100_000,
                              num_threads=1, progress=False, embedding_l2_fields=per_field)
    run_experiment("split3/train", "split3/val", "split3/test", f"report_l2_{tag}", config, oracle_dir="synth3",
                   log=print)
