"""``potq train-char``: train the seed's character-level nanoGPT on a text file, on CPU.

The text is split 80/10/10 (:func:`potq.eval.data.split_text`): the model trains on the first
80 %, its validation loss is estimated on the next 10 %, and the last 10 % is the held-out test
text every later table is scored on (``potq eval nanogpt-shakespeare --dataset shakespeare``).
Batches are random ``block_size`` windows, as nanoGPT's ``get_batch``. The result is saved as a
float potq folder, so ``quantize``/``eval``/``generate``/``pt2e`` all take it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import Tensor

from potq.errors import PotqError
from potq.eval.data import SHAKESPEARE_FILE, split_text
from potq.models import LoadedModel
from potq.models.nanogpt import SHORT_NAME, CharGPTShape, char_model, char_tokenizer, encode_all
from potq.paths import shared_file, trained_model_dir
from potq.train.loop import Batch, TrainResult, TrainSettings, train

# The seed's recipe: 15000 iterations at lr 1e-3, batch 12.
DEFAULT_STEPS, DEFAULT_BATCH = 15000, 12


def default_data() -> Path:
    return shared_file(SHAKESPEARE_FILE)


def default_output() -> Path:
    return trained_model_dir(SHORT_NAME)


def window_batches(splits: dict[str, Tensor], batch_size: int, block_size: int) -> Batch:
    """``(split, rng) -> (x, y)``: ``batch_size`` random windows and the same shifted by one."""
    for split, ids in splits.items():
        if len(ids) <= block_size:
            raise PotqError(f"the {split} split has {len(ids)} characters, fewer than the context "
                            f"{block_size} + 1: give a longer text")

    def batch(split: str, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = splits[split]
        starts = torch.randint(len(ids) - block_size, (batch_size,), generator=rng)
        x = torch.stack([ids[i:i + block_size] for i in starts.tolist()])
        y = torch.stack([ids[i + 1:i + 1 + block_size] for i in starts.tolist()])
        return x, y

    return batch


def train_char(data: Path | None = None, output: Path | None = None, settings: TrainSettings | None = None,
               batch_size: int = DEFAULT_BATCH, shape: CharGPTShape = CharGPTShape(),
               progress: bool = True, overwrite: bool = False) -> tuple[LoadedModel, TrainResult]:
    """Train a char GPT on ``data`` and save it to ``output``; resumes an interrupted run.

    The checkpoint lives beside the output (``.<name>.ckpt``) until the final model is saved.
    """
    from potq.storage import save  # storage sits above models in the one-way flow

    from potq.outputs import check_output
    from potq.storage import FOLDER_FILES, MANIFEST_FILE

    data = Path(data) if data else default_data()
    overwrite = overwrite or output is None  # the short name's home is potq's own folder
    output = Path(output) if output else default_output()
    check_output(output, overwrite, MANIFEST_FILE, FOLDER_FILES)  # before the training, not after
    settings = settings or TrainSettings(steps=DEFAULT_STEPS)
    if not data.is_file():
        raise PotqError(f"{data}: no such text file; give --data a plain text file to train on")
    raw = data.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PotqError(f"{data} is not UTF-8 text; give --data a plain text file") from None
    tokenizer = char_tokenizer(text)
    splits = {name: encode_all(tokenizer, part) for name, part in split_text(text).items()}
    model = char_model(tokenizer.vocab_size, shape, seed=settings.seed)
    batch = window_batches({k: splits[k] for k in ("train", "val")}, batch_size, shape.block_size)
    state_dir = output.with_name(f".{output.name}.ckpt")
    result = train(model, batch, settings, state_dir=state_dir, progress=progress)
    source = {"name": SHORT_NAME if output == default_output() else None, "path": str(data.resolve()),
              "sha256": hashlib.sha256(raw).hexdigest(), "loader": "potq train-char",
              "shape": shape.to_dict(), "batch_size": batch_size, "training": result.to_dict()}
    lm = LoadedModel(model, tokenizer, source)
    save(lm, output, overwrite=overwrite)
    shutil.rmtree(state_dir, ignore_errors=True)
    return lm, result
