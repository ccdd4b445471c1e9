"""The one way kiapi's engines import MLX: after the optimized BLAS is loaded.

MLX binds its BLAS symbols at its first matmul, so whichever engine reaches MLX first must
have activated OpenBLAS (a chat model loaded before any embedding model once left MLX on the
reference BLAS, 10x slower). ``blas.activate`` is a no-op after its first call.
"""

from __future__ import annotations

from types import ModuleType

from kiapi.runtime import blas


def import_mlx() -> ModuleType:
    """``mlx.core``, imported after the optimized BLAS is loaded."""
    blas.activate()
    import mlx.core as mx

    return mx
