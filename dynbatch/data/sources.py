"""Data sets by name, loaded to host memory as uint8 NHWC arrays with integer labels.

Names: ``digits`` (scikit-learn's real 8x8 handwritten digits; offline, the embedded default), ``cifar10``,
``cifar100`` (torchvision; downloaded where reachable, or read from ``data_dir`` in torchvision's layout),
``npz:PATH`` (any file with ``x_train, y_train, x_test, y_test``) and ``imagefolder:PATH`` (torchvision
``ImageFolder`` trees ``train/`` and ``test/``, resized once).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynbatch.errors import UserError

# The largest class count accepted from labels or --num-classes: a linear head over more no longer fits a sensible
# memory budget (nor the selection kernels' tiles).
MAX_CLASSES = 100_000

# Channel statistics of the full CIFAR training sets (images scaled to [0, 1]).
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

DATASET_NAMES = ("digits", "cifar10", "cifar100", "npz:PATH", "imagefolder:PATH", "text:PATH")


@dataclass
class DataSource:
    """A whole data set in host memory.

    x_*: uint8 (N, H, W, C); y_*: int64 (N,); mean/std: per channel, for images scaled to [0, 1].
    crop_padding: pixels of padding for the random-crop (translation) augmentation, ``pad_mode`` zero, reflect or mean;
    flip: whether horizontal flips are valid, ``flip_mode`` how they are drawn (random, alternate).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    flip: bool = True
    pad_mode: str = "zero"
    flip_mode: str = "random"
    y_train_clean: np.ndarray | None = None  # the true training labels when y_train was corrupted (label noise)
    label_file_sha256: str | None = None  # of the label file (and index map) y_train was read from

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, h, w, c = self.x_train.shape
        return (c, h, w)


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(xf.std(0), 1e-3)  # a constant channel must not divide by zero
    return tuple(float(v) for v in xf.mean(0)), tuple(float(v) for v in std)


DIGITS = Path(__file__).with_name("digits.npz")


def _load_digits() -> DataSource:
    """scikit-learn's handwritten digits (the UCI optdigits test set, 1,797 images of 8 x 8), pixels 0..16 scaled to
    the full uint8 range so every data set shares one pipeline, split 1,437 / 360 as
    ``train_test_split(test_size=360, stratify=y, random_state=0)`` splits them: the same 360 test images everywhere.
    Shipped in the package (``digits.npz``, 48 kB; ``tests/test_data.py`` checks it against scikit-learn), so the
    default data set needs neither scikit-learn nor a network (a bare GPU image has neither)."""
    with np.load(DIGITS) as d:
        x_tr, y_tr, x_te, y_te = d["x_train"], d["y_train"].astype(np.int64), d["x_test"], d["y_test"].astype(np.int64)
    mean, std = _channel_stats(x_tr)
    # Digits are small and not mirror-symmetric: one pixel of crop jitter, no flips.
    return DataSource("digits", x_tr, y_tr, x_te, y_te, 10, mean, std, crop_padding=1, flip=False)


def _load_cifar(name: str, data_dir: str | None) -> DataSource:
    from torchvision import datasets

    cls, stats, k = {
        "cifar10": (datasets.CIFAR10, CIFAR10_STATS, 10),
        "cifar100": (datasets.CIFAR100, CIFAR100_STATS, 100),
    }[name]
    root = data_dir or os.environ.get("DYNBATCH_DATA", str(Path.home() / ".cache" / "dynbatch" / "data"))
    try:
        tr = cls(root=root, train=True, download=data_dir is None)
        te = cls(root=root, train=False, download=data_dir is None)
    except Exception as e:  # network errors, integrity check failures, missing folders
        raise UserError(
            f"cannot load {name} from {root} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"pass --data-dir with torchvision's {name} layout, or use npz:PATH"
        ) from None
    return DataSource(
        name, np.asarray(tr.data), np.asarray(tr.targets, dtype=np.int64), np.asarray(te.data),
        np.asarray(te.targets, dtype=np.int64), k, *stats,
    )


