"""The ``apem`` command line: ``main`` plus one module per subject."""
