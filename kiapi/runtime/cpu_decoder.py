"""A decoder block's element-wise work on the CPU, through kiapi's kernel library.

MLX's CPU backend runs ``exp`` one scalar at a time (its vector code is for ARM), so on x86
a 255-token prompt through SmolLM2 spent ~6.8 ms per layer in attention's softmax and ~6.1 ms
in the MLP's SiLU: 0.4 s of a 0.7 s prefill, against ~0.5 and ~0.1 ms in
``qmatmul.c``'s vectorized ``kiapi_attention``/``kiapi_swiglu`` on both cores. Two seams:

* :func:`install_attention` replaces ``scaled_dot_product_attention`` in the mlx-lm model
  modules of :data:`SWIGLU_MODULES` (a module global they import from ``mlx_lm.models.base``)
  with :func:`attention`: for :data:`ATTENTION_MIN_QUERIES` queries or more (prefill) the
  whole attention runs in the kernel (``kiapi_attention``: scores, mask, softmax and weighted
  values per query row, no BLAS; for a prompt chunk over 32 rows with bfloat16 products on,
  both of its products on AMX tiles too (:func:`bf16_attention`): by hand, a 255-token
  prefill 183-190 -> 160-166 ms); anything else (decoding's single query, attention sinks, a
  quantized cache) goes to mlx-lm's own function unchanged. Process-wide and idempotent.
* :class:`PackedMLP` (from :func:`packed_mlp_class`) replaces those modules' SwiGLU ``MLP``
  when its projections are packed (:mod:`kiapi.runtime.qmatmul`): gate and up as one product,
  the activation, and down, all on NumPy buffers between one evaluation of ``x`` and one MLX
  array out.

mlx-lm is pinned below 0.33 in pyproject.toml; ``tests/unit/test_cpu_decoder.py`` checks both
seams against mlx-lm's own functions. Only the worker thread runs models. MLX is imported
lazily.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
from typing import Any

from kiapi.runtime import interlude, qmatmul
from kiapi.runtime.mlx_import import import_mlx

log = logging.getLogger(__name__)

# mlx-lm model modules whose MLP is ``down(swiglu(gate(x), up(x)))`` with those names and
# whose attention calls the module-global ``scaled_dot_product_attention``.
SWIGLU_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")
ATTENTION_MIN_QUERIES = 8  # fewer (decoding): MLX's own attention, the softmax is tiny


def elementwise_threads(rows: int) -> int:
    """Threads for the softmax and SwiGLU kernels over ``rows`` rows: one, unless they are a
    prompt chunk's (over ``qmatmul.KERNEL_ROWS``) and its products run in bfloat16 (kiapi's
    OpenMP pool, as these kernels; a decode step's few rows stay on one). With the BLAS's own
    threads running the products around them, two pools taking turns on two cores waited on
    each other (by hand, a 255-token prompt's first step took 549 ms on one thread, 574 on
    two); with the products in the same pool, every core (by hand, 255-token prefill 347 ->
    303 ms, SwiGLU alone 15 -> 6 ms)."""
    if rows > qmatmul.KERNEL_ROWS and qmatmul.bf16_products():
        return qmatmul.cpu_threads()
    return 1


def bf16_attention(rows: int) -> bool:
    """Whether attention over ``rows`` query rows runs its products in bfloat16: for a prompt
    chunk over ``qmatmul.KERNEL_ROWS`` rows where bfloat16 products are on (AMX,
    ``KIAPI_MATMUL_PRECISION=auto``), as a packed model's own products over that many rows
    run; the setting is process-wide, so a model whose matrices stay float32 (the ``rows``
    or ``columns`` layout) gets it too. Fewer rows: float32, like the kernel's products."""
    return rows > qmatmul.KERNEL_ROWS and qmatmul.bf16_products()


_installed: dict[str, Any] = {}  # module name -> mlx-lm's original function


def install_attention(module_name: str) -> bool:
    """Route ``module_name``'s attention through :func:`attention`; False (nothing changed)
    when the module is not one of :data:`SWIGLU_MODULES` or the kernel is unavailable."""
    if module_name not in SWIGLU_MODULES or qmatmul.kernel() is None:
        return False
    if module_name not in _installed:
        module = importlib.import_module(module_name)
        original = module.scaled_dot_product_attention
        _installed[module_name] = original
        module.scaled_dot_product_attention = functools.partial(attention, original)
        log.info("attention softmax of %s on kiapi's CPU kernel", module_name)
    return True