def _load_npz(path: str) -> DataSource:
    p = Path(path).expanduser()
    hint = "pass an .npz with uint8 NHWC arrays x_train, x_test and integer labels y_train, y_test"
    if not p.is_file():
        raise UserError(f"data file not found: {p}; {hint}")
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
            raise UserError(f"data file {p} is a single array, not an .npz archive of arrays; {hint}")
        with loaded as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise UserError(f"data file {p} lacks {', '.join(missing)}; {hint}")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"data file {p} is unreadable or corrupted ({type(e).__name__}); {hint}") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4:
            raise UserError(f"x_{split} in {p} is {x.dtype} with shape {x.shape}, expected uint8 (N, H, W, C); {hint}")
        if min(x.shape[1:]) < 1:
            raise UserError(f"x_{split} in {p} has images of shape {x.shape[1:]} (H, W, C); each needs at least one "
                            f"pixel and one channel; {hint}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"y_{split} in {p} must be integer labels, one per image of x_{split}; {hint}")
        if len(y) == 0:
            raise UserError(f"the {split} split in {p} is empty; {hint}")
        if y.min() < 0:
            raise UserError(f"y_{split} in {p} has negative labels; labels must be 0..num_classes-1")
        # Compared in the labels' own dtype: a uint64 label >= 2**63 would wrap negative as int64.
        if y.max() >= MAX_CLASSES:
            raise UserError(f"y_{split} in {p} has a label of {y.max()}, beyond the supported {MAX_CLASSES} classes; "
                            "labels must be 0..num_classes-1")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise UserError(f"train and test images in {p} differ in shape; {hint}")
    y_tr, y_te = arrays["y_train"].astype(np.int64), arrays["y_test"].astype(np.int64)
    k = int(max(y_tr.max(), y_te.max())) + 1
    mean, std = _channel_stats(arrays["x_train"])
    return DataSource(f"npz:{p}", arrays["x_train"], y_tr, arrays["x_test"], y_te, k, mean, std)


def _load_imagefolder(path: str, size: int) -> DataSource:
    """torchvision ``ImageFolder`` trees ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (or ``val``), each image
    resized to ``size`` x ``size`` RGB and stored as uint8 once, so the device-resident pipeline serves it."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder

    root = Path(path).expanduser()
    hint = "give a folder with train/<class>/<images> and test/<class>/<images> (or val/)"
    if not root.is_dir():
        raise UserError(f"image folder {root} not found; {hint}")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise UserError(f"image folder {root} lacks train/ or test/; {hint}")

    def load(folder: Path, classes: dict[str, int] | None):
        try:
            ds = ImageFolder(str(folder), transform=lambda im: np.asarray(
                im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8))
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"{folder} holds no readable images ({str(e).splitlines()[0]}); {hint}") from None
        if classes is not None and not set(ds.class_to_idx) <= set(classes):
            extra = sorted(set(ds.class_to_idx) - set(classes))
            raise UserError(f"{folder} has classes the training folder lacks ({', '.join(extra[:3])}); {hint}")
        mapping = classes or ds.class_to_idx
        xs, ys = [], []
        for i, (file, label) in enumerate(ds.samples):
            try:
                xs.append(ds[i][0])
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise UserError(f"cannot read image {file} ({type(e).__name__}); remove or replace it") from None
            ys.append(mapping[ds.classes[label]])
        return np.stack(xs), np.asarray(ys, dtype=np.int64), ds.class_to_idx

    x_tr, y_tr, classes = load(root / "train", None)
    x_te, y_te, _ = load(test_dir, classes)
    mean, std = _channel_stats(x_tr)
    return DataSource(f"imagefolder:{root}", x_tr, y_tr, x_te, y_te, len(classes), mean, std,
                      crop_padding=max(1, size // 8))


def load_dataset(spec: str, data_dir: str | None = None, num_classes: int | None = None,
                 image_size: int | None = None) -> DataSource:
    """Load a data set by name (see module docstring); ``num_classes`` overrides the inferred class count;
    ``image_size`` is the side images of an ``imagefolder:`` tree are resized to (default 32)."""
    if image_size is not None and not spec.startswith("imagefolder:"):
        raise UserError("--image-size applies to --data imagefolder:PATH only; drop it")
    if spec.startswith("imagefolder:") and len(spec) > 12:
        src = _load_imagefolder(spec[12:], image_size or 32)
    elif spec == "digits":
        src = _load_digits()
    elif spec in ("cifar10", "cifar100"):
        src = _load_cifar(spec, data_dir)
    elif spec.startswith("npz:") and len(spec) > 4:
        src = _load_npz(spec[4:])
    else:
        raise UserError(f"unknown data set {spec!r}; choose one of {', '.join(DATASET_NAMES)}")
    if num_classes is not None:
        top = int(max(src.y_train.max(), src.y_test.max()))
        if top >= num_classes:
            raise UserError(
                f"labels go up to {top} but the model has {num_classes} classes; raise --num-classes to at least {top + 1}"
            )
        src.num_classes = num_classes
    return src


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced, seeded subset of ``n`` samples (sorted).

    Each class gets ``n // K`` samples and ``n % K`` randomly chosen classes one more; a class with too few samples
    gives all it has and the shortfall is drawn from the remaining samples.
    """
    if not 1 <= n <= len(labels):
        raise UserError(f"--train-samples {n} is outside 1..{len(labels)} (the training split's size); give at most {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    quota = np.full(len(classes), n // len(classes))
    quota[rng.permutation(len(classes))[: n % len(classes)]] += 1
    chosen = []
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(labels == c)
        chosen.append(rng.permutation(idx)[:q])
    picked = np.concatenate(chosen)
    if len(picked) < n:
        rest = np.setdiff1d(np.arange(len(labels)), picked)
        picked = np.concatenate([picked, rng.permutation(rest)[: n - len(picked)]])
    return np.sort(picked)


VALIDATION_SEED = 0x5EED  # one validation split for every seed of a study: runs tuned on it are paired


def hold_out(src, n: int) -> None:
    """Make ``n`` class-balanced training images of ``src`` its evaluation split, in place; the test split is
    dropped, so nothing tuned on the run's rows has seen it. The normalisation statistics stay the full training
    split's (pixel means, no labels)."""
    if not 1 <= n < len(src.y_train):
        raise UserError(f"--validation {n} must leave training images: give 1..{len(src.y_train) - 1}")
    held = balanced_subset(src.y_train, n, VALIDATION_SEED)
    rest = np.setdiff1d(np.arange(len(src.y_train)), held)
    src.x_test, src.y_test = src.x_train[held], src.y_train[held]
    src.x_train, src.y_train = src.x_train[rest], src.y_train[rest]
