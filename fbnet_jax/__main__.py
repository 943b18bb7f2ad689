"""`python -m fbnet_jax ...` is the `fbnet` command."""

from fbnet_jax.cli import main

if __name__ == "__main__":
    main.run()
