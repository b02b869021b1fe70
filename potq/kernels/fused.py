"""The fused PoT GEMV (``csrc/pot_gemv.cpp``): built once per machine, with a PyTorch fallback.

The C++ sources are compiled on first use with ``torch.utils.cpp_extension.load`` into
``$POTQ_HOME/kernels/<source hash>`` and reused from there. The vector ISA (AVX-512, AVX2, or
scalar) is chosen at run time from the CPU. When no compiler is available, :func:`extension`
returns None and callers use :func:`reference_gemv` — dequantize-then-matmul in PyTorch, which
is also what the tests compare the kernel against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
import os
import sys
import threading
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from potq.errors import PotqError
from potq.formats.grouping import group_width
from potq.formats.pot import PoT, PoTWithZero
from potq.formats.uniform import UniformSym
from potq.paths import home_dir
from potq.switch import Switch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("pot_gemv.cpp", "pot_gemv_avx2.cpp", "pot_gemv_avx512.cpp", "int8_gemv.cpp",
                                         "q8_kernel.cpp", "q8_vnni.cpp", "decoder_math.cpp", "native_decoder.cpp")]
# at::parallel_for splits rows across threads only in code compiled with OpenMP (PyTorch's own
# runtime, already loaded, serves it); without the flag it silently runs on one thread.
OPENMP = "-fopenmp"
BUILD_FLAGS = f"-O3 {OPENMP}"
ISAS = {"avx512": ("avx512", "avx2", "scalar"), "avx2": ("avx2", "scalar"), "scalar": ("scalar",), "none": ()}


BUILD_WAIT_S = float(os.environ.get("POTQ_BUILD_WAIT", "900"))  # how long to wait for another builder
RECORD_FILE = "potq-build.json"  # the built .so's size and sha256, written after a successful build


@lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The compiled kernel module, or None (with one line on stderr saying why) when it cannot
    be built or loaded here.

    Builds are serialised with ``flock`` on a lock file the kernel releases when its holder dies
    (kill -9, out of memory), so a killed build never leaves later processes waiting; torch's own
    lock file, which does not expire, is removed while potq holds the flock. A cached ``.so`` is
    loaded only if its size and sha256 match what was recorded after it was built: a truncated
    or altered one is rebuilt instead of crashing the process when loaded.
    """
    digest = build_digest()
    name = f"potq_pot_gemv_{digest}"
    try:
        build = home_dir() / "kernels" / digest
        build.mkdir(parents=True, exist_ok=True)
        with _build_lock(build):
            return _load_checked(build, name)
    except Exception as exc:  # no compiler, no ninja, a failed compile, POTQ_HOME unusable ...: PyTorch path
        return _fallback(str(exc))


def build_digest() -> str:
    """The name of this kernel's build folder: a digest of its sources, where they are, torch's
    version and the flags. The sources' folder counts because torch's build reads them by path:
    two checkouts of the same code sharing one folder would each rebuild the other's library."""
    code = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h"))
    where = str(CSRC.resolve()).encode()
    return hashlib.sha256(code + where + torch.__version__.encode() + BUILD_FLAGS.encode()).hexdigest()[:16]


def _fallback(why: str) -> None:
    lines = why.strip().splitlines() or ["unknown error"]
    print(f"potq: the fused PoT kernel is not available ({lines[0][:160]}); using the PyTorch path",
          file=sys.stderr, flush=True)
    return None


@contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``build/.potq.lock``, waiting at most :data:`BUILD_WAIT_S`."""
    import fcntl
    import time

    with open(build / ".potq.lock", "a+") as handle:
        deadline, told = time.monotonic() + BUILD_WAIT_S, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building the kernel in {build} for "
                                       f"{BUILD_WAIT_S:.0f} s") from None
                if not told:
                    print("potq: waiting for another potq process to finish building the fused kernel",
                          file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.5)
        try:
            (build / "lock").unlink(missing_ok=True)  # torch's baton: stale, since we hold the flock
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_checked(build: Path, name: str) -> ModuleType:
    """Build (or reuse) and import the extension; the ``.so`` is checked against its record first."""
    import json

    from torch.utils.cpp_extension import load

    library, record = build / f"{name}.so", build / RECORD_FILE
    if library.exists() and _record(library) != _read_record(record):
        print(f"potq: the cached kernel {library} does not match its build record; rebuilding it",
              file=sys.stderr, flush=True)
        library.unlink()
    if not library.exists():
        record.unlink(missing_ok=True)
        print(f"potq: building the fused PoT kernel once for this machine (about a minute) in {build}",
              file=sys.stderr, flush=True)
    module = load(name=name, sources=[str(p) for p in SOURCES], build_directory=str(build),
                  extra_cflags=["-O3", OPENMP], extra_ldflags=[OPENMP], extra_include_paths=[str(CSRC)],
                  verbose=False)
    if not record.exists():
        tmp = record.with_name(f".{RECORD_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(_record(library)))
        os.replace(tmp, record)
    return module


def _record(library: Path) -> dict:
    return {"size": library.stat().st_size, "sha256": hashlib.sha256(library.read_bytes()).hexdigest()}


def _read_record(record: Path) -> dict | None:
    import json

    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return None


# Within `with enabled(False):` packed PoT layers take the pure-PyTorch path (`potq generate --kernel
# torch`; POTQ_FUSED=0 sets the default).
enabled = Switch("POTQ_FUSED")


@lru_cache(maxsize=1)
def best_isa() -> str:
    ext = extension()
    return ext.best_isa() if ext is not None else "none"


def serves(layer) -> bool:  # noqa: ANN001
    """Whether the fused kernel computes this packed layer: a PoT format of 2–4 bits on the CPU,
    with the kernel built here (wider codes would take its slow scalar path: not worth it)."""
    return bool(enabled) and layer.codes.is_cpu and _grid(layer) is not None


def _grid(layer) -> tuple[int, int, int, bool] | None:  # noqa: ANN001
    """The kernel's description of ``layer``'s codes — bits, group width, K, whether field 0 is
    zero — or None where the kernel does not serve its format. Worked out once per layer: a
    decoding step calls the kernel for every linear, so per-call Python time adds up."""
    grid = layer.__dict__.get("_fused_grid", False)
    if grid is False:
        fmt = layer.fmt
        grid = None
        if isinstance(fmt, PoT) and fmt.bits <= 4 and extension() is not None:
            grid = (fmt.bits, group_width(layer.in_features, layer.group_size), fmt.top_exponent,
                    isinstance(fmt, PoTWithZero))
        layer.__dict__["_fused_grid"] = grid
    return grid


def serves_int8(layer) -> bool:  # noqa: ANN001
    """Whether the 8-bit GEMV computes this packed layer: symmetric 8-bit codes on the CPU (a
    GGUF's Q8_0 token table, packed back losslessly, as a tied output head)."""
    width = layer.__dict__.get("_int8_group", False)
    if width is False:
        fmt = layer.fmt
        width = (group_width(layer.in_features, layer.group_size)
                 if isinstance(fmt, UniformSym) and fmt.bits == 8 and extension() is not None else None)
        layer.__dict__["_int8_group"] = width
    return bool(enabled) and width is not None and layer.codes.is_cpu


def int8_gemv(x: Tensor, layer) -> Tensor:  # noqa: ANN001
    """``x @ W.T (+ bias)`` for a layer :func:`serves_int8` accepted, the bytes widened in registers."""
    return _rows_through(x, layer, lambda flat: extension().int8_gemv(flat, layer.codes, layer.scales,
                                                                       layer.__dict__["_int8_group"], best_isa()))


def _rows_through(x: Tensor, layer, kernel: Callable[[Tensor], Tensor]) -> Tensor:  # noqa: ANN001
    """``kernel`` on ``x`` as contiguous float32 rows ``[rows, in]``, plus the layer's bias, back in
    ``x``'s shape and dtype."""
    flat = x.reshape(-1, layer.in_features)
    if flat.dtype != torch.float32 or not flat.is_contiguous():
        flat = flat.float().contiguous()
    y = kernel(flat)
    if layer.bias is not None:
        y += layer.bias
    y = y.view(*x.shape[:-1], layer.out_features)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def q8_isa() -> str:
    """The native decoder's 8-bit-activation kernel here: "vnni" (AVX-512 VNNI), "avx2", "scalar" or "none"."""
    ext = extension()
    return ("scalar", "avx2", "vnni")[ext.q8_best_isa()] if ext is not None else "none"


def _isa(isa: str | None) -> str:
    if isa is None:
        return best_isa()
    if isa not in ISAS[best_isa()]:
        raise PotqError(f"this CPU runs the {', '.join(ISAS[best_isa()])} kernels, not {isa}")
    return isa


def pot_gemv(x: Tensor, layer, isa: str | None = None) -> Tensor:  # noqa: ANN001
    """``x @ W.T (+ bias)`` for a packed PoT layer, ``x`` of shape ``[..., in]``, never decoding W;
    the result in ``x``'s dtype (the kernel itself works in float32).

    Where the kernel cannot run (no compiler here, a non-PoT format) the result comes from
    :func:`reference_gemv` instead, so callers never need to ask first.
    """
    if not serves(layer):
        return reference_gemv(x, layer).to(x.dtype)
    return served_gemv(x, layer, _isa(isa))


def served_gemv(x: Tensor, layer, isa: str | None = None) -> Tensor:  # noqa: ANN001
    """:func:`pot_gemv` for a layer :func:`serves` has accepted: the decoding hot path, which
    does nothing per call that need not be done per call."""
    return _rows_through(x, layer, lambda flat: extension().pot_gemv(flat, layer.codes, layer.scales,
                                                                      *layer.__dict__["_fused_grid"], isa or best_isa()))


def bound_gemv(layer) -> Callable[[Tensor], Tensor] | None:  # noqa: ANN001
    """``layer``'s fused GEMV with everything but the input bound once, or None where the kernel
    does not serve the layer: for a caller that calls it every token with a float32
    ``[rows, in]`` input (potq's LLaMA decoder), skipping all per-call checks."""
    if not serves(layer):
        return None
    ext, args, bias = extension(), (layer.codes, layer.scales, *_grid(layer), best_isa()), layer.bias

    def gemv(x: Tensor) -> Tensor:
        y = ext.pot_gemv(x, *args)
        return y if bias is None else y.add_(bias)

    return gemv


def decoder_ops(kernel: bool = True) -> ModuleType | None:
    """The extension, for its decoding-step ops (``rms_norm``, ``attend_step``, ``silu_mul`` in
    ``csrc/decoder_ops.h``), where it is built and enabled and ``kernel`` says the caller's inputs
    are float32 CPU tensors; else None, and the caller uses PyTorch's ops."""
    return extension() if kernel and enabled else None


def rms_norm(kernel: bool = True) -> Callable[[Tensor, Tensor, float], Tensor]:
    """``norm(x, weight, eps)``: one extension call where :func:`decoder_ops` allows — a decoding
    step runs two a block, and PyTorch's composite takes eight ops — else
    :func:`torch.nn.functional.rms_norm`."""
    ops = decoder_ops(kernel)
    if ops is not None:
        return ops.rms_norm
    return lambda x, weight, eps: F.rms_norm(x, (x.shape[-1],), weight, eps)


def packed_dequantize(layer, isa: str | None = None, out: Tensor | None = None) -> Tensor:  # noqa: ANN001
    """The float32 weight of a packed PoT layer, made by the kernel's exponent add (falls back
    to the layer's own PyTorch decode where the kernel does not serve it); into ``out`` if given."""
    if not serves(layer):
        return layer.dequantize() if out is None else out.copy_(layer.dequantize())
    return extension().pot_dequantize(layer.codes, layer.scales, layer.in_features, *_grid(layer), _isa(isa), out)


def dequantize_rows(layer, rows: Tensor) -> Tensor:  # noqa: ANN001
    """Rows ``rows`` (a 1-D index tensor) of a packed PoT layer the kernel serves, as float32
    ``[len(rows), in_features]`` by its exponent add: an embedding lookup, one call instead of the
    dozen PyTorch ops of unpacking and decoding."""
    return extension().pot_dequantize(layer.codes[rows], layer.scales[rows], layer.in_features, *_grid(layer),
                                      best_isa(), None)


_scratch = threading.local()


def scratch_dequantize(layer) -> Tensor:  # noqa: ANN001
    """:func:`packed_dequantize` into a buffer this thread reuses call after call, valid until its
    next call: a prompt or an evaluation window decodes every layer's weight once per forward,
    and fresh megabytes each time would cost a page fault per 4 KiB on first touch. Only for a
    weight nothing keeps (no autograd graph records it)."""
    n = layer.out_features * layer.in_features
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < n:
        buffer = _scratch.buffer = torch.empty(n)
    return packed_dequantize(layer, out=buffer[:n].view(layer.out_features, layer.in_features))


def reference_gemv(x: Tensor, layer) -> Tensor:  # noqa: ANN001
    """The same product by dequantize-then-matmul (the fallback and the tests' reference)."""
    return F.linear(x.float(), layer.dequantize(), layer.bias)
