"""Triton when it is installed, inert stand-ins when it is not.

Kernel modules that are imported eagerly (for example by the VAE) import `triton` / `tl` from here, so the
package still imports on machines without Triton (macOS, Windows without a Triton build). Their wrappers
check `TRITON_AVAILABLE` and run the PyTorch reference instead; a kernel is never launched without Triton.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

    class _Unavailable:
        """Absorbs what a kernel module does at import time: decorators, configs, dtype attributes."""

        def __getattr__(self, name: str) -> _Unavailable:
            return self

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # a bare decorator such as @triton.jit leaves the function as it is
            return self

    triton = tl = _Unavailable()

__all__ = ["TRITON_AVAILABLE", "tl", "triton"]
