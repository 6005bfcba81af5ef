"""Every setting of a training run, declared once (``dynbatch.options``), resolved, validated, and stored in
``config.json``."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dynbatch.data.noise import parse_label_noise
from dynbatch.data.sources import DATASET_NAMES, MAX_CLASSES
from dynbatch.errors import UserError
from dynbatch.methods import POLICIES, policy_class
from dynbatch.models import MODELS
from dynbatch.options import (OptionError, at_least, check_fields, finite_float, non_negative, one_of, option,
                              positive, within)
from dynbatch.train.loggers import parse_loggers
from dynbatch.train.optim import OPTIMIZERS
from dynbatch.train.schedules import SCHEDULES, TRIANGLE

# Used where neither the user nor the policy's paper says otherwise.
OPTIMIZER_DEFAULTS = {"lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4}
# Seeds feed numpy (non-negative) and EDBA's per-step subset seed (seed << 32) + step, which must fit in int64.
MAX_SEED = 2**31 - 1
NONFINITE_ACTIONS = ("stop", "skip")


def _milestones(s: str) -> tuple[float, ...]:
    try:
        return tuple(finite_float(v) for v in s.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of epochs like 30,60,90") from None


def _milestones_check(name, v):
    if any(m < 0 for m in v or ()):
        raise OptionError(f"{{{name}}} must be epochs >= 0 (got {','.join(map(str, v))}); e.g. 50,75")


def _seed_check(name, v):
    if not 0 <= v <= MAX_SEED:
        raise OptionError(f"{{{name}}} must be in 0..{MAX_SEED} (got {v}); pick a seed in that range")


def _triple(s: str) -> tuple[float, ...]:
    try:
        values = tuple(finite_float(v) for v in s.split(","))
    except argparse.ArgumentTypeError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{s!r} is not three comma-separated numbers like 0.2,0.23,0.07")
    return values


def _triangle_check(name, v):
    if len(v) != 3 or not (v[0] >= 0 and 0 < v[1] < 1 and v[2] >= 0):
        raise OptionError(f"{{{name}}} must be start,peak,end with start, end >= 0 and 0 < peak < 1 (got "
                          f"{','.join(map(str, v))}); e.g. 0.2,0.23,0.07")


def _label_noise_check(name, v):
    parse_label_noise(v)


def _loggers_check(name, v):
    parse_loggers(v)


def _choices(values) -> str:
    return ", ".join(values)


_D, _M, _X = "data", "model and optimisation", "execution"
_PAPER = "(default: the policy's paper, else {})"


@dataclass
class TrainConfig:
    """Every setting of a run: the library's fields, the command line's flags (``--data-dir`` for ``data_dir``)
    and a config file's keys, each declared once."""

    data: str = option("digits", f"data set: {_choices(DATASET_NAMES)}", group=_D)
    data_dir: str | None = option(None, "folder with torchvision's CIFAR layout (no download)", group=_D)
    image_size: int | None = option(None, "imagefolder data: side in pixels the images are resized to (default: 32)",
                                    check=positive(), group=_D)
    num_classes: int | None = option(None, "number of classes (default: from the labels)", check=at_least(2),
                                     group=_D)
    train_samples: int | None = option(None, "class-balanced seeded subset of N training samples", check=positive(),
                                       group=_D)
    train_fraction: float | None = option(None, "class-balanced seeded subset, a fraction in (0, 1]",
                                          check=within("(0, 1]", lambda v: 0 < v <= 1, "e.g. 0.1 for 10%"), group=_D)
    validation: int | None = option(None, "hold out N class-balanced training images (one fixed draw, whatever "
                                    "the seed) and evaluate on them instead of the test set: tune on this",
                                    check=positive("e.g. 1000"), group=_D)
    augment: bool = option(True, "train without random crops and flips (augmentation is on otherwise)",
                           flag="--no-augment", group=_D)
    translate: int | None = option(None, "random translation of up to N pixels (a crop of the padded image; "
                                   "default: the data set's, 4 for CIFAR)", check=non_negative("e.g. 2 or 4"),
                                   group=_D)
    pad_mode: str = option("zero", "padding for the translation: zero (black, as torchvision's RandomCrop), "
                           "reflect, or mean (the training images' mean colour: zeros after normalising)",
                           check=one_of("zero", "reflect", "mean", hint="zero is the default"), group=_D)
    flip: str = option("random", "horizontal flips: random (each image, each epoch), alternate (a random "
                       "image's flip, then all flipped every other epoch: airbench's) or none",
                       check=one_of("random", "alternate", "none", hint="random is the default"), group=_D)
    label_noise: str = option("", "label noise on the training split, seeded by --seed (test labels stay clean): "
                              "symmetric:R (uniform over the other classes), pair:R (c -> c+1) or asymmetric:R "
                              "(CIFAR-10's truck->automobile, bird->airplane, cat<->dog, deer->horse), R in [0, 1); or "
                              "real noisy labels from file:PATH (.npy) or file:PATH#KEY (.npz, .pt; e.g. CIFAR-10N's "
                              "#worse_label), one per training image", check=_label_noise_check, group=_D)
    label_index_map: str = option("", "with --label-noise file:PATH whose rows are a superset of the training "
                                  "images: a .npy of each training image's row in the label file", group=_D)
    context: int = option(128, "text data: tokens a sequence holds (a sample is one sequence)", check=at_least(2),
                          group=_D)
    vocab_size: int = option(2048, "text data: the byte-level BPE tokenizer's vocabulary, trained on the training "
                             "split (cached)", check=at_least(257), group=_D)
    model: str = option("preresnet20", f"one of {_choices(MODELS)}, or package.module:factory (a callable taking "
                        "num_classes and in_channels that returns an nn.Module)", group=_M)
    gpt_layers: int = option(4, "--model gpt: transformer blocks", check=positive(), group=_M)
    gpt_width: int = option(128, "--model gpt: width D (the head's input)", check=positive(), group=_M)
    gpt_heads: int = option(4, "--model gpt: attention heads (dividing the width)", check=positive(), group=_M)
    policy: str = option("fixed", f"one of {_choices(POLICIES)}", group=_M)
    policy_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = option(30, "total epochs; with --resume, the new total (extends or finishes the run)",
                         check=positive(), group=_M)
    batch_size: int | None = option(None, "loader batch size; the initial one for adaptive policies (default: the "
                                    "policy's)", check=positive(), group=_M)
    optimizer: str = option("sgd", "sgd, adam or adamw (fused; --momentum and --nesterov are SGD's)", group=_M)
    lr: float | None = option(None, "learning rate " + _PAPER.format(OPTIMIZER_DEFAULTS["lr"]),
                              check=positive("e.g. 0.05"), group=_M)
    momentum: float | None = option(None, "SGD momentum in [0, 1) " + _PAPER.format(OPTIMIZER_DEFAULTS["momentum"]),
                                    check=within("[0, 1)", lambda v: 0 <= v < 1, "e.g. 0.9, or 0 for none"), group=_M)
    nesterov: bool | None = option(None, "Nesterov momentum, true or false (default: the policy's, else false)",
                                   group=_M)
    weight_decay: float | None = option(None, "L2 penalty " + _PAPER.format(OPTIMIZER_DEFAULTS["weight_decay"]),
                                        check=non_negative("e.g. 5e-4, or 0 for none"), group=_M)
    schedule: str | None = option(None, f"one of {_choices(SCHEDULES)} (default: the policy's, else cosine)",
                                  group=_M)
    warmup_epochs: float = option(0.0, "epochs of linear learning-rate warm-up",
                                  check=non_negative("e.g. 5, or 0 for none"), group=_M)
    milestones: tuple[float, ...] = option((), "epochs of the step schedule, comma separated (default: 50%%,75%% "
                                           "of the budget)", parse=_milestones, check=_milestones_check, group=_M)
    gamma: float = option(0.1, "step-schedule factor, in (0, 1]", check=within(
        "(0, 1]", lambda v: 0 < v <= 1, "it multiplies the learning rate at each milestone, e.g. 0.1"), group=_M)
    triangle: tuple[float, ...] = option(TRIANGLE, "triangle schedule: start,peak,end (start and end as fractions of "
                                         "the peak lr, peak as a fraction of the budget)", parse=_triple,
                                         check=_triangle_check, group=_M)
    hyp_form: str = option("torch", "torch (--lr and --weight-decay as torch's optimizers take them) or decoupled "
                           "(airbench's: per 1024 examples, the lr normalised by Nesterov momentum's gain, the "
                           "weight decay independent of the lr; converted for --batch-size; a step on part of "
                           "the batch, as the selection methods and EDBA train, scales them by its share)",
                           check=one_of("torch", "decoupled", hint="torch is the default"), group=_M)
    bias_lr_scale: float = option(1.0, "learning-rate multiplier for the BatchNorm biases (their decay per step "
                                  "unchanged; airbench: 64)", check=positive("e.g. 64"), group=_M)
    lookahead: int | None = option(None, "every K steps pull the weights (and BatchNorm statistics) toward their "
                                   "slow average and copy it back (airbench's lookahead; default off)",
                                   check=at_least(1, "give the steps between pulls, e.g. 5, or leave it out"),
                                   group=_M)
    lookahead_decay: float = option(0.95, "lookahead: the slow average keeps decay^K x progress^power of itself",
                                    check=within("(0, 1]", lambda v: 0 < v <= 1, "e.g. 0.95"), group=_M)
    lookahead_power: float = option(3.0, "lookahead: exponent of the training progress in the decay",
                                    check=non_negative("e.g. 3"), group=_M)
    lookahead_start: float = option(3.0, "lookahead: epochs before it starts", check=non_negative("e.g. 3"),
                                    group=_M)
    init: str = option("default", "weight initialisation: default (the model's) or dirac (every convolution with "
                       "as many outputs as inputs or more starts as the identity on its first inputs)",
                       check=one_of("default", "dirac", hint="default is the model's own"), group=_M)
    bn_momentum: float | None = option(None, "BatchNorm running-statistics momentum, torch's convention (the new "
                                       "batch's weight; airbench: 0.4)", check=within(
                                           "(0, 1]", lambda v: 0 < v <= 1, "e.g. 0.1"), group=_M)
    bn_eps: float | None = option(None, "BatchNorm epsilon", check=positive("e.g. 1e-5"), group=_M)
    bn_weight: bool = option(True, "freeze BatchNorm weights at 1 (train only their biases)",
                             flag="--freeze-bn-weight", group=_M)
    whiten: bool = option(False, "initialise the first convolution by whitening the training images' patches "
                          "and freeze its weights (its output channels: twice its inputs x kernel area)", group=_M)
    whiten_bias_epochs: int = option(3, "with --whiten: epochs the whitening layer's bias trains before it is "
                                     "frozen", check=non_negative("e.g. 3"), group=_M)
    label_smoothing: float = option(0.0, "in [0, 1)", check=within("[0, 1)", lambda v: 0 <= v < 1, "e.g. 0.1"),
                                    group=_M)
    seed: int = option(0, "seeds the model, subset, sampler and augmentation", check=_seed_check, group=_M)
    selection_control: bool = option(False, "selection policies (importance, selective-backprop, small-loss, "
                                     "consensus): train on random samples, as many as the policy chose (the control "
                                     "that tells choosing from training on fewer)", group=_M)
    device: str = option("auto", "auto, cpu, cuda, cuda:N", group=_X)
    amp: str = option("auto", "auto (bf16 autocast where bf16 is native and a timed probe finds it faster for "
                              "this model and batch, else fp32), bf16, none",
                      check=one_of("auto", "bf16", "none", hint="auto picks bf16 where it is fast"), group=_X)
    channels_last: str = option("auto", "auto (on for convolutional models), on, off",
                                check=one_of("auto", "on", "off", hint="auto is the default"), group=_X)
    compile: bool = option(False, "torch.compile the model (dynamic shapes)", group=_X)
    sync_bn: bool = option(False, "under torchrun: SyncBatchNorm (global batch statistics)", group=_X)
    micro_batch: int | None = option(None, "largest chunk computed at once; larger steps accumulate gradients",
                                     check=positive(), group=_X)
    eval_batch: int = option(1000, "test images evaluated at once", check=positive(), group=_X)
    eval_every: int = option(1, "epochs between test evaluations (the last epoch is always evaluated)",
                             check=positive(), group=_X)
    tta: int = option(0, "test-time augmentation of the last epoch's evaluation, reported as test_acc_tta beside "
                      "test_acc: 0 none, 1 mirror, 2 mirror and 1-pixel translations",
                      check=within("0..2", lambda v: v in (0, 1, 2), "e.g. 2 (airbench's)"), group=_X)
    util_interval: float = option(0.5, "seconds between utilisation samples", check=positive("e.g. 0.5"), group=_X)
    log: str = option("", "loggers beside metrics.jsonl, comma separated: tensorboard (events in <out>/tensorboard; "
                      "nothing logged twice on resume)", check=_loggers_check, group=_X)
    redraw_subset: str = option(
        "never", "a protocol reading of the EDBA authors' template, not a practice: redraw the training subset from "
        "the whole split at epoch boundaries: never, on-resize (where the policy's batch size changed) or every-epoch",
        check=one_of("never", "on-resize", "every-epoch", hint="never is the default"), group=_X)
    on_nonfinite: str = option("stop", "a non-finite loss or gradient: stop (exit 3, last checkpoint intact) or skip "
                               "(the step is not applied and is counted in its row)",
                               check=one_of(*NONFINITE_ACTIONS, hint="stop is the default"), group=_X)
    nonfinite_limit: int = option(10, "with --on-nonfinite skip: stop after this many skipped steps in a row",
                                  check=positive(), group=_X)
    stop_after_steps: int | None = option(None, "checkpoint and stop after N steps (resumable)", check=positive(),
                                          group="run folder")
    progress: bool = option(True, "no progress bar (the bar shows images per second, and the step's loss, accuracy "
                            "and batch size)", flag="--no-progress", group="run folder")

    def resolved(self) -> "TrainConfig":
        """A copy with unset settings filled from the policy (its paper's optimizer, its batch size), then global
        defaults; ``self`` (what the user gave) is left as it is."""
        policy_cls = policy_class(self.policy)
        out = dataclasses.replace(self, policy_options=dict(self.policy_options))
        if out.batch_size is None:
            out.batch_size = policy_cls.default_batch_size
        if out.schedule is None:
            out.schedule = policy_cls.config_defaults.get("schedule", "cosine")
        for k, v in OPTIMIZER_DEFAULTS.items():
            if k in ("momentum", "nesterov") and out.optimizer != "sgd":
                continue  # SGD's; left unset so an Adam run's config.json re-runs as it is
            if getattr(out, k) is None:
                setattr(out, k, policy_cls.optimizer_defaults.get(k, v))
        return out

    def validate(self) -> None:
        """Raise ``OptionError`` naming the first bad setting and its valid range: each field's declared check,
        then the checks between fields."""
        check_fields(self)
        if self.num_classes is not None and self.num_classes > MAX_CLASSES:
            raise OptionError(f"{{num_classes}} {self.num_classes} is above the supported {MAX_CLASSES}; give the "
                              "number of classes in the labels")
        if self.train_fraction is not None and self.train_samples is not None:
            raise OptionError("give either {train_samples} or {train_fraction}, not both; drop one of them")
        if self.nesterov and self.momentum == 0:
            raise OptionError("{nesterov} needs a positive {momentum}; give {momentum} 0.9 or {nesterov} false")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.redraw_subset != "never" and self.train_samples is None and self.train_fraction is None:
            raise OptionError("{redraw_subset} redraws a {train_samples} (or {train_fraction}) subset; give one, "
                              "or drop {redraw_subset}")
        if self.label_index_map and not self.label_noise.startswith("file:"):
            raise OptionError("{label_index_map} maps training images to the rows of a label file; give {label_noise} "
                              "file:PATH, or drop {label_index_map}")

    def torch_hyperparameters(self) -> tuple[float, float]:
        """(lr, weight decay) as torch's optimizers take them for a mean loss over ``batch_size`` samples. In the
        decoupled form (airbench's), ``lr`` and ``weight_decay`` are per 1024 examples of a summed loss, the lr
        divided by Nesterov momentum's gain 1 + 1/(1 - momentum); the decay per step, lr x weight decay, is then
        weight_decay x batch / (1024 x gain), independent of the lr."""
        if self.hyp_form == "torch":
            return self.lr, self.weight_decay
        gain = 1024 * (1 + 1 / (1 - (self.momentum or 0.0)))
        lr = self.lr * self.batch_size / gain
        return lr, self.weight_decay * self.batch_size / gain / lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config of a run folder's ``config.json``; a field of the wrong type is a ``UserError``."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for name, v in known.items():
            kinds = _FIELD_KINDS[name]
            ok = (v is None and type(None) in kinds) or any(
                isinstance(v, k) and not (k in (int, float) and isinstance(v, bool)) for k in kinds)
            if not ok or (isinstance(v, float) and not math.isfinite(v)):
                raise UserError(f"config.json: {name} = {v!r} is not a valid value; restore the run's config.json")
        for name in ("milestones", "triangle"):
            if name in known:
                if not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in known[name]):
                    raise UserError(f"config.json: {name} must be numbers; restore the run's config.json")
                known[name] = tuple(known[name])
        return cls(**known)


def _kinds(annotation: str) -> tuple[type, ...]:
    names = {"int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None),
             "dict[str, Any]": dict, "tuple[float, ...]": (list, tuple)}
    out: list[type] = []
    for part in annotation.split(" | "):
        k = names[part.strip()]
        out += list(k) if isinstance(k, tuple) else [k]
    return tuple(out)


_FIELD_KINDS = {f.name: _kinds(f.type) for f in dataclasses.fields(TrainConfig)}
