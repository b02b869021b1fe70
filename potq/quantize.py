"""``quantize_``: swap a model's linear layers for packed :class:`QuantLinear` layers, in place.

The flow is one-way: pick the layers, let the method decide codes and scales, replace the
modules, and record what was done in ``model.potq_meta`` (saved as ``potq.json``). On request the
embedding tables (token, position, and an output head tied to the token table) become packed
:class:`QuantEmbedding` layers of the same format, round-to-nearest.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

import torch
from torch import Tensor, nn

from potq import devices
from potq.config import QuantConfig
from potq.engine import resume
from potq.errors import PotqError
from potq.eval.data import training_batch
from potq.eval.perplexity import max_positions
from potq.methods import get_method
from potq.models import LoadedModel, transformer_blocks
from potq.formats.weights import QuantizedWeight, quantize_weight
from potq.nn import PackedWeight, QuantEmbedding, QuantLinear


def quantizable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the transformer blocks, by its name in ``model``.

    Embeddings and the output head stay in float, as in GPTQ and the thesis.
    """
    blocks = transformer_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    return {f"{prefix}.{name}": module for name, module in blocks.named_modules()
            if isinstance(module, nn.Linear)}


def embedding_tables(model: nn.Module) -> dict[str, nn.Embedding]:
    """Every ``nn.Embedding`` of the model (GPT-2: token and position tables; LLaMA: token)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Embedding)}


def quantize_embeddings_(model: nn.Module, config: QuantConfig,
                         given: dict[str, QuantizedWeight] | None = None) -> dict[str, QuantEmbedding]:
    """Replace the embedding tables by packed ones (round-to-nearest, groups along the vector);
    with ``given``, only those tables, by the quantized weights given.

    An output head whose weight *is* the token table (tied, as in GPT-2 and SmolLM2) becomes a
    :class:`QuantLinear` sharing the table's codes, so the model stays tied and is stored once.
    An untied head stays float, like every output head in potq.
    """
    fmt = config.make_format()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done = {}
    for name, table in embedding_tables(model).items():
        if given is not None and name not in given:
            continue
        qw = given[name] if given is not None else quantize_weight(table.weight.detach(), fmt, config.group_size)
        packed = QuantEmbedding.from_quantized(qw).keep_scale_of(table)
        model.set_submodule(name, packed)
        done[name] = packed
        if isinstance(head, nn.Linear) and head.weight is table.weight:
            tied = QuantLinear(packed.in_features, packed.out_features, fmt, config.group_size,
                               bias=head.bias is not None)
            tied.share_from(packed)
            if head.bias is not None:
                tied.bias.copy_(head.bias.detach().float())
            model.set_submodule(next(n for n, m in model.named_modules() if m is head), tied)
    return done


INT8_TABLES = QuantConfig("uniform-sym", 8, 32)  # llama.cpp's Q8_0: an fp16 scale and an int8 per 32


def pack_exact_tables_(model: nn.Module) -> list[str]:
    """Pack the embedding tables and an untied output head whose values lie exactly on an 8-bit
    grid per 32 (a GGUF's Q8_0 tensors, expanded to float on load) back onto that grid, losslessly:
    the same values in about a quarter of float32's bytes, so a model from a GGUF is not stored
    larger than it came. A tensor that does not round-trip bit for bit stays float."""
    fmt = INT8_TABLES.make_format()

    def exact(w: Tensor) -> QuantizedWeight | None:
        if w.is_meta or w.shape[1] % INT8_TABLES.group_size:  # meta: a lazy model's head, read at the end
            return None
        parts = []  # a few thousand rows at a time: a 262k-row table never has float temporaries of its size
        for rows in w.detach().split(4096):  # most tensors fail on their first rows
            qw = quantize_weight(rows.float(), fmt, INT8_TABLES.group_size)
            if not torch.equal(qw.dequantize(), rows.float()):
                return None
            parts.append(qw)
        return QuantizedWeight(fmt, INT8_TABLES.group_size, torch.cat([p.codes for p in parts]),
                               torch.cat([p.scale for p in parts]), None)

    found = {name: exact(table.weight) for name, table in embedding_tables(model).items()}
    found = {name: qw for name, qw in found.items() if qw is not None}
    tables = list(found)
    if found:
        quantize_embeddings_(model, INT8_TABLES, found)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear and (qw := exact(head.weight.detach())) is not None:  # untied: tied ones are done
        name = next(n for n, m in model.named_modules() if m is head)
        model.set_submodule(name, QuantLinear.from_quantized(qw, head.bias))
        tables.append(name)
    return tables


def quantize_(model: nn.Module | LoadedModel, config: QuantConfig, method: str = "rtn",
              calib_samples: int = 32, calib_len: int = 512, seed: int = 0, embeddings: bool | QuantConfig = False,
              resume_dir: str | None = None, device: str | torch.device | None = None, bpw: float | None = None,
              **settings: Any) -> nn.Module:
    """Quantize ``model``'s transformer linears with ``method`` to ``config``; returns the module.

    ``embeddings=True`` also quantizes the embedding tables (see :func:`quantize_embeddings_`),
    first, so a data-dependent method calibrates on what the quantized model will feed its blocks;
    a QuantConfig instead (e.g. :data:`INT8_TABLES`, symmetric 8-bit: a tied head then runs on the
    8-bit GEMV) quantizes them in that format.
    Without it, a table that is exactly 8-bit already (a GGUF's Q8_0) is packed losslessly
    (:func:`pack_exact_tables_`); other tables stay float.

    ``settings`` go to the method (e.g. ``progress=False``, ``epochs=10``); the JSON-able ones are
    recorded in ``model.potq_meta`` and from there in ``potq.json``. Methods that need data get
    ``calib_samples`` sequences of ``calib_len`` tokens drawn with ``seed`` from the calibration
    half of C4 (a char model trained here: the train split of its text; never evaluation text)
    unless ``calibration=ids`` is given; 32×512 is the fast
    default on 2-core CPUs (the thesis uses 128×2048).

    ``resume_dir``: a block-wise method checkpoints every finished block there, and a run of the
    same quantization killed before it finished goes on from its last block
    (:mod:`potq.engine.resume`); the folder is the caller's to remove when the result is saved.

    ``device`` (``"cpu"``, ``"cuda"``, ``"auto"``): where the method computes; the model stays in
    memory where it is and the packed result is on the CPU (see :mod:`potq.devices`). ``None``:
    the device of the model's parameters.

    ``bpw``: a bit budget — bits per weight over every quantized linear, scales included; each
    layer gets the width (``config``'s format at 2, 3, 4 bits, or an 8-bit layer) that a measured
    sensitivity says it needs (:mod:`potq.methods.allocate`); needs a staged method
    (``blockap``, ``awq,blockap,e2e``, …).
    """
    module, tokenizer = (model.model, model.tokenizer) if isinstance(model, LoadedModel) else (model, None)
    if any(isinstance(m, PackedWeight) for m in module.modules()):
        raise PotqError("this model is already quantized: load the float model to quantize it again")
    chosen = get_method(method, staged=bpw is not None)
    _check_settings(method, chosen.run, settings)
    lazy = getattr(module, "potq_lazy", None)
    if lazy is not None and not chosen.blockwise(settings):
        raise PotqError(f"method {method!r} needs the whole model in memory: load it without lazy=True "
                        "(rtn and grid stream through potq.stream.stream_quantize)")
    layers = quantizable_layers(module)
    if not layers:
        raise PotqError(f"{type(module).__name__} has no linear layers in its transformer blocks to quantize")
    if embeddings:
        quantize_embeddings_(module, config if embeddings is True else embeddings)
    else:
        pack_exact_tables_(module)
    calibration_info = None
    if chosen.needs_calibration(settings) and "calibration" not in settings:
        if tokenizer is None:
            raise PotqError(f"method {method!r} needs calibration data: pass a LoadedModel or calibration=ids")
        source = model.source if isinstance(model, LoadedModel) else {}
        limit = max_positions(module)
        if limit is not None and calib_len > limit:
            raise PotqError(f"calibration sequences of {calib_len} tokens exceed the model's {limit} positions: "
                            f"pass --calib-len {limit} or less")
        data = ("the train split of its own text" if source.get("loader") == "potq train-char"
                else "c4 calibration half (c4_validation_2k.jsonl documents 0-999)")
        calibration_info = {"data": data, "samples": calib_samples, "seqlen": calib_len, "seed": seed}
        settings["calibration"] = training_batch(tokenizer, source, calib_samples, calib_len, seed)
    allocation = None
    if bpw is not None:
        if not getattr(chosen.run, "staged", False):
            raise PotqError(f"--bpw needs a staged method (blockap, grid+…, e.g. awq,blockap,e2e), not {method!r}")
        if lazy is not None:
            raise PotqError("--bpw measures every layer first: load the model without lazy=True")
        from potq.methods.allocate import allocate

        with devices.using(devices.of(module) if device is None else device):
            allocation = allocate(module, layers, config, settings["calibration"], bpw,
                                  progress=settings.get("progress", True))
        settings["formats"] = {name: c.make_format() for name, c in allocation.configs.items()}
    source = model.source if isinstance(model, LoadedModel) else {}
    fingerprint = (method, config.to_dict(), embeddings, source.get("sha256"), bpw,
                   {k: v for k, v in settings.items() if k not in _UI_SETTINGS and _is_json(v)},
                   settings.get("calibration", torch.zeros(0)))
    device = devices.of(module) if device is None else device
    with resume.checkpointing(resume_dir, *fingerprint), devices.using(device):
        quantized = chosen.run(module, layers, config, **settings)
    if lazy is not None:
        lazy.finish(module)
        del module.potq_lazy  # every block is done
        if not embeddings:
            pack_exact_tables_(module)  # the head, read only now
    home = devices.of(module)
    for name in list(quantized):  # popped: a streamed model never holds unpacked and packed codes of all layers
        module.set_submodule(name, QuantLinear.from_quantized(quantized.pop(name), layers[name].bias).to(home))
    module.potq_meta = {
        **config.to_dict(),
        "embeddings": embeddings if isinstance(embeddings, bool) else embeddings.to_dict(),
        "method": method,
        "method_settings": recorded_settings(chosen.run, {**settings,
                                                          **getattr(module, "potq_report", {}).get("settings", {})}),
        "calibration": calibration_info,
    }
    if allocation is not None:
        module.potq_meta.update(bpw=bpw, allocation=allocation.labels())
    return module


def recorded_settings(run: Callable, settings: dict[str, Any]) -> dict[str, Any]:
    """What ``potq.json`` records of a method's settings: its defaults overridden by ``settings``,
    the JSON-able ones that change the result."""
    effective = {**_defaults(run), **settings}
    return {k: v for k, v in effective.items() if k not in _UI_SETTINGS and _is_json(v)}


_UI_SETTINGS = {"progress", "state_dir"}  # how a run looks or where it keeps a checkpoint: not recorded
_INPUTS = ("model", "layers", "config")  # what every method is given, not a setting


def _defaults(run: Callable) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(run).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_settings(method: str, run: Callable, settings: dict[str, Any]) -> None:
    params = inspect.signature(run).parameters
    unknown = sorted(set(settings) - set(params) - {"calibration"})
    if unknown:
        allowed = sorted(set(params) - set(_INPUTS) - _UI_SETTINGS)
        raise PotqError(f"method {method!r} has no setting {', '.join(map(repr, unknown))}; "
                        f"it takes: {', '.join(allowed) or 'none'}")
    for name, value in settings.items():  # a string "False" would be truthy: refuse it, not run it
        default = params[name].default if name in params else None
        if isinstance(default, (bool, int, float, str)) and not _same_kind(value, default):
            raise PotqError(f"method {method!r} setting {name!r} must be {type(default).__name__} "
                            f"like its default {default!r}, got {value!r}")


def _same_kind(value: Any, default: bool | int | float | str) -> bool:
    """Whether ``value`` can stand where ``default`` does: bools only for bools, ints for floats."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
