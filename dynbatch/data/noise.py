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

Real noisy labels come from a file instead (``file:PATH`` or ``file:PATH#KEY``): one label per training index of
the data set, as a ``.npy`` array, or under KEY in a ``.npz`` or ``.pt`` (e.g. CIFAR-10N's ``worse_label``). When
the data set's training split is a subset of the file's rows, ``--label-index-map MAP.npy`` gives each training
index its row in the file. The data set's own labels stay the clean ones, so a run measures the file's real rate.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class LabelFile:
    """Noisy labels read from ``path`` (under ``key`` in an ``.npz`` or ``.pt``)."""

    path: str
    key: str | None = None

    def __str__(self) -> str:
        return f"file:{self.path}" + (f"#{self.key}" if self.key else "")


LABEL_FILE_SUFFIXES = (".npy", ".npz", ".pt")


def parse_label_noise(text: str) -> LabelNoise | LabelFile | None:
    """``KIND:RATE`` or ``file:PATH[#KEY]`` (or ``none`` / empty: no noise) as a :class:`LabelNoise` or
    :class:`LabelFile`; bad text is one ``OptionError`` (a ``ValueError``) with the fix. The file itself is read,
    and checked, by :func:`read_label_file`."""
    if text in (None, "", "none"):
        return None
    kind, sep, rate_text = str(text).partition(":")
    if kind == "file":
        path, _, key = rate_text.partition("#")
        if not path.endswith(LABEL_FILE_SUFFIXES):
            raise OptionError(f"{{label_noise}} {text!r}: the label file must be .npy, or .npz / .pt with #KEY; e.g. "
                              "file:labels.npy or file:CIFAR-10_human.pt#worse_label")
        if path.endswith(".npy") and key:
            raise OptionError(f"{{label_noise}} {text!r}: a .npy file holds one array, so no #KEY; drop #{key}")
        if not path.endswith(".npy") and not key:
            raise OptionError(f"{{label_noise}} {text!r}: name the array in the {Path(path).suffix} file with #KEY; "
                              f"e.g. file:{path}#worse_label")
        return LabelFile(path, key or None)
    if kind not in KINDS or not sep:
        raise OptionError(f"{{label_noise}} {text!r} is not KIND:RATE with KIND one of {', '.join(KINDS)}, nor "
                          "file:PATH; e.g. symmetric:0.4")
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


def _torch_load_arrays(path: Path):
    """A ``.pt`` file as ``torch.load`` gives it, safely (``weights_only``), with numpy arrays allowed: CIFAR-10N's
    files are dicts of them."""
    import torch

    dtypes = [type(np.dtype(t)) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                          np.uint64, np.bool_, np.float32, np.float64)]
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 renamed core to _core
    with torch.serialization.safe_globals([multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_array(spec: LabelFile) -> np.ndarray:
    """The raw array of ``spec``'s file (one line naming the problem for a missing file, key or unreadable file)."""
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise OptionError(f"{{label_noise}} {spec}: no such file; give the path of a .npy, .npz or .pt label file")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if spec.key in keys:
                    return z[spec.key]
        else:
            z = _torch_load_arrays(path)
            keys = list(z) if isinstance(z, dict) else []
            if spec.key in keys:
                value = z[spec.key]
                return value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # truncated or foreign
        raise OptionError(f"{{label_noise}} {spec}: cannot read the file ({type(e).__name__}); check that it is a "
                          f"{path.suffix} file") from None
    raise OptionError(f"{{label_noise}} {spec}: no array {spec.key!r} in the file (it has "
                      f"{', '.join(map(repr, keys)) or 'none'}); name one with #KEY")


def read_label_file(spec: LabelFile, num_train: int, num_classes: int, index_map: str | None = None
                    ) -> tuple[np.ndarray, str]:
    """The (num_train,) int64 training labels of ``spec`` and the sha256 of the label file and the map (a resumed run
    checks it). ``index_map`` is a ``.npy`` of ``num_train`` row indices into the file. Every problem (length, dtype,
    range, key, a missing map) is one ``OptionError`` naming the fix."""
    labels = _load_array(spec)
    digest = hashlib.sha256(Path(spec.path).expanduser().read_bytes())
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise OptionError(f"{{label_noise}} {spec}: labels must be a 1-d integer array (got {labels.dtype} of shape "
                          f"{tuple(labels.shape)}); save class indices, e.g. np.save(path, y.astype(np.int64))")
    if index_map:
        map_path = Path(index_map).expanduser()
        if map_path.suffix != ".npy" or not map_path.is_file():
            raise OptionError(f"{{label_index_map}} {index_map}: not a .npy file; give the .npy of each training "
                              "index's row in the label file")
        rows = np.load(map_path, allow_pickle=False)
        digest.update(map_path.read_bytes())
        if rows.shape != (num_train,) or not np.issubdtype(rows.dtype, np.integer):
            raise OptionError(f"{{label_index_map}} {index_map}: needs {num_train} integer rows, one per training "
                              f"image (got {rows.dtype} of shape {tuple(rows.shape)}); save one row per training image")
        if rows.size and (rows.min() < 0 or rows.max() >= len(labels)):
            raise OptionError(f"{{label_index_map}} {index_map}: rows must be in 0..{len(labels) - 1}, the label "
                              f"file's length (got {rows.min()}..{rows.max()}); is the map for this file?")
        labels = labels[rows]
    elif len(labels) != num_train:
        hint = ("give --label-index-map MAP.npy with each training image's row in the file" if len(labels) > num_train
                else "it must hold one label per training image")
        raise OptionError(f"{{label_noise}} {spec}: {len(labels)} labels for {num_train} training images; {hint}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise OptionError(f"{{label_noise}} {spec}: labels must be in 0..{num_classes - 1} (got "
                          f"{labels.min()}..{labels.max()}); is the file for this data set?")
    return labels, digest.hexdigest()
