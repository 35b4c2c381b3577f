"""The data contract (spec), feature encoding, the dataset's own knowledge (features), storage and atomic writes.

The bottom layer: it imports nothing else from ``apem``.
"""
