"""``dynbatch::sample_scores``: each sample's last-layer scores against its batch, fp32 (K, B), one row per name in
:data:`SCORES` (the class rows only with ``by_class``), and :class:`Scores`, the rows by name."""
from __future__ import annotations

import torch

from dynbatch.errors import UserError
from dynbatch.ops import library
from dynbatch_kernels import reference as _reference

SCHEMA = f"({library.HEAD}, bool by_class) -> Tensor"
Args = library.args_type("sample_scores", SCHEMA)
SCORES = _reference.SCORES + _reference.CLASS_SCORES


def torch_impl(a):
    return _reference.sample_scores(a.logits, a.targets, a.features, bias=a.bias, label_smoothing=a.label_smoothing,
                                    by_class=a.by_class)


def triton_impl(a):
    from dynbatch_kernels.sample_scores import sample_scores as launch

    return launch(a)


def fake(a):
    library.check_head(a)
    rows = len(_reference.SCORES) + len(_reference.CLASS_SCORES) * a.by_class
    return a.logits.new_empty(rows, a.logits.shape[0], dtype=torch.float32)


OP = library.define("sample_scores", SCHEMA, Args, reference=torch_impl, triton=triton_impl, fake=fake)


class Scores:
    """Each sample's scores against its batch, on the device: ``table`` fp32 (K, B), one row per name in
    ``names`` (:data:`SCORES`, the class rows only when asked for), each row also an attribute::

        s = sample_scores(logits, y, features, by_class=True)
        s.loss, s.residual_norm, s.grad_norm, s.agreement, s.consensus, s.class_agreement, s.class_consensus

    - ``loss``: cross-entropy against the (smoothed) target;
    - ``residual_norm``: ||e_i||, e_i = softmax(z_i) - t_i (EL2N; Katharopoulos & Fleuret's upper bound);
    - ``grad_norm``: ||g_i|| = ||e_i|| ||a_i||, the last layer's per-sample gradient norm, a_i = [h_i, 1];
    - ``agreement``: r_i = <g_i, G>, G the batch's summed last-layer gradient;
    - ``consensus``: cos(g_i, G - g_i), in [-1, 1]; 0 for a zero gradient or a sample alone;
    - ``class_*``: the same against G_k, the sum over the samples of i's own class.
    """

    __slots__ = ("table", "names")

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.names = SCORES[:table.shape[0]]

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in SCORES:
            if name not in self.names:
                raise UserError(f"{name} needs the class scores; call sample_scores(..., by_class=True)")
            return self.table[self.names.index(name)]
        raise AttributeError(name)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.table))


def sample_scores(logits, targets, features, *, bias=True, label_smoothing=0.0, by_class=False,
                  backend="auto") -> Scores:
    """Each sample's last-layer scores against its batch (see :class:`Scores`), in one pass over the head: the
    residuals, one C x (D + bias) product, one bilinear pass (and with ``by_class`` a class-masked one); fp32
    accumulation whatever the inputs' dtype; nothing of size B x C(D + 1) is allocated."""
    head = library.head(logits, targets, features, bias, label_smoothing)
    return Scores(library.call(OP, Args(*head, bool(by_class)), backend))
