"""EDBA (Efficient Dynamic Batch Adaptation): train on the subset whose mean last-layer gradient best follows the
loss trend, and adapt the batch size.

One step:
1. Forward the loader batch once, capturing the final ``nn.Linear``'s input (a forward hook), without moving any
   buffer (BatchNorm running statistics are restored) and without a graph.
2. Draw ``--subsets`` random subsets from a per-step seed and score each by the norm G_S of its mean last-layer
   gradient (``dynbatch.selection``; fused kernels, no per-sample gradient materialised).
3. Choose the subset minimising the margin loss |(L - L_ema) / (G_S - G_ema) - 1|, where L is the batch loss.
   The first step has no EMAs and takes the largest subset. Then update both EMAs (decay ``--ema-decay``).
4. Train one usual step on the chosen samples: a fresh forward and backward on them alone (the paper's method).
   With ``--reuse-forward`` the step-1 forward keeps its graph and the loss is masked to the chosen samples instead:
   one forward fewer, but BatchNorm then normalises with statistics of the whole loader batch, and its running
   statistics are updated from the whole batch.

Under DDP (``torchrun``) every rank forwards its share, gathers the residual inputs of the whole global batch
(logits and last-layer inputs: B x (C + D) values), selects with the shared seed (so every rank picks the same
subset, which is checked), and trains on its own part of it; the executor weights the ranks' losses by the global
subset size. A rank holding none of the chosen samples contributes a zero-weight sample.

Batch-size rule (the paper only says: smaller while the loss is high, larger once it is low). The statistic is
the loss-trend term of the margin loss, r = (L - L_ema) / L_ema, taken before the EMA update:
r > ``--shrink-above`` (loss above its trend) divides the next batch by ``--bs-factor``; r < -``--grow-below``
(loss below its trend) multiplies it; within [``--bs-min``, ``--bs-max``] (10, 1000), starting at ``--batch-size``
(100). Defaults: factor 1.1, thresholds 0.05 (above the step-to-step noise of a 100-sample loss).
"""
from __future__ import annotations

import math
import time

import torch

from dynbatch.errors import RunFailure, UserError
from dynbatch.models import final_linear
from dynbatch.policies.base import Plan, Policy, StepContext, TrainStep
from dynbatch.train.buffers import preserved_buffers

MAX_SUBSETS = 65536


