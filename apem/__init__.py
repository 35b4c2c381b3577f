"""APEM: Adaptive Pattern Extraction Multi-task learning for multi-step conversion estimation."""

__version__ = "0.1.0"
