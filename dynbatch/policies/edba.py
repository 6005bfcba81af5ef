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

The selection, the EMAs and the batch-size rule are ``dynbatch.selectors.EDBASelector``'s (the same object a
researcher uses in their own loop); this policy adds what the trainer needs around it: DDP gathering, the
``--reuse-forward`` variant, the plan and the step record.
"""
from __future__ import annotations

import time

import torch

from dynbatch.policies.base import ForwardStep, Plan, Policy, ReuseStep, StepContext
from dynbatch.selectors.edba import EDBAOptions, EDBASelector, capture_last_layer, chosen_rows


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, without a dispatch when it already is (this runs on every step)."""
    return t if t.dtype == torch.float32 else t.float()


class EDBAPolicy(Policy):
    name = "edba"
    help = "EDBA: train on the random subset whose last-layer gradient best follows the loss trend"
    optimizer_defaults = {"lr": 0.001, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-5}
    default_batch_size = 100
    options_type = EDBAOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        # The model is bound at the first step; the seed is the run's (subsets are seeded by (seed, step)).
        self.selector = EDBASelector(None, batch_size=batch_size, seed=config.seed if config else 0,
                                     options=self.options)

    def batch_size(self) -> int:
        return self.selector.batch_size

    def plan(self, x, y, ctx: StepContext) -> Plan:
        o, d, selector = self.options, ctx.dist, self.selector
        if selector.model is None:
            selector.model = ctx.module
        selector.seed = ctx.seed
        t0 = time.perf_counter()
        xl, yl = d.local(x), d.local(y)
        if o.reuse_forward:  # the training forward itself: through the DDP wrapper, which syncs gradients
            logits, feats = capture_last_layer(ctx.model, selector.head, xl, keep_graph=True, autocast=ctx.autocast)
        else:  # no graph, no buffer change, no collective: the unwrapped module
            logits, feats = selector.forward(xl, autocast=ctx.autocast)
        losses = ctx.loss_fn(_fp32(logits), yl)
        g_logits, g_feats = _fp32(logits.detach()), _fp32(feats.detach())
        if d.enabled:  # the whole global batch on every rank, so every rank selects the same subset
            g_logits, g_feats = d.all_gather_rows(g_logits), d.all_gather_rows(g_feats)
        loss = d.all_reduce_sum(losses.detach().sum().reshape(1))[0] / y.shape[0]  # stays on the device
        before = selector.state
        sel = selector.select_from(g_logits, y, g_feats, loss, step=ctx.step, label_smoothing=ctx.label_smoothing)
        c = selector.last  # the selection's one read
        if d.enabled:  # an invariant worth one tiny collective: every rank chose the same subset
            chosen = d.gather_objects(c.index)
            if len(set(chosen)) != 1:
                raise RuntimeError(f"EDBA ranks chose different subsets {chosen}: selection must be deterministic")
        record = {"batch_loss": c.loss, "chosen_size": c.size, "subset_index": c.index, "grad_norm": c.grad_norm,
                  "margin": c.margin, "loss_ema": before.loss_ema, "grad_ema": before.grad_ema,
                  "selection_s": time.perf_counter() - t0, "next_batch_size": selector.batch_size}
        weight = None
        if d.enabled:
            mask = sel.mask[d.share(y.shape[0])]
            if not bool(mask.any()):  # this rank holds none of the chosen samples: one at weight 0 keeps DDP in step
                mask = torch.zeros_like(mask)
                mask[0] = True
                weight = torch.zeros(1, device=x.device)
            rows = chosen_rows(mask, int(mask.sum()))
        else:
            rows = chosen_rows(sel.mask, c.size)  # the size is known from the one read: no sync to index
        if o.reuse_forward:
            step = ReuseStep(losses[rows], logits[rows].detach(), yl[rows], sample_weight=weight)
        else:
            step = ForwardStep(xl[rows], yl[rows], sample_weight=weight)
        return Plan([step], record)

    def state_dict(self):
        return self.selector.state_dict()

    def load_state_dict(self, state):
        self.selector.load_state_dict(state)
