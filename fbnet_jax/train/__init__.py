"""Training: the step (step.py), the loop (loop.py) with its logging (progress.py), profiling
(profiling.py) and stop signals (signals.py), and the whole-config checks (checks.py)."""
