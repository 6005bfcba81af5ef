"""Every setting of a training run, resolved, validated, and stored in ``config.json``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dynbatch.data.sources import MAX_CLASSES
from dynbatch.errors import UserError
from dynbatch.train.loggers import parse_loggers
from dynbatch.train.optim import OPTIMIZERS
from dynbatch.train.schedules import SCHEDULES

# Used where neither the user nor the policy's paper says otherwise.
OPTIMIZER_DEFAULTS = {"lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4}
# Seeds feed numpy (non-negative) and EDBA's per-step subset seed (seed << 32) + step, which must fit in int64.
MAX_SEED = 2**31 - 1
NONFINITE_ACTIONS = ("stop", "skip")


@dataclass
class TrainConfig:
    data: str = "digits"
    data_dir: str | None = None
    num_classes: int | None = None
    image_size: int | None = None  # imagefolder data: side of the resized images (default 32)
    train_samples: int | None = None
    train_fraction: float | None = None
    model: str = "preresnet20"
    policy: str = "fixed"
    policy_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int | None = None  # None: the policy's default
    optimizer: str = "sgd"  # sgd, adam, adamw
    lr: float | None = None
    momentum: float | None = None  # SGD only
    nesterov: bool | None = None
    weight_decay: float | None = None
    schedule: str | None = None  # None: the policy's default, else cosine
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto: bf16 autocast where bf16 is native (CUDA; CPUs with avx512_bf16/amx), else fp32
    channels_last: str = "auto"  # auto: on for convolutional models
    compile: bool = False
    sync_bn: bool = False  # under DDP: BatchNorm statistics over the global batch
    micro_batch: int | None = None
    eval_batch: int = 1000
    eval_every: int = 1  # epochs between test evaluations; the last epoch is always evaluated
    util_interval: float = 0.5
    log: str = ""  # loggers beside metrics.jsonl: "tensorboard"
    redraw_subset: str = "never"  # protocol reading (dynbatch.train.redraw): never, on-resize, every-epoch
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: stop the run, or skip the step
    nonfinite_limit: int = 10  # skip mode: stop after this many skipped steps in a row
    stop_after_steps: int | None = None
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with unset settings filled from the policy (its paper's optimizer, its batch size), then global
        defaults; ``self`` (what the user gave) is left as it is."""
        from dynbatch.methods import policy_class

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
        """Raise ``UserError`` naming the first bad setting and its valid range."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        def at_least(name: str, lo, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if v is None or v < lo:
                word = "positive" if lo == 1 else f"at least {lo}"
                raise UserError(f"{flag(name)} must be {word} (got {v}); give a value of {lo} or more")

        for name in ("epochs", "batch_size", "eval_batch", "eval_every", "nonfinite_limit"):
            at_least(name, 1)
        for name in ("micro_batch", "train_samples", "stop_after_steps"):
            at_least(name, 1, allow_none=True)
        at_least("num_classes", 2, allow_none=True)
        at_least("image_size", 1, allow_none=True)
        if self.num_classes is not None and self.num_classes > MAX_CLASSES:
            raise UserError(f"--num-classes {self.num_classes} is above the supported {MAX_CLASSES}; give the "
                            "number of classes in the labels")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be in 0..{MAX_SEED} (got {self.seed}); pick a seed in that range")
        if not self.util_interval > 0:
            raise UserError(f"--util-interval must be positive seconds (got {self.util_interval}); e.g. 0.5")
        if self.train_fraction is not None and not 0 < self.train_fraction <= 1:
            raise UserError(f"--train-fraction must be in (0, 1] (got {self.train_fraction}); e.g. 0.1 for 10%")
        if self.train_fraction is not None and self.train_samples is not None:
            raise UserError("give either --train-samples or --train-fraction, not both; drop one of them")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"--lr must be positive (got {self.lr}); e.g. --lr 0.05")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UserError(f"--weight-decay must be non-negative (got {self.weight_decay}); e.g. 5e-4, or 0 for none")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1) (got {self.momentum}); e.g. 0.9, or 0 for none")
        if self.nesterov and self.momentum == 0:
            raise UserError("--nesterov needs a positive --momentum; give --momentum 0.9 or --nesterov false")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0 < self.gamma <= 1:
            raise UserError(f"--gamma must be in (0, 1] (got {self.gamma}); it multiplies the learning rate at each "
                            "milestone, e.g. 0.1")
        if any(m < 0 for m in self.milestones):
            raise UserError(f"--milestones must be epochs >= 0 (got {','.join(map(str, self.milestones))}); e.g. 50,75")
        if self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be non-negative (got {self.warmup_epochs}); e.g. 5, or 0 for none")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing}); e.g. 0.1")
        if self.amp not in ("auto", "bf16", "none"):
            raise UserError(f"--amp must be auto, bf16 or none (got {self.amp!r}); auto picks bf16 where it is fast")
        if self.channels_last not in ("auto", "on", "off"):
            raise UserError(f"--channels-last must be auto, on or off (got {self.channels_last!r}); auto is the default")
        parse_loggers(self.log)
        if self.redraw_subset not in ("never", "on-resize", "every-epoch"):
            raise UserError(f"--redraw-subset must be never, on-resize or every-epoch (got {self.redraw_subset!r}); "
                            "never is the default")
        if self.redraw_subset != "never" and self.train_samples is None and self.train_fraction is None:
            raise UserError("--redraw-subset redraws a --train-samples (or --train-fraction) subset; give one, or "
                            "drop --redraw-subset")
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise UserError(f"--on-nonfinite must be stop or skip (got {self.on_nonfinite!r}); stop is the default")

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
        if "milestones" in known:
            if not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in known["milestones"]):
                raise UserError("config.json: milestones must be numbers; restore the run's config.json")
            known["milestones"] = tuple(known["milestones"])
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
