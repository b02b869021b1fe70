"""Shared fixtures: the real tiny model (stories260K, 260K parameters) loaded once per session."""

import copy
import os

import pytest
import torch

import potq

# Without a GPU the Triton kernel's tests run it in Triton's interpreter, which has to be switched
# on before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def stories_float() -> potq.LoadedModel:
    return potq.load_model("stories260k")


@pytest.fixture
def stories(stories_float) -> potq.LoadedModel:
    """A fresh float copy each test may quantize in place."""
    return potq.LoadedModel(copy.deepcopy(stories_float.model), stories_float.tokenizer,
                            stories_float.source)


@pytest.fixture(scope="session")
def story_text() -> str:
    from potq.eval import eval_text

    return eval_text("tinystories")[:20000]


@pytest.fixture(scope="session")
def char_trained(tmp_path_factory):
    """The seed's char nanoGPT after a short run (200 steps) on tiny Shakespeare, and its result."""
    from potq.train.char import train_char
    from potq.train.loop import TrainSettings

    out = tmp_path_factory.mktemp("char") / "nanogpt"
    settings = TrainSettings(steps=200, eval_every=100, eval_batches=4)
    return train_char(output=out, settings=settings, progress=False)


@pytest.fixture
def char_model(char_trained) -> potq.LoadedModel:
    """A fresh copy of the trained char model each test may quantize in place."""
    lm, _ = char_trained
    return potq.LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.source)


@pytest.fixture
def fused_kernel() -> str:
    """The fused kernel's instruction set. Skips where no C++ compiler exists; where one does, a
    kernel that fails to build fails the test instead of hiding behind the PyTorch fallback."""
    import shutil

    from potq.kernels.fused import best_isa

    if best_isa() == "none":
        assert shutil.which("c++") is None, "a C++ compiler is here but the fused kernel did not build"
        pytest.skip("no C++ compiler: the fused kernel is not built here")
    return best_isa()
