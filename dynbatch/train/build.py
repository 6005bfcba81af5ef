"""Building a run from its config: the device and ranks, the device-resident data, the model (precision, layout,
DDP, compile), the optimizer, the policy, the executor and the step context. Everything is checked here, before
the run folder is touched, so bad input never leaves a partial run behind."""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from dynbatch.data import DeviceData, VariableBatchSampler, balanced_subset, hold_out, load_dataset
from dynbatch.data.noise import LabelFile, corrupt_labels, parse_label_noise, read_label_file
from dynbatch.data.text import TextSource, load_text
from dynbatch.distributed import Dist
from dynbatch.errors import UserError
from dynbatch.info import cpu_name, package_versions
from dynbatch.methods import POLICIES, Policy, StepContext, policy_class
from dynbatch.methods.base import sample_cross_entropy
from dynbatch.methods.scored import SelectionPolicy
from dynbatch.models import SIZED, build_model
from dynbatch.models.init import dirac_init, first_conv, set_batchnorm, whiten_conv
from dynbatch.train import precision as precisions
from dynbatch.train import run_folder
from dynbatch.train.config import TrainConfig
from dynbatch.train.executor import PlanExecutor
from dynbatch.train.lookahead import Lookahead
from dynbatch.train.optim import build_optimizer
from dynbatch.train.redraw import SubsetRedraw


@dataclass
class RunParts:
    """What a run is made of. ``model`` is the plain module (its state is saved); ``step_model`` the wrapper that
    trains (DDP and/or ``torch.compile`` around it)."""

    cfg: TrainConfig
    device: torch.device
    dist: Dist
    data: DeviceData
    redraw: SubsetRedraw | None
    model: torch.nn.Module
    step_model: torch.nn.Module
    precision: precisions.Precision
    channels_last: bool
    optimizer: torch.optim.Optimizer
    policy: Policy
    executor: PlanExecutor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-sample losses (B,)
    ctx: StepContext
    sampler: VariableBatchSampler
    aug_gen: torch.Generator
    lookahead: Lookahead | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


def _place(cfg: TrainConfig) -> tuple[torch.device, Dist]:
    device = resolve_device(cfg.device)
    dist = Dist.from_env(device.type)
    if dist.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        if cfg.batch_size < dist.world:
            raise UserError(f"--batch-size {cfg.batch_size} is below the {dist.world} ranks, which each need a "
                            f"sample; give at least {dist.world}")
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only); on CPU use a model without "
                        "BatchNorm statistics, such as preresnet20_gn")
    return device, dist


IMAGE_ONLY = (("label_noise", "--label-noise"), ("validation", "--validation"), ("train_samples", "--train-samples"),
              ("train_fraction", "--train-fraction"), ("whiten", "--whiten"), ("tta", "--tta"),
              ("translate", "--translate"))


def _text_data(cfg: TrainConfig, device: torch.device) -> DeviceData:
    """``--data text:PATH``: its sequences on the device (the corpus fixes its validation split)."""
    for name, flag in IMAGE_ONLY:
        if getattr(cfg, name) not in (None, "", False, 0):
            raise UserError(f"{flag} applies to image data; drop it for --data {cfg.data}")
    if cfg.redraw_subset != "never":
        raise UserError(f"--redraw-subset applies to image data; drop it for --data {cfg.data}")
    if not (cfg.model in SIZED or ":" in cfg.model):
        raise UserError(f"--data {cfg.data} trains a language model; give --model gpt (or package.module:factory)")
    return DeviceData(load_text(cfg.data[5:], cfg.vocab_size, cfg.context), device)


def _model_sizes(cfg: TrainConfig, data: DeviceData) -> dict[str, int]:
    """The keywords of a sized model (``gpt``), from the run's settings; refuses one without text data."""
    if cfg.model not in SIZED:
        return {}
    if not isinstance(data.source, TextSource):
        raise UserError(f"--model {cfg.model} trains on text; give --data text:PATH")
    return {"context": cfg.context, "layers": cfg.gpt_layers, "width": cfg.gpt_width, "heads": cfg.gpt_heads}


