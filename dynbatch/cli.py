"""Command line: ``dynbatch train | plot | info | bench`` (also ``python -m dynbatch``).

Bad input ends with one line on stderr, ``dynbatch: error: <problem>; <fix>``, exit code 2, and nothing written.
Every option of ``train`` is registered with ``argparse.SUPPRESS`` as its parse-time default and its real default
kept in :data:`TrainOptions.defaults`, so the parsed namespace holds exactly what the user typed: that is what tells
an option given on resume from one left alone, and an option of another policy from a default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from dynbatch.errors import DynbatchError, UserError
from dynbatch.options import OptionError, boolean, cli_spec, integer

# Options a resumed run may change; everything else comes from the run's config.json.
RESUMABLE_OVERRIDES = {"resume", "autoresume", "epochs", "stop_after_steps", "progress", "command"}
# Settings that say how a run is driven rather than what it computes: not compared by --autoresume.
NOT_COMPARED = {"epochs", "stop_after_steps", "progress"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, with the fix, not usage + message
        self.exit(2, f"dynbatch: error: {message}; see '{self.prog} --help'\n")


class TrainOptions:
    """Registers ``train``'s options, remembering each one's default and the policy that owns it (if any)."""

    def __init__(self):
        self.defaults: dict[str, Any] = {}
        self.owner: dict[str, str] = {}  # dest -> policy name, for policy options
        self.parse: dict[str, Any] = {}  # dest -> the function that reads a value of it (bool for flags)

    def group(self, parser: argparse.ArgumentParser, title: str, description: str | None = None,
              owner: str | None = None) -> "_Group":
        return _Group(self, parser.add_argument_group(title, description), owner)


class _Group:
    """The ``add_argument`` that policies call: the real default is recorded, argparse gets SUPPRESS."""

    def __init__(self, options: TrainOptions, group, owner: str | None):
        self.options, self.group, self.owner = options, group, owner

    def add_argument(self, *flags, default=None, help: str = "", **kw):
        action = kw.get("action")
        if action == "store_true":
            default = False
        elif action == "store_false":
            default = True
        elif default not in (None, "", ()) and "(default" not in help:
            help = f"{help} (default: {default})" if help else f"default: {default}"
        a = self.group.add_argument(*flags, default=argparse.SUPPRESS, help=help, **kw)
        self.options.defaults[a.dest] = default
        self.options.parse[a.dest] = bool if action in ("store_true", "store_false") else kw.get("type", str)
        if self.owner:
            self.options.owner[a.dest] = self.owner
        return a

    def add_options(self, options_type, group: str | None = None) -> None:
        """A flag for every field of ``options_type`` (of help group ``group``, or all when None)."""
        for spec in cli_spec(options_type):
            field_group = spec.pop("group")
            if group is None or field_group == group:
                self.add_argument(*spec.pop("flags"), **spec)


def _add_train(sub) -> tuple[argparse.ArgumentParser, TrainOptions]:
    from dynbatch.methods import POLICIES
    from dynbatch.train.config import TrainConfig

    opts = TrainOptions()
    p = sub.add_parser("train", help="train a model", description="Train a classifier with a batch-size policy.")
    for title in ("data", "model and optimisation", "execution"):
        opts.group(p, title).add_options(TrainConfig, title)
    g = opts.group(p, "config file")
    g.add_argument("--recipe", help=f"a named recipe ({', '.join(recipe_names())}) or a recipe file: options "
                   "set together (model, optimizer, schedule, augmentation, evaluation); --config and flags "
                   "override it; config.json records the expanded settings")
    g.add_argument("--config", help="YAML or JSON file of options by name (lr: 0.1, policy: edba, ...); flags on "
                   "the command line override it; a run's config.json re-runs that run")
    g = opts.group(p, "run folder")
    g.add_argument("--out", help="run folder (default: runs/<time>-<policy>-<model>)")
    g.add_argument("--overwrite", action="store_true", help="replace a run (or a run stopped before its first "
                   "checkpoint) in --out")
    g.add_argument("--resume", help="continue the run in this folder from its last checkpoint")
    g.add_argument("--autoresume", action="store_true", help="with --out: start the run if the folder is new, resume "
                   "it if it holds a run of the same settings (for schedulers and torchrun --max-restarts)")
    g.add_options(TrainConfig, "run folder")
    for name, cls in POLICIES.items():
        if cls.options_type is not None:
            opts.group(p, f"policy {name}", cls.help, owner=name).add_options(cls.options_type)
    return p, opts


def _check_policy_options(given: dict[str, Any], opts: TrainOptions, policy: str) -> None:
    foreign = [k for k in given if opts.owner.get(k, policy) != policy]
    if foreign:
        k = foreign[0]
        flag = "--" + k.replace("_", "-")
        raise UserError(f"{flag} is an option of --policy {opts.owner[k]}, not of --policy {policy}; drop it or "
                        f"choose --policy {opts.owner[k]}")


def _config_from(given: dict[str, Any], opts: TrainOptions):
    from dynbatch.methods import policy_class
    from dynbatch.train.config import TrainConfig

    values = {**opts.defaults, **given}
    cls = policy_class(values["policy"])
    _check_policy_options(given, opts, cls.name)
    sgd_only = [k for k in ("momentum", "nesterov") if k in given]
    if values["optimizer"] != "sgd" and sgd_only:
        raise UserError(f"--{sgd_only[0]} is an option of --optimizer sgd, not of --optimizer {values['optimizer']}; "
                        "drop it (Adam's betas are torch's defaults)")
    policy_options = {k: v for k, v in values.items() if opts.owner.get(k) == cls.name}
    fields = {k: v for k, v in values.items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(**fields, policy_options=policy_options)


def train_config(**given: Any):
    """The ``TrainConfig`` that ``dynbatch train`` builds from these options (argparse names, e.g.
    ``train_config(policy="edba", batch_size=100)``), with every default the command line has."""
    _, opts = build_parser()
    return _config_from(given, opts)


RECIPES = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.json"))


def recipe_path(name: str) -> str:
    """The file of the named recipe, or ``name`` itself when it is a file."""
    if (RECIPES / f"{name}.json").is_file():
        return str(RECIPES / f"{name}.json")
    if Path(name).is_file():
        return name
    raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())}, or give a recipe file")


def load_config_file(path: str, opts: TrainOptions) -> dict[str, Any]:
    """Option values from a YAML or JSON file (a run's ``config.json`` included), checked like command-line
    values; the file's keys are option names (``train_samples`` or ``train-samples``)."""
    fix = "give a mapping of option names to values, e.g. 'lr: 0.1'"
    p = Path(path)
    try:
        text = p.read_text()
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --config {p} ({getattr(e, 'strerror', None) or type(e).__name__}); "
                        "check the path") from None
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise UserError(f"--config {p} is not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                        f"({type(e).__name__}); {fix}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):  # a run folder's config.json
        data = data["config"]
    if not isinstance(data, dict):
        raise UserError(f"--config {p} holds a {type(data).__name__}, not a mapping; {fix}")
    flat = {k: v for k, v in data.items() if k != "policy_options" and not str(k).startswith("_")}  # _: comments
    flat.update(data.get("policy_options") or {})
    out = {}
    for key, value in flat.items():
        dest = str(key).replace("-", "_")
        if dest not in opts.defaults or dest in ("config", "resume", "out", "overwrite", "autoresume"):
            raise UserError(f"--config {p}: unknown option {key!r}; use the names of 'dynbatch train --help' "
                            "(without the dashes)")
        if value is None:
            continue  # None means the default
        out[dest] = _config_value(dest, value, opts.parse[dest], p)
    return out


