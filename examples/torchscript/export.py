"""Exports a model for longhaul-worker as TorchScript (`torch.jit.script`).

The contract a module must keep (docs: README, "TorchScript models"):
- `forward(x: Tensor) -> Tensor`. For token datasets `x` is `[B, T]` int64 token ids and the
  result is logits `[B, T, V]` (position t may look only at tokens 0..=t); for tensor datasets
  `x` is `[B, ...]` float features and the result is `[B, K]` class logits.
- The worker computes the loss (mean cross-entropy over scored positions) and owns the
  optimizer; every parameter (`named_parameters()`) is trained and synchronised. Buffers are
  neither trained nor synchronised; dropout is fine.
- Parameters are float32; initialise them in Python: every worker loads the same file, so every
  replica starts from the same bits.

Usage: python export.py OUT.pt [--vocab 14] [--width 64] [--context 16]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyCausalLM(nn.Module):
    """Embeddings, one causal self-attention layer and an MLP: small, but a real LM."""

    def __init__(self, vocab: int, width: int, context: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        h = h + self.mlp(self.norm(h))
        return self.head(h)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--vocab", type=int, default=14)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    module = torch.jit.script(TinyCausalLM(a.vocab, a.width, a.context))
    module.save(a.out)
    n = sum(p.numel() for p in module.parameters())
    print(f"wrote {a.out}: {n} parameters, forward(x: [B, T] int64) -> [B, T, {a.vocab}]")


if __name__ == "__main__":
    main()
