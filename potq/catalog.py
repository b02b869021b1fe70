"""The names the command line offers — formats, methods, data sets — without importing torch.

``potq --help`` must answer in well under a second, so the parser cannot import the registries
(they import torch and transformers). These tuples are what the parser offers; a test keeps them
equal to the registries (``potq.formats.FORMATS``, ``potq.methods.METHODS``, ``pipeline.STAGES``,
``potq.eval.data.DATASETS``), so adding a format or method still fails loudly if one is missed.
"""

FORMAT_NAMES = ("pot", "pot-seed", "pot-zero", "apot", "uniform", "uniform-sym")
METHOD_NAMES = ("awq", "blockap", "finetune", "gptq", "grid", "omniquant", "qat", "rtn", "twostep")
STAGE_NAMES = ("awq", "grid", "blockap", "e2e")  # the stages a method joins with commas: awq,blockap,e2e
DATASET_NAMES = ("wikitext2", "ptb", "c4", "shakespeare", "tinystories")
