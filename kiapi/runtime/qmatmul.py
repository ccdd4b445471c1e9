"""Matrix products on MLX-quantized weights on the CPU, through kiapi's own kernel.

MLX's CPU backend multiplies quantized matrices one scalar at a time on one thread (4-bit
SmolLM2: 79-136 ms of products per decoded token, slower than the float32 expansion), so the
chat engine used to hold its weights as float32 (538 MB for a 135M model) and stream them
through the BLAS. ``qmatmul.c`` (package data, beside this module) multiplies the packed
4- and 8-bit weights directly: widened to floats in registers, a 32-value block at a time,
each weight row read once for every row of ``x``, rows split over the cores with OpenMP. It
also holds the element-wise work MLX's scalar ``exp`` makes slow: softmax (with attention's
masks), SwiGLU and GELU (used by :mod:`kiapi.runtime.cpu_decoder` and the embedding engine).

* :func:`kernel` compiles it once per machine with the C compiler (``$CC``, else ``cc``),
  ``-O3 -march=native``, into kiapi's cache folder (written to a temporary file and renamed,
  so a crash never leaves half a library), keyed by the source, the flags, the compiler and
  the CPU, and loads it with ``ctypes``. No compiler, or a failed build: ``None``, and the
  engines keep float32 weights and MLX's own ops (:func:`describe` says which).
* :class:`PackedMatrix` holds one packed matrix. Up to :data:`KERNEL_ROWS` rows (decoding:
  one per sequence) run the kernel: MLX evaluates ``x``, the kernel reads it and the weights
  in place (NumPy views of MLX's buffers, no copy) and writes the product, which becomes a
  new MLX array. More rows (a prompt chunk) expand the matrix to float32 into a scratch
  buffer, exactly, and run the BLAS's ``sgemm`` on it.
* On CPUs with AMX (Intel Sapphire Rapids and later), products over many rows run in bfloat16
  on AMX tiles instead (:func:`bf16_products`, the ``matmul_precision`` setting): a prompt
  chunk's packed matrix expands exactly, then rounds to bfloat16 tiles
  (``kiapi_dequantize_bf16``), and a float32 matrix (the embedding engine's) is held as tiles
  once (:class:`Bf16Linear`). Sums stay float32; by hand about 1.1-1.3 TFLOP/s on two cores
  here, 3-4x the float32 BLAS.
* :class:`PackedLinear` (from :func:`packed_modules`) is an ``nn.Linear`` stand-in over it;
  :func:`pack_linears` stacks siblings that take the same input (q/k/v, gate/up) into one
  matrix (:class:`SharedInput`). An output head (a tied :class:`PackedEmbedding`, an untied
  ``lm_head``) over a prompt chunk stays lazy (MLX's own quantized matmul): mlx-lm's prefill
  never evaluates those logits, so a prompt's rows of vocabulary products are never computed;
  one position per sequence (decoding) always runs the kernel.

Only the worker thread calls these modules (they run inside a model's forward pass); the
scratch buffers belong to that thread. MLX is imported lazily, in functions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiapi.runtime import blas
from kiapi.runtime.mlx_import import import_mlx

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qmatmul.c")


def compile_flags(machine: str) -> tuple[str, ...]:
    """The compiler's flags for a CPU of ``machine`` (``platform.machine()``). On x86, GCC's
    own vector loops use 512-bit registers like the kernel's explicit ones (it prefers 256 on
    Intel, and mixing the two stalled loads on stores); the option is x86's alone (GCC on ARM
    refuses it)."""
    wide = ("-mprefer-vector-width=512",) if machine.lower() in ("x86_64", "amd64") else ()
    return ("-O3", "-march=native", *wide, "-ffp-contract=fast", "-fPIC", "-shared")


FLAGS = compile_flags(platform.machine())
OPENMP = "-fopenmp"
# More rows than this: expand the matrix and run the BLAS. SmolLM2's layers here (by hand):
# 24 rows 57 ms through the kernel, 68 expanded; 32 rows 77 against 71; 64 rows 157 against
# 98. Decoding's rows are its sequences (up to the generator's 32: all on the kernel, no
# scratch matrix); prefill's are a prompt chunk's tokens.
KERNEL_ROWS = 32


@functools.cache
def cpu_threads() -> int:
    """The cores this process may run on (the kernel's OpenMP threads), read once: it was
    1% of a decode step's samples as a system call per product."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part", "CPU variant")
    keep = [line for line in lines if line.split(":")[0].strip() in keys]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


def cache_folder() -> Path:
    return blas.cache_folder().parent / "kernels"


def build(compiler: str, folder: Path) -> Path:
    """Compile ``qmatmul.c`` into ``folder`` (once per key) and return the library's path.

    Raises ``subprocess.CalledProcessError``/``OSError`` when it cannot be built."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    source = SOURCE.read_bytes()
    for flags in ((*FLAGS, OPENMP), FLAGS):  # OpenMP where the compiler has it
        key = hashlib.sha256(
            b"\0".join(
                [source, " ".join(flags).encode(), version.encode(), _cpu_identity().encode()]
            )
        ).hexdigest()[:16]
        target = folder / key / "libkiapi_qmatmul.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
        os.close(handle)
        try:
            done = subprocess.run(
                [compiler, *flags, "-o", partial, str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode == 0:
                os.replace(partial, target)
                return target
            last_error = done.stderr.strip()[-2000:]
        finally:
            Path(partial).unlink(missing_ok=True)
    raise OSError(f"{compiler} could not build {SOURCE.name}: {last_error}")


_lock = threading.Lock()
_status = {"detail": "not built yet"}  # what describe() reports


def describe() -> str:
    """The kernel's library, or why there is none, and whether products over many rows run
    in bfloat16 (``kiapi doctor``)."""
    if kernel() is None:
        return _status["detail"]
    if bf16_products():
        products = "bfloat16 on AMX tiles"
    elif _precision["value"] != "auto":
        products = "float32 (KIAPI_MATMUL_PRECISION=float32)"
    else:
        products = "float32 (no AMX on this CPU)"
    return f"{_status['detail']}; products over many rows: {products}"


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no C compiler, a failed build: logged once)."""
    compiler = _compiler()
    if compiler is None:
        _status["detail"] = (
            "unavailable: no C compiler (cc, or $CC); chat weights are served as float32 and "
            "softmax/GELU by MLX, slower (install gcc or clang to get it)"
        )
        log.warning("kiapi's CPU kernel %s", _status["detail"])
        return None
    with _lock:
        try:
            path = build(compiler, cache_folder())
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as error:
            _status["detail"] = f"unavailable: {error}; chat weights are served as float32"
            log.warning("kiapi's CPU kernel %s", _status["detail"])
            return None
    _status["detail"] = f"{path} (built by {compiler}, {' '.join(FLAGS[:2])})"
    pointer, number = ctypes.c_void_p, ctypes.c_int
    lib.kiapi_supported.argtypes = [number, number]
    lib.kiapi_qgemv.argtypes = [pointer, number, number, pointer, pointer, pointer]
    lib.kiapi_qgemv.argtypes += [number, number, number, pointer, pointer, number]
    lib.kiapi_qgemv.restype = None
    lib.kiapi_dequantize.argtypes = [pointer, pointer, pointer, number, number, number]
    lib.kiapi_dequantize.argtypes += [number, pointer, number]
    lib.kiapi_dequantize.restype = None
    lib.kiapi_softmax.argtypes = [pointer, number, number, number]
    lib.kiapi_softmax.restype = None
    lib.kiapi_swiglu.argtypes = [pointer, number, number, pointer, number]
    lib.kiapi_swiglu.restype = None
    lib.kiapi_gelu.argtypes = [pointer, ctypes.c_long, number]
    lib.kiapi_gelu.restype = None
    lib.kiapi_attention.argtypes = [pointer] * 4 + [number] * 6 + [pointer, ctypes.c_float]
    lib.kiapi_attention.argtypes += [number, pointer, pointer, number, pointer, pointer, number]
    lib.kiapi_attention.restype = None
    lib.kiapi_attention_bf16.argtypes = lib.kiapi_attention.argtypes
    lib.kiapi_attention_bf16.restype = ctypes.c_int
    lib.kiapi_add_layer_norm.argtypes = [pointer, pointer, number, number, number]  # a, x, dims
    lib.kiapi_add_layer_norm.argtypes += [pointer, pointer, ctypes.c_float, number]
    lib.kiapi_add_layer_norm.restype = None
    lib.kiapi_bf16_ready.argtypes = []
    lib.kiapi_pack_bf16.argtypes = [pointer, number, number, pointer, number]
    lib.kiapi_pack_bf16.restype = None
    lib.kiapi_dequantize_bf16.argtypes = [pointer, pointer, pointer] + [number] * 4
    lib.kiapi_dequantize_bf16.argtypes += [pointer, pointer, number]
    lib.kiapi_dequantize_bf16.restype = None
    lib.kiapi_gemm_bf16.argtypes = [pointer, number, number, pointer, number, pointer]
    lib.kiapi_gemm_bf16.argtypes += [number, pointer, pointer, pointer, number]
    lib.kiapi_gemm_bf16.restype = ctypes.c_int
    return lib


PRECISIONS = ("auto", "float32")
_precision = {"value": "auto"}


def configure(precision: str) -> None:
    """The server's ``matmul_precision`` setting (process-wide, like the BLAS): ``auto`` runs
    products over many rows (prompt chunks, embedding batches) in bfloat16 on AMX tiles where
    the CPU has them, ``float32`` never does. Engines read it when they load a model."""
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision must be one of {PRECISIONS}, not {precision!r}")
    _precision["value"] = precision


def bf16_products() -> bool:
    """Whether products over many rows run in bfloat16 on AMX (see ``qmatmul.c``): the
    setting allows it, the kernel is built with AMX, and Linux lets this process use it."""
    return _precision["value"] == "auto" and _amx_granted()


@functools.cache
def _amx_granted() -> bool:
    """The kernel is built with AMX and Linux gave this process the tile state (asked once)."""
    lib = kernel()
    return lib is not None and bool(lib.kiapi_bf16_ready())


def bf16_shape(outputs: int, inputs: int) -> bool:
    """Whether a matrix's sizes fit the AMX tiles (both multiples of 32)."""
    return outputs % 32 == 0 and inputs % 32 == 0


@dataclass(frozen=True)
class Bf16Rows:
    """A product's input already rounded to bfloat16 and laid out as the AMX tiles read it
    (:func:`gemm_bf16_gelu_rows` makes it): ``tiles`` holds ``rows`` rounded up to 32 (zeros
    past ``rows``) of ``width`` values each. It lives in a worker buffer: used before the next
    call that makes one."""

    tiles: Any
    rows: int
    width: int


def gemm_bf16(x: Any, tiles: Any, outputs: int, bias: Any = None, out: Any = None) -> Any:
    """``x @ W.T (+ bias)`` in bfloat16 for ``x`` a C-contiguous float32 NumPy (rows, inputs)
    or :class:`Bf16Rows`, and ``W`` packed as AMX tiles (``tiles``, uint16), on every core:
    written into ``out`` (a C-contiguous float32 NumPy (rows, outputs)) or a new NumPy array,
    returned."""
    if isinstance(x, Bf16Rows):
        rows, inputs = x.rows, x.width
    else:
        rows, inputs = x.shape
    if out is None:
        out = aligned_empty((rows, outputs))
    _gemm_bf16(x, rows, inputs, tiles, outputs, bias, out, None)
    return out


def gemm_bf16_gelu_rows(x_view: Any, tiles: Any, outputs: int, bias: Any = None) -> Bf16Rows:
    """``GELU(x @ W.T + bias)`` (exact erf GELU) for a float32 NumPy ``x`` (rows, inputs),
    rounded to bfloat16 as the tiles of the next product's input, in this thread's buffer:
    an MLP's up product for its down product, with no float32 rows between them."""
    rows, inputs = x_view.shape
    gelu = scratch("gelu_rows", (rows + 31) // 32 * 32 * outputs, "uint16")
    _gemm_bf16(x_view, rows, inputs, tiles, outputs, bias, None, gelu)
    return Bf16Rows(gelu, rows, outputs)


def _gemm_bf16(
    x: Any, rows: int, inputs: int, tiles: Any, outputs: int, bias: Any, y: Any, gelu: Any
) -> None:
    tiled = isinstance(x, Bf16Rows)
    work = x.tiles if tiled else scratch("x_tiles", (rows + 31) // 32 * 32 * inputs, "uint16")
    c = ctypes
    failed = kernel().kiapi_gemm_bf16(
        c.c_void_p(None if tiled else x.ctypes.data), c.c_int(rows), c.c_int(inputs),
        c.c_void_p(tiles.ctypes.data), c.c_int(outputs),
        c.c_void_p(None if bias is None else bias.ctypes.data), c.c_int(int(tiled)),
        c.c_void_p(None if y is None else y.ctypes.data),
        c.c_void_p(None if gelu is None else gelu.ctypes.data),
        c.c_void_p(work.ctypes.data), c.c_int(cpu_threads()),
    )  # fmt: skip
    if failed:
        raise RuntimeError("bfloat16 products need AMX, which this CPU or kernel does not give")


class Bf16Linear:
    """A linear layer's float32 (outputs, inputs) ``W`` held as bfloat16 AMX tiles (half its
    float32 memory) and its bias, for :func:`gemm_bf16`. Only when :func:`bf16_products` and
    :func:`bf16_shape` hold. Its arrays never change after construction."""

    def __init__(self, weight: Any, bias: Any = None) -> None:
        import numpy as np

        mx = import_mlx()
        w = np.ascontiguousarray(np.array(weight.astype(mx.float32)), dtype=np.float32)
        self.outputs, self.inputs = w.shape
        if not bf16_shape(self.outputs, self.inputs):
            raise ValueError(f"a {w.shape} matrix does not fit AMX tiles")
        self.tiles = aligned_empty(w.size, np.uint16)
        kernel().kiapi_pack_bf16(
            ctypes.c_void_p(w.ctypes.data), ctypes.c_int(self.outputs),
            ctypes.c_int(self.inputs), ctypes.c_void_p(self.tiles.ctypes.data),
            ctypes.c_int(cpu_threads()),
        )  # fmt: skip
        self.bias = None if bias is None else np.array(bias.astype(mx.float32), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return self.tiles.nbytes + (0 if self.bias is None else self.bias.nbytes)


def fresh_array(shape: tuple[int, ...]) -> tuple[Any, Any]:
    """A new evaluated float32 MLX array of ``shape`` and a writable NumPy view of its buffer,
    which nothing else holds (kernels write their results there instead of copying them in;
    MLX's allocator reuses freed buffers, where a new NumPy array's pages fault in)."""
    import numpy as np

    mx = import_mlx()
    out = mx.zeros(shape, dtype=mx.float32)
    mx.eval(out)
    return out, np.array(out, copy=False)


def supported(bits: int, group_size: int, mode: str = "affine") -> bool:
    """Whether the kernel multiplies tensors quantized this way (and is available)."""
    lib = kernel()
    return lib is not None and mode == "affine" and bool(lib.kiapi_supported(bits, group_size))


class _Buffers(threading.local):
    """Per-thread buffers by name, grown as needed: the matrix a prefill product expands into
    (``scratch``: float32; ``tiles``: bfloat16 tiles), the kernel's copy of ``x`` (``work``,
    ``x_tiles``) and the rows being expanded (``rows``)."""

    def __init__(self) -> None:
        self.by_name: dict[str, Any] = {}


_buffers = _Buffers()


CACHE_LINE = 64


def aligned_empty(shape: int | tuple[int, ...], dtype: Any = "float32") -> Any:
    """An uninitialized C-contiguous NumPy array whose first element starts a cache line.

    The kernel reads and writes AMX tiles as 64-byte rows: a row that straddles two lines
    costs two, and NumPy only aligns to 16 bytes. ``bench/encoder_kernel.py``: MiniLM's
    products at 0.7-1.3 TFLOP/s with their buffers 16 bytes past a line, 1.2-2.9 aligned."""
    import numpy as np

    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + CACHE_LINE, dtype=np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def scratch(name: str, size: int, dtype: str = "float32") -> Any:
    """This thread's buffer ``name`` of at least ``size`` elements (flat, uninitialized,
    cache-line aligned), kept for the next call: kernels' work space, never a result."""
    buffer = _buffers.by_name.get(name)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
        buffer = _buffers.by_name[name] = aligned_empty(size, dtype)
    return buffer


def scratch_rows(name: str, rows: int, cols: int) -> Any:
    """:func:`scratch` as a C-contiguous float32 (rows, cols) array: a layer's intermediate
    that the next batch reuses instead of faulting fresh pages in (by hand, zeroing new pages
    was 8% of a 32 x 128-token MiniLM batch)."""
    return scratch(name, rows * cols)[: rows * cols].reshape(rows, cols)


def release_scratch() -> None:
    """Drop this thread's buffers (the worker, once quiet: a server at rest keeps no large
    batch's intermediates); they are made again on the next call."""
    _buffers.by_name.clear()


def trim_scratch(max_bytes: int) -> None:
    """Drop this thread's buffers if together they hold more than ``max_bytes``: after a
    large batch, between calls (a worker busy with chat never goes quiet)."""
    if sum(buffer.nbytes for buffer in _buffers.by_name.values()) > max_bytes:
        release_scratch()


def _sgemm():
    """``cblas_sgemm`` of the BLAS MLX uses (kiapi's OpenBLAS), or None."""
    lib = blas.loaded_library()
    return getattr(lib, "cblas_sgemm", None) if lib is not None else None


class PackedMatrix:
    """An (outputs, inputs) MLX-quantized matrix held packed, with NumPy views of its
    buffers for the kernel. ``weight`` (uint32), ``scales`` and ``biases`` (float32) are MLX
    arrays: their memory is MLX's, and counts in its active memory like any weight. The
    arrays never change after construction (the kernel holds their addresses)."""

    def __init__(self, weight: Any, scales: Any, biases: Any, group_size: int, bits: int):
        import numpy as np

        mx = import_mlx()
        self.weight = mx.contiguous(weight)
        self.scales = mx.contiguous(scales.astype(mx.float32))
        self.biases = mx.contiguous(biases.astype(mx.float32))
        mx.eval(self.weight, self.scales, self.biases)
        self.group_size, self.bits = group_size, bits
        self.outputs = int(weight.shape[0])
        self.inputs = int(scales.shape[-1]) * group_size
        self._views = [np.array(a, copy=False) for a in (self.weight, self.scales, self.biases)]
        # the kernel's fixed arguments, as ctypes objects (no conversion per call)
        c = ctypes
        self._fixed = (
            c.c_int(self.inputs), *(c.c_void_p(v.ctypes.data) for v in self._views),
            c.c_int(self.outputs), c.c_int(group_size), c.c_int(bits),
        )  # fmt: skip

    @classmethod
    def stacked(cls, modules: Sequence[Any]) -> PackedMatrix:
        """One matrix holding the rows of several quantized linear layers in order (layers
        that multiply the same input: one pass over ``x`` for all of them)."""
        mx = import_mlx()
        first = modules[0]
        return cls(
            mx.concatenate([m.weight for m in modules]),
            mx.concatenate([m.scales for m in modules]),
            mx.concatenate([m.biases for m in modules]),
            first.group_size,
            first.bits,
        )

    def matmul(self, x: Any) -> Any:
        """``x @ W.T`` for ``x`` (..., inputs), evaluated now."""
        mx = import_mlx()
        lead = x.shape[:-1]
        out = self.product(evaluated_rows(x, self.inputs))
        return mx.array(out).reshape(*lead, self.outputs)

    def product(self, x_view: Any) -> Any:
        """``x @ W.T`` for a C-contiguous float32 NumPy ``x`` (rows, inputs): NumPy out."""
        rows = x_view.shape[0]
        lib = kernel()
        many = rows > KERNEL_ROWS
        c = ctypes
        if many and bf16_products() and bf16_shape(self.outputs, self.inputs):
            # expanded and packed as tiles on every core (one OpenMP pool, as the product's)
            tiles = scratch("tiles", self.outputs * self.inputs, "uint16")
            threads = cpu_threads()
            lib.kiapi_dequantize_bf16(
                *(c.c_void_p(v.ctypes.data) for v in self._views), c.c_int(self.outputs),
                c.c_int(self.inputs), c.c_int(self.group_size), c.c_int(self.bits),
                c.c_void_p(tiles.ctypes.data),
                c.c_void_p(scratch("rows", threads * 16 * self.inputs).ctypes.data),
                c.c_int(threads),
            )  # fmt: skip
            return gemm_bf16(x_view, tiles, self.outputs)
        out = aligned_empty((rows, self.outputs))
        sgemm = _sgemm() if many else None
        if sgemm is None:
            work = scratch("work", rows * (self.inputs + self.inputs // self.group_size))
            lib.kiapi_qgemv(
                c.c_void_p(x_view.ctypes.data), c.c_int(rows), *self._fixed,
                c.c_void_p(out.ctypes.data), c.c_void_p(work.ctypes.data),
                c.c_int(cpu_threads()),
            )  # fmt: skip
        else:
            full = scratch("scratch", self.outputs * self.inputs)
            # one thread: the BLAS's own threads run the product next, and two pools taking
            # turns on two cores wait on each other (by hand, a 255-token prompt's first step
            # took 549 ms so, 812 with the expansion on two threads)
            self._dequantize_into(full, threads=1)
            _call_sgemm(sgemm, x_view, full, out, rows, self.outputs, self.inputs)
        return out

    def _dequantize_into(self, out: Any, threads: int) -> None:
        c = ctypes
        kernel().kiapi_dequantize(
            *(c.c_void_p(v.ctypes.data) for v in self._views), c.c_int(self.outputs),
            c.c_int(self.inputs), c.c_int(self.group_size), c.c_int(self.bits),
            c.c_void_p(out.ctypes.data), c.c_int(threads),
        )  # fmt: skip

    def dequantized(self) -> Any:
        """The float32 (outputs, inputs) matrix, as an MLX array (tests, measurements)."""
        import numpy as np

        mx = import_mlx()
        out = np.empty((self.outputs, self.inputs), dtype=np.float32)
        self._dequantize_into(out, threads=cpu_threads())
        return mx.array(out)


def evaluated_rows(x: Any, inputs: int) -> Any:
    """``x`` (..., inputs) evaluated, as a C-contiguous float32 NumPy (rows, inputs): a view
    of MLX's buffer where it already is one, else a copy."""
    import numpy as np

    mx = import_mlx()
    if x.dtype != mx.float32:
        x = x.astype(mx.float32)
    mx.eval(x)
    return np.ascontiguousarray(np.array(x, copy=False).reshape(-1, inputs))


def softmax_in_place(scores: Any, threads: int) -> None:
    """Softmax over the last axis of an evaluated, row-contiguous float32 MLX array, written
    into its own buffer (MLX's NumPy view is writable and shares it): only for the fresh
    result of an op that nothing else holds (see :func:`_own_buffer`)."""
    view = _own_buffer(scores)
    rows, cols = view.shape
    c = ctypes
    kernel().kiapi_softmax(
        c.c_void_p(view.ctypes.data), c.c_int(rows), c.c_int(cols), c.c_int(threads)
    )


def attention(
    q: Any, k: Any, v: Any, out: Any, sizes: tuple[int, ...], strides: Sequence[int],
    scale: float, causal: bool, mask: Any, threads: int, bf16: bool = False,
) -> None:  # fmt: skip
    """``kiapi_attention`` over NumPy float32 views (see ``qmatmul.c``): ``sizes`` is (batch,
    heads, kv heads, queries, keys, head size); ``strides`` the 12 element strides of q, k, v
    and out; ``mask`` None or a C-contiguous (batch or 1, queries, keys) array, uint8 (nonzero:
    attend) or float32 (added to the scores). With ``bf16`` (the caller's choice, where
    :func:`bf16_products` holds) and a head size that is a multiple of 32, both products run
    on AMX tiles (``kiapi_attention_bf16``); otherwise in float32."""
    batch, heads, kv_heads, length, keys, dim = sizes
    strides_c = (ctypes.c_long * 12)(*strides)
    keep = mask is not None and mask.dtype == "uint8"
    c = ctypes
    args = (
        *(c.c_void_p(a.ctypes.data) for a in (q, k, v, out)),
        *(c.c_int(n) for n in sizes), strides_c, c.c_float(scale), c.c_int(int(causal)),
        c.c_void_p(mask.ctypes.data if keep else None),
        c.c_void_p(None if keep or mask is None else mask.ctypes.data),
        c.c_int(int(mask is not None and mask.shape[0] > 1)),
    )  # fmt: skip
    if bf16 and dim % 32 == 0 and dim <= 256:
        padded = -(-keys // 32) * 32  # keys rounded up to a tile's 32
        tiles = scratch("attention_tiles", 2 * batch * kv_heads * dim * padded, "uint16")
        rows = scratch("attention_rows", threads * 16 * padded * 2)
        if not kernel().kiapi_attention_bf16(
            *args, c.c_void_p(tiles.ctypes.data), c.c_void_p(rows.ctypes.data), c.c_int(threads)
        ):
            return
    padded = -(-keys // 16) * 16  # keys rounded up to the kernel's widest vector
    kernel().kiapi_attention(
        *args,
        c.c_void_p(  # the transposed keys, then the values, per (batch, kv head)
            scratch("attention_work", batch * kv_heads * dim * (padded + keys)).ctypes.data
        ),
        c.c_void_p(scratch("attention_scores", threads * padded).ctypes.data),
        c.c_int(threads),
    )  # fmt: skip


def add_layer_norm(a: Any, x: Any, gamma: Any, beta: Any, eps: float, threads: int) -> None:
    """``x = layer_norm(a + x)`` over rows, in place in the C-contiguous float32 NumPy ``x``;
    ``a`` has x's rows, or fewer that repeat down x (a text's position rows, added to each
    text of a batch): x's row r adds a's row ``r % len(a)``."""
    rows, cols = x.shape
    if a.shape[1] != cols or not 0 < a.shape[0] <= rows or rows % a.shape[0]:
        raise ValueError(f"cannot add {a.shape} to every row of {x.shape}")
    c = ctypes
    kernel().kiapi_add_layer_norm(
        c.c_void_p(a.ctypes.data), c.c_void_p(x.ctypes.data), c.c_int(rows), c.c_int(cols),
        c.c_int(a.shape[0]), c.c_void_p(gamma.ctypes.data), c.c_void_p(beta.ctypes.data),
        c.c_float(eps), c.c_int(threads),
    )  # fmt: skip


def gelu_in_place(x: Any, threads: int) -> None:
    """Exact (erf) GELU of an evaluated float32 MLX array, in its own buffer (as above)."""
    view = _own_buffer(x)
    kernel().kiapi_gelu(
        ctypes.c_void_p(view.ctypes.data), ctypes.c_long(view.size), ctypes.c_int(threads)
    )


def _own_buffer(a: Any) -> Any:
    """A NumPy view of ``a``'s buffer, which the caller may overwrite. MLX cannot say whether
    another array shares that buffer (a slice or reshape of another array does, and its view
    is as writable), so callers pass only the fresh result of an op (``addmm``, ``+``) that
    nothing else holds, evaluated; a float32 dtype and row-contiguity are checked here."""
    import numpy as np

    mx = import_mlx()
    if a.dtype != mx.float32:
        raise ValueError(f"float32 expected, not {a.dtype}")
    view = np.array(a, copy=False)
    if not view.flags.c_contiguous:
        raise ValueError("a row-contiguous array expected")
    return view.reshape(-1, view.shape[-1]) if view.ndim else view.reshape(1, 1)


class SharedInput:
    """The product of one :class:`PackedMatrix` stacked from ``readers`` sibling layers (a
    block's query, key and value projections; an MLP's gate and up projections) with the
    input they share, computed once: mlx-lm's blocks call ``q_proj(x)``, ``k_proj(x)``,
    ``v_proj(x)`` with the same array, so the first call computes every sibling's rows and
    the others slice them. The input and product are released once every sibling has read
    them (a prefill chunk's activations would otherwise stay alive in every layer); a call
    with another array computes the whole product again (correct, only slower)."""

    def __init__(self, matrix: PackedMatrix, readers: int = 1) -> None:
        self.matrix = matrix
        self.readers = readers
        self._x: Any = None
        self._y: Any = None
        self._unread = 0

    def product(self, x: Any) -> Any:
        if x is not self._x or self._unread == 0:
            self._x, self._y, self._unread = x, self.matrix.matmul(x), self.readers
        y = self._y
        self._unread -= 1
        if self._unread == 0:
            self._x = self._y = None
        return y


ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS enums


def _call_sgemm(sgemm, x, w, out, rows: int, outputs: int, inputs: int) -> None:
    """``out = x @ w[:outputs*inputs].reshape(outputs, inputs).T`` through cblas_sgemm."""
    number, single, pointer = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    sgemm(
        number(ROW_MAJOR), number(NO_TRANS), number(TRANS), number(rows), number(outputs),
        number(inputs), single(1.0), pointer(x.ctypes.data), number(inputs),
        pointer(w.ctypes.data), number(inputs), single(0.0), pointer(out.ctypes.data),
        number(outputs),
    )  # fmt: skip


def prefill(x: Any) -> bool:
    """Whether ``x`` (batch, positions, features) holds a prompt chunk: several positions per
    sequence and more rows than :data:`KERNEL_ROWS` in all. Decoding has one position."""
    if x.ndim < 3 or x.shape[-2] == 1:
        return False
    rows = 1
    for size in x.shape[:-1]:
        rows *= int(size)
    return rows > KERNEL_ROWS


def lazy_product(matrix: PackedMatrix, x: Any) -> Any:
    """``x @ W.T`` as a lazy MLX op (its own quantized matmul: slow on the CPU, but an output
    head's prefill logits are never evaluated: mlx-lm keeps only the caches)."""
    mx = import_mlx()
    return mx.quantized_matmul(
        x.astype(mx.float32), matrix.weight, matrix.scales, matrix.biases, transpose=True,
        group_size=matrix.group_size, bits=matrix.bits,
    )  # fmt: skip


# Sibling layers mlx-lm's decoder blocks call with one input (Hugging Face names).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def pack_linears(linears: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``(path, PackedLinear)`` for every ``(path, QuantizedLinear)``; siblings (same parent,
    names in :data:`SIBLINGS`, same quantization, no bias) share one stacked matrix."""
    packed_linear, _ = packed_modules()
    by_path = dict(linears)
    out: dict[str, Any] = {}
    for path, module in linears:
        if path in out:
            continue
        parent, _, name = path.rpartition(".")
        for names in SIBLINGS:
            if name not in names:
                continue
            paths = [f"{parent}.{n}" if parent else n for n in names]
            group = [by_path.get(p) for p in paths]
            if (
                all(g is not None and "bias" not in g for g in group)
                and len({(g.bits, g.group_size) for g in group}) == 1
            ):
                shared = SharedInput(PackedMatrix.stacked(group), readers=len(group))
                start = 0
                for index, (p, g) in enumerate(zip(paths, group, strict=True)):
                    rows = int(g.weight.shape[0])
                    out[p] = packed_linear(
                        shared=shared, rows=(start, start + rows), owner=index == 0
                    )
                    start += rows
            break
        if path not in out:  # an untied output head: its prefill logits are never read
            out[path] = packed_linear(module, lazy_prefill=path == "lm_head")
    return [(path, out[path]) for path, _ in linears]


@functools.cache
def packed_modules() -> tuple[type, type]:
    """``(PackedLinear, PackedEmbedding)``, defined once MLX is imported (lazily)."""
    import_mlx()
    import mlx.nn as nn

    class PackedLinear(nn.Module):
        """``x @ W.T (+ b)`` over a packed quantized ``W`` (see the module docstring).

        Alone (``quantized``): holds its MLX arrays as parameters and a
        :class:`PackedMatrix` over them. As a sibling (``shared``, ``rows``): its output is
        ``rows`` of the shared product; the first sibling (``owner``) holds the stacked
        arrays as its parameters, so the model's parameters list each array once."""

        def __init__(
            self,
            quantized: Any = None,
            *,
            shared: SharedInput | None = None,
            rows: tuple[int, int] | None = None,
            owner: bool = True,
            lazy_prefill: bool = False,
        ) -> None:
            super().__init__()
            self._lazy_prefill = lazy_prefill
            if shared is None:
                shared = SharedInput(
                    PackedMatrix(
                        quantized.weight, quantized.scales, quantized.biases,
                        quantized.group_size, quantized.bits,
                    )
                )  # fmt: skip
                if "bias" in quantized:
                    self.bias = quantized.bias
            self._shared, self._rows = shared, rows
            if owner:
                matrix = shared.matrix
                self.weight, self.scales, self.biases = matrix.weight, matrix.scales, matrix.biases

        def __call__(self, x: Any) -> Any:
            if self._lazy_prefill and prefill(x):
                y = lazy_product(self._shared.matrix, x)
            else:
                y = self._shared.product(x)
                if self._rows is not None:
                    y = y[..., self._rows[0] : self._rows[1]]
            return y + self.bias if "bias" in self else y

    class PackedEmbedding(nn.Module):
        """A quantized embedding table: lookups expanded to float32 exactly as
        :func:`kiapi.runtime.mlx_quantized.dequantized_float32` does; ``as_linear`` (a tied
        output head) through the kernel for a few rows, lazily through MLX's quantized
        matmul for many (prefill's logits, which nothing evaluates)."""

        def __init__(self, quantized: Any) -> None:
            super().__init__()
            self.group_size, self.bits = quantized.group_size, quantized.bits
            self._matrix = PackedMatrix(
                quantized.weight, quantized.scales, quantized.biases, self.group_size, self.bits
            )
            self.weight = self._matrix.weight
            self.scales, self.biases = self._matrix.scales, self._matrix.biases

        def __call__(self, ids: Any) -> Any:
            from kiapi.runtime.mlx_quantized import dequantized_float32

            return dequantized_float32(
                self.weight[ids], self.scales[ids], self.biases[ids], self.group_size, self.bits
            )

        def as_linear(self, x: Any) -> Any:
            if prefill(x):
                return lazy_product(self._matrix, x)
            return self._matrix.matmul(x)

    return PackedLinear, PackedEmbedding