def _data(cfg: TrainConfig, device: torch.device) -> tuple[DeviceData, SubsetRedraw | None]:
    if cfg.data.startswith("text:"):
        return _text_data(cfg, device), None
    src = load_dataset(cfg.data, cfg.data_dir, cfg.num_classes, cfg.image_size)
    if cfg.translate is not None:
        src.crop_padding = cfg.translate
    src.pad_mode, src.flip_mode = cfg.pad_mode, cfg.flip
    if not cfg.augment or cfg.flip == "none":
        src.flip = False
    if not cfg.augment:
        src.crop_padding = 0
    if cfg.validation is not None:
        hold_out(src, cfg.validation)
    train_samples = cfg.train_samples
    if cfg.train_fraction is not None:
        train_samples = max(1, round(cfg.train_fraction * len(src.y_train)))
    subset = balanced_subset(src.y_train, train_samples, cfg.seed) if train_samples is not None else None
    redraw = SubsetRedraw(cfg.redraw_subset, src.y_train, subset, cfg.seed) if cfg.redraw_subset != "never" else None
    noise = parse_label_noise(cfg.label_noise)
    if noise is not None:  # after the subsets are drawn from the true labels: the same images as a clean run
        src.y_train_clean = src.y_train
        if isinstance(noise, LabelFile):
            src.y_train, src.label_file_sha256 = read_label_file(noise, len(src.y_train), src.num_classes,
                                                                 cfg.label_index_map or None)
        else:
            src.y_train = corrupt_labels(src.y_train, noise, src.num_classes, cfg.seed)
    return DeviceData(src, device, subset, augment_seed=cfg.seed + 3), redraw


def _ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel without buffer syncs in forwards: no hidden collective in forwards that only some
    code paths run; ``--sync-bn`` gives global BatchNorm statistics instead."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = {"device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kw["forward_sync_buffers"] = False
    else:
        kw["broadcast_buffers"] = False
    return DDP(model, **kw)


WHITEN_IMAGES = 5000  # training images whose patches set the whitening layer (airbench's count)


def _initialise(cfg: TrainConfig, model: torch.nn.Module, data: DeviceData) -> None:
    """The initialisation options, on the freshly built model (a resumed run then loads its checkpoint over it)."""
    if cfg.init == "dirac":
        dirac_init(model)
    set_batchnorm(model, momentum=cfg.bn_momentum, eps=cfg.bn_eps, train_weight=cfg.bn_weight)
    if cfg.whiten:
        conv = first_conv(model)
        images, _ = data.train.batch(torch.arange(min(WHITEN_IMAGES, len(data.train)), device=data.device))
        whiten_conv(conv, images)


def _model(cfg: TrainConfig, data: DeviceData, device: torch.device, dist: Dist, log, recorded_bf16: bool | None):
    """(plain module, the wrapper that trains, precision); ``recorded_bf16``: a resumed run's choice of ``auto``."""
    torch.manual_seed(cfg.seed)
    src = data.source
    model = build_model(cfg.model, src.num_classes, src.image_shape[0], **_model_sizes(cfg, data)).to(device)
    _initialise(cfg, model, data)
    precision = precisions.resolve(cfg.amp, cfg.channels_last, device, model)
    if precision.bf16 and device.type == "cpu" and not precisions.cpu_has_native_bf16():
        log("note: --amp bf16 on a CPU without native bf16 (avx512_bf16 or amx_bf16) is emulated and much slower "
            "than fp32; --amp auto chooses fp32 here")
    # Before any wrapper (DDP builds its gradient buckets from the parameters' layout as it finds them).
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.amp == "auto" and precisions.bf16_is_native(device):
        precision = _auto_amp(cfg, precision, model, data, dist, log, recorded_bf16)
    model.train()  # once: the steps do not switch modes (evaluation switches back itself)
    wrapped = model
    if dist.enabled:
        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = _ddp(model, device)
    return model, torch.compile(wrapped, dynamic=True) if cfg.compile else wrapped, precision


def _auto_amp(cfg: TrainConfig, precision, model, data: DeviceData, dist: Dist, log, recorded_bf16: bool | None):
    """``--amp auto`` where bf16 is native: a resumed run's recorded choice (its arithmetic must not change midway),
    else the main rank's cached verdict or probe on a batch of the run's size, the same on every rank."""
    if recorded_bf16 is not None:
        return precisions.Precision(precision.device_type, recorded_bf16, precision.channels_last,
                                    {"recorded": "the run's own choice, kept on resume"})
    decided = None
    if dist.is_main:
        x, y = data.train.batch(torch.arange(min(cfg.batch_size, len(data.train)), device=data.device))
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        decided = precisions.choose_amp(precision, model, x, y, cfg.model, data.device)
        probe = decided.decided_by["probe"]
        log(f"--amp auto: {'bf16 autocast' if decided.bf16 else 'fp32'} (a step takes {probe['fp32_ms']:.3g} ms in "
            f"fp32, {probe['bf16_ms']:.3g} ms in bf16{', cached' if decided.decided_by['cached'] else ''})")
    return dist.gather_objects(decided)[0]


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``'s weights."""
    lr, weight_decay = cfg.torch_hyperparameters()
    return build_optimizer(cfg.optimizer, model, lr=lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov),
                           weight_decay=weight_decay, bias_lr_scale=cfg.bias_lr_scale)