def _config_value(dest: str, value: Any, parse, path: Path) -> Any:
    """A config-file value checked as the command line checks it (a YAML 1e-3 is a number, "1e-3" a string)."""
    bad = UserError(f"--config {path}: {dest} = {value!r} is not a valid value; see 'dynbatch train --help'")
    if parse in (bool, boolean, str):
        if not isinstance(value, str if parse is str else bool):
            raise bad
        return value
    if isinstance(value, (bool, dict)):
        raise bad
    if dest in ("milestones", "triangle") and isinstance(value, (list, tuple)):
        if not value:
            return ()  # no milestones: the step schedule's own (50%, 75% of the budget)
        value = ",".join(map(str, value))
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError:
        raise bad from None


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "command"}


def _say(msg: str) -> None:
    """print() that survives a closed stdout (``dynbatch train | head -1``): training goes on, output is dropped."""
    try:
        print(msg, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_train(args: argparse.Namespace, opts: TrainOptions) -> int:
    from dynbatch.train import run_folder
    from dynbatch.train.trainer import Trainer

    given = _given(args)
    if not given.get("resume"):  # flags override the config file, which overrides the recipe
        base = load_config_file(recipe_path(given["recipe"]), opts) if "recipe" in given else {}
        if "config" in given:
            base.update(load_config_file(given.pop("config"), opts))
        given = {**base, **given}
    if given.get("resume") and (given.get("out") or given.get("autoresume")):
        raise UserError("give either --resume DIR or --out DIR [--autoresume], not both; drop one of them")
    if given.get("autoresume") and not given.get("out"):
        raise UserError("--autoresume needs a run folder; add --out DIR, the folder to start or continue the run in")
    resume = given.get("resume")
    if resume is not None:
        changed = sorted(k for k in given if k not in RESUMABLE_OVERRIDES)
        if changed:
            raise UserError(f"--resume continues a run with its own settings; drop "
                            f"{', '.join('--' + c.replace('_', '-') for c in changed)} "
                            "(only --epochs and --stop-after-steps may change)")
    elif given.get("autoresume") and (Path(given["out"]) / "config.json").is_file():
        # The same command again (a scheduler's rerun, torchrun --max-restarts): continue the run it started.
        run_folder.require_same_config(Path(given["out"]), _config_from(given, opts).resolved(), ignore=NOT_COMPARED)
        if run_folder.has_checkpoint(Path(given["out"])):
            resume = given["out"]
    if resume is not None:
        trainer = Trainer.resume(Path(resume), epochs=given.get("epochs"),
                                 stop_after_steps=given.get("stop_after_steps"), log=_say)
        trainer.cfg.progress = given.get("progress", True)
        trainer.log(f"resuming {resume} at epoch {trainer.epoch + 1}, step {trainer.step}")
    else:
        cfg = _config_from(given, opts)
        out = Path(given.get("out") or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.policy}-{cfg.model}")
        overwrite = given.get("overwrite", False) or (given.get("autoresume", False) and run_folder.is_restartable(out))
        trainer = Trainer.new(cfg, out, overwrite=overwrite, given=given, log=_say)
        trainer.log(f"run folder: {out}")  # rank 0 only under torchrun
    summary = trainer.run()
    if trainer.dist.is_main:
        _plot_run(trainer.out, trainer.log)
    if summary["interrupted"] is not None:
        sig = summary["interrupted"]
        return 128 + sig if sig else 0
    if summary.get("test_acc") is not None:
        trainer.log(f"done: test accuracy {summary['test_acc']:.4f} after {trainer.epoch} epochs; "
                    f"run folder: {summary['out']} (metrics.jsonl, checkpoint.pt, curves.png)")
    else:
        trainer.log(f"nothing to do: the run already has {trainer.epoch} epochs; raise --epochs to continue")
    return 0


def _plot_run(out: Path, log) -> None:
    """``curves.png`` of a run that wrote rows; the figure is a convenience, so its failure does not fail a run."""
    from dynbatch.plots import plot_runs

    if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
        try:
            plot_runs([out], out / "curves.png")
        except UserError as e:
            log(f"curves.png not written: {e}")


def cmd_plot(args: argparse.Namespace, opts=None) -> int:
    from dynbatch.plots import plot_runs

    out = plot_runs([Path(r) for r in args.runs], Path(args.out), x_axis=args.x)
    print(f"wrote {out}")
    return 0


def cmd_score(args, opts=None) -> int:
    from dynbatch.train.checkpoint_scores import score_run

    if args.batch < 2:
        raise UserError(f"--batch must be at least 2 (got {args.batch}); agreement needs a batch, e.g. 1024")
    score_run(Path(args.run), batch=args.batch, seed=args.seed)
    return 0


def cmd_info(args, opts=None) -> int:
    from dynbatch import info

    print(info.render(info.collect()))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, TrainOptions]:
    parser = _Parser(prog="dynbatch", description="Training with dynamic batch sizes.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    _, opts = _add_train(sub)
    plot = sub.add_parser("plot", help="overlay the curves of run folders")
    plot.add_argument("runs", nargs="+", help="run folders")
    plot.add_argument("--out", required=True, help="PNG file to write")
    plot.add_argument("--x", choices=("epochs", "samples"), default="epochs",
                      help="x axis of the curves: epochs, or samples trained on (compares policies on compute)")
    score = sub.add_parser("score", help="every training sample's last-layer scores under a run's checkpoint",
                           description="Score each training sample of RUN under its checkpoint (loss, ||e||, ||g||, "
                           "agreement and consensus, by batch and by class); with label noise, each score's AUROC "
                           "for telling mislabeled samples. Writes RUN/scores/step-<N>.npz and .json.")
    score.add_argument("run", help="run folder (with checkpoint.pt)")
    score.add_argument("--batch", type=integer, default=1024, help="scoring batch: the agreement's reference set")
    score.add_argument("--seed", type=integer, default=0, help="seed of the scoring batches' order")
    sub.add_parser("info", help="versions, devices, usable kernel backends")
    from dynbatch.bench_cli import add_bench_parser

    add_bench_parser(sub)
    return parser, opts


def main(argv: list[str] | None = None) -> int:
    parser, opts = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    handlers = {"train": cmd_train, "plot": cmd_plot, "score": cmd_score, "info": cmd_info}
    try:
        if args.command == "bench":
            from dynbatch.bench_cli import cmd_bench

            return cmd_bench(args)
        return handlers[args.command](args, opts)
    except DynbatchError as e:
        print(f"dynbatch: error: {e.for_cli() if isinstance(e, OptionError) else e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dynbatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dynbatch info | head` closed the pipe: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not raise again
        return 141


if __name__ == "__main__":
    sys.exit(main())
