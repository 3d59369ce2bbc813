"""Checks of the Python environment that vtc runs in, made before a broken package fails deep inside transformers.

A torchvision that cannot load beside torch (the usual cause: PyPI's CUDA build of torchvision
installed, e.g. by ``lmms-eval``, beside a CPU build of torch) makes transformers fail while it
imports its image utilities, with ``operator torchvision::nms does not exist``. vtc does not need
torchvision, so ``check_torchvision`` turns that into one message with the fix.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def check_torchvision() -> None:
    """Raise VTCError naming the fix when torchvision is installed but cannot be imported; nothing when it is
    absent or loads. Checked once per process (importing a working torchvision is what transformers does anyway)."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to load is the same problem for the user
        from .methods.base import VTCError

        torch_version = _version("torch")
        raise VTCError(
            f"torchvision {_version('torchvision')} is installed but cannot be loaded beside torch {torch_version} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); the usual cause is "
            "a CUDA build of torchvision beside a CPU build of torch (lmms-eval pulls torchvision from PyPI). "
            "vtc does not need torchvision: remove it (pip uninstall torchvision), or install the torchvision "
            f"build made for torch {torch_version} (for a CPU torch, the CPU build from PyTorch's CPU wheel index)."
        ) from None
