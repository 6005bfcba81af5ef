"""Proxy filtering (Keller Jordan's airbench96_faster, the CIFAR-10 speedrun record at 96 %): a small proxy network
scores every batch by its loss, the main network trains on the highest-loss share of it.

Per loader batch of B samples:

- the proxy (default ``airbench-proxy``: the airbench net at widths 32/64/64) forwards the whole batch; its
  per-sample losses, label smoothing ``proxy_smoothing`` (0.2), rank the samples;
- the main network trains on the ``k = round(proxy_keep * B)`` highest, at the recipe's rate for k samples (in the
  decoupled form, a summed loss: ``--batch-size 256 --proxy-keep 0.5`` steps as fixed does at 128, half as often);
- every ``proxy_every``-th batch (4) the proxy takes a step on its own kept half, at the run's scheduled rate, with
  an optimizer of the run's settings: it learns online from the same seeded stream, no pre-run needed. The pre-run
  form: ``proxy_from`` starts it from a finished run's weights (a run of ``--model <proxy_model>``), and
  ``proxy_every 0`` keeps it frozen.

On CUDA all of the proxy's work (forward, backward, step) runs on one side stream: the main stream waits only for
its forward (the rows need its losses), so its backward and step run beside the main network's step, and its next
forward follows them on the same stream. On the CPU they run in turn and compute the same numbers.
The proxy's weights, BatchNorm statistics and optimizer are part of the checkpoint: a resumed run continues exactly.
Under DDP every rank runs the proxy on the whole global batch (it is small), so all ranks keep the same samples and
hold the same proxy without a collective; each trains the main network on its share of the kept rows.

Own-loop component
------------------
::

    proxy = ProxyFilter(small_net, torch.optim.SGD(small_net.parameters(), lr=0.1), proxy_keep=0.5, proxy_every=4)
    for step, (x, y) in enumerate(loader):
        rows = proxy.select(x, y, step, lr=0.1)      # int64 (k,): the proxy's highest-loss rows; trains the proxy
        F.cross_entropy(model(x[rows]), y[rows]).backward()
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynbatch.methods.base import ForwardStep, Plan, Policy, StepContext, sample_cross_entropy
from dynbatch.options import check_fields, non_negative, option, with_overrides, within


@dataclass
class ProxyOptions:
    proxy_model: str = option("airbench-proxy", "the proxy network, any model by name (airbench-proxy: the airbench "
                              "net at widths 32/64/64)")
    proxy_keep: float = option(0.5, "share of each batch the main network trains on, by highest proxy loss",
                               check=within("(0, 1]", lambda v: 0 < v <= 1, "e.g. 0.5 (airbench96_faster's)"))
    proxy_every: int = option(4, "the proxy takes a step every N-th batch (0: a frozen proxy, with --proxy-from)",
                              check=non_negative("e.g. 4, or 0 for a frozen proxy"))
    proxy_smoothing: float = option(0.2, "label smoothing of the proxy's loss (its scores and its steps)",
                                    check=within("[0, 1)", lambda v: 0 <= v < 1, "e.g. 0.2"))
    proxy_from: str | None = option(None, "start the proxy from a finished run's weights (a run folder of "
                                    "--model <proxy_model>): airbench96_faster's pre-run form")

    def validate(self) -> None:
        check_fields(self)


def kept_count(batch: int, keep: float) -> int:
    """How many of a batch of ``batch`` the main network trains on: max(1, round(keep * batch))."""
    return max(1, round(keep * batch))


def hardest_rows(losses: torch.Tensor, keep: float) -> torch.Tensor:
    """Int64 (k,) rows of the :func:`kept_count` highest of ``losses`` (B,); k is known on the host (no read)."""
    return torch.topk(losses.detach(), kept_count(losses.shape[0], keep), sorted=False).indices


class ProxyFilter:
    """The proxy in your own loop (see the module docstring): ``model`` and its ``optimizer``, both yours."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, options: ProxyOptions | dict
                 | None = None, **overrides):
        self.options = with_overrides(ProxyOptions, options, overrides)
        self.model, self.optimizer = model, optimizer
        self._side: Any = None  # the CUDA stream all of the proxy's work runs on (made at the first CUDA batch)

    def trains_at(self, step: int) -> bool:
        """Whether batch ``step`` (0-based) gives the proxy a step: the last of every ``proxy_every``."""
        every = self.options.proxy_every
        return every > 0 and self.optimizer is not None and step % every == every - 1

    def losses(self, x: torch.Tensor, y: torch.Tensor, graph: bool, autocast=None) -> torch.Tensor:
        """The proxy's per-sample losses (B,) fp32 on x (B, ...), y (B,), with the graph when ``graph``."""
        with torch.set_grad_enabled(graph), (autocast or nullcontext)():
            logits = self.model(x)
        return sample_cross_entropy(logits.float(), y, self.options.proxy_smoothing)  # a sequence: its tokens' mean

    def _on_side(self, device: torch.device):
        """A context running its work on the side stream after the main stream's work so far (CUDA), or in turn."""
        if device.type != "cuda":
            return nullcontext()
        if self._side is None:
            self._side = torch.cuda.Stream(device)
        self._side.wait_stream(torch.cuda.current_stream(device))  # its inputs come from the main stream
        return torch.cuda.stream(self._side)

    def select(self, x: torch.Tensor, y: torch.Tensor, step: int, lr: float, autocast=None) -> torch.Tensor:
        """Rows int64 (k,) of the batch x (B, ...), y (B,) to train on; the proxy learns when :meth:`trains_at`.

        On CUDA the proxy's forward runs on the side stream, which the main stream waits for (the rows need its
        losses); its backward follows its forward's stream (autograd's rule) and its optimizer step is issued
        there, so both run beside the main network's step, and the next forward, on the same stream, after them."""
        train = self.trains_at(step)
        with self._on_side(x.device):
            losses = self.losses(x, y, train, autocast)
        if x.is_cuda:
            main = torch.cuda.current_stream(x.device)
            main.wait_stream(self._side)
            for t in (x, y):
                t.record_stream(self._side)  # read on the side stream: not to be reused before it is done
            losses.record_stream(main)  # made on the side stream, read on the main one
        rows = hardest_rows(losses, self.options.proxy_keep)
        if train:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_factor", 1.0)
            with self._on_side(x.device):
                losses[rows].mean().backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if x.is_cuda:
                rows.record_stream(self._side)
        self.last_loss = losses.detach().mean()
        return rows


