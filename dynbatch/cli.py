"""Command line: ``dynbatch train | plot | info | bench`` (also ``python -m dynbatch``).

Bad input ends with one line on stderr, ``dynbatch: error: <problem>; <fix>``, and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dynbatch.errors import UserError

# Options a resumed run may change; everything else comes from the run's config.json.
RESUMABLE_OVERRIDES = {"resume", "epochs", "stop_after_steps", "progress", "command"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"dynbatch: error: {message} (see '{self.prog} --help')\n")


def _bool(s: str) -> bool:
    return s.lower() in ("1", "true", "yes", "on")


def _add_train(sub) -> argparse.ArgumentParser:
    from dynbatch.data import DATASET_NAMES
    from dynbatch.models import MODELS
    from dynbatch.policies import POLICIES
    from dynbatch.train.config import OPTIMIZER_DEFAULTS, TrainConfig
    from dynbatch.train.schedules import SCHEDULES

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model", description="Train a classifier with a batch-size policy.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help=f"data set: {', '.join(DATASET_NAMES)}")
    g.add_argument("--data-dir", help="folder with torchvision's CIFAR layout (no download)")
    g.add_argument("--num-classes", type=int, help="number of classes (default: from the labels)")
    g.add_argument("--train-samples", type=int, help="class-balanced seeded subset of N training samples")
    g.add_argument("--train-fraction", type=float, help="class-balanced seeded subset, a fraction in (0, 1]")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop / flip")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default=d.model, help=f"one of {', '.join(MODELS)}")
    g.add_argument("--policy", default=d.policy, help=f"one of {', '.join(POLICIES)}")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, help="loader batch size (initial one for adaptive policies; default: the policy's)")
    g.add_argument("--lr", type=float, help=f"learning rate (default: the policy's paper, else {OPTIMIZER_DEFAULTS['lr']})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {OPTIMIZER_DEFAULTS['momentum']})")
    g.add_argument("--nesterov", type=_bool, help="Nesterov momentum (true/false)")
    g.add_argument("--weight-decay", type=float, help=f"default {OPTIMIZER_DEFAULTS['weight_decay']}")
    g.add_argument("--schedule", help=f"one of {', '.join(SCHEDULES)} (default: the policy's, else cosine)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear learning-rate warm-up")
    g.add_argument("--milestones", type=lambda s: tuple(float(v) for v in s.split(",")), default=d.milestones,
                   help="epochs of the step schedule, comma separated (default: 50%%,75%% of the budget)")
    g.add_argument("--gamma", type=float, default=d.gamma, help="step-schedule factor")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--amp", default=d.amp, help="auto (bf16 on CUDA), bf16, none")
    g.add_argument("--channels-last", default=d.channels_last, help="auto (on for CUDA), on, off")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes)")
    g.add_argument("--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm (global batch statistics)")
    g.add_argument("--micro-batch", type=int, help="largest chunk computed at once; larger steps accumulate gradients")
    g.add_argument("--eval-batch", type=int, default=d.eval_batch)
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs between test evaluations (last always)")
    g.add_argument("--util-interval", type=float, default=d.util_interval, help="seconds between utilisation samples")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", help="run folder (default: runs/<time>-<policy>-<model>)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--resume", help="continue the run in this folder from its last checkpoint")
    g.add_argument("--stop-after-steps", type=int, help="checkpoint and stop after N steps (resumable)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    policy_dests = {}
    for name, cls in POLICIES.items():
        g = p.add_argument_group(f"policy {name}", cls.help)
        before = {a.dest for a in p._actions}
        cls.add_arguments(g)
        policy_dests[name] = [a.dest for a in p._actions if a.dest not in before]
    p.set_defaults(policy_dests=policy_dests)
    return p


def _config_from_args(args: argparse.Namespace):
    from dynbatch.policies import policy_class
    from dynbatch.train.config import TrainConfig

    cls = policy_class(args.policy)
    opts = {k: getattr(args, k) for k in args.policy_dests.get(cls.name, [])}
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(**fields, policy_options=opts)


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dynbatch.train.trainer import Trainer

    if args.resume:
        defaults = vars(parser.parse_args([]))
        changed = sorted(k for k, v in vars(args).items() if k not in RESUMABLE_OVERRIDES and defaults.get(k) != v)
        if changed:
            raise UserError(f"--resume continues a run with its own settings; drop {', '.join('--' + c.replace('_', '-') for c in changed)} "
                            "(only --epochs and --stop-after-steps may change)")
        trainer = Trainer.resume(Path(args.resume), epochs=args.epochs if args.epochs != defaults["epochs"] else None,
                                 stop_after_steps=args.stop_after_steps)
        trainer.cfg.progress = args.progress
        trainer.log(f"resuming {args.resume} at epoch {trainer.epoch + 1}, step {trainer.step}")
    else:
        cfg = _config_from_args(args)
        out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.policy}-{cfg.model}")
        trainer = Trainer.new(cfg, out, overwrite=args.overwrite)
        trainer.log(f"run folder: {out}")  # rank 0 only under torchrun
    summary = trainer.run()
    if summary["interrupted"] is not None:
        sig = summary["interrupted"]
        return 128 + sig if sig else 0
    if summary.get("test_acc") is not None:
        trainer.log(f"done: test accuracy {summary['test_acc']:.4f} after {trainer.epoch} epochs; "
              f"run folder: {summary['out']} (metrics.jsonl, checkpoint.pt, curves.png)")
    else:
        trainer.log(f"nothing to do: the run already has {trainer.epoch} epochs; raise --epochs to continue")
    return 0


def cmd_plot(args: argparse.Namespace, parser) -> int:
    from dynbatch.plots import plot_runs

    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not (r / "metrics.jsonl").is_file():
            raise UserError(f"{r} is not a run folder (no metrics.jsonl); pass folders written by dynbatch train")
    out = plot_runs(runs, Path(args.out))
    print(f"wrote {out}")
    return 0


def cmd_info(args, parser) -> int:
    from dynbatch import info

    print(info.render(info.collect()))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog="dynbatch", description="Training with dynamic batch sizes.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    train = _add_train(sub)
    plot = sub.add_parser("plot", help="overlay the curves of run folders")
    plot.add_argument("runs", nargs="+", help="run folders")
    plot.add_argument("--out", required=True, help="PNG file to write")
    sub.add_parser("info", help="versions, devices, usable kernel backends")
    from dynbatch.bench_cli import add_bench_parser

    add_bench_parser(sub)
    return parser, {"train": train}


def main(argv: list[str] | None = None) -> int:
    parser, subs = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    handlers = {"train": cmd_train, "plot": cmd_plot, "info": cmd_info}
    try:
        if args.command == "bench":
            from dynbatch.bench_cli import cmd_bench

            return cmd_bench(args)
        return handlers[args.command](args, subs.get(args.command))
    except UserError as e:
        print(f"dynbatch: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dynbatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
