"""The experiment configs shipped with fbnet_jax.

Installed as the package `fbnet_jax.configs`, so `fbnet train --config NAME[:VARIANT]` finds them
from any directory and in any install (`synthetic`, `synthetic.py` and `configs/synthetic.py` all
name configs/synthetic.py). Each file defines `get_config(arg)`; see fbnet_jax/core/config_files.py.
"""
