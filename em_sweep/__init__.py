"""em-sweep: one-shot entropy minimization experiments at sweep scale."""
