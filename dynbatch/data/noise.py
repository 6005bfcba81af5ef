"""Label noise as data: the training labels a run sees, corrupted at a stated rate, with the clean ones kept.

Kinds (``KIND:RATE``, RATE in [0, 1)):

- ``symmetric``: each label is replaced, with probability RATE, by one drawn uniformly from the *other* classes;
- ``pair``: each label c becomes c + 1 (mod C) with probability RATE (the hard case for class-agnostic scores:
  the mislabeled samples of a class all agree with each other);
- ``asymmetric``: CIFAR-10's class-dependent flips, each with probability RATE: truck → automobile, bird →
  airplane, cat ↔ dog, deer → horse (10 classes only; the other classes keep their labels, so the rate over all
  samples is about RATE / 2).

Corruption is a pure function of (labels, kind, rate, number of classes, seed): the same seed gives the same noisy
labels. Only the training split is ever corrupted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynbatch.options import OptionError

KINDS = ("symmetric", "pair", "asymmetric")
# CIFAR-10 class indices: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse, 8 ship, 9 truck.
CIFAR10_FLIPS = {9: 1, 2: 0, 3: 5, 5: 3, 4: 7}


@dataclass(frozen=True)
class LabelNoise:
    kind: str
    rate: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.rate:g}"


def parse_label_noise(text: str) -> LabelNoise | None:
    """``KIND:RATE`` (or ``none`` / empty: no noise) as a :class:`LabelNoise`; bad text is one ``OptionError`` (a
    ``ValueError``) with the fix."""
    if text in (None, "", "none"):
        return None
    kind, sep, rate_text = str(text).partition(":")
    if kind not in KINDS or not sep:
        raise OptionError(f"{{label_noise}} {text!r} is not KIND:RATE with KIND one of {', '.join(KINDS)}; e.g. "
                          "symmetric:0.4")
    try:
        rate = float(rate_text)
    except ValueError:
        raise OptionError(f"{{label_noise}} {text!r}: the rate {rate_text!r} is not a number; e.g. "
                          "symmetric:0.4") from None
    if not 0.0 <= rate < 1.0:
        raise OptionError(f"{{label_noise}} {text!r}: the rate must be in [0, 1) (got {rate}); e.g. pair:0.45")
    return LabelNoise(kind, rate)


def corrupt_labels(y: np.ndarray, noise: LabelNoise, num_classes: int, seed: int) -> np.ndarray:
    """The noisy labels (int64, the shape of ``y``) of clean labels ``y`` in 0..num_classes-1."""
    y = np.asarray(y, dtype=np.int64)
    if noise.kind in ("symmetric", "pair") and num_classes < 2:
        raise OptionError(f"{{label_noise}} {noise} needs at least two classes (the data has {num_classes}); "
                          "drop it")
    if noise.kind == "asymmetric" and num_classes != 10:
        raise OptionError(f"{{label_noise}} {noise} is CIFAR-10's class mapping and needs 10 classes (the data "
                          f"has {num_classes}); use symmetric or pair noise")
    rng = np.random.default_rng([seed, 0x1abe1])  # a stream of its own: the run's other draws do not move
    flip = rng.random(y.shape) < noise.rate
    if noise.kind == "symmetric":
        # An offset in 1..C-1 from the true class: uniform over the other classes.
        other = (y + rng.integers(1, num_classes, size=y.shape)) % num_classes
        return np.where(flip, other, y)
    if noise.kind == "pair":
        return np.where(flip, (y + 1) % num_classes, y)
    target = y.copy()
    for src, dst in CIFAR10_FLIPS.items():
        target[y == src] = dst
    return np.where(flip, target, y)


def noise_rate(clean: np.ndarray, noisy: np.ndarray) -> float:
    """The measured fraction of labels that differ from the clean ones."""
    clean = np.asarray(clean)
    return float(np.mean(clean != np.asarray(noisy))) if clean.size else 0.0
