#!/usr/bin/env bash
# Creates (once) the Python environment that longhaul needs: torch==2.11.0, which provides
# libtorch for the `tch` crate and PyTorch's gloo for the peer baseline, plus the test suite's
# kubernetes-validate (the Kubernetes manifests' schema check in examples/tests/containers.rs).
# Idempotent: a ready environment is detected by a stamp file and left alone, except that with
# `--test-tools` a missing or different kubernetes-validate is (re)installed into it. `--check` prints its path
# and exits 0 if torch is ready, and exits 1 if not, installing nothing either way.
# Only the environment's path goes to stdout; progress goes to stderr.
set -euo pipefail
TORCH_VERSION=2.11.0
K8S_VALIDATE_VERSION=1.37.0
CACHE="${LONGHAUL_CACHE:-$HOME/.cache/longhaul}"
VENV="${LONGHAUL_VENV:-$CACHE/venv-torch-$TORCH_VERSION}"
STAMP="$VENV/.longhaul-ready"

# Added after environments with a stamp existed, so it is checked on every call, not only at
# creation. It ships the schemas, so validating needs no network.
k8s_validate() {
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, kubernetes_validate; assert m.version('kubernetes-validate') == '$K8S_VALIDATE_VERSION'" 2>/dev/null; then
    echo "setup: installing kubernetes-validate==$K8S_VALIDATE_VERSION into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet "kubernetes-validate==$K8S_VALIDATE_VERSION" >&2
  fi
}

# `--test-tools` (scripts/test): also the tools only the test suite uses, so that the quickstart
# does not download them.
TEST_TOOLS=0
[[ "${1:-}" == "--test-tools" ]] && TEST_TOOLS=1
if [[ -f "$STAMP" ]]; then
  if [[ $TEST_TOOLS == 1 ]]; then
    k8s_validate
  fi
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
if [[ $TEST_TOOLS == 1 ]]; then
  k8s_validate
fi
touch "$STAMP"
echo "$VENV"
