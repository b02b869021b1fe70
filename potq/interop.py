"""A packed folder opens in transformers: ``AutoModelForCausalLM.from_pretrained(folder)``.

Every folder potq writes carries a ``config.json`` whose ``model_type`` is ``"potq"``: the real
architecture sits under ``base_config`` and the quantization (format, bits, group size, each
layer's settings) under ``quantization_config``. After ``import potq``, transformers knows that
model type (registered here through its Auto classes) and hands the folder to
:func:`potq.storage.load` — the packed layers, no float copy, the same logits as ``potq.load``,
and a real transformers model, so ``model.generate`` works. Without ``import potq``,
transformers refuses the folder (it does not know the model type ``potq``) instead of building a
model with random weights.

The same import registers potq with transformers' quantizer extension points
(``register_quantization_config`` / ``register_quantizer``), so a float model can be quantized as
transformers loads it, the way torchao's integration does::

    AutoModelForCausalLM.from_pretrained(folder, quantization_config=PotqQuantization(bits=3))

(data-free methods only — ``rtn`` or ``grid``; calibrated ones run through ``potq.quantize_``).
A packed folder does not go through that route on purpose: transformers treats an unknown
``quant_method`` as "not quantized" and would build random weights without potq.

Registration waits until transformers is imported (``import potq`` alone never imports it, so the
command line stays fast): :func:`install` registers at once if transformers is loaded, else when
it is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

MODEL_TYPE = "potq"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def folder_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a packed folder, from its ``potq.json``."""
    layers = {name: {k: entry[k] for k in ("format", "bits", "group_size")}
              for name, entry in manifest["quantized_layers"].items()}
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["PotqForCausalLM"],
        "base_config": manifest["architecture"]["config"],
        "quantization_config": {"quant_method": MODEL_TYPE, "format": manifest.get("format"),
                                "bits": manifest.get("bits"), "group_size": manifest.get("group_size"),
                                "method": manifest.get("method"), "layers": layers},
        "note": "a potq packed model: `import potq` before transformers' from_pretrained, or use potq.load",
    }


def tokenizer_config(bos: str | None, eos: str | None, chat_template: str | None = None) -> dict[str, Any]:
    """What ``AutoTokenizer`` needs beside ``tokenizer.json`` (and the chat template, where the model has one)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    return config if chat_template is None else {**config, "chat_template": chat_template}


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    class PotqConfig(PretrainedConfig):
        """The ``config.json`` of a potq folder (the architecture is in ``base_config``)."""

        model_type = MODEL_TYPE

    class PotqForCausalLM(PreTrainedModel):
        """Stands for a potq folder in transformers' Auto classes: loading returns the packed
        transformers model :func:`potq.storage.load` builds."""

        config_class = PotqConfig

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):  # noqa: ANN206
            from potq.storage import load

            device = kwargs.get("device_map")
            model = load(pretrained_model_name_or_path).model
            return model.to(device) if isinstance(device, str) and device not in ("auto", "cpu") else model

    AutoConfig.register(MODEL_TYPE, PotqConfig, exist_ok=True)
    AutoModelForCausalLM.register(PotqConfig, PotqForCausalLM, exist_ok=True)
    _register_quantizer()


def _register_quantizer() -> None:
    """``quant_method="potq"`` for ``from_pretrained(..., quantization_config=PotqQuantization(...))``."""
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if MODEL_TYPE in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config(MODEL_TYPE)
    class PotqQuantization(QuantizationConfigMixin):
        """What to quantize to while loading: a potq format, bits, group size, a data-free method."""

        def __init__(self, format: str = "pot", bits: int = 4, group_size: int = 128, method: str = "rtn",
                     **_ignored: Any) -> None:
            self.quant_method = MODEL_TYPE
            self.format, self.bits, self.group_size, self.method = format, bits, group_size, method

        def post_init(self) -> None:
            from potq.config import QuantConfig
            from potq.errors import PotqError

            QuantConfig(self.format, self.bits, self.group_size)  # checks format, bits and group size
            if self.method not in ("rtn", "grid"):
                raise PotqError(f"quantizing while loading takes a data-free method (rtn, grid), not {self.method!r}: "
                                "load the float model and call potq.quantize_")

    @register_quantizer(MODEL_TYPE)
    class PotqQuantizer(HfQuantizer):
        """Loads the float weights as usual, then packs every block linear (potq.quantize_)."""

        requires_calibration = False

        def __init__(self, quantization_config: PotqQuantization, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            quantization_config.post_init()

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            from potq.config import QuantConfig
            from potq.models.hf import as_linear_layers
            from potq.quantize import quantize_

            q = self.quantization_config
            return quantize_(as_linear_layers(model), QuantConfig(q.format, q.bits, q.group_size),
                             method=q.method, progress=False)

        def is_serializable(self) -> bool:
            return False  # potq.save(model, path, tokenizer=...) writes the packed folder

        @property
        def is_trainable(self) -> bool:
            return False

    globals()["PotqQuantization"] = PotqQuantization  # potq.interop.PotqQuantization, once transformers is loaded


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` right after transformers is first imported."""

    def find_spec(self, name: str, path: Any, target: Any = None):  # noqa: ANN201
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register potq folders with transformers now, or as soon as transformers is imported."""
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