def _second_model(cfg: TrainConfig, data: DeviceData, device: torch.device, channels_last: bool,
                  name: str, weights_from: str | None = None) -> torch.nn.Module:
    """A model of ``name`` initialised as the run's (``StepContext.make_model``), in train mode on the device; its
    initial weights drawn from the run's seed, apart from the main model's, or a finished run's (``weights_from``,
    a run folder of that model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 0x9E37)
        sizes = _model_sizes(cfg, data) if name == cfg.model else {}
        model = build_model(name, data.source.num_classes, data.source.image_shape[0], **sizes).to(device)
        _initialise(cfg, model, data)
    if weights_from is not None:
        run = Path(weights_from)
        trained = run_folder.read_config(run)["config"].get("model")
        if trained != name:
            raise UserError(f"{run} trained --model {trained}, not {name}; give a run of {name} or its name")
        model.load_state_dict(run_folder.load_checkpoint(run / "checkpoint.pt", ("model",))["model"])
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    return model.train()


def build_run(cfg: TrainConfig, log: Callable[[str], None], recorded_bf16: bool | None = None) -> RunParts:
    """The parts of a run of ``cfg`` (resolved and validated here); ``recorded_bf16``: a resumed run's choice of
    ``--amp auto``."""
    cfg.validate()
    policy_cls = policy_class(cfg.policy)
    policy_cls.validate(cfg.policy_options)
    if cfg.selection_control and not issubclass(policy_cls, SelectionPolicy):
        raise UserError(f"--selection-control needs a selection policy, not {cfg.policy}; use it with --policy "
                        "importance, selective-backprop, small-loss or consensus")
    device, dist = _place(cfg)
    data, redraw = _data(cfg, device)
    if isinstance(data.source, TextSource) and not policy_cls.sequences:
        raise UserError(f"--policy {cfg.policy} needs one feature vector a sample, which a sequence is not; for "
                        "text use " + ", ".join(n for n, p in POLICIES.items() if p.sequences))
    model, step_model, precision = _model(cfg, data, device, dist, log, recorded_bf16)
    optimizer = _optimizer(cfg, model)
    policy = policy_cls(cfg.policy_options, batch_size=cfg.batch_size, config=cfg)
    policy.check_world_size(dist.world)
    executor = PlanExecutor(step_model, optimizer, cfg.micro_batch, dist=dist,
                            restore_buffers_on_skip=cfg.on_nonfinite == "skip")
    # per-sample losses: a class's cross-entropy, or a sequence's mean over its tokens
    loss_fn = partial(sample_cross_entropy, label_smoothing=cfg.label_smoothing)
    ctx = StepContext(model=step_model, module=model, loss_fn=loss_fn, autocast=precision.autocast, device=device,
                      seed=cfg.seed, label_smoothing=cfg.label_smoothing, dist=dist,
                      make_model=partial(_second_model, cfg, data, device, precision.channels_last),
                      make_optimizer=partial(_optimizer, cfg))
    policy.attach(ctx)
    return RunParts(cfg=cfg, device=device, dist=dist, data=data, redraw=redraw, model=model, step_model=step_model,
                    precision=precision, channels_last=precision.channels_last, optimizer=optimizer, policy=policy,
                    executor=executor, loss_fn=loss_fn, ctx=ctx,
                    sampler=VariableBatchSampler(len(data.train), cfg.seed + 1, device),
                    aug_gen=torch.Generator().manual_seed(cfg.seed + 2),
                    lookahead=Lookahead(model, every=cfg.lookahead, decay=cfg.lookahead_decay,
                                        power=cfg.lookahead_power, start=cfg.lookahead_start)
                    if cfg.lookahead else None)


def describe(parts, given: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of a run (its :class:`RunParts`, or the trainer holding them): the resolved settings, what
    the user gave (so it re-runs exactly), versions, device, data."""
    dev, src = parts.device, parts.data.source
    return {
        "config": parts.cfg.to_dict(),
        "given": {k: v for k, v in given.items() if k not in ("out", "overwrite", "autoresume")},
        "versions": package_versions(),
        "device": {"type": dev.type, "name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else cpu_name(), "torch_threads": torch.get_num_threads()},
        "data": {"name": src.name, "train_samples": len(parts.data.train), "test_samples": len(parts.data.test),
                 "num_classes": src.num_classes, "image_shape": list(src.image_shape)},
        "label_noise": {"asked": parts.cfg.label_noise, "measured": parts.data.train_label_noise,
                        **({"sha256": src.label_file_sha256} if src.label_file_sha256 else {})}
        if parts.cfg.label_noise else None,
        "precision": parts.precision.name, "amp_bf16": parts.precision.bf16, "channels_last": parts.channels_last,
        "amp_decided_by": parts.precision.decided_by,
        "world_size": parts.dist.world,
        "command": sys.argv,
    }
