"""Ingestion of raw logs, TFDV validation, the Beam chronological split and the training window."""
