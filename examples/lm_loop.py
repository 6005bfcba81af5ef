"""A small GPT on a text in a plain loop, its loss fused into the head (``linear_cross_entropy``: no B x T x V
logits), training on the highest-loss 60 % of each batch's tokens (per-token selection) and printing each
sequence's head-gradient norm, a by-product of the same pass. Run:
python examples/lm_loop.py [--text ../shared/data/shakespeare/shakespeare.txt]
"""
import argparse

import torch

from dynbatch.data.text import load_text
from dynbatch.methods import TokenSelection
from dynbatch.models.gpt import GPT
from dynbatch.ops import Sequences, linear_cross_entropy

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--text", default="../shared/data/shakespeare/shakespeare.txt")
args = parser.parse_args()
torch.manual_seed(0)
data = load_text(args.text, vocab_size=1024, context=64)  # BPE trained on the training split, cached
x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
model = GPT(data.num_classes, context=64, layers=2, width=64, heads=4)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
pick = TokenSelection(model, token_share=0.6)  # scores each token with the LM head op, through model.lm_head

for step in range(1, args.steps + 1):
    rows = torch.randint(0, len(x_all), (16,))
    x, y = x_all[rows], y_all[rows]
    y_kept = pick.select(x, y)  # (16, 64): the unchosen tokens' targets are -100
    loss, scores = linear_cross_entropy(model.features(x), model.lm_head.weight, y_kept, return_scores=True,
                                        sequences=Sequences(64))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
norms = ", ".join(f"{v:.2f}" for v in scores.sequence_grad_norm[:4].tolist())
print(f"step {args.steps}: loss {loss.item():.3f}; sequence gradient norms {norms}, ...")
