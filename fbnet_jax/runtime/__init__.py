"""Devices and state: the mesh, the jit/pmap step runner, multi-host start, TrainState, checkpoints."""
