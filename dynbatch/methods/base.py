"""The policy interface: a policy names the next batch size and turns a batch into a plan of optimizer steps.

Policies receive the *global* batch; under DDP each rank works on its share (``ctx.dist.local``) and policies that
choose (EDBA, split) agree across ranks through ``ctx.dist``. The orchestrator (``dynbatch.train.trainer``) draws
the batch, asks the policy for a :class:`Plan`, executes it
(learning-rate scale, micro-batching, clipping, optimizer steps) and logs ``Plan.record``. A policy keeps all of its
state in ``state_dict()`` so a resumed run continues exactly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from dynbatch.errors import UserError
from dynbatch.options import from_mapping


@dataclass(slots=True)
class ForwardStep:
    """One optimizer step from a fresh forward and backward at the current weights: x (B, C, H, W), y (B,).

    ``sample_weight`` (B,) weighs each sample's loss; a rank with nothing to train on under DDP sends one sample at
    weight 0, so that every rank still runs the one synchronising backward DDP expects. The step's loss is the
    weighted sum over the weights' sum, or with ``mean_over_count`` over the number of samples (importance weights,
    whose expectation is 1: the unbiased estimate). ``rows``: the step's samples as rows of the batch the policy
    was given (indices or a slice; None: this rank's whole share), read only to count mislabeled samples.
    """

    x: torch.Tensor
    y: torch.Tensor
    lr_scale: float = 1.0  # this step's learning rate is the scheduled rate times lr_scale
    sample_weight: torch.Tensor | None = None
    rows: torch.Tensor | slice | None = None
    mean_over_count: bool = False


@dataclass(slots=True)
class ReuseStep:
    """One optimizer step from sample losses (B,) the policy already computed *with a graph* at the current weights
    (their logits (B, C) detached, for accuracy), instead of a second forward."""

    losses: torch.Tensor
    logits: torch.Tensor
    y: torch.Tensor
    lr_scale: float = 1.0
    sample_weight: torch.Tensor | None = None
    rows: torch.Tensor | slice | None = None  # as ForwardStep's
    mean_over_count: bool = False


@dataclass(slots=True)
class GradientStep:
    """One optimizer step applying gradients the policy computed (one tensor or None per parameter, in
    ``parameters()`` order, owned by the step), with the statistics of the samples behind them: 0-d float32
    device tensors ``loss_sum`` and ``correct``, and ``samples`` (a count)."""

    grads: list[torch.Tensor | None]
    loss_sum: torch.Tensor
    correct: torch.Tensor
    samples: int
    lr_scale: float = 1.0
    rows: torch.Tensor | slice | None = None  # as ForwardStep's


TrainStep = ForwardStep | ReuseStep | GradientStep


@dataclass(slots=True)
class Plan:
    """What to do with one loader batch: optimizer steps, and fields for this step's row in ``metrics.jsonl``
    (host values, or 0-d device tensors, read with the block of rows they join; the executor supplies the loss,
    accuracy and sample counts of every kind of step)."""

    steps: list[TrainStep]
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class StepContext:
    """What a policy may use while planning a step. The trainer builds one per run and advances ``step`` and
    ``epoch``; build it with keywords.

    Two handles on the model: ``model`` is the wrapper that trains (DDP and/or ``torch.compile`` around the
    module), for forwards whose graph the backward will use; ``module`` is the plain module, whose state is saved,
    for forwards that must neither synchronise ranks nor be compiled (selection, candidates).
    """

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-sample losses (B,)
    autocast: Callable[[], AbstractContextManager]
    device: torch.device
    seed: int = 0  # the run's seed; policies derive per-step seeds from (seed, step)
    step: int = 0  # global step index, 0-based
    epoch: int = 0
    label_smoothing: float = 0.0
    dist: Any = None  # dynbatch.distributed.Dist; None means a single process
    module: nn.Module | None = None  # None: ``model`` unwrapped (its ``.module`` under DDP)
    # bool (B,) on the device: which samples of this step's (global) batch carry a corrupted label; set by the
    # trainer when the run has label noise, for the rows' mislabeled fractions. Policies must not read it to choose.
    mislabeled: torch.Tensor | None = None
    indices: torch.Tensor | None = None  # int64 (B,) on the device: the batch's rows of the training split
    lr: float = 0.0  # the step's scheduled learning rate (torch's form), before a step's ``lr_scale``
    # The run's recipe for a second network (InfoBatch needs none; the proxy policy one): a model of that name built
    # and initialised as the run's own, on its device; an optimizer with the run's settings over a model's weights.
    make_model: Callable[[str, str | None], nn.Module] | None = None  # (name, a run folder to load or None)
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None

    def __post_init__(self):
        if self.dist is None:
            from dynbatch.distributed import SINGLE

            self.dist = SINGLE
        if self.module is None:
            self.module = getattr(self.model, "module", self.model)


class Policy(ABC):
    """Base class; subclasses set ``name`` and implement :meth:`plan` (and usually :meth:`batch_size`)."""

    name: ClassVar[str]
    help: ClassVar[str] = ""
    # Optimizer settings this policy's paper used; the CLI applies them unless the user overrides them.
    optimizer_defaults: ClassVar[dict[str, Any]] = {}
    # Loader batch size when the user gives no --batch-size.
    default_batch_size: ClassVar[int] = 128
    # Defaults for other trainer settings this policy relies on (e.g. a schedule), applied unless the user sets them.
    config_defaults: ClassVar[dict[str, Any]] = {}

    # The policy's typed options (a dataclass of ``dynbatch.options`` fields, with ``validate()``); the CLI makes
    # a flag of each field.
    options_type: ClassVar[type | None] = None
    # Whether a sample may be a sequence (language models): a policy whose math needs one feature vector a sample
    # says False, and the trainer refuses text data for it before the run starts.
    sequences: ClassVar[bool] = True

    @classmethod
    def validate(cls, options: dict[str, Any]) -> None:
        """Raise ``UserError`` for bad option values, before any run file is written."""
        if cls.options_type:
            from_mapping(cls.options_type, options)

    def __init__(self, options: Any = None, *, batch_size: int, config: Any = None):
        # A mapping of some options (the rest take their defaults) or an options instance; validated.
        self.options = from_mapping(self.options_type, options or {}) if self.options_type else options
        self.base_batch_size = batch_size
        self.config = config  # the resolved TrainConfig (None in unit tests that build a policy alone)

    def check_world_size(self, world: int) -> None:
        """Raise ``UserError`` if this policy's options cannot run on ``world`` processes (checked before the run
        folder is touched)."""

    def batch_size(self) -> int:
        """Size of the next loader batch."""
        return self.base_batch_size

    def lr_factor(self, epoch_progress: float) -> float:
        """Multiplier on the scheduled learning rate at fractional epoch ``epoch_progress``."""
        return 1.0

    def part_lr_scale(self, trained: int) -> float:
        """``lr_scale`` of a step that trains on ``trained`` samples (global count) of a batch at a mean loss.
        Torch's form: 1, the step's rate whatever the method kept, as the methods' papers train. The decoupled
        form: ``trained / batch_size``, its lr and weight decay being per example of a summed loss, so a step on
        fewer samples moves the weights as much per sample as a full one (split's 1/k and AdaBatch's factors are
        already stated on the step's rate and need no scaling)."""
        if self.config is None or self.config.hyp_form != "decoupled":
            return 1.0
        return trained / self.base_batch_size

    def attach(self, ctx: StepContext) -> None:
        """Called once when the run is built, before a checkpoint is loaded: build what needs the run's device,
        model or recipe (the proxy policy's network and optimizer)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first batch of every epoch (0-based), also after a resume."""

    def epoch_samples(self, epoch: int, n: int) -> torch.Tensor | None:
        """Bool (n,) on the CPU: which of the training split's n samples epoch ``epoch`` draws (None: all of them).
        Called at the epoch's start, after :meth:`on_epoch_start` (not again on a resume mid-epoch: the sampler's
        state holds the epoch's draw)."""
        return None

    def epoch_record(self) -> dict[str, Any]:
        """Fields for the epoch's row (host values)."""
        return {}

    @abstractmethod
    def plan(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> Plan:
        """Turn the global batch x (B, C, H, W), y (B,) into optimizer steps (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass



class BufferSnapshot:
    """A copy of every buffer of ``model`` (BatchNorm running statistics, counters, ...), to put back later; or of
    the given list of buffers (a caller that snapshots at every step lists them once)."""

    def __init__(self, model: nn.Module | list[torch.Tensor]):
        buffers = model if isinstance(model, list) else model.buffers()
        self.saved = [(b, b.detach().clone()) for b in buffers]

    def restore(self, where: torch.Tensor | None = None) -> None:
        """Put the copies back; with ``where`` (a 0-d bool device tensor, never read to the host) only if it is
        true."""
        for b, v in self.saved:
            if where is None:
                b.data.copy_(v)
            else:
                b.copy_(torch.where(where, v, b))


@contextmanager
def preserved_buffers(model: nn.Module | list[torch.Tensor]):
    """Restore every buffer of ``model`` (or the listed ones) on exit.

    Keeping train-mode behaviour (batch statistics, dropout) while undoing the running-statistics update is what
    selection forwards need: their losses are those of a training forward, but they must not count as one.
    """
    snapshot = BufferSnapshot(model)
    try:
        yield
    finally:
        snapshot.restore()


def sample_cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Each sample's cross-entropy, fp32 (B,): logits (B, C) and labels (B,), or a sequence's mean over its tokens
    for logits (B, T, V) and next tokens (B, T) (a token whose target is -100 counts 0 in the mean over T)."""
    losses = nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none",
                                         label_smoothing=label_smoothing)
    return losses.view(y.shape).flatten(1).mean(1) if y.dim() > 1 else losses


def sample_hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each sample's share of correct predictions, fp32 (B,): 0 or 1 for a class, the token accuracy of a
    sequence over its tokens not ignored (targets -100: the tokens a per-token selection left out)."""
    hit = logits.argmax(-1) == y
    if y.dim() == 1:
        return hit.float()
    valid = (y != -100).flatten(1)
    return (hit.flatten(1) & valid).sum(1) / valid.sum(1).clamp_min(1)


def chosen_rows(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Indices (size,) of the True entries of ``mask`` (B,), ascending, without a host sync (``x[mask]`` must learn
    the count from the device; here the caller already knows it)."""
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:size]


