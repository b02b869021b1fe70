"""potq — power-of-two quantization of large language models.

    import potq
    lm = potq.load_model("smollm2-135m")
    potq.quantize_(lm.model, potq.PoTConfig(bits=3, group_size=128), method="rtn")
    potq.save(lm, "out/smollm2-pot3")
    lm = potq.load("out/smollm2-pot3")
    potq.eval.perplexity(lm.model, lm.tokenizer, "wikitext2", ctx=2048)

Names are imported on first use, so ``potq --help`` does not pay for importing transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PoTConfig": "potq.config", "QuantConfig": "potq.config", "UniformConfig": "potq.config",
    "PotqError": "potq.errors",
    "LoadedModel": "potq.models", "load_model": "potq.models",
    "quantize_": "potq.quantize",
    "load": "potq.storage", "save": "potq.storage",
}

__all__ = [*_EXPORTS, "eval", "__version__"]

# transformers imports torchao (potq's PT2E back end) whenever it is installed; torchao then warns
# about its CUDA-only libraries on every CPU import and torch about torchao's pytree enums. Both
# are noise for potq's users, so they are quieted unless the application configured them.
for _name in ("torchao", "torch.utils._pytree"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.ERROR)


from potq import interop as _interop  # noqa: E402 - after the logging set-up; imports nothing heavy

_interop.install()  # transformers' AutoModelForCausalLM then opens potq folders


def __getattr__(name: str) -> Any:
    if name == "eval":
        return importlib.import_module("potq.eval")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'potq' has no attribute {name!r}")
