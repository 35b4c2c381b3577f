"""Model directories (save/load), batch prediction, recalibration, export and the serving model."""
