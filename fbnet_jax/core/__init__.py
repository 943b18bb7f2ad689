"""The floor: label spaces, the error family, logs, config files, runtime defaults as a function."""
