"""What a run says about its compiled step and how it spends its time: the step's memory line,
and a `jax.profiler` trace of a few steps (`train.profile_steps`)."""

from __future__ import annotations

import logging
from pathlib import Path

import jax

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"  # in the work directory


def memory_line(compiled) -> str:
    """What a compiled step needs per device, from XLA's memory analysis (when it has one)."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        stats = None
    if stats is None:
        return "no memory analysis on this backend"
    mib = lambda n: n / 2**20  # noqa: E731
    return (f"per device: {mib(stats.argument_size_in_bytes):.1f} MiB arguments, "
            f"{mib(stats.output_size_in_bytes):.1f} MiB outputs "
            f"({mib(stats.alias_size_in_bytes):.1f} MiB of them donated), "
            f"{mib(stats.temp_size_in_bytes):.1f} MiB temporaries, "
            f"{mib(stats.generated_code_size_in_bytes):.1f} MiB code")


class Profiler:
    """A `jax.profiler` trace of `num_steps` train steps (`config.train.profile_steps`), taken
    from the second step of the invocation on (the first compiles), into `directory`; viewable
    in TensorBoard's profile plugin or Perfetto. 0 steps: nothing is traced."""

    def __init__(self, directory: Path, num_steps: int):
        self.directory, self.num_steps = directory, int(num_steps)
        self.first = self.traced = None

    def before_step(self, step: int) -> None:
        if self.num_steps > 0 and self.first is None and jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.first, self.traced = step + 1, 0

    def after_step(self, step: int, step_metrics) -> None:
        if self.traced is None:
            return
        self.traced += 1
        if self.traced == self.num_steps:
            jax.block_until_ready(step_metrics)
            self.close()

    def close(self) -> None:
        """Ends the trace (also when the loop ends early); logs where it is."""
        if self.traced is not None:
            jax.profiler.stop_trace()
            log.info("profile of steps %d-%d written to %s", self.first,
                     self.first + self.traced - 1, self.directory)
            self.traced = None