class EDBAPolicy(Policy):
    name = "edba"
    help = "EDBA: train on the random subset whose last-layer gradient best follows the loss trend"
    optimizer_defaults = {"lr": 0.001, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-5}
    default_batch_size = 100

    @classmethod
    def add_arguments(cls, g):
        g.add_argument("--subsets", type=int, default=4096, help=f"random subsets scored per step (1..{MAX_SUBSETS})")
        g.add_argument("--subset-mode", default="bernoulli", help="bernoulli (each sample in with p) or uniform_size")
        g.add_argument("--subset-p", type=float, default=0.5, help="inclusion probability for bernoulli subsets")
        g.add_argument("--ema-decay", type=float, default=0.9, help="decay of the loss and gradient-norm EMAs")
        g.add_argument("--margin-eps", type=float, default=1e-8, help="floor of |G_S - G_ema| in the margin")
        g.add_argument("--reuse-forward", action="store_true", help="one forward per step, loss masked to the subset")
        g.add_argument("--bs-min", type=int, default=10, help="smallest loader batch the batch-size rule may set")
        g.add_argument("--bs-max", type=int, default=1000, help="largest loader batch the batch-size rule may set")
        g.add_argument("--bs-factor", type=float, default=1.1, help="batch-size change factor (> 1)")
        g.add_argument("--grow-below", type=float, default=0.05, help="grow when (L - L_ema)/L_ema < -this")
        g.add_argument("--shrink-above", type=float, default=0.05, help="shrink when (L - L_ema)/L_ema > this")
        g.add_argument("--selection-backend", default="auto", help="auto, torch, native, triton")

    @classmethod
    def validate(cls, o):
        if not 1 <= o["subsets"] <= MAX_SUBSETS:
            raise UserError(f"--subsets must be in 1..{MAX_SUBSETS} (got {o['subsets']}); e.g. 4096")
        if o["subset_mode"] not in ("bernoulli", "uniform_size"):
            raise UserError(f"--subset-mode must be bernoulli or uniform_size (got {o['subset_mode']!r}); "
                            "bernoulli is the default")
        if not 0 < o["subset_p"] <= 1:
            raise UserError(f"--subset-p must be in (0, 1] (got {o['subset_p']}); e.g. 0.5")
        if not 0 <= o["ema_decay"] < 1:
            raise UserError(f"--ema-decay must be in [0, 1) (got {o['ema_decay']}); e.g. 0.9")
        if not 1 <= o["bs_min"] <= o["bs_max"]:
            raise UserError(f"need 1 <= --bs-min <= --bs-max (got {o['bs_min']}, {o['bs_max']}); e.g. 10 and 1000")
        if o["bs_factor"] <= 1:
            raise UserError(f"--bs-factor must be above 1 (got {o['bs_factor']}); e.g. 1.1")
        if o["margin_eps"] <= 0:
            raise UserError(f"--margin-eps must be positive (got {o['margin_eps']}); e.g. 1e-8")
        for k in ("grow_below", "shrink_above"):
            if o[k] < 0:
                raise UserError(f"--{k.replace('_', '-')} must be non-negative (got {o[k]}); e.g. 0.05")
        if o["selection_backend"] not in ("auto", "torch", "native", "triton"):
            raise UserError(f"--selection-backend must be auto, torch, native or triton (got "
                            f"{o['selection_backend']!r}); auto picks the fastest usable one")

    def __init__(self, options, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        o = options
        self.current = min(max(batch_size, o["bs_min"]), o["bs_max"])
        self.loss_ema: float | None = None
        self.grad_ema: float | None = None

    def batch_size(self) -> int:
        return self.current

    def next_batch_size(self, loss: float) -> int:
        """The rule in the module docstring, from the batch loss of this step (EMA not yet updated)."""
        o = self.options
        if self.loss_ema is None or self.loss_ema <= 0:
            return self.current
        r = (loss - self.loss_ema) / self.loss_ema
        if r > o["shrink_above"]:
            return max(o["bs_min"], min(self.current - 1, round(self.current / o["bs_factor"])))
        if r < -o["grow_below"]:
            return min(o["bs_max"], max(self.current + 1, round(self.current * o["bs_factor"])))
        return self.current

    def _selection_forward(self, model, x, ctx: StepContext, keep_graph: bool):
        head = final_linear(model)
        captured = {}
        hook = head.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", inp[0]))
        try:
            with torch.set_grad_enabled(keep_graph), ctx.autocast():
                logits = model(x)
        finally:
            hook.remove()
        return logits, captured["h"], head.bias is not None

    def plan(self, x, y, ctx: StepContext) -> Plan:
        from dynbatch.selection import select_subset

        o = self.options
        d = ctx.dist
        t0 = time.perf_counter()
        xl, yl = d.local(x), d.local(y)
        if o["reuse_forward"]:  # the training forward itself: through the DDP wrapper, which syncs gradients
            logits, feats, bias = self._selection_forward(ctx.model, xl, ctx, keep_graph=True)
        else:  # no graph, no buffer change, no collective: the unwrapped module
            with preserved_buffers(ctx.raw_model):
                logits, feats, bias = self._selection_forward(ctx.raw_model, xl, ctx, keep_graph=False)
        losses = ctx.loss_fn(logits.float(), yl)
        # One selection precision on one rank and on many: fp32 inputs (bf16 autocast outputs are upcast before any
        # gather), and one loss formula, so the same data chooses the same subset whatever the number of ranks.
        g_logits, g_feats = logits.detach().float(), feats.detach().float()
        if d.enabled:
            g_logits, g_feats = d.all_gather_rows(g_logits), d.all_gather_rows(g_feats)
        loss = float(d.all_reduce_sum(losses.detach().sum().reshape(1))[0]) / y.shape[0]
        sel = select_subset(
            g_logits, y, g_feats, num_subsets=o["subsets"], seed=(ctx.seed << 32) + ctx.step,
            loss=loss, loss_ema=self.loss_ema, grad_ema=self.grad_ema, mode=o["subset_mode"], p=o["subset_p"],
            backend=o["selection_backend"], bias=bias, label_smoothing=ctx.label_smoothing, eps=o["margin_eps"],
        )
        grad_norm, margin = float(sel.grad_norm), float(sel.margin)  # float() waits for the device
        if math.isfinite(loss) and not math.isfinite(grad_norm):
            # Non-finite subset norms map to the largest margin, so a NaN would otherwise be chosen only silently,
            # when every subset is NaN; with a finite loss that is a kernel fault, not a divergence.
            raise RunFailure(f"EDBA's selection gave a non-finite gradient norm at step {ctx.step} although the loss "
                             f"is finite (backend {o['selection_backend']}); rerun with --selection-backend torch "
                             "and report it")
        if d.enabled:  # an invariant worth one tiny collective: every rank chose the same subset
            chosen = d.gather_objects(int(sel.index))
            if len(set(chosen)) != 1:
                raise RuntimeError(f"EDBA ranks chose different subsets {chosen}: selection must be deterministic")
        selection_s = time.perf_counter() - t0
        record = {"batch_loss": loss, "chosen_size": int(sel.size), "subset_index": int(sel.index),
                  "grad_norm": grad_norm, "margin": margin, "loss_ema": self.loss_ema, "grad_ema": self.grad_ema,
                  "selection_s": selection_s}
        # EMAs and batch size move after the choice, as in the paper. A non-finite step (whose update the executor
        # skips) must not poison the EMAs for the rest of the run.
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        nxt = self.next_batch_size(loss) if finite else self.current
        beta = o["ema_decay"]
        if not finite:
            pass
        elif self.loss_ema is None:
            self.loss_ema, self.grad_ema = loss, grad_norm
        else:
            self.loss_ema = beta * self.loss_ema + (1 - beta) * loss
            self.grad_ema = beta * self.grad_ema + (1 - beta) * grad_norm
        self.current = nxt
        record["next_batch_size"] = nxt
        mask = sel.mask[d.share(y.shape[0])]
        empty = d.enabled and not bool(mask.any())
        if empty:  # this rank holds none of the chosen samples: one sample at weight 0 keeps DDP in step
            mask = torch.zeros_like(mask)
            mask[0] = True
        weight = torch.zeros(1, device=x.device) if empty else None
        if o["reuse_forward"]:
            step = TrainStep(x=None, y=yl[mask], reuse_losses=losses[mask], reuse_logits=logits[mask].detach(),
                             sample_weight=weight)
        else:
            step = TrainStep(xl[mask], yl[mask], sample_weight=weight)
        return Plan([step], record)

    def state_dict(self):
        return {"current": self.current, "loss_ema": self.loss_ema, "grad_ema": self.grad_ema}

    def load_state_dict(self, state):
        self.current, self.loss_ema, self.grad_ema = state["current"], state["loss_ema"], state["grad_ema"]
