"""A process-wide on/off setting: a default from the environment, switched for a block of code.

The fused kernel (``POTQ_FUSED``) and the native decoder (``POTQ_NATIVE``) are such settings: the
command line's ``--kernel`` turns them off for one command, the tests for one comparison.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class Switch:
    """On unless the environment variable ``env`` is ``0``; ``with switch(False): ...`` turns it off
    inside the block (and back to what it was after)."""

    def __init__(self, env: str) -> None:
        self.on = os.environ.get(env, "1") != "0"

    def __bool__(self) -> bool:
        return self.on

    @contextmanager
    def __call__(self, flag: bool) -> Iterator[None]:
        saved, self.on = self.on, flag
        try:
            yield
        finally:
            self.on = saved
