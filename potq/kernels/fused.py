"""The fused PoT GEMV (``csrc/pot_gemv.cpp``): built once per machine, with a PyTorch fallback.

The C++ sources are compiled on first use with ``torch.utils.cpp_extension.load`` into
``$POTQ_HOME/kernels/<source hash>`` and reused from there. The vector ISA (AVX-512, AVX2, or
scalar) is chosen at run time from the CPU. When no compiler is available, :func:`extension`
returns None and callers use :func:`reference_gemv` — dequantize-then-matmul in PyTorch, which
is also what the tests compare the kernel against.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from potq.errors import PotqError
from potq.formats.grouping import group_width
from potq.formats.pot import PoT, PoTWithZero
from potq.paths import home_dir

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("pot_gemv.cpp", "pot_gemv_avx2.cpp", "pot_gemv_avx512.cpp")]
ISAS = {"avx512": ("avx512", "avx2", "scalar"), "avx2": ("avx2", "scalar"), "scalar": ("scalar",), "none": ()}


@lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The compiled kernel module, or None (with one warning) when it cannot be built here."""
    from torch.utils.cpp_extension import load

    code = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h"))
    digest = hashlib.sha256(code + torch.__version__.encode()).hexdigest()[:16]
    build = home_dir() / "kernels" / digest
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load(name=f"potq_pot_gemv_{digest}", sources=[str(p) for p in SOURCES], build_directory=str(build),
                    extra_cflags=["-O3"], extra_include_paths=[str(CSRC)], verbose=False)
    except Exception as exc:  # no compiler, no ninja, ...: the PyTorch path still works
        warnings.warn(f"potq: the fused PoT kernel could not be built ({str(exc).splitlines()[0][:120]}); "
                      "using the PyTorch fallback", stacklevel=2)
        return None


@lru_cache(maxsize=1)
def best_isa() -> str:
    ext = extension()
    return ext.best_isa() if ext is not None else "none"


def pot_gemv(x: Tensor, layer, isa: str | None = None) -> Tensor:  # noqa: ANN001
    """``x @ W.T`` for a packed PoT layer, ``x`` of shape ``[..., in]`` (float32), never decoding W.

    Where the kernel cannot run (no compiler here, a non-PoT format) the result comes from
    :func:`reference_gemv` instead, so callers never need to ask first.
    """
    ext = extension()
    if ext is None or not isinstance(layer.fmt, PoT):
        return reference_gemv(x, layer)
    isa = isa or best_isa()
    if isa not in ISAS[best_isa()]:
        raise PotqError(f"this CPU runs the {', '.join(ISAS[best_isa()])} kernels, not {isa}")
    flat = x.reshape(-1, layer.in_features).float().contiguous()
    fmt = layer.fmt
    y = ext.pot_gemv(flat, layer.codes, layer.scales.float().contiguous(), fmt.bits,
                     group_width(layer.in_features, layer.group_size), fmt.top_exponent,
                     isinstance(fmt, PoTWithZero), isa)
    if getattr(layer, "bias", None) is not None:
        y = y + layer.bias
    return y.reshape(*x.shape[:-1], layer.out_features)


def reference_gemv(x: Tensor, layer) -> Tensor:  # noqa: ANN001
    """The same product by dequantize-then-matmul (the fallback and the tests' reference)."""
    return F.linear(x.float(), layer.dequantize(), getattr(layer, "bias", None))
