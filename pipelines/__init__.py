"""The daily retraining pipeline (``daily_retrain``) and its compile, local-run and schedule entry points."""
