"""`laas export` and `laas eval`: the exporters' commands, mounted on the `laas` command line.

Layer: composition (command line). It plugs into `laas` as the entry point `exporters` of the group
`laas.cli` (pyproject.toml; the protocol is laas.client.plugins'): the client imports nothing of this
slice. Importing this module is cheap: torch, transformers, optimum and onnxruntime load only when a
command runs, and a command whose packages are not installed says which extras hold them (its help line
too). Exit codes: 0 ok; 1 a step failed, a package is missing, or the quality gate refused a quantization
(the others are registered); 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from laas.daemon.settings import Settings

COMMANDS = ("export", "eval")
# The top-level modules each command imports when it runs: the `export` extra's and the `daemon` extra's.
NEEDS = {"export": ("torch", "transformers", "optimum", "onnx", "onnxruntime", "tokenizers", "numpy"),
         "eval": ("llama_cpp", "onnxruntime", "tokenizers", "numpy")}
INSTALL = "pip install 'laas[daemon,export]' (from a checkout: pip install -e '.[daemon,export]')"


def missing(command: str) -> list[str]:
    """The modules `command` needs that are not installed (found without importing them)."""
    return [module for module in NEEDS[command] if importlib.util.find_spec(module) is None]


def _help(command: str, text: str) -> str:
    absent = missing(command)
    return f"{text} (not installed: {', '.join(absent)}; pip install 'laas[daemon,export]')" if absent else text


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def home(p: argparse.ArgumentParser) -> None:
        p.add_argument("--home", help="laas data directory; packages go to HOME/models (env LAAS_HOME)")
        p.add_argument("--config", type=Path, help="laasd's TOML config (to find configured models)")
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all)")
        p.add_argument("--tokens", type=int, help="evaluate on the first N tokens of the held-out text")

    ex = sub.add_parser("export", help=_help("export", "export a GGUF file or Hugging Face folder to quantized "
                                             "ONNX packages"))
    ex.add_argument("source", help="a .gguf file or a Hugging Face model folder (a sentence-transformers folder "
                    "becomes embedding packages: fp32 and int8)")
    ex.add_argument("--name", help="package base name (default: from the source); packages are NAME-fp32, ...")
    ex.add_argument("-q", "--quantization", nargs="+", choices=("fp32", "int8", "int4"),
                    default=["fp32", "int8", "int4"], help="what to build (fp32, the reference, always is)")
    ex.add_argument("--block-size", type=int, default=32, help="int4 block size (16..256, default 32)")
    ex.add_argument("--threshold", type=float, default=10.0,
                    help="refuse a quantization whose perplexity rises more than this many percent (default 10)")
    ex.add_argument("--force", action="store_true", help="register quantizations the threshold (an encoder's: "
                    "mean cosine to fp32 >= 0.99) refuses")
    home(ex)
    ev = sub.add_parser("eval", help=_help("eval", "evaluate a served model (ONNX package or GGUF): perplexity, "
                                           "speed, size"))
    ev.add_argument("model", help="a model name as `laas models` lists it")
    ev.add_argument("--reference", help="the unquantized model to compare with (default: an ONNX package's own)")
    home(ev)


def run(args: argparse.Namespace) -> int:
    from laas.core.errors import LaasError

    absent = missing(args.command)
    if absent:
        print(f"laas {args.command}: needs {', '.join(absent)}, not installed: {INSTALL}", file=sys.stderr)
        return 1
    try:
        return _export(args) if args.command == "export" else _eval(args)
    except LaasError as e:
        print(f"laas {args.command}: {e}", file=sys.stderr)
        return 1


def _settings(args: argparse.Namespace) -> Settings:
    from laas.daemon.settings import load_settings

    return load_settings(args.config, overrides={"home": args.home})


def _export(args: argparse.Namespace) -> int:
    from laas.daemon.store import ModelStore
    from laas.exporters.encoder_eval import EmbeddingEvaluation, format_encoder_table
    from laas.exporters.evaluate import Evaluation, format_table
    from laas.exporters.pipeline import ExportOptions, export

    settings = _settings(args)
    options = ExportOptions(quantizations=args.quantization, name=args.name, block_size=args.block_size,
                            threshold=args.threshold / 100.0, force=args.force, threads=args.threads,
                            eval_tokens=args.tokens)
    results = export(args.source, ModelStore(settings.store), settings.home / "cache" / "onnx-export", options,
                     progress=lambda m: print(m, file=sys.stderr, flush=True))
    encoders = [(r.name, r.quantization, e) for r in results if isinstance(e := r.evaluation, EmbeddingEvaluation)]
    decoders = [(r.name, r.quantization, e) for r in results if isinstance(e := r.evaluation, Evaluation)]
    print(format_encoder_table(encoders) if encoders else format_table(decoders))
    for r in results:
        print(f"{r.name}: {'registered in ' + str(r.path) if r.path else 'REFUSED: ' + r.refusal}")
    return 0 if all(r.path for r in results) else 1


def _eval(args: argparse.Namespace) -> int:
    from laas.exporters.evaluate import format_table
    from laas.exporters.served import evaluate_served

    name, quantization, evaluation = evaluate_served(_settings(args), args.model, reference=args.reference,
                                                     threads=args.threads, tokens=args.tokens)
    print(format_table([(name, quantization, evaluation)]))
    return 0
