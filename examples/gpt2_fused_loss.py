"""dynbatch's fused linear cross-entropy on a Hugging Face ``GPT2LMHeadModel`` built from a config (nothing is
downloaded): the transformer's hidden states go straight into ``linear_cross_entropy`` with the model's head, so the
B x T x V logits are never formed, and each sequence's head-gradient norm and agreement with the batch come with
the loss. Needs ``pip install 'dynbatch[hf]'``. Run:
python examples/gpt2_fused_loss.py
"""
import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dynbatch.ops import Sequences, linear_cross_entropy

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()
torch.manual_seed(0)
config = GPT2Config(vocab_size=5000, n_positions=128, n_embd=128, n_layer=2, n_head=4, bos_token_id=0,
                    eos_token_id=0)
model = GPT2LMHeadModel(config)  # its lm_head is tied to the token embedding, as in GPT-2
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
tokens = torch.randint(0, config.vocab_size, (8, 65))

for step in range(1, args.steps + 1):
    hidden = model.transformer(tokens[:, :-1]).last_hidden_state  # (8, 64, 128)
    loss, scores = linear_cross_entropy(hidden, model.lm_head.weight, tokens[:, 1:], return_scores=True,
                                        sequences=Sequences(64, agreement=True))
    # the same loss from the materialised logits, for comparison
    reference = torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), tokens[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
agreement = ", ".join(f"{v:.3g}" for v in scores.sequence_agreement[:3].tolist())
print(f"step {args.steps}: loss {loss.item():.4f} (materialised {reference.item():.4f}); agreement {agreement}, ...")
