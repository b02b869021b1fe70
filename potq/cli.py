"""The ``potq`` command line: quantize, eval, generate, info, verify, demo, ...

Every user mistake ends as one line on stderr and exit code 2 (see :mod:`potq.errors`). The
parser imports nothing heavy (names come from :mod:`potq.catalog`), so ``--help`` is instant;
each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

from potq.catalog import DATASET_NAMES, FORMAT_NAMES, METHOD_NAMES, STAGE_NAMES
from potq.errors import PotqError
from potq.models.registry import short_names
from potq.paths import write_text_atomic

if TYPE_CHECKING:
    import torch

    from potq.config import QuantConfig


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2) like every other potq error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_format_args(p: argparse.ArgumentParser, fmt: str = "pot", bits: int = 4, group_size: int = 128,
                     int_format: bool = False) -> None:
    """The weight-format flags, with a command's own defaults (``int_format``: PT2E's integers too)."""
    p.add_argument("--format", default=fmt, choices=[*FORMAT_NAMES, *(["int"] if int_format else [])],
                   help="weight grid: pot (zero-excluded, the thesis'), pot-zero, pot-seed (the 'PoT weights in "
                        "LLMs' definition, exponents [-E, E] and epsilon), apot (additive PoT, 2-4 bits: each "
                        "magnitude a sum of at most two powers of two), uniform (asymmetric), uniform-sym"
                        + ("; int = PT2E's own symmetric per-channel integers (2-32 bits)" if int_format else "")
                        + f" (default {fmt})")
    p.add_argument("--bits", type=int, default=bits, help=f"bits per weight code (default {bits})")
    p.add_argument("--group-size", type=int, default=group_size,
                   help=f"input elements per scale (default {group_size}; -1 per channel, 0 per tensor)")
    p.add_argument("--quantize-embeddings", nargs="?", const="same", default=None, choices=("same", "int8"),
                   help="also quantize the embedding tables (token, position, a tied output head), round-to-nearest: "
                        "in the weights' format (same, the default), or int8 — symmetric 8-bit, G32, a small error, "
                        "read as the output head by the 8-bit GEMV")
    p.add_argument("--epsilon", type=float, default=None,
                   help="pot-seed only: the epsilon in log2(|w|/s + epsilon) (default 1e-8)")


def _method_name(text: str) -> str:
    """A method name, or stages joined by commas (checked without importing torch)."""
    if text in METHOD_NAMES or ("," in text or text in STAGE_NAMES) and all(
            part in STAGE_NAMES for part in text.split(",")):
        return text
    raise argparse.ArgumentTypeError(f"unknown method {text!r}: choose one of {', '.join(METHOD_NAMES)}, "
                                     f"or stages joined by commas from {', '.join(STAGE_NAMES)}")


def _add_quant_args(p: argparse.ArgumentParser, method: bool = True) -> None:
    """The format flags, and (``method``) the method choice with every method's settings."""
    _add_format_args(p)
    if not method:
        return
    p.add_argument("--method", default="rtn", type=_method_name, metavar="METHOD",
                   help="rtn: round to nearest; grid: Step 1 scale search; twostep: Step 1 + block-wise "
                        "fine-tuning (Step 2); finetune: Step 2 from naive scales; gptq; awq; "
                        "omniquant: learnable weight clipping; blockap: block-wise training of weights and scales; "
                        "qat: quantization-aware training (see `potq qat`); or stages joined by commas from "
                        f"{', '.join(STAGE_NAMES)}, e.g. awq,blockap,e2e (all work with every format)")
    p.add_argument("--objective", choices=("mse", "act"), default=None,
                   help="Step 1 error: mse = plain weight error (the thesis'; grid's default, no data needed); "
                        "act = weighted per input column by the calibration E[x²] (twostep's default)")
    p.add_argument("--report", type=Path, default=None,
                   help="write what was done, the wall time and the per-block, per-epoch loss here "
                        "(.json, else Markdown)")
    g = p.add_argument_group("data-dependent methods (twostep, finetune, gptq, awq, omniquant, grid --objective act)")
    g.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    g.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    g.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    g.add_argument("--epochs", type=int, default=None, help="Step 2 epochs (default 10, or 40 at 2 bits; omniquant 20)")
    g.add_argument("--lr", type=float, default=None, help="Step 2 learning rate (default 1e-3; omniquant 1e-2)")
    g.add_argument("--bpw", type=float, default=None, metavar="B",
                   help="a bit budget: bits per weight (scales included) over the quantized layers, spent layer by "
                        "layer where a measured sensitivity says (widths 2, 3, 4 or 8 bits); staged methods only "
                        "(blockap, awq,blockap,e2e, …)")
    g.add_argument("--weight-lr", type=float, default=None,
                   help="blockap: learning rate of the latent weights (default 1e-3; --lr is the scales')")
    g.add_argument("--e2e-steps", type=int, default=None,
                   help="e2e: optimizer steps on the whole model's loss (default one pass over the calibration)")
    g.add_argument("--e2e-lr", type=float, default=None, help="e2e: learning rate of the scale factors (default 1e-2)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="Step 2: λ, the pull of Γ towards 0 (default 0.1; omniquant 0)")
    g.add_argument("--decay", choices=("decoupled", "coupled"), default=None,
                   help="twostep/finetune: λ as AdamW's decoupled decay (default) or as λ/2‖Γ‖² added to the loss")
    g.add_argument("--batch-size", type=int, default=None,
                   help="calibration sequences per optimizer step (twostep/finetune 4, omniquant 1) "
                        "or per forward pass (gptq/awq 8, memory only)")
    g.add_argument("--grad", choices=("ste", "detach"), default=None,
                   help="gradient through the rounding (twostep/finetune default detach; omniquant ste, detach on PoT grids)")
    g.add_argument("--damp", type=float, default=None, help="gptq: dampening, fraction of the mean Hessian diagonal (0.01)")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: quantize columns by decreasing Hessian diagonal (default on; implies static groups)")
    g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: group scales from the original weights, not re-fitted as the loop reaches a group")
    g.add_argument("--no-clip", dest="clip", action="store_false", default=None,
                   help="awq: skip the clipping search")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True,
                   help="output folder (written atomically; an existing one is refused unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing potq folder at --output (never a folder holding other files)")
    p.add_argument("--shard-size", type=float, default=5.0, metavar="GB",
                   help="weights over this many GB go into shards with an index, as transformers writes them "
                        "(default 5)")
    _add_json_arg(p, "the result")


