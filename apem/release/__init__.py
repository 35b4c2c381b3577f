"""The MLflow model registry (aliases, not stages) and push: registration and the serving copy."""
