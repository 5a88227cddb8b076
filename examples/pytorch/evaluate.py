"""Evaluates a longhaul checkpoint in PyTorch: loads its parameters into the model (strictly:
every name and shape must match) and prints the worker's loss on a batch, as JSON.

    python evaluate.py STEP_DIR BATCH.safetensors [--module MODULE.pt]

STEP_DIR is a checkpoint directory (`.../run-<id>/step-<N>`); BATCH holds `inputs` and `targets`
tensors. Built-in models are rebuilt from the checkpoint's `meta.json`; a TorchScript run's
checkpoint loads into the module file it trained (`--module`).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import longhaul_models as lm  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("batch")
    p.add_argument("--module", help="the TorchScript module file of a TorchScript run")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.module:
        model = torch.jit.load(a.module)
        model.load_state_dict(lm.load_safetensors(os.path.join(a.checkpoint, "model.safetensors")))
        model.eval()
    else:
        model = lm.from_checkpoint(a.checkpoint)
    batch = lm.load_safetensors(a.batch)
    with torch.no_grad():
        loss = lm.loss(model(batch["inputs"]), batch["targets"]).item()
    names = list(model.state_dict().keys())
    print(json.dumps({"loss": loss, "parameters": len(names), "names": names}))


if __name__ == "__main__":
    main()
