"""Shared fixtures: the real tiny model (stories260K, 260K parameters) loaded once per session."""

import copy

import pytest

import potq


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
