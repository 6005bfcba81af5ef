"""``dynbatch score RUN``: every training sample's last-layer scores under a run's checkpoint, and, when the run
injected label noise, how well each score tells the mislabeled samples from the clean ones (AUROC).

The model is put in eval mode (running BatchNorm statistics), so a sample's loss and norms do not depend on the
batch it is scored in; its agreement and consensus are against its scoring batch, ``batch`` samples of the
training split in a seeded random order (so that every batch holds every class), as a selection method would
see them. Written beside the checkpoint: ``scores/step-<N>.npz`` (one array per score, with the labels trained
on, the true labels and the mislabeled flags) and ``scores/step-<N>.json`` (the AUROCs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynbatch.errors import UserError
from dynbatch.methods.scored import BatchScorer
from dynbatch.ops import SCORES

# A mislabeled sample is expected to score high on these and low on the agreement scores: each AUROC is that of
# SIGN x score for "mislabeled", so 0.5 is chance and 1 a perfect separation whatever the score.
SIGN = {"loss": 1, "residual_norm": 1, "grad_norm": 1, "feature_norm": 1, "agreement": -1, "consensus": -1,
        "class_agreement": -1, "class_consensus": -1}


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting half (the Mann-Whitney statistic); None
    without both classes."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks (1-based) over runs of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(score)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_split(model, split, *, batch: int, seed: int, autocast, label_smoothing: float) -> dict[str, np.ndarray]:
    """Every sample of ``split`` (a ``DeviceSplit``) scored in eval mode: name -> fp32 (N,), in the split's order."""
    scorer = BatchScorer(model, by_class=True)
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(split.x.device)
    table = torch.empty(len(SCORES), n, dtype=torch.float32, device=split.x.device)
    model.eval()
    try:
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            x, y = split.batch(idx)
            table[:, idx] = scorer(x, y, label_smoothing=label_smoothing, autocast=autocast).table
    finally:
        model.train()
    scores = dict(zip(SCORES, table.cpu().numpy()))
    # ||g_i|| = ||e_i|| ||a_i|| (a_i with the bias column): the head's input norm, the factor ||g|| adds to ||e||.
    scores["feature_norm"] = np.divide(scores["grad_norm"], scores["residual_norm"],
                                       out=np.zeros_like(scores["grad_norm"]), where=scores["residual_norm"] > 0)
    return scores


def score_run(run: Path, *, batch: int = 1024, seed: int = 0, log=print) -> dict[str, Any]:
    """Score ``run``'s training split under its checkpoint; write ``scores/step-<N>.{npz,json}``; return the
    summary (the JSON's content)."""
    from dynbatch.train.run_folder import unlock_run
    from dynbatch.train.trainer import Trainer

    if not (Path(run) / "checkpoint.pt").is_file():
        raise UserError(f"{run} holds no checkpoint.pt; give a run folder that has saved one (at an epoch's end, "
                        "or stopped with --stop-after-steps)")
    t = Trainer.resume(Path(run), log=lambda msg: None)
    try:
        split = t.data.train
        scores = score_split(t.model, split, batch=batch, seed=seed, autocast=t.precision.autocast,
                             label_smoothing=t.cfg.label_smoothing)
        arrays = {**scores, "label": split.y.cpu().numpy()}
        summary: dict[str, Any] = {"run": str(run), "step": t.step, "epoch": t.epoch, "samples": len(split),
                                   "batch": batch, "seed": seed, "label_noise": t.cfg.label_noise}
        if split.mislabeled is not None:
            mislabeled = split.mislabeled.cpu().numpy()
            arrays.update(clean_label=split.y_clean.cpu().numpy(), mislabeled=mislabeled)
            summary["mislabeled"] = float(mislabeled.mean())
            summary["auroc"] = {k: auroc(SIGN[k] * v, mislabeled) for k, v in scores.items()}
        out = Path(run) / "scores"
        out.mkdir(exist_ok=True)
        np.savez_compressed(out / f"step-{t.step}.npz", **arrays)
        (out / f"step-{t.step}.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"wrote {out / f'step-{t.step}.npz'} and .json ({len(split)} samples, step {t.step})")
        for name, value in (summary.get("auroc") or {}).items():
            log(f"  AUROC {name:<16} {value:.3f}" if value is not None else f"  AUROC {name:<16} -")
        return summary
    finally:
        unlock_run(t.lock)
