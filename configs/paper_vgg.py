r"""The paper's experiment: FaceBehaviorNet with VGG-FACE, all five loss terms (docs/paper.md).

Kollias, Sharmanska, Zafeiriou, "Face Behavior à la carte" (arXiv 1910.11111), as far as the paper
and its context fix it: the VGG-FACE backbone (13 conv + 2 fc of 4096, dropout 0.5) on 112x112
face crops with pixels scaled to [-1, 1]; the expression, AU and VA losses plus co-annotation and
distribution matching, all at weight 1, with Du et al.'s relatedness table; every training batch
mixing examples of every task (each example is drawn from the weighted mixture of sources). The
paper does not publish its optimizer settings; the choice below (Adam, 1e-4, batch 256, as in the
authors' earlier VGG-FACE work on Aff-Wild) is ours.

Variants (`--config configs/paper_vgg.py:VARIANT`):
  "synthetic"  the same recipe on the six synthetic sources of configs/synthetic.py (they label
               tasks and AUs as AffectNet, RAF-DB, EmotioNet, DISFA, BP4D and Aff-Wild2 do), so
               it can be tried without the datasets:
                 fbnet train --config paper_vgg:synthetic --workdir runs/paper_vgg_synthetic
               On 2 CPU cores try a few steps with a smaller batch, e.g.
                 --config.train.num_steps=20 --config.data.global_batch_size=16
The real-dataset variant needs readers of the datasets' own formats, which fbnet_jax does not
have yet; it joins this file when they exist.
"""

from pathlib import Path

from fbnet_jax import config_files

# The synthetic sources are defined once, in the sibling synthetic.py (by path: it is found the
# same way in a source tree, an editable install and a wheel).
SYNTHETIC = Path(__file__).with_name("synthetic.py")


def get_config(arg: str = ""):
    """Returns the config; `arg` picks the variant (only "synthetic" today)."""
    if arg != "synthetic":
        raise ValueError(f"unknown variant {arg!r} of configs/paper_vgg.py; use 'synthetic' "
                         f"(the real-dataset variant needs dataset readers fbnet_jax does not "
                         f"have yet)")
    config = config_files.load(str(SYNTHETIC))  # the six synthetic sources; fields described there
    config.name = "paper_vgg_synthetic"

    config.data.image_size = 112        # the paper's aligned face crops (every source renders it)
    config.data.global_batch_size = 256
    config.data.eval_batch_size = 256

    config.model.backbone = "vgg_face"  # the paper's backbone
    config.model.backbones.vgg_face.fc = 4096      # fc6, fc7
    config.model.backbones.vgg_face.dropout = 0.5  # after fc6 and fc7

    weights = config.loss.weights       # all five terms at weight 1 (the paper's defaults)
    weights.expression = weights.au = weights.va = 1.0
    weights.co_annotation = 1.0
    weights.distribution_matching = 1.0
    config.loss.distribution_matching.stop_gradient = False  # gradients reach both heads
    config.loss.relatedness = "du2014"

    opt = config.optimizer
    opt.name = "adamw"
    opt.learning_rate = 1e-4
    opt.weight_decay = 0.0               # Adam without decay
    opt.momentum = 0.9                   # Adam's b1
    opt.schedule = "constant"            # a fixed rate after a short warm-up
    opt.warmup_steps = 500
    opt.grad_clip_norm = 0.0

    train = config.train
    train.num_steps = 20_000            # about 5M examples at batch 256
    train.log_every = 100
    train.eval_every = 2_000
    train.checkpoint_every = 2_000
    return config
