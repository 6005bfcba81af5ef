"""Text as training data: ``--data text:PATH``, a byte-level BPE tokenizer trained offline on the training split,
and the token stream cut into sequences of ``context`` + 1 tokens (input and next-token targets).

The split: a file of works marked by ``<<<name>>>`` lines (``../shared/data/shakespeare/``) is split by work —
validation = hamlet, macbeth, tempest, sonnets, as its README fixes it, when they are present, training = the rest;
any other file gives its last 10 % of lines to validation. The tokenizer (``tokenizers``' byte-level BPE, vocabulary
``vocab_size``) is trained on the training split alone and cached by the text's hash and the size
(``~/.cache/dynbatch/tokenizers``, or ``DYNBATCH_CACHE``), so every run of a corpus sees the same token ids.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynbatch.errors import UserError

VALIDATION_WORKS = ("hamlet", "macbeth", "tempest", "sonnets")  # the Shakespeare corpus README's validation split
SPECIAL = "<|endoftext|>"


@dataclass
class TextSource:
    """A tokenized corpus in host memory: x_* int64 (N, T) inputs and y_* (N, T) their next tokens, sequences of
    ``context`` tokens that do not overlap; ``num_classes`` the vocabulary size V."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    context: int
    tokenizer: str  # the tokenizer file's path
    y_train_clean = None  # label noise does not apply to text
    label_file_sha256 = None

    @property
    def image_shape(self) -> tuple[int]:
        """(T,): one sample's shape."""
        return (self.context,)


class TokenSplit:
    """Sequences resident on the device: x, y int64 (N, T); ``batch(idx)`` indexes them (text has no augmentation)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device):
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        self.y = torch.from_numpy(np.ascontiguousarray(y)).to(device)
        self.y_clean = self.mislabeled = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: torch.Tensor, generator=None, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, T) and next-token targets (B, T) int64 for indices ``idx``."""
        idx = idx.to(self.x.device, non_blocking=True)
        return self.x[idx], self.y[idx]


def split_text(text: str) -> tuple[str, str]:
    """(training text, validation text): by work where the file marks its works, else its last 10 % of lines."""
    parts = re.split(r"^<<<([^>\n]+)>>>\n", text, flags=re.M)
    works = dict(zip(parts[1::2], parts[2::2]))
    if all(w in works for w in VALIDATION_WORKS):
        return ("".join(t for n, t in works.items() if n not in VALIDATION_WORKS),
                "".join(works[n] for n in VALIDATION_WORKS))
    lines = text.splitlines(keepends=True)
    cut = max(1, int(len(lines) * 0.9))
    if cut >= len(lines):
        raise UserError("the text file is too short to hold a validation split; give a longer text")
    return "".join(lines[:cut]), "".join(lines[cut:])


def _cache_dir() -> Path:
    return Path(os.environ.get("DYNBATCH_CACHE", Path.home() / ".cache" / "dynbatch")) / "tokenizers"


def train_tokenizer(train_text: str, vocab_size: int):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``train_text``, cached; (tokenizer, path)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError("text data needs the tokenizers package: pip install 'dynbatch[lm]'") from None
    key = hashlib.sha256(train_text.encode()).hexdigest()[:16]
    path = _cache_dir() / f"bpe-{key}-{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path)), path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_text.splitlines(keepends=True), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: parallel runs of one corpus write the same file
    return tok, path


def _sequences(ids: list[int], context: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(ids, dtype=np.int64)
    n = (len(a) - 1) // context
    if n < 1:
        raise UserError(f"the text holds {len(a)} tokens, fewer than one sequence of --context {context} + 1")
    return a[:n * context].reshape(n, context), a[1:n * context + 1].reshape(n, context)


def load_text(path: str, vocab_size: int, context: int) -> TextSource:
    """The corpus at ``path`` tokenized (see the module's docstring)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--data text:{path}: no such file; give a plain-text file, e.g. "
                        "text:../shared/data/shakespeare/shakespeare.txt")
    if vocab_size < 257:
        raise UserError(f"--vocab-size {vocab_size} is below the 256 bytes plus one; give e.g. 2048")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--data text:{path} is not UTF-8 text; convert it or give another file") from None
    train, val = split_text(text)
    tok, tok_path = train_tokenizer(train, vocab_size)
    x_tr, y_tr = _sequences(tok.encode(train).ids, context)
    x_te, y_te = _sequences(tok.encode(val).ids, context)
    return TextSource(f"text:{p.name}", x_tr, y_tr, x_te, y_te, tok.get_vocab_size(), context, str(tok_path))
