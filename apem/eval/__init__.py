"""Metrics, significance tests (DeLong, bootstrap), champion comparison and the blessing rule."""
