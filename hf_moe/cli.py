# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""The `hf-moe` command: one subcommand per job, each registered by an `add_<name>_command(subparsers)` function
that sets `run=<function(args) -> exit code>`.

Exit codes: 0 success, 2 invalid input (usage error, or a conversion refused with a one-line reason),
130 interrupted (nothing is left at OUT).
"""

import argparse
import sys

from .conversion.native import EXPORT_FORMATS, export_native, import_native
from .conversion.safetensors_io import DEFAULT_MAX_SHARD_SIZE, ConversionError
from .modeling.configuration_hf_moe import list_presets

# Errors that mean "the input is wrong": reported in one line, exit code 2.
INPUT_ERRORS = (ConversionError, FileExistsError, FileNotFoundError, NotADirectoryError)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the descriptions' line breaks."""


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it exists (only once the new checkpoint is complete)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                        help="largest safetensors shard to write, e.g. 500MB, 5GB, 2GiB")


def add_import_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "import", formatter_class=_HelpFormatter,
        help="convert a native MoE checkpoint (mixtral, qwen2_moe, qwen3_moe, deepseek) to hf_moe",
        description=(
            "Convert a native MoE checkpoint folder to an hf_moe checkpoint, exactly (same logits).\n"
            "  mixtral              -> hf_moe_mixtral\n"
            "  qwen2_moe, qwen3_moe -> hf_moe_deepseek\n"
            "  deepseek (DeepSeek-MoE 16B remote-code layout) -> hf_moe_deepseek\n"
            "Weights must be safetensors; pickled .bin/.pt files are refused. Nothing is written to OUT when the\n"
            "conversion fails or is interrupted."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="native checkpoint folder (config.json + safetensors weights)")
    parser.add_argument("out", metavar="OUT", help="folder to create for the hf_moe checkpoint")
    _add_output_options(parser)
    parser.set_defaults(run=run_import)


def run_import(args: argparse.Namespace) -> int:
    out = import_native(args.src, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"hf-moe import: wrote the hf_moe checkpoint to {out}")
    return 0


def add_export_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", formatter_class=_HelpFormatter,
        help="convert an hf_moe checkpoint to a native format (mixtral, qwen2_moe, qwen3_moe)",
        description=(
            "Convert an hf_moe checkpoint folder to a native transformers format, with per-expert weight names and\n"
            "the config keys that transformers, vLLM and llama.cpp read. Refused, before anything is written, when\n"
            "the model uses a feature the format cannot represent (the error names the field and what is allowed)."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="hf_moe checkpoint folder")
    parser.add_argument("out", metavar="OUT", help="folder to create for the native checkpoint")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, default=argparse.SUPPRESS,
                        help="native format to write (required)")
    _add_output_options(parser)
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    out = export_native(args.src, args.out, args.format, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size)
    print(f"hf-moe export: wrote the {args.format} checkpoint to {out}")
    return 0


def add_presets_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "presets", formatter_class=_HelpFormatter,
        help="list the routing presets named after the MoE papers",
        description=(
            "List the presets of MixtralMoEConfig.from_preset / DeepSeekMoEConfig.from_preset: each fixes the\n"
            "routing and balancing settings of one paper; sizes come from the overrides you pass."
        ),
    )
    parser.set_defaults(run=run_presets)


def run_presets(args: argparse.Namespace) -> int:
    for name, summary in list_presets().items():
        print(f"{name:14s} {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-moe", formatter_class=_HelpFormatter,
        description="Mixture-of-experts decoders for the Hugging Face stack: conversion, fine-tuning, publishing.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in (add_import_command, add_export_command, add_presets_command):
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `hf-moe` with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help (0) or a usage error (2, already printed by argparse)
        return exit_request.code if isinstance(exit_request.code, int) else 0
    try:
        return args.run(args)
    except INPUT_ERRORS as error:
        message = " ".join(str(error).split())
        print(f"hf-moe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-moe {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