def attention(original, queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention(queries, keys, values, cache, scale, mask,
    sinks)``: (B, heads, L, D) queries against (B, kv_heads, S, D) keys and values, each kv
    head shared by ``heads // kv_heads`` query heads; ``mask`` None, ``"causal"`` (query i at
    position S - L + i) or an array broadcastable to (B, 1, L, S), boolean (True: attend) or
    added to the scores."""
    mx = import_mlx()
    batch, heads, length, dim = queries.shape
    kv_heads, keys_length = keys.shape[1], keys.shape[2]
    array_mask = mask is not None and not isinstance(mask, str)
    if (
        length < ATTENTION_MIN_QUERIES
        or sinks is not None
        or hasattr(cache, "bits")
        or (isinstance(mask, str) and mask != "causal")
        or (array_mask and mask.ndim == 4 and mask.shape[1] != 1)
        or heads % kv_heads
    ):
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    import numpy as np

    q, k, v = (qmatmul.evaluated_rows(a, dim) for a in (queries, keys, values))
    if array_mask:  # (B or 1, L, S): one byte per (query, key), or a float added to its score
        while mask.ndim < 4:
            mask = mask[None]
        mask = np.ascontiguousarray(
            np.array(mx.broadcast_to(mask, (mask.shape[0], 1, length, keys_length)))
        )
        mask = mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.float32)
    threads = elementwise_threads(length * batch)
    out, view = qmatmul.fresh_array((batch, heads, length, dim))
    query_strides = (heads * length * dim, length * dim, dim)  # (B, H, L, D): q and out
    key_strides = (kv_heads * keys_length * dim, keys_length * dim, dim)  # k and v
    qmatmul.attention(
        q, k, v, view, (batch, heads, kv_heads, length, keys_length, dim),
        query_strides + key_strides * 2 + query_strides, scale, isinstance(mask, str),
        mask if array_mask else None, threads, bf16=bf16_attention(length * batch),
    )  # fmt: skip
    return out if queries.dtype == mx.float32 else out.astype(queries.dtype)


def is_swiglu_mlp(module: Any) -> bool:
    """An mlx-lm ``MLP`` of :data:`SWIGLU_MODULES` (``down(swiglu(gate(x), up(x)))``)."""
    kind = type(module)
    return kind.__name__ == "MLP" and kind.__module__ in SWIGLU_MODULES


@functools.cache
def packed_mlp_class() -> type:
    """``PackedMLP``, defined once MLX is imported (lazily)."""
    import_mlx()
    import mlx.nn as nn

    class PackedMLP(nn.Module):
        """``down(silu(gate(x)) * up(x))`` over packed projections: ``gate_up`` is the stacked
        gate and up matrix (gate's rows first), ``down`` the down projection's. Holds the
        packed layers as its children (their parameters count as before)."""

        def __init__(self, mlp: Any) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
            self.down_proj = mlp.down_proj
            self._gate_up = mlp.gate_proj._shared.matrix
            self._down = mlp.down_proj._shared.matrix
            self._hidden = self._down.inputs

        def __call__(self, x: Any) -> Any:
            mx = import_mlx()
            lead = x.shape[:-1]
            gate_up = self._gate_up.product(qmatmul.evaluated_rows(x, self._gate_up.inputs))
            rows = gate_up.shape[0]
            hidden = qmatmul.aligned_empty((rows, self._hidden))
            qmatmul.kernel().kiapi_swiglu(
                ctypes.c_void_p(gate_up.ctypes.data), ctypes.c_int(rows),
                ctypes.c_int(self._hidden), ctypes.c_void_p(hidden.ctypes.data),
                ctypes.c_int(elementwise_threads(rows)),
            )  # fmt: skip
            out = mx.array(self._down.product(hidden)).reshape(*lead, self._down.outputs)
            interlude.checkpoint()  # between layers: nothing of this step is in flight
            return out

    return PackedMLP


def packable_mlp(module: Any) -> bool:
    """Whether :class:`PackedMLP` can stand in for ``module``: a SwiGLU MLP whose gate and
    up projections share one packed matrix (gate first), down packed alone, no biases."""
    if not is_swiglu_mlp(module):
        return False
    packed_linear, _ = qmatmul.packed_modules()
    parts = [module.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, packed_linear) and "bias" not in p for p in parts):
        return False
    gate, up, down = parts
    hidden = down._shared.matrix.inputs
    return (
        gate._shared is up._shared
        and gate._rows == (0, hidden)
        and up._rows == (hidden, 2 * hidden)
        and down._rows is None
    )