EXIT_CODES = ("exit codes: 0 done; 2 bad input or usage (one line on stderr); 130 interrupted (Ctrl-C); "
              "141 the reader of stdout went away; 1 a bug in potq (with a traceback: please report it)")


def _common() -> argparse.ArgumentParser:
    """Options every command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None,
                        help="compute threads (default: the cores not busy with other work now; POTQ_THREADS "
                             "sets it too)")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or notes on stderr; errors are still printed")
    return common


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, what: str) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"{what} (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the K likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (for a repeatable sample)")


def _add_device_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"),
                   help=f"where {what} runs: auto (default) = the GPU when PyTorch sees one, else the CPU")


def _add_json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help=f"{what} as JSON: to FILE, or alone on stdout (nothing else there) when no FILE is given")


def build_parser() -> argparse.ArgumentParser:
    DATASETS = DATASET_NAMES  # noqa: N806 - the choices of every --dataset
    parser = _Parser(prog="potq", description="Power-of-two quantization of LLMs.", epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"potq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = _common()
    sub.add_parser = _with_parents(sub.add_parser, common)  # type: ignore[method-assign]
    model_help = (f"a short name ({', '.join(short_names())}), a .gguf / llama2.c or llm.c .bin / HF folder, "
                  "or a potq folder")

    p = sub.add_parser("quantize", help="quantize a model and save it as a potq folder")
    p.add_argument("model", help=model_help)
    _add_quant_args(p)
    _add_device_arg(p, "the quantization")
    _add_output_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity on a data set (GPTQ protocol)")
    p.add_argument("model", help=model_help)
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="default: the model's own kind of text — tinystories for the stories models, "
                        "shakespeare for the char model, wikitext2 for the rest")
    p.add_argument("--ctx", type=int, default=None,
                   help="window length in tokens (default 2048, or the model's context when shorter)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first K windows (a quick estimate; a full set can take an hour)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast where the hardware has native bf16, else fp32")
    p.add_argument("--kernel", choices=["torch", "native"], default="torch",
                   help="torch (default): the PyTorch forward, the reference; native: the native decoder, i.e. "
                        "the perplexity of what `potq generate` computes (8-bit activations included)")
    _add_device_arg(p, "the evaluation")
    _add_json_arg(p, "the result")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("model", help=model_help)
    p.add_argument("--prompt", required=True, help="the text to continue")
    _add_sampling_args(p, 64, "tokens to generate at most")
    p.add_argument("--kernel", choices=["native", "fused", "torch"], default="native",
                   help="native (default): Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma-2/3 decode in one C++ call per "
                        "token, PoT layers on 8-bit activations, a float16 KV cache; fused: the Python decoder with the exact fused PoT kernel; "
                        "torch: the pure-PyTorch path")
    p.add_argument("--stats", action="store_true",
                   help="print tokens/s and which path computed the layers after the text")
    _add_device_arg(p, "the model")
    _add_json_arg(p, "the prompt, text and speed")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to an instruct model with its chat template (Ctrl-C stops an answer, "
                                    "Ctrl-D or /exit ends, /reset forgets)")
    p.add_argument("model", help=model_help)
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    _add_sampling_args(p, 256, "tokens per answer at most")
    _add_device_arg(p, "the model")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                                     "/v1/completions, /v1/models; streaming)")
    p.add_argument("model", help=model_help)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None, help="the model id clients ask for (default: the model's folder or file name)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait their turn (default 64; more get 429)")
    p.add_argument("--max-tokens", type=int, default=1024, help="the most tokens one answer may ask for (default 1024)")
    _add_device_arg(p, "the model")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="check a potq folder (as `potq verify`), then print its format, bits per "
                                    "weight incl. scales, where the bytes are, and the per-layer table")
    p.add_argument("folder", help="a potq folder written by `potq quantize`")
    _add_json_arg(p, "the summary")
    p.set_defaults(func=cmd_info, compute=False)

    p = sub.add_parser("verify", help="check a potq folder completely: description, digests, every tensor's "
                                      "name, shape, dtype and checksum, scales, tokenizer")
    p.add_argument("folder", help="a potq folder written by `potq quantize`")
    _add_json_arg(p, "the result")
    p.set_defaults(func=cmd_verify, compute=False)

    p = sub.add_parser("qat", help="quantization-aware training: fine-tune through the quantized weights, "
                                    "save packed like `potq quantize`")
    p.add_argument("model", help=model_help)
    _add_quant_args(p, method=False)
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--scales", choices=("learned", "frozen"), default="learned",
                   help="group scales from Step 1's grid search, then learned (LSQ-like) or frozen")
    p.add_argument("--calib-samples", type=int, default=512,
                   help="training windows drawn from the model's training text (default 512; 10%% held out)")
    p.add_argument("--calib-len", type=int, default=None,
                   help="tokens per window (default 256, or the model's context when shorter)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the training windows (default 0)")
    p.add_argument("--report", type=Path, default=None, help="write the settings, wall time and loss history here")
    _add_device_arg(p, "the training")
    _add_output_args(p)
    p.set_defaults(func=cmd_qat, method="qat")

    p = sub.add_parser("pt2e", help="quantize through PyTorch 2 export (PT2E): export, prepare, calibrate, "
                                     "convert; print the quantized graph and the loss")
    p.add_argument("model", help=model_help)
    # 5 stored bits = the seed's 4-bit PoT [-7, 7]; per channel, as PT2E
    _add_format_args(p, fmt="pot-seed", bits=5, group_size=-1, int_format=True)
    p.add_argument("--activations", action="store_true",
                   help="also quantize linear inputs to int8 (affine per tensor, calibrated min/max)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches for activations (default 8)")
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="loss on this held-out text (default: shakespeare for char models, else wikitext2)")
    p.add_argument("--ctx", type=int, default=None, help="window length (default: min(2048, model positions))")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--graph", type=Path, default=None, help="write the whole converted graph's code here")
    p.set_defaults(func=cmd_pt2e)

    p = sub.add_parser("train-char", help="train the seed's char-level nanoGPT (4x128, context 64) on CPU")
    p.add_argument("--data", type=Path, default=None,
                   help="training text (default: tiny Shakespeare from the shared folder); split 80/10/10")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output folder (default: $POTQ_HOME/models/nanogpt-shakespeare, the short name's home)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing potq folder at --output")
    p.add_argument("--steps", type=int, default=15000, help="iterations (default 15000, the seed's)")
    p.add_argument("--batch-size", type=int, default=12, help="windows per step (default 12)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between loss estimates (default 500)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch seed (default 0)")
    p.set_defaults(func=cmd_train_char)

    p = sub.add_parser("bench", help="speed: dequantization, GEMV, decoding, llama.cpp peer, bandwidth bound "
                                     "(-> docs/results/speed.md)")
    p.add_argument("--model", default="smollm2-135m", help=model_help)
    p.add_argument("--quick", action="store_true",
                   help="only the fused 3-bit GEMV vs float32 on the largest linear shape (under a minute)")
    p.add_argument("--no-peer", action="store_true", help="skip llama.cpp even where it is installed")
    p.add_argument("--vs-llamacpp", action="store_true",
                   help="only pot3 against llama.cpp Q4_0 decoding, in one run; the last line is the ratio")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: write --out again from the JSON report beside it")
    p.add_argument("--out", type=Path, default=Path("docs/results/speed.md"), help="the report to write")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="what PoT is good for, in a few minutes: 4-bit PoT beside 4-bit uniform at "
                                    "the same size — perplexity, size on disk, decoding speed against float")
    p.add_argument("--model", default="smollm2-135m", help=model_help)
    p.add_argument("--max-windows", type=int, default=4,
                   help="WikiText-2 windows of 2048 tokens to evaluate (default 4 of 148: a quick estimate)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="where the quantized folders go")
    p.set_defaults(func=cmd_demo)
    return parser


def _with_parents(add_parser, common: argparse.ArgumentParser):  # noqa: ANN001, ANN202
    """``sub.add_parser`` that gives every command the common options."""
    def add(name: str, **kwargs):  # noqa: ANN003, ANN202
        return add_parser(name, parents=[common], **kwargs)

    return add


def _version() -> str:
    from potq import __version__

    return __version__


def quant_config(args: argparse.Namespace) -> "QuantConfig":
    """The QuantConfig of the format flags (``--epsilon`` becomes the format's option)."""
    from potq.config import QuantConfig

    options = {} if args.epsilon is None else {"epsilon": args.epsilon}
    return QuantConfig(args.format, args.bits, args.group_size, options)


def cmd_quantize(args: argparse.Namespace) -> None:
    import potq
    from potq.info import summary
    from potq.methods import get_method
    from potq.report import build_report, write_report

    from potq import devices

    config = quant_config(args)  # validate before loading
    device = devices.resolve(args.device)
    if not args.shard_size > 0:
        raise PotqError(f"--shard-size must be a positive number of GB, got {args.shard_size}")
    if args.batch_size is not None and args.batch_size < 1:
        raise PotqError(f"--batch-size must be at least 1, got {args.batch_size}")
    from potq.outputs import check_output
    from potq.storage import FOLDER_FILES, MANIFEST_FILE

    check_output(Path(args.output), args.overwrite, MANIFEST_FILE, FOLDER_FILES)  # before an hour of work
    settings = {k: getattr(args, k) for k in ("epochs", "lr", "weight_decay", "decay", "grad", "objective", "damp",
                                               "act_order", "static_groups", "clip", "steps", "batch_size", "scales",
                                               "weight_lr", "e2e_steps", "e2e_lr")
                if getattr(args, k, None) is not None}
    if args.quiet:
        settings["progress"] = False  # block notes too, not only the bars
    if _stream(args, config, settings, device):
        return
    bpw = getattr(args, "bpw", None)  # `potq qat` shares this command without a budget
    chosen = get_method(args.method, staged=bpw is not None)
    lm = potq.load_model(args.model, lazy=chosen.blockwise(settings) and bpw is None)  # blocks read in turn
    start = time.perf_counter()
    if args.method == "qat":  # a checkpoint beside the output lets an interrupted run resume
        settings["state_dir"] = str(Path(args.output).with_name(f".{Path(args.output).name}.qat-ckpt"))
    resume_dir = Path(args.output).with_name(f".{Path(args.output).name}.blocks-ckpt")  # block-wise runs
    if chosen.needs_calibration(settings):
        from potq.eval.perplexity import max_positions

        calib_len = args.calib_len or min(256, max_positions(lm.model) or 256)
        settings.update(calib_samples=args.calib_samples, calib_len=calib_len, seed=args.seed)
    from potq.quantize import INT8_TABLES

    embeddings = {None: False, "same": True, "int8": INT8_TABLES}[args.quantize_embeddings]
    potq.quantize_(lm, config, method=args.method, embeddings=embeddings, resume_dir=str(resume_dir),
                   device=device, bpw=bpw, **settings)
    seconds = time.perf_counter() - start
    potq.save(lm, args.output, overwrite=args.overwrite, max_shard_bytes=int(args.shard_size * 1e9))
    shutil.rmtree(resume_dir, ignore_errors=True)
    if args.report:
        print(f"report -> {write_report(args.report, build_report(lm.model, args.model, seconds))}")
    s = summary(args.output)
    _report(args, f"quantized {args.model} to {config.format} {config.bits}-bit G{config.group_size} "
                  f"({args.method}{f', budget {bpw} bits/weight' if bpw else ''}) in {seconds:.1f} s "
                  f"-> {args.output}\n"
                  f"{s['bits_per_quantized_weight']:.3f} bits per quantized weight (incl. scales), "
                  f"{s['file_bytes'] / 2**20:.1f} MiB on disk",
            {"output": str(args.output), "method": args.method, "seconds": seconds, **s})


def _stream(args: argparse.Namespace, config: "QuantConfig", settings: dict, device: "torch.device") -> bool:
    """Quantize a Hugging Face folder block by block from its files (:mod:`potq.stream`) where the
    method allows: the float model is never built, so a model larger than memory fits."""
    from potq import devices
    from potq.info import summary
    from potq.models.hf import CONFIG_FILE, weight_files
    from potq.models.registry import resolve
    from potq.paths import sha256_of_files
    from potq.storage import is_potq_folder
    from potq.models.lazy import readable_by_name
    from potq.stream import stream_quantize, streams

    name, path = resolve(args.model)
    if not (path.is_dir() and (path / CONFIG_FILE).is_file() and not is_potq_folder(path)) or args.report or \
            getattr(args, "bpw", None) is not None or \
            not streams(args.method, settings, args.quantize_embeddings is not None) or not readable_by_name(path):
        return False
    source = {"name": name, "path": str(path), "sha256": sha256_of_files(weight_files(path)), "loader": "hf"}
    start = time.perf_counter()
    with devices.using(device):
        stream_quantize(path, config, args.method, settings, Path(args.output), source, progress=not args.quiet,
                        max_shard_bytes=int(args.shard_size * 1e9))
    seconds = time.perf_counter() - start
    s = summary(args.output)
    _report(args, f"quantized {args.model} to {config.format} {config.bits}-bit G{config.group_size} "
                  f"({args.method}, streamed block by block) in {seconds:.1f} s -> {args.output}\n"
                  f"{s['bits_per_quantized_weight']:.3f} bits per quantized weight (incl. scales), "
                  f"{s['file_bytes'] / 2**20:.1f} MiB on disk",
            {"output": str(args.output), "method": args.method, "seconds": seconds, "streamed": True, **s})
    return True


def cmd_eval(args: argparse.Namespace) -> None:
    from potq.eval import perplexity
    from potq.eval.data import home_dataset
    from potq.eval.perplexity import max_positions
    from potq.devices import resolve
    from potq.models import load_model

    device = resolve(args.device)
    lm = load_model(args.model)
    lm.model.to(device)
    dataset = args.dataset or home_dataset(lm.source)
    ctx = args.ctx or min(2048, max_positions(lm.model) or 2048)
    if args.dataset is None:
        _note(f"evaluating on {dataset} (the default for this model; --dataset picks another), ctx {ctx}")
    r = perplexity(lm.model, lm.tokenizer, dataset, ctx=ctx, max_windows=args.max_windows, dtype=args.dtype,
                   progress=not args.quiet, native=args.kernel == "native")
    _report(args, f"{dataset} perplexity {r.ppl:.3f} (ctx {r.ctx}, {r.windows} of {r.total_windows} windows, "
                  f"{r.tokens} tokens, {r.dtype}, {r.path} path, {r.tokens_per_s:.0f} tok/s)",
            {"model": str(args.model), **r.to_dict()})


def cmd_generate(args: argparse.Namespace) -> None:
    from potq.eval import generate
    from potq.kernels import fused
    from potq.devices import resolve
    from potq.models import load_model, native_decoder

    device = resolve(args.device)
    lm = load_model(args.model)
    lm.model.to(device)
    to_screen = args.json != "-"
    if to_screen:
        print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    with fused.enabled(args.kernel != "torch"), native_decoder.enabled(args.kernel == "native"):
        text = generate(lm.model, lm.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                        stream=(lambda piece: print(piece, end="", flush=True)) if to_screen else None)
        path = compute_path(lm.model)
    seconds = time.perf_counter() - start
    tokens = len(lm.tokenizer.encode(args.prompt + text)) - len(lm.tokenizer.encode(args.prompt))
    if to_screen:
        print()
    if args.stats and to_screen:
        print(f"[{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.2f} tok/s; {path}]")
    if args.json:
        _emit_json(args.json, {"prompt": args.prompt, "text": text, "tokens": tokens, "seconds": seconds,
                               "tokens_per_s": tokens / seconds, "path": path})


def cmd_chat(args: argparse.Namespace) -> None:
    from potq.chat import Sampling, chat
    from potq.devices import resolve
    from potq.eval.generate import check_sampling
    from potq.models import load_model

    check_sampling(args.max_new_tokens, args.temperature, args.top_k)  # before loading the model
    device = resolve(args.device)
    lm = load_model(args.model)
    lm.model.to(device)
    _note("chat: Ctrl-C stops an answer, Ctrl-D or /exit ends, /reset forgets the conversation")
    chat(lm, sampling=Sampling(args.max_new_tokens, args.temperature, args.top_k, args.seed), system=args.system)


def cmd_serve(args: argparse.Namespace) -> None:
    from potq.devices import resolve
    from potq.models import load_model
    from potq.serve import serve

    if not 0 < args.port < 65536 or args.max_queue < 1 or args.max_tokens < 1:
        raise PotqError("--port must be 1-65535, --max-queue and --max-tokens at least 1")
    device = resolve(args.device)
    lm = load_model(args.model)
    lm.model.to(device)
    name = args.name or Path(str(args.model).rstrip("/")).name
    _note(f"serving {name!r} at http://{args.host}:{args.port}/v1 (OpenAI API; Ctrl-C stops)")
    serve(lm, name, args.host, args.port, args.max_queue, args.max_tokens)


def compute_path(model) -> str:  # noqa: ANN001
    """What actually computed the model's linear layers, in words (``--stats`` tells the truth)."""
    from potq.kernels import fused
    from potq.nn import QuantLinear

    from potq.models import native_decoder

    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if native_decoder.unsupported(model) is None:
        return f"native decoder: one C++ call per token ({len(packed)} packed layers)"
    if not packed:
        return "float model: PyTorch matmuls"
    served = sum(fused.serves(m) for m in packed)
    if served:
        return f"fused PoT GEMV ({fused.best_isa()}) on {served} of {len(packed)} packed layers"
    return f"PyTorch path: {len(packed)} packed layers decoded to float"


def cmd_bench(args: argparse.Namespace) -> None:
    from potq import bench

    if args.quick:
        print(bench.quick(args.model, args.threads))
    elif args.vs_llamacpp:
        print(bench.vs_llamacpp(args.model, args.threads))
    elif args.render:
        bench.rerender(args.out)
    else:
        bench.run_all(args.model, args.threads, args.out, with_peer=not args.no_peer)


def cmd_verify(args: argparse.Namespace) -> None:
    from potq.storage import verify

    checked = verify(args.folder)
    _report(args, f"{args.folder}: ok ({len(checked.header)} tensors; description digest, tensor roles, content "
                  f"checksum, scales and tokenizer checked)",
            {"folder": str(args.folder), "ok": True, "tensors": len(checked.header)})


def cmd_info(args: argparse.Namespace) -> None:
    from potq.info import layer_costs, summary
    from potq.storage import verify

    verify(args.folder, skeleton=False)  # all but the model build (`potq verify` does that too)
    s = summary(args.folder)
    if args.json == "-":
        _emit_json("-", s)
        return
    src = s["source"]
    print(f"{s['path']}: {s['format']} {s['bits']}-bit, group size {s['group_size']}, method {s['method']}")
    if s["bpw"] is not None:
        print(f"bit budget {s['bpw']} bits/weight: layers at "
              + ", ".join(f"{fmt} ×{count}" for fmt, count in s["widths"].items()))
    print(f"source: {src.get('path')} (sha256 {str(src.get('sha256'))[:16]}…)")
    if s["quantized_weights"]:
        print(f"{s['quantized_layers']} quantized layers, {s['quantized_weights']:,} weights, "
              f"{s['bits_per_quantized_weight']:.3f} bits per quantized weight incl. scales")
    if s["quantized_embedding_tables"]:
        print(f"{s['quantized_embedding_tables']} quantized embedding tables, "
              f"{s['bits_per_embedding_weight']:.3f} bits per embedding weight incl. scales")
    mib = 2**20
    print(f"where the {s['file_bytes'] / mib:.1f} MiB of weights are: "
          f"codes {s['code_bytes'] / mib:.1f} MiB, scales and zero points {s['scale_bytes'] / mib:.1f} MiB, "
          f"float tensors {s['float_bytes'] / mib:.1f} MiB")
    for name, nbytes, dtype in s["largest_float_tensors"]:
        print(f"  float {name}: {nbytes / mib:.1f} MiB ({dtype})")
    if s["float_bytes"] > s["file_bytes"] / 4 and not s["quantized_embedding_tables"]:
        print("  most of the rest is float embeddings/output head: `potq quantize --quantize-embeddings` packs "
              "them too (round-to-nearest, same format)")
    print(f"{'layer':48} {'shape':>12} {'format':>9} {'bits':>4} {'G':>5} {'bits/w':>7} {'bytes':>9}")
    for c in layer_costs(args.folder):
        shape = f"{c.shape[0]}x{c.shape[1]}"
        print(f"{c.name:48} {shape:>12} {c.format:>9} {c.bits:>4} {c.group_size:>5} "
              f"{c.bits_per_weight:>7.3f} {c.stored_bytes:>9,}")
    if args.json:
        _emit_json(args.json, s)


def cmd_qat(args: argparse.Namespace) -> None:
    cmd_quantize(args)
    shutil.rmtree(Path(args.output).with_name(f".{Path(args.output).name}.qat-ckpt"), ignore_errors=True)


def cmd_pt2e(args: argparse.Namespace) -> None:
    from potq.eval import perplexity
    from potq.eval.data import home_dataset, training_batch
    from potq.eval.perplexity import max_positions
    from potq.models import load_model
    from potq.pt2e import TorchInt, graph_summary, quantize_pt2e

    weights = TorchInt(args.bits) if args.format == "int" else quant_config(args)
    lm = load_model(args.model)
    ctx = args.ctx or min(2048, max_positions(lm.model) or 2048)
    dataset = args.dataset or home_dataset(lm.source)
    calibration = None
    if args.activations:
        calibration = list(training_batch(lm.tokenizer, lm.source, args.calib_batches, ctx, seed=0).split(1))
    start = time.perf_counter()
    if args.quantize_embeddings == "int8":
        raise PotqError("pt2e packs the embeddings in the weights' format only: --quantize-embeddings without int8")
    gm = quantize_pt2e(lm, weights, embeddings=args.quantize_embeddings is not None, activations=args.activations,
                       calibration=calibration)
    print(f"exported, prepared, calibrated and converted in {time.perf_counter() - start:.1f} s")
    print(graph_summary(gm))
    if args.graph:
        write_text_atomic(args.graph, gm.code)
        print(f"graph -> {args.graph}")
    for name, model in (("float", lm.model), ("pt2e", gm)):
        r = perplexity(model, lm.tokenizer, dataset, ctx=ctx, max_windows=args.max_windows, dtype="fp32")
        print(f"{name:6} {dataset} cross-entropy {r.nll:.4f}, perplexity {r.ppl:.3f} "
              f"(ctx {r.ctx}, {r.windows} of {r.total_windows} windows)")


def cmd_train_char(args: argparse.Namespace) -> None:
    from potq.train.char import train_char
    from potq.train.loop import TrainSettings

    if args.batch_size < 1:
        raise PotqError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = TrainSettings(steps=args.steps, lr=args.lr, eval_every=args.eval_every, seed=args.seed)
    lm, result = train_char(args.data, args.output, settings, batch_size=args.batch_size, overwrite=args.overwrite)
    final = result.final
    where = lm.source.get("name") or args.output
    print(f"trained {result.settings.steps} steps in {result.seconds:.0f} s: train loss {final['train']:.4f}, "
          f"val loss {final['val']:.4f} -> {args.output or 'nanogpt-shakespeare'}")
    print(f"next: potq eval {where} --dataset shakespeare --ctx 64")


def cmd_demo(args: argparse.Namespace) -> None:
    from potq.demo import run_demo

    run_demo(args.model, max_windows=args.max_windows, out=args.out, threads=args.threads)


def _note(message: str) -> None:
    """A note for the person at the terminal (stderr; silenced by --quiet)."""
    if not _QUIET:
        print(f"potq: {message}", file=sys.stderr, flush=True)


def _report(args: argparse.Namespace, line: str, data: dict) -> None:
    """A command's result: ``line`` for a person, ``data`` as JSON with --json (alone on stdout for
    ``--json`` without a file)."""
    if args.json != "-":
        print(line)
    if args.json:
        _emit_json(args.json, data)


def _emit_json(target: str | Path, data: dict) -> None:
    if str(target) == "-":
        print(json.dumps(data, indent=1))
    else:
        write_text_atomic(target, json.dumps(data, indent=1))


_QUIET = False


def _silence_progress_bars() -> None:
    """Every tqdm bar, potq's and its libraries', starts disabled (``--quiet``). tqdm's own
    ``TQDM_DISABLE`` is not honoured where a caller passes ``disable=`` itself, so the constructor
    is wrapped instead."""
    from tqdm import std

    original = std.tqdm.__init__

    def quiet(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = quiet


def main(argv: list[str] | None = None) -> int:
    global _QUIET
    from potq.threads import prefer_sleeping_threads

    args = build_parser().parse_args(argv)  # imports no torch
    if getattr(args, "compute", True):  # reading a folder needs no thread count (nor its 0.1 s sample)
        prefer_sleeping_threads()  # before torch is imported by the command
    _QUIET = args.quiet
    if args.quiet:
        _silence_progress_bars()
    try:
        if args.threads is not None and args.threads < 1:
            raise PotqError(f"--threads must be at least 1, got {args.threads}")
        if getattr(args, "compute", True):
            from potq.threads import apply

            args.threads = apply(args.threads)
        args.func(args)
    except PotqError as exc:
        print(f"potq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("potq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `potq info | head -1`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
