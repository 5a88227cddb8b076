#!/usr/bin/env bash
# Creates (once) the Python environment that longhaul needs: torch==2.11.0, which provides
# libtorch for the `tch` crate and PyTorch's gloo for the peer baseline. Idempotent: a ready
# environment is detected by a stamp file and left alone. `--check` prints its path and exits 0
# if it is ready, and exits 1 without installing anything if not.
set -euo pipefail
TORCH_VERSION=2.11.0
CACHE="${LONGHAUL_CACHE:-$HOME/.cache/longhaul}"
VENV="${LONGHAUL_VENV:-$CACHE/venv-torch-$TORCH_VERSION}"
STAMP="$VENV/.longhaul-ready"
if [[ -f "$STAMP" ]]; then
  echo "$VENV"
  exit 0
fi
# `--check`: only says whether the environment is ready (exit 1 if not), installing nothing.
if [[ "${1:-}" == "--check" ]]; then
  exit 1
fi
echo "setup: creating $VENV with torch==$TORCH_VERSION (first run only; large download)" >&2
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" numpy >&2
"$VENV/bin/python" -c "import torch, torch.distributed as d; assert d.is_gloo_available(); print('torch', torch.__version__)" >&2
touch "$STAMP"
echo "$VENV"
