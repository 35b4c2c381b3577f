"""The trainer loop, checkpoints, MLflow tracking and training from dataset directories."""
