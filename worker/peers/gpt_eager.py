"""The built-in `gpt` of longhaul-worker in PyTorch eager, for the throughput comparison.

Same architecture, init, optimizer (AdamW, clip 1.0) and batch as `cargo bench -p worker --bench gpt`.
Usage: python gpt_eager.py [layers width heads seq batch steps]   (default 4 256 4 128 16 20)
"""
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, w, heads, layers):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(w)
        self.c_attn = nn.Linear(w, 3 * w)
        self.c_proj = nn.Linear(w, w)
        self.ln_2 = nn.LayerNorm(w)
        self.c_fc = nn.Linear(w, 4 * w)
        self.mlp_proj = nn.Linear(4 * w, w)
        for lin, std in [(self.c_attn, 0.02), (self.c_fc, 0.02),
                         (self.c_proj, 0.02 / math.sqrt(2 * layers)),
                         (self.mlp_proj, 0.02 / math.sqrt(2 * layers))]:
            nn.init.normal_(lin.weight, 0.0, std)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        b, t, w = x.shape
        hd = w // self.heads
        qkv = self.c_attn(self.ln_1(x)).view(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, w))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, vocab, layers, w, heads, context):
        super().__init__()
        self.wte = nn.Embedding(vocab, w)
        self.wpe = nn.Embedding(context, w)
        nn.init.normal_(self.wte.weight, 0.0, 0.02)
        nn.init.normal_(self.wpe.weight, 0.0, 0.02)
        self.h = nn.ModuleList([Block(w, heads, layers) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(w)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.h:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T


def main():
    a = [int(v) for v in sys.argv[1:]]
    layers, width, heads, seq, batch, steps = (a + [4, 256, 4, 128, 16, 20][len(a):])[:6]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    vocab = 256
    model = Gpt(vocab, layers, width, heads, seq).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.98), eps=1e-8, foreach=True)
    data = torch.randint(0, vocab, (steps + 3, batch, seq + 1), device=dev)

    def step(i):
        x, y = data[i, :, :-1], data[i, :, 1:]
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for i in range(3):
        step(i)
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(3 + i)
    loss = loss.item()
    secs = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    print(f"pytorch eager gpt: device {dev}, threads {torch.get_num_threads()}, {n} params, "
          f"layers {layers} width {width} heads {heads} seq {seq} batch {batch}: {steps} steps in "
          f"{secs:.2f} s, {steps * batch * seq / secs:.0f} tokens/s, {1e3 * secs / steps:.1f} ms/step "
          f"(loss {loss:.3f})")


if __name__ == "__main__":
    main()
