"""Training: the loop, its stop signals and the whole-config checks."""
