"""One tuned.json for the grid: the three tuning runs' choices, and APEM's for its three ablations
(so each ablation changes one part only)."""
import json

parts = [json.load(open(p)) for p in ("tuned_base_a.json", "tuned_base_b.json", "tuned_apem.json")]
models = {}
for part in parts:
    models.update(part["models"])
for ablation in ("apem_wo_asrg", "apem_wo_ps", "apem_wo_ld"):
    models[ablation] = {"best": dict(models["apem"]["best"])}
out = dict(parts[0])
out["budget"] = {"trials_per_model": parts[0]["budget"]["trials_per_model"],
                 "epochs_per_trial": parts[0]["budget"]["epochs_per_trial"],
                 "wall_seconds": sum(p["budget"]["wall_seconds"] for p in parts)}
out["note"] = ("sparse2 funnel, tune.sh as three processes (baselines a, b and apem); "
               "apem's ablations take apem's chosen hyperparameters")
out["models"] = models
json.dump(out, open("tuned.json", "w"), indent=2)
print({m: v["best"] for m, v in models.items()})
