"""Per-token selection for language models (Lin et al. 2024, "Rho-1: Not All Tokens Are What You Need"): train on a
share of each batch's tokens, chosen by their loss (``loss``) or by their excess loss over a reference model
(``excess``, Rho-1's rule: loss under the model minus loss under the reference, a model trained beforehand).

Each step scores every token of the batch without a graph and without moving a buffer: the head's input from one
forward, then the per-token loss from the LM head op (:func:`dynbatch.ops.lm_head_scores`, never the B x T x V
logits); the reference's loss the same way. The top ``token_share`` of the batch's tokens by the rule are kept
(ties to the lower index); the others' targets become ``ignore_index``, so a sequence's loss is its kept tokens'
sum over T, and each sequence weighs 1 / share: the step's loss is the mean over the kept tokens, as Rho-1 trains
(a loss scale, not a learning-rate scale, so adaptive optimizers see it alike).

Own-loop component
------------------
::

    pick = TokenSelection(model, share=0.6, reference=ref_model)   # rule "excess" with a reference
    y_kept = pick.select(x, y)                                       # (B, T): unchosen targets -100
    loss = F.cross_entropy(model(x).flatten(0, 1), y_kept.flatten()) # the mean over the kept tokens
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from dynbatch.errors import UserError
from dynbatch.methods.base import ForwardStep, LastLayerForward, Plan, Policy, StepContext
from dynbatch.ops import lm_head_scores
from dynbatch.options import OptionError, check_fields, one_of, option, with_overrides, within

IGNORE = -100


@dataclass
class TokenSelectionOptions:
    token_share: float = option(0.6, "share of each batch's tokens trained on (Rho-1's k%)",
                                check=within("(0, 1]", lambda v: 0 < v <= 1, "e.g. 0.6"))
    token_rule: str = option("loss", "loss (the highest losses) or excess (loss minus a reference model's, Rho-1)",
                             check=one_of("loss", "excess", hint="loss needs no reference"))
    token_reference: str = option("", "with --token-rule excess: a finished run folder of the same model and "
                                  "text (its checkpoint is the reference)")

    def validate(self) -> None:
        check_fields(self)
        if (self.token_rule == "excess") != bool(self.token_reference):
            raise OptionError("{token_rule} excess needs {token_reference} RUN (a trained reference), and only it "
                              "does; give both, or use {token_rule} loss without a reference")


def token_losses(scorer: LastLayerForward, x: torch.Tensor, y: torch.Tensor, autocast=nullcontext) -> torch.Tensor:
    """Each token's loss under ``scorer``'s model, fp32 (B, T): one forward for the head's input, then the LM
    head op (no logits kept)."""
    _, features = scorer.forward(x, autocast=autocast)
    head = scorer.head
    return lm_head_scores(features.detach(), head.weight.detach(), y,
                          None if head.bias is None else head.bias.detach()).loss.view(y.shape)


def keep_top(score: torch.Tensor, y: torch.Tensor, share: float) -> tuple[torch.Tensor, int]:
    """(targets (B, T) with all but the top ``share`` of ``score``'s tokens set to ``IGNORE``, how many kept)."""
    k = max(1, round(share * score.numel()))
    kept = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    kept[torch.topk(score.flatten(), k, sorted=False).indices] = True
    return torch.where(kept.view(y.shape), y, torch.full_like(y, IGNORE)), k


class TokenSelection:
    """Per-token selection inside your own loop (see the module docstring)."""

    def __init__(self, model: nn.Module | None = None, *, reference: nn.Module | None = None,
                 options: TokenSelectionOptions | dict | None = None, **overrides):
        if reference is not None and "token_reference" not in overrides:
            overrides.update(token_rule="excess", token_reference="<own loop>")
        self.options = with_overrides(TokenSelectionOptions, options, overrides)
        self.scorer = LastLayerForward(model)
        self.reference = LastLayerForward(reference) if reference is not None else None

    def select(self, x: torch.Tensor, y: torch.Tensor, *, autocast=nullcontext) -> torch.Tensor:
        """Targets (B, T) with the unchosen tokens ``IGNORE``; no host read."""
        return self.select_with_count(x, y, autocast=autocast)[0]

    def select_with_count(self, x, y, *, autocast=nullcontext) -> tuple[torch.Tensor, int]:
        score = token_losses(self.scorer, x, y, autocast)
        if self.reference is not None:
            score = score - token_losses(self.reference, x, y, autocast)
        return keep_top(score, y, self.options.token_share)


class TokenSelectionPolicy(Policy):
    name = "token-selection"
    help = "language models: train on a share of each batch's tokens, by loss or excess loss (Rho-1)"
    default_batch_size = 32
    options_type = TokenSelectionOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        self.selector: TokenSelection | None = None

    def attach(self, ctx: StepContext) -> None:
        o = self.options
        if self.config is not None and not self.config.data.startswith("text:"):
            raise UserError("--policy token-selection selects the tokens of sequences; give --data text:PATH "
                            "and --model gpt")
        reference = None
        if o.token_rule == "excess":
            reference = ctx.make_model(self.config.model, o.token_reference).eval()
            for p in reference.parameters():
                p.requires_grad_(False)
        self.selector = TokenSelection(ctx.module, reference=reference, options=o)

    def plan(self, x, y, ctx: StepContext) -> Plan:
        y_kept, kept = self.selector.select_with_count(x, y, autocast=ctx.autocast)
        share = kept / y.numel()
        record = {"kept_tokens": kept, "kept_token_share": share}
        # each sequence's loss is its kept tokens' sum over T; weights 1 / share make the step's loss their mean
        weight = torch.full((y.shape[0],), 1.0 / share, device=y.device)
        return Plan([ForwardStep(x, y_kept, sample_weight=weight, mean_over_count=True)], record)
