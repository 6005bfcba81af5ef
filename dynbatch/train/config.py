"""Every setting of a training run, resolved, validated, and stored in ``config.json``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dynbatch.errors import UserError
from dynbatch.train.schedules import SCHEDULES

# Used where neither the user nor the policy's paper says otherwise.
OPTIMIZER_DEFAULTS = {"lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4}


@dataclass
class TrainConfig:
    data: str = "digits"
    data_dir: str | None = None
    num_classes: int | None = None
    train_samples: int | None = None
    train_fraction: float | None = None
    model: str = "preresnet20"
    policy: str = "fixed"
    policy_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int | None = None  # None: the policy's default
    lr: float | None = None
    momentum: float | None = None
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
    amp: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU
    channels_last: str = "auto"  # auto: on for CUDA
    compile: bool = False
    sync_bn: bool = False  # under DDP: BatchNorm statistics over the global batch
    micro_batch: int | None = None
    eval_batch: int = 1000
    eval_every: int = 1  # epochs between test evaluations; the last epoch is always evaluated
    util_interval: float = 0.5
    stop_after_steps: int | None = None
    progress: bool = True

    def resolve_defaults(self, policy_cls) -> None:
        """Fill unset settings from the policy (its paper's optimizer, its batch size), then global defaults."""
        if self.batch_size is None:
            self.batch_size = policy_cls.default_batch_size
        if self.schedule is None:
            self.schedule = policy_cls.config_defaults.get("schedule", "cosine")
        policy_defaults = policy_cls.optimizer_defaults
        for k, v in OPTIMIZER_DEFAULTS.items():
            if getattr(self, k) is None:
                setattr(self, k, policy_defaults.get(k, v))

    def validate(self) -> None:
        def positive(name: str, v, allow_none=False):
            if v is None and allow_none:
                return
            if v is None or v <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {v})")

        positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        positive("eval_batch", self.eval_batch)
        positive("eval_every", self.eval_every)
        positive("micro_batch", self.micro_batch, allow_none=True)
        positive("train_samples", self.train_samples, allow_none=True)
        positive("num_classes", self.num_classes, allow_none=True)
        positive("stop_after_steps", self.stop_after_steps, allow_none=True)
        positive("util_interval", self.util_interval)
        if self.num_classes is not None and self.num_classes < 2:
            raise UserError("--num-classes must be at least 2")
        if self.train_fraction is not None and not 0 < self.train_fraction <= 1:
            raise UserError(f"--train-fraction must be in (0, 1] (got {self.train_fraction})")
        if self.train_fraction is not None and self.train_samples is not None:
            raise UserError("give either --train-samples or --train-fraction, not both")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive (got {self.lr})")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UserError(f"--weight-decay must be non-negative (got {self.weight_decay})")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1) (got {self.momentum})")
        if self.nesterov and self.momentum == 0:
            raise UserError("--nesterov needs a positive --momentum")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.warmup_epochs < 0:
            raise UserError("--warmup-epochs must be non-negative")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        if self.amp not in ("auto", "bf16", "none"):
            raise UserError(f"--amp must be auto, bf16 or none (got {self.amp})")
        if self.channels_last not in ("auto", "on", "off"):
            raise UserError(f"--channels-last must be auto, on or off (got {self.channels_last})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "milestones" in known:
            known["milestones"] = tuple(known["milestones"])
        return cls(**known)
