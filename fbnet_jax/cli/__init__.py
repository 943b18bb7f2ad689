"""The `fbnet` command: the only layer that knows flag names."""
