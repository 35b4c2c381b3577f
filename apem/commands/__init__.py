"""CLI subcommands, one module per subject; the logic lives in the apem modules they call."""
