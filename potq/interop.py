"""A packed folder opens in transformers: ``AutoModelForCausalLM.from_pretrained(folder)``.

Every folder potq writes carries a ``config.json`` whose ``model_type`` is ``"potq"``: the real
architecture sits under ``base_config`` and the quantization (format, bits, group size, each
layer's settings) under ``quantization_config``. After ``import potq``, transformers knows that
model type (registered here through its Auto classes) and hands the folder to
:func:`potq.storage.load` — the packed layers, no float copy, the same logits as ``potq.load``,
and a real transformers model, so ``model.generate`` works. Without ``import potq``,
transformers refuses the folder (it does not know the model type ``potq``) instead of building a
model with random weights.

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


def tokenizer_config(bos: str | None, eos: str | None) -> dict[str, Any]:
    """What ``AutoTokenizer`` needs beside ``tokenizer.json``."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}


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
