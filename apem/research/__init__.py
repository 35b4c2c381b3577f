"""Experiments (paper Tables 3-4, Figs 7-8) and synthetic logs with known truth."""
