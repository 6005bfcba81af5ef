"""A small GPT for ``--data text:PATH``: token and position embeddings, pre-norm blocks of causal self-attention
and a 4x MLP, a final LayerNorm and the head ``lm_head`` (V, D) without bias, untied from the embedding (so the
head's gradient is the whole gradient of its weight, which the LM head ops score)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Tokens (B, T) int64 -> logits (B, T, V); ``features(tokens)`` the head's input (B, T, D)."""

    def __init__(self, vocab: int, context: int, layers: int = 4, width: int = 128, heads: int = 4):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tokens(tokens) + self.positions(torch.arange(t, device=tokens.device))
        return self.norm(self.blocks(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.features(tokens))


def gpt(num_classes: int, in_channels: int, *, context: int = 128, layers: int = 4, width: int = 128,
        heads: int = 4) -> GPT:
    """The model factory's form: ``num_classes`` is the vocabulary; a token model has no channels."""
    if width % heads:
        raise ValueError(f"--gpt-width {width} must be a multiple of --gpt-heads {heads}; give e.g. --gpt-width "
                         f"{heads * max(1, width // heads)}")
    return GPT(num_classes, context, layers, width, heads)
