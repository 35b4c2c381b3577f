"""One file per model. ``apem.models.registry`` maps the CLI names to classes and typed configs."""
