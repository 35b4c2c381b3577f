"""Building blocks and losses: shared layers, ASRG (eq. 11-17), the Pattern Selector (eq. 18-19),
the sequential-dependence loss (eq. 20-23). Imports only ``apem.data``; never ``apem.models``."""