class ProxyPolicy(Policy):
    name = "proxy"
    help = "proxy filtering (airbench96_faster): a small network's highest-loss share of each batch trains the model"
    options_type = ProxyOptions

    def attach(self, ctx: StepContext) -> None:
        o = self.options
        model = ctx.make_model(o.proxy_model, o.proxy_from)
        optimizer = ctx.make_optimizer(model) if o.proxy_every > 0 else None
        self.filter = ProxyFilter(model, optimizer, o)

    def plan(self, x, y, ctx: StepContext) -> Plan:
        k = kept_count(x.shape[0], self.options.proxy_keep)
        rate = ctx.lr * self.part_lr_scale(k)  # the proxy steps at the main step's rate
        rows, d = self.filter.select(x, y, ctx.step, rate, ctx.autocast), ctx.dist
        xl, yl = d.local(x[rows]), d.local(y[rows])
        step = ForwardStep(xl, yl, lr_scale=self.part_lr_scale(k), rows=d.local(rows))
        return Plan([step], {"kept": k, "proxy_loss": self.filter.last_loss})

    def state_dict(self) -> dict[str, Any]:
        f = self.filter
        return {"model": f.model.state_dict(), "optimizer": f.optimizer.state_dict() if f.optimizer else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.filter.model.load_state_dict(state["model"])
        if self.filter.optimizer is not None and state.get("optimizer") is not None:
            self.filter.optimizer.load_state_dict(state["optimizer"])
