r"""The ablation regime: scarce expression and AU labels, VA on the rest (benchmarks/ablation.py).

A world where the couplings have something to do: of the training images, 4% carry AU labels
(all 17 AUs), 6% an expression label, 2% both, and the other 88% only valence/arousal. The model,
pipeline and training settings are configs/synthetic.py's (small_cnn), at 48 px and for fewer
steps (1000), so that one run takes under a minute on 2 CPU cores. Every source's validation
and test splits are fully labelled, and all sources draw from one world, so the test metrics
measure the same tasks for every row of the ablation.

Variants (`--config configs/ablation.py:VARIANT`):
  "matched"     the faces' AUs follow Du et al.'s table, the prior the couplings assume by default;
  "mismatched"  they follow the "swapped" table (data_pipelines/synthetic.py, SWAPPED_AU_PAIRS):
                the couplings' default prior is then wrong.
The couplings are off here; benchmarks/ablation.py switches them per row, e.g.
  fbnet train --config ablation:matched --config.loss.weights.co_annotation=1
"""

import copy
from pathlib import Path

from fbnet_jax.core import config_files

SYNTHETIC = Path(__file__).with_name("synthetic.py")
VARIANTS = ("matched", "mismatched")

# name: (weight, train records, labels expression, labels VA, AU numbers labelled or None (all))
SOURCES = {
    "expr_few": (0.06, 600, True, False, ()),
    "au_few": (0.04, 400, False, False, None),
    "both_few": (0.02, 300, True, False, None),
    "va_rest": (0.88, 20_000, False, True, ()),
}


def get_config(arg: str = "matched"):
    """Returns the config; `arg` picks the generator's AU table ("matched" or "mismatched")."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/ablation.py; use one of {VARIANTS}")
    config = config_files.load(str(SYNTHETIC))  # model, pipeline, optimizer: fields described there
    config.name = f"ablation_{arg}"
    config.data.image_size = 48
    template = config.data.sources.rafdb_like  # every field of a synthetic source
    sources = {}
    for k, (name, (weight, records, expression, va, aus)) in enumerate(SOURCES.items()):
        source = copy.deepcopy(template)
        source.weight = weight
        source.validation_size = 200
        source.test_size = 400
        spec = source.synthetic
        spec.num_records = records
        spec.seed = 101 + k
        spec.image_size = 48
        spec.label_expression = expression
        spec.label_va = va
        spec.label_aus = aus
        spec.video_frames = 0
        spec.au_table = "du2014" if arg == "matched" else "swapped"
        sources[name] = source
    with config.unlocked():
        config.data.sources = type(config.data.sources)(sources)
        # One final evaluation per run (no periodic one, no compound source here).
        config.evals = type(config.evals)({"test": config.evals.test})
    # The budget at which every single-task row learns (EXPERIMENTS.md, "The budget"): at the
    # demo's 2e-3, and at 5e-4 with 50 warm-up steps, single-task runs with few labelled examples
    # per batch (VA only here) could die in their first 50 steps, VA's tanh saturated for every
    # face; 300 warm-up steps kept 8 of 8 seeds alive. 1000 steps double the old 500.
    config.train.num_steps = 1000
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.best_metric = ""
    config.optimizer.warmup_steps = 300
    config.optimizer.learning_rate = 5e-4
    return config