def capture_last_layer(model: nn.Module, head: nn.Linear, x: torch.Tensor, *, keep_graph: bool = False,
                       autocast: Callable[[], Any] = nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, C), the head's input features (B, D)) of one forward of ``model`` on ``x``."""
    captured = {}
    hook = head.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", inp[0]))
    try:
        with torch.set_grad_enabled(keep_graph), autocast():
            logits = model(x)
    finally:
        hook.remove()
    if "h" not in captured:
        raise UserError(f"the head {type(head).__name__} was not called in the model's forward; pass the "
                        "nn.Linear that produces the logits as head=")
    return logits, captured["h"]


class LastLayerForward:
    """A forward of ``model`` that captures the input of its head (the ``nn.Linear`` producing the logits: given, or
    the model's final one), in train mode, building no graph and moving no buffer unless ``keep_graph``: how
    every selection method looks at a batch before choosing from it. ``model`` may be bound later (a policy gets
    its model at the first step)."""

    def __init__(self, model: nn.Module | None = None, *, head: nn.Linear | None = None):
        self.model = model
        self._head = head
        self._buffers: tuple[nn.Module, list[torch.Tensor]] | None = None  # (model, its buffers), listed once

    def _model_buffers(self) -> list[torch.Tensor]:
        """The bound model's buffers, listed once per model: walking the module tree costs ~10 µs at every step."""
        if self._buffers is None or self._buffers[0] is not self.model:
            self._buffers = (self.model, list(self.model.buffers()))
        return self._buffers[1]

    @property
    def head(self) -> nn.Linear:
        """The layer whose per-sample gradients are scored: given, or the model's final ``nn.Linear``."""
        if self._head is None:
            from dynbatch.models import final_linear

            self._head = final_linear(self.model)
        return self._head

    def forward(self, x: torch.Tensor, *, keep_graph: bool = False, autocast=nullcontext):
        """(logits (B, C), features (B, D)) of a selection forward on x (B, ...); without ``keep_graph`` no
        buffer moves."""
        buffers = None if keep_graph else self._model_buffers()
        with preserved_buffers(buffers) if buffers else nullcontext():
            return capture_last_layer(self.model, self.head, x, keep_graph=keep_graph, autocast=autocast)
