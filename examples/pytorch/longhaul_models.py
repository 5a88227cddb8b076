"""longhaul's built-in models in PyTorch, and a loader for longhaul checkpoints.

A worker's checkpoint (`<state dir>/checkpoints/run-<id>/step-<N>/`) holds `model.safetensors`,
the synchronised parameters named exactly as `state_dict()` of the modules below names them, and
`meta.json`, which says which model they belong to. So a model trained by longhaul can be
evaluated or fine-tuned in PyTorch:

    import longhaul_models
    model = longhaul_models.from_checkpoint("checkpoints/run-1/step-00000500")
    logits = model(tokens)          # [B, T] int64 -> [B, T, V]

A TorchScript run's checkpoint names parameters as the module's own `named_parameters()`, so it
loads into the module it was exported from (`torch.jit.load(module_file)` or the Python class):

    model.load_state_dict(longhaul_models.load_safetensors(".../model.safetensors"))

The forward passes below compute what the worker computes (same layers, same order, same
defaults: LayerNorm eps 1e-5, tanh-approximated GELU, causal attention). `loss` is the
worker's loss: mean cross-entropy over scored positions (targets of -100 are not scored).

Nothing here needs more than torch; `load_safetensors` reads the format itself (if the
`safetensors` package is installed, `safetensors.torch.load_file` gives the same tensors).
"""
import json
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100


class Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)


class Mlp4(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp4(width)


class Gpt(nn.Module):
    """`model.builtin = "gpt"`: GPT-2 style, pre-norm blocks with a fused QKV projection, a
    4x tanh-GELU MLP, a final LayerNorm and an output head tied to the token embedding."""

    def __init__(self, vocab: int, layers: int, width: int, heads: int, context: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"gpt width {width} is not a multiple of its {heads} heads")
        self.heads = heads
        self.context = context
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList([Block(width) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context of {self.context}")
        w = self.wte.weight.shape[1]
        hd = w // self.heads
        h = self.wte(x) + self.wpe(torch.arange(t, device=x.device))
        for blk in self.h:
            qkv = blk.attn.c_attn(blk.ln_1(h)).view(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
            h = h + blk.attn.c_proj(y.transpose(1, 2).contiguous().view(b, t, w))
            h = h + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(blk.ln_2(h)), approximate="tanh"))
        return self.ln_f(h) @ self.wte.weight.t()


class Mlp(nn.Module):
    """`model.builtin = "mlp"`: for tensor tasks, flatten, `layers` ReLU layers, a linear head;
    for token tasks, per position the token's embedding plus its position's through the same
    stack (a bigram model)."""

    def __init__(self, layers: int, width: int, outputs: int, features=None, vocab=None, context=1):
        super().__init__()
        if vocab is not None:
            self.wte = nn.Embedding(vocab, width)
            self.wpe = nn.Embedding(max(context, 1), width)
            dim = width
        else:
            self.wte = None
            dim = 1
            for d in features:
                dim *= d
        hidden = []
        for _ in range(layers):
            hidden.append(nn.Linear(dim, width))
            dim = width
        self.hidden = nn.ModuleList(hidden)
        self.head = nn.Linear(dim, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wte is not None:
            x = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        else:
            x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


class Convnet(nn.Module):
    """`model.builtin = "convnet"`: for images `[C, H, W]`, 3x3 convolutions with ReLU and 2x2
    max-pooling, global average pooling, a linear head; for tokens, causal 1-D convolutions
    (kernel 3, left-padded) over the embeddings with residual connections."""

    def __init__(self, layers: int, width: int, outputs: int, features=None, vocab=None):
        super().__init__()
        if vocab is not None:
            self.wte = nn.Embedding(vocab, width)
            self.conv = nn.ModuleList([nn.Conv1d(width, width, 3) for _ in range(layers)])
        else:
            if len(features) != 3:
                raise ValueError(f"convnet needs image inputs [C, H, W], not {features}")
            self.wte = None
            c = features[0]
            self.conv = nn.ModuleList(
                [nn.Conv2d(c if i == 0 else width, width, 3, padding=1) for i in range(layers)]
            )
        self.head = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wte is not None:
            x = self.wte(x).transpose(1, 2)
            for c in self.conv:
                x = x + F.relu(c(F.pad(x, (2, 0))))
            return self.head(x.transpose(1, 2))
        for c in self.conv:
            x = F.relu(c(x))
            if x.shape[2] >= 2 and x.shape[3] >= 2:
                x = F.max_pool2d(x, 2)
        return self.head(x.mean(dim=(2, 3)))


def build(meta: dict) -> nn.Module:
    """The module a checkpoint's `meta.json` `model` entry describes (built-in models only)."""
    arch = meta["arch"]
    vocab, features = meta.get("vocab"), meta.get("features")
    if arch == "gpt":
        return Gpt(vocab, meta["layers"], meta["width"], meta["heads"], meta["context"])
    if arch == "mlp":
        return Mlp(meta["layers"], meta["width"], meta["outputs"], features, vocab, meta["context"])
    if arch == "convnet":
        return Convnet(meta["layers"], meta["width"], meta["outputs"], features, vocab)
    if arch == "torchscript":
        raise ValueError(
            "a TorchScript run's checkpoint loads into its own module: "
            "module.load_state_dict(load_safetensors(path))"
        )
    raise ValueError(f"unknown model {arch!r}")


_DTYPES = {
    "F32": torch.float32,
    "F64": torch.float64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors(path: str) -> dict:
    """The tensors of a safetensors file, by name (what `safetensors.torch.load_file` gives)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: not a safetensors file (header past the end)")
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= len(body):
            raise ValueError(f"{path}: tensor {name} lies outside the file")
        dtype = _DTYPES[info["dtype"]]
        raw = bytearray(body[start:end])
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def from_checkpoint(step_dir: str) -> nn.Module:
    """A built-in model with the parameters of the checkpoint in `step_dir`, in eval mode."""
    with open(os.path.join(step_dir, "meta.json")) as f:
        meta = json.load(f)
    if "model" not in meta:
        raise ValueError(f"{step_dir}: meta.json names no model (written by an older worker)")
    model = build(meta["model"])
    model.load_state_dict(load_safetensors(os.path.join(step_dir, "model.safetensors")))
    return model.eval()


def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The worker's loss: mean cross-entropy over scored positions."""
    v = logits.shape[-1]
    return F.cross_entropy(
        logits.reshape(-1, v).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="mean"
    )
