"""Train-step throughput of FaceBehaviorNet in JAX and of the same model in PyTorch, side by side.

One process builds each case twice: the project's jitted train step
(fbnet_jax.train.step.make_train_step, timed as benchmarks/train_throughput.py does) and an eager
PyTorch step of the same network, losses and optimizer. Every repeat times --steps JAX steps,
then --steps PyTorch steps, each on its own preallocated copy of one random batch, so both sides
share the machine's load of the moment. The table gives medians over the repeats; JAX/PyTorch is
the median of the repeats' ratios of examples/s, with their range.

  python benchmarks/compare_pytorch.py                                          # all cases
  python benchmarks/compare_pytorch.py --cases small_cnn --repeats 1 --steps 2  # smoke run
  python benchmarks/compare_pytorch.py --dtype bfloat16

Matched, so that the ratio compares the frameworks and not two models:
- architectures: fbnet_jax/model/backbones.py layer by layer (paddings, pools, BatchNorm eps
  1e-5 and momentum, the (H, W, C) flatten order, dropout rates of configs/synthetic.py) and the
  float32 heads of fbnet_jax/model/facebehaviornet.py. The script stops unless both sides have
  the same number of trainable parameters;
- losses: fbnet_jax/model/losses.py's masked expression CE, per-image normalised AU BCE and
  1 - mean CCC with the config's weights (coupling terms off, as by default);
- optimizer: AdamW as optax.adamw (b1 = optimizer.momentum, b2 0.999, eps 1e-8, decoupled weight
  decay on every parameter), its warm-up + cosine learning rate, global-norm gradient clipping.
Not matched, as they do not change the work done: initial weights, dropout masks, BatchNorm's
running variance (torch keeps the unbiased one; training does not read it).

PyTorch settings, the CPU tuning advice that needs no extra package: torch.set_num_threads(the
cores this process may use, os.sched_getaffinity; --torch_threads to change), as XLA's CPU client
uses every core; channels_last weights and activations (oneDNN's fast convolution layout); fused
AdamW (one kernel over all parameters); gradients set to None, not zeroed. Eager mode: no
torch.compile, as PyTorch training usually runs. bfloat16 runs the backbone under
torch.autocast("cpu", bfloat16), heads and losses in float32, as model.dtype=bfloat16 in JAX.

Run it on an idle machine: PyTorch's OpenMP threads meet at a barrier after every operator, so
one thread that another process holds off its core stalls the rest (on 2 busy cores one
channels_last BatchNorm took 70 ms with 2 threads, 0.9 ms with 1); XLA suffers far less. The load
average is printed before and after the cases.

GFLOP/step is XLA's cost analysis of the JAX step (train_throughput.model_flops), used for both
sides. It counts only the taps of a convolution that fall inside the image, not those on the
zero padding, so it is lower than the 2 x multiply-adds that torch's FlopCounterMode counts
(about 5-7 % here; both are printed per case as a check that the two models do the same work,
torch's without the elementwise operations XLA includes). "% peak" divides achieved GFLOP/s by the best n x n matmul this script measures for the
row's dtype (numpy, JAX and torch, fp32 and bf16; JAX's bf16 with a bf16 and with a float32
result), printed above the table.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from fbnet_jax.model import losses
from fbnet_jax.runtime import parallel
from fbnet_jax.core import runtime_defaults
from fbnet_jax.train import loop as train
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.model import backbones

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling train_throughput.py
import train_throughput  # noqa: E402  pylint: disable=wrong-import-position

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode
except ImportError:
    raise SystemExit("benchmarks/compare_pytorch.py needs PyTorch: pip install -e .[bench]") \
        from None

# name -> (backbone, image size, batch); sized for a few seconds per step on 2 CPU cores.
CASES = {
    "small_cnn": ("small_cnn", 64, 64),
    "vgg_face_96": ("vgg_face", 96, 16),
    "vgg_face_112": ("vgg_face", 112, 16),
    "resnet50": ("resnet50", 112, 8),
}
BN = {"eps": 1e-5, "momentum": 0.1}  # torch's momentum weighs the batch, flax's 0.9 the average


# ------------------------------------------------------------------------------------------
# The model in PyTorch (NCHW tensors in channels_last memory, i.e. NHWC bytes as in JAX).

def conv_bn(channels: int, features: int, size: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, padding size // 2 as flax "SAME" and backbones.py's explicit pads) + BN."""
    return nn.Sequential(nn.Conv2d(channels, features, size, stride, size // 2, bias=False),
                         nn.BatchNorm2d(features, **BN))


class SmallCNN(nn.Module):
    """backbones.SmallCNN: [conv 3x3 (no bias) -> BatchNorm -> ReLU -> max-pool 2] per width."""

    def __init__(self, image_size: int, widths, features: int, dropout: float):
        super().__init__()
        layers, channels = [], 3
        for width in widths:
            layers += [conv_bn(channels, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.trunk = nn.Sequential(*layers)
        side = image_size // 2 ** len(widths)
        self.fc = nn.Linear(side * side * channels, features)
        self.dropout = nn.Dropout(dropout)
        self.features = features

    def forward(self, x):
        # flax flattens (H, W, C); on channels_last memory this permute is a free view.
        x = self.trunk(x).permute(0, 2, 3, 1).flatten(1)
        return self.dropout(F.relu(self.fc(x)))


class VGGFace(nn.Module):
    """backbones.VGGFace: the 13 convolutions of VGG-16, fc6 and fc7 each followed by dropout."""

    def __init__(self, image_size: int, fc: int, dropout: float):
        super().__init__()
        layers, channels = [], 3
        for count, width in backbones.VGG16_STAGES:
            for _ in range(count):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers)
        side = image_size // 32
        self.head = nn.Sequential(nn.Linear(side * side * channels, fc), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(fc, fc), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout))
        self.features = fc

    def forward(self, x):
        return self.head(self.trunk(x).permute(0, 2, 3, 1).flatten(1))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck v1.5 (stride on the 3x3 conv), as backbones._Bottleneck."""

    def __init__(self, channels: int, width: int, stride: int, downsample: bool):
        super().__init__()
        self.branch = nn.Sequential(
            conv_bn(channels, width, 1), nn.ReLU(inplace=True),
            conv_bn(width, width, 3, stride), nn.ReLU(inplace=True), conv_bn(width, 4 * width, 1))
        self.shortcut = conv_bn(channels, 4 * width, 1, stride) if downsample else nn.Identity()

    def forward(self, x):
        return F.relu(self.branch(x) + self.shortcut(x))


class ResNet50(nn.Module):
    """backbones.ResNet50: torchvision's ResNet-50 trunk, global average pool, dropout."""

    def __init__(self, dropout: float):
        super().__init__()
        layers = [conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        channels = 64
        for stage, (blocks, width) in enumerate(backbones.RESNET50_STAGES, start=1):
            for block in range(blocks):
                stride = 2 if stage > 1 and block == 0 else 1
                layers.append(Bottleneck(channels, width, stride, downsample=block == 0))
                channels = 4 * width
        self.trunk = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.features = channels

    def forward(self, x):
        return self.dropout(self.trunk(x).mean(dim=(2, 3)))


class FaceBehaviorNet(nn.Module):
    """facebehaviornet.FaceBehaviorNet's heads on a backbone; the heads compute in float32."""

    def __init__(self, backbone: nn.Module, num_expressions: int, num_aus: int):
        super().__init__()
        self.backbone = backbone
        self.expression_head = nn.Linear(backbone.features, num_expressions)
        self.au_head = nn.Linear(backbone.features, num_aus)
        self.va_head = nn.Linear(backbone.features, 2)

    def forward(self, image):
        features = self.backbone(image)
        with torch.autocast("cpu", enabled=False):  # as flax: heads float32 whatever the backbone
            features = features.float()
            return {"expression_logits": self.expression_head(features),
                    "au_logits": self.au_head(features), "va": torch.tanh(self.va_head(features))}


def torch_model(config) -> FaceBehaviorNet:
    """The PyTorch twin of `state_lib.model_for(config)` (float32 parameters, train mode)."""
    name, size = config.model.backbone, config.data.image_size
    settings = config.model.backbones[name]
    if name == "small_cnn":
        backbone = SmallCNN(size, tuple(settings.widths), settings.features, settings.dropout)
    elif name == "vgg_face":
        backbone = VGGFace(size, settings.fc, settings.dropout)
    elif name == "resnet50":
        backbone = ResNet50(settings.dropout)
    else:
        raise ValueError(f"no PyTorch version of backbone {name!r}; known: small_cnn, vgg_face, "
                         "resnet50")
    return FaceBehaviorNet(backbone, config.model.num_expressions, len(config.data.aus))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------
# Losses and optimizer in PyTorch (fbnet_jax/model/losses.py, fbnet_jax/runtime/state.py).

def expression_loss(logits, labels, mask):
    labels = torch.where(mask > 0, labels, 0)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (mask * ce).sum() / mask.sum().clamp(min=1.0)


def au_loss(logits, labels, mask):
    labels = torch.where(mask > 0, labels, 0.0)
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    labelled = mask.sum(-1)
    has_label = (labelled > 0).float()
    per_image = (mask * bce).sum(-1) / torch.where(labelled > 0, labelled, 1.0)
    return (has_label * per_image).sum() / has_label.sum().clamp(min=1.0)


def va_loss(pred, target, mask):
    """1 - mean CCC with two-pass population moments, as losses.ccc."""
    m = mask[:, None]
    pred, target = pred.float(), torch.where(m > 0, target, 0.0)
    count = m.sum(0).clamp(min=1.0)
    mean_x, mean_y = (m * pred).sum(0) / count, (m * target).sum(0) / count
    dx, dy = m * (pred - mean_x), m * (target - mean_y)
    var_x, var_y, cov = (dx * dx).sum(0) / count, (dy * dy).sum(0) / count, (dx * dy).sum(0) / count
    ccc = 2.0 * cov / (var_x + var_y + (mean_x - mean_y) ** 2 + losses.CCC_EPSILON)
    return (mask.sum() > 0).float() * (1.0 - ccc.mean())


def task_losses(outputs, batch, weights):
    """(total, terms) of losses.task_losses without the coupling terms."""
    terms = {
        "expression": expression_loss(outputs["expression_logits"], batch["expression"],
                                      batch["expression_mask"]),
        "au": au_loss(outputs["au_logits"], batch["au"], batch["au_mask"]),
        "va": va_loss(outputs["va"], batch["va"], batch["va_mask"]),
    }
    total = sum(weights[name] * term for name, term in terms.items())
    return total, {**terms, "total": total}


def learning_rate(opt_config, num_steps: int):
    """optax.warmup_cosine_decay_schedule as state_lib.create_optimizer builds it."""
    peak = opt_config.learning_rate
    end = peak * opt_config.end_learning_rate_factor
    warmup = min(opt_config.warmup_steps, num_steps)
    decay = max(num_steps, warmup + 1) - warmup

    def schedule(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        progress = min(step - warmup, decay) / decay
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
    return schedule


def torch_batch(batch: dict) -> dict:
    """A numpy batch as torch tensors; NHWC images become NCHW tensors in channels_last memory."""
    out = {name: torch.from_numpy(np.array(value)) for name, value in batch.items()}
    out["image"] = out["image"].permute(0, 3, 1, 2)
    out["expression"] = out["expression"].long()
    return out


def torch_trainer(config, dtype: str):
    """(model, step) where step(batch) -> terms makes one training step in place."""
    opt, weights = config.optimizer, dict(config.loss.weights)
    if opt.name != "adamw" or opt.schedule != "cosine":
        raise ValueError("the PyTorch side implements optimizer.name=adamw, schedule=cosine only")
    if any(weights.get(name, 0.0) for name in losses.COUPLING_TERMS):
        raise ValueError("the PyTorch side has no coupling losses; set their weights to 0")
    model = torch_model(config).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(opt.momentum, 0.999),
                                  eps=1e-8, weight_decay=opt.weight_decay, fused=True)
    schedule, steps = learning_rate(opt, config.train.num_steps), itertools.count()

    def step(batch):
        lr = schedule(next(steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            outputs = model(batch["image"])
        total, terms = task_losses(outputs, batch, weights)  # float32, outside autocast
        total.backward()
        if opt.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
        optimizer.step()
        return {name: value.detach() for name, value in terms.items()}
    return model, step


# ------------------------------------------------------------------------------------------
# Timing.

def config_for(backbone: str, image_size: int, batch_size: int, dtype: str):
    config = train_throughput.load_config()
    config.model.backbone, config.model.dtype = backbone, dtype
    config.data.image_size, config.data.global_batch_size = image_size, batch_size
    return config


def jax_side(config, batch_np):
    """(run, info): run(steps) makes that many jitted steps and waits for them."""
    mesh = parallel.create_mesh()
    model, tx, _, state = state_lib.create_state(config, mesh)
    step_fn = jax.jit(train.make_train_step(model, tx, config.loss.weights), donate_argnums=0)
    batch = parallel.global_batch(batch_np, mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    info = {"compile_s": time.perf_counter() - start,
            "flops": train_throughput.model_flops(step_fn, state, batch),
            "params": sum(x.size for x in jax.tree.leaves(state.params))}
    holder = [state]  # the step donates its input state, so keep only the newest

    def run(steps: int):
        state = holder[0]
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        holder[0] = state
    return run, info


def torch_side(config, batch_np, dtype: str):
    model, step = torch_trainer(config, dtype)
    batch = torch_batch(batch_np)
    return (lambda steps: [step(batch) for _ in range(steps)]), trainable_parameters(model)


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_case(name: str, dtype: str, args) -> dict:
    backbone, size, batch_size = CASES[name]
    config = config_for(backbone, size, batch_size, dtype)
    batch_np = train_throughput.random_batch(batch_size, size, len(config.data.aus),
                                             np.random.default_rng(0))
    jax_run, info = jax_side(config, batch_np)
    torch_run, torch_params = torch_side(config, batch_np, dtype)
    if info["params"] != torch_params:
        raise AssertionError(f"{name}: the PyTorch model is not the JAX one "
                             f"({torch_params:,} != {info['params']:,} parameters)")
    first_s = seconds(torch_run, 1)
    with FlopCounterMode(display=False) as counter:  # a cross-check of the FLOP count
        torch_run(1)
    print(f"- {name}: trainable parameters JAX {info['params']:,}, PyTorch {torch_params:,}; "
          f"GFLOP/step XLA {info['flops'] / 1e9:.2f}, torch FlopCounterMode "
          f"{counter.get_total_flops() / 1e9:.2f}", flush=True)
    jax_run(args.warmup + 1)  # + 1: the first call, which the compile time does not include
    torch_run(args.warmup)
    jax_s, torch_s = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same load
        jax_s.append(seconds(jax_run, args.steps) / args.steps)
        torch_s.append(seconds(torch_run, args.steps) / args.steps)
    ratios = sorted(t / j for j, t in zip(jax_s, torch_s))  # JAX ex/s over PyTorch ex/s
    return {"name": name, "backbone": backbone, "size": size, "batch": batch_size,
            "params": torch_params, "jax_step": statistics.median(jax_s),
            "torch_step": statistics.median(torch_s), "ratio": statistics.median(ratios),
            "ratio_range": (ratios[0], ratios[-1]), "compile_s": info["compile_s"],
            "first_s": first_s, "flops": info["flops"]}


def matmul_peaks(n: int) -> dict[tuple[str, str], float]:
    """GFLOP/s of an n x n matmul, best of 3 after a warm-up, per (library, dtype).

    JAX's bf16 product is timed twice: with a bf16 result (what a bf16 `nn.Dense` computes) and
    with a float32 result (`preferred_element_type`): on this jaxlib's CPU backend only the
    second runs on the CPU's BF16 units (YNNPACK), at about twice the first's rate. torch.mm's
    bf16 product returns bf16 and uses them either way."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    runs = {("numpy", "fp32"): lambda: a @ b}
    matmul = jax.jit(jnp.matmul)
    to_float32 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    for key, jdt, tdt in (("fp32", jnp.float32, torch.float32),
                          ("bf16", jnp.bfloat16, torch.bfloat16)):
        ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
        runs[("jax", key)] = lambda ja=ja, jb=jb: matmul(ja, jb).block_until_ready()
        if key == "bf16":
            runs[("jax", "bf16 (fp32 result)")] = (
                lambda ja=ja, jb=jb: to_float32(ja, jb).block_until_ready())
        ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
        runs[("torch", key)] = lambda ta=ta, tb=tb: torch.mm(ta, tb)
    peaks = {}
    for key, run in runs.items():
        run()
        peaks[key] = 2 * n ** 3 / min(seconds(run) for _ in range(3)) / 1e9
    return peaks


# ------------------------------------------------------------------------------------------
# Output.

def print_header(args, malloc: dict[str, int], timing: str = ""):
    """The run's date, machine, versions and settings (`malloc`: what `runtime_defaults.apply`
    set); `timing` replaces the steps clause."""
    precision = jax.config.jax_default_matmul_precision or "default"
    dispatch = ("asynchronous" if jax.config.read("jax_cpu_enable_async_dispatch")
                else "synchronous")
    arithmetic = ("bf16 backbone (JAX model.dtype=bfloat16, torch autocast cpu bfloat16), heads "
                  "and losses float32" if args.dtype == "bfloat16" else "float32 throughout")
    lines = [
        f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"machine: {train_throughput.cpu_model()}, {len(os.sched_getaffinity(0))} cores usable of "
        f"{os.cpu_count()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average {os.getloadavg()[0]:.2f} at the start",
        f"versions: Python {platform.python_version()}, jax {jax.__version__}, jaxlib "
        f"{jaxlib.__version__}, torch {torch.__version__}, numpy {np.__version__}",
        f"arithmetic: {arithmetic}; JAX matmul precision {precision} (float32 is float32 on the "
        f"CPU), torch float32_matmul_precision {torch.get_float32_matmul_precision()}",
        f"settings: torch threads {torch.get_num_threads()}, channels_last, fused AdamW, eager; "
        f"XLA_FLAGS {os.environ.get('XLA_FLAGS') or '(unset)'}; malloc (one process, both "
        f"sides) {malloc or 'glibc defaults'}; JAX CPU dispatch {dispatch}; " +
        (timing or
            f"{args.repeats} repeats of {args.steps} steps per side after {args.warmup} warm-up "
            "steps"),
    ]
    print("\n".join(f"- {line}" for line in lines), flush=True)


COLUMNS = ("case", "size", "batch", "params", "JAX ex/s", "PyTorch ex/s",
           "JAX/PyTorch (range)", "JAX compile s", "PyTorch 1st step s", "GFLOP/step",
           "JAX GFLOP/s (% peak)", "PyTorch GFLOP/s (% peak)")


def print_table(rows, peak: float):
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in rows:
        low, high = r["ratio_range"]
        cells = [r["name"], r["size"], r["batch"], f"{r['params']:,}",
                 f"{r['batch'] / r['jax_step']:.1f}", f"{r['batch'] / r['torch_step']:.1f}",
                 f"{r['ratio']:.2f} ({low:.2f}-{high:.2f})", f"{r['compile_s']:.1f}",
                 f"{r['first_s']:.2f}", f"{r['flops'] / 1e9:.1f}"]
        for step_s in (r["jax_step"], r["torch_step"]):
            achieved = r["flops"] / step_s / 1e9
            cells.append(f"{achieved:.0f} ({achieved / peak:.0%})")
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5, help="timing windows per side")
    parser.add_argument("--steps", type=int, default=5, help="train steps per timing window")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--matmul_size", type=int, default=2048,
                        help="n of the n x n matmul that measures the peak")
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="torch.set_num_threads (0: the cores this process may use)")
    args = parser.parse_args()
    if min(args.repeats, args.steps) < 1 or min(args.warmup, args.torch_threads) < 0:
        parser.error("--repeats and --steps must be >= 1, --warmup and --torch_threads >= 0")
    malloc = runtime_defaults.apply()  # the XLA flags, malloc and CPU dispatch of `fbnet`
    torch.set_num_threads(args.torch_threads or len(os.sched_getaffinity(0)))
    print_header(args, malloc)
    peaks = matmul_peaks(args.matmul_size)
    cells = ", ".join(f"{lib} {dt} {gflops:.0f}" for (lib, dt), gflops in peaks.items())
    print(f"- matmul {args.matmul_size}x{args.matmul_size} GFLOP/s: {cells}")
    arithmetic = "bf16" if args.dtype == "bfloat16" else "fp32"
    peak = max(g for (_, dt), g in peaks.items() if dt.split()[0] == arithmetic)
    print(f"- peak used for % peak: {peak:.0f} GFLOP/s ({arithmetic}, best of the above)")
    rows = [bench_case(name, args.dtype, args) for name in args.cases]
    print_table(rows, peak)
    print(f"\n- load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
