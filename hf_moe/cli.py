# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""The `hf-moe` command: one subcommand per job, each registered by an `add_<name>_command(subparsers)` function
that sets `run=<function(args) -> exit code>`.

Every error is one line, `hf-moe <command>: error: <what is wrong, naming the file or field>`; `--debug` shows the
traceback instead. Ctrl-C and SIGTERM end a command cleanly: a converter leaves nothing at OUT.

Exit codes: 0 success, 1 a failed check (verification) or an unexpected error, 2 invalid input (usage error, or a
command refused with a one-line reason), 130 interrupted.
"""

import argparse
import json
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import MISSING, fields

from .conversion.native import EXPORT_FORMATS, IMPORT_FORMATS, export_native, import_native
from .conversion.safetensors_io import DEFAULT_MAX_SHARD_SIZE, ConversionError
from .conversion.upcycle import UpcycleOptions, load_options_file, upcycle
from .conversion.verify import DEFAULT_TOLERANCE, VerificationError, format_report, verify
from .conversion.verify import MODES as VERIFY_MODES
from . import __version__
from .hub import HubAccessError
from .modeling.configuration_hf_moe import list_presets

# Errors that mean "the input is wrong": reported in one line, exit code 2. (ConversionError, OutputPathError and
# the recipes' errors are ValueErrors; json's and YAML's parse errors too, or are turned into ConversionErrors.)
INPUT_ERRORS = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError)
# Failures whose message already says what happened and what to do: printed as they are, exit code 1.
EXPLAINED_FAILURES = (VerificationError, HubAccessError)
# What an interrupted command leaves behind, by command (default: nothing).
INTERRUPTED = {"finetune": "the checkpoints saved so far stay in OUT (resume with training.resume_from_checkpoint)",
               "quickstart": "DIR holds the steps that finished; rerun with --overwrite"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and shows each option's default once, in one style: `(default: on)` /
    `(default: off)` for flags, `(default: VALUE)` for values; none for options without a default (None) and for
    help texts that already say theirs."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)"


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it holds an earlier output of hf-moe or is empty (only once the new "
                             "checkpoint is complete); any other content is refused")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                        help="largest safetensors shard to write, e.g. 500MB, 5GB, 2GiB")


def add_import_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "import", formatter_class=_HelpFormatter,
        help=f"convert a native MoE checkpoint ({', '.join(IMPORT_FORMATS)}) to hf_moe",
        description=(
            "Convert a native MoE checkpoint folder to an hf_moe checkpoint, exactly (same logits).\n"
            "  mixtral              -> hf_moe_mixtral\n"
            "  qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, glm4_moe, olmoe, gpt_oss -> hf_moe_deepseek\n"
            "  deepseek (DeepSeek-MoE 16B remote-code layout) -> hf_moe_deepseek\n"
            "The multi-token-prediction layers of deepseek_v3 and glm4_moe checkpoints are dropped.\n"
            "Weights must be safetensors; pickled .bin/.pt files are refused. Nothing is written to OUT when the\n"
            "conversion fails or is interrupted."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="native checkpoint folder (config.json + safetensors weights)")
    parser.add_argument("out", metavar="OUT", help="folder to create for the hf_moe checkpoint")
    _add_output_options(parser)
    _add_no_verify_option(parser)
    parser.set_defaults(run=run_import)


def _add_no_verify_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-verify", dest="verify", action="store_false", default=argparse.SUPPRESS,
                        help="turn off verification: by default the logits of OUT are compared with those of SRC "
                             f"in fp32 (relative error <= {DEFAULT_TOLERANCE:g}, else nothing is written) and "
                             "recorded in the card (default: on)")


def run_import(args: argparse.Namespace) -> int:
    out = import_native(args.src, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                        verify=vars(args).get("verify", True))
    print(f"hf-moe import: wrote the hf_moe checkpoint and its card to {out}")
    return 0


def add_export_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", formatter_class=_HelpFormatter,
        help=f"convert an hf_moe checkpoint to a native format ({', '.join(EXPORT_FORMATS)})",
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
    _add_no_verify_option(parser)
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    out = export_native(args.src, args.out, args.format, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size, verify=vars(args).get("verify", True))
    print(f"hf-moe export: wrote the {args.format} checkpoint and its card to {out}")
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
    presets = list_presets()
    width = max(map(len, presets))
    for name, summary in presets.items():
        print(f"{name:{width}s} {summary}")
    return 0


def _add_option(parser: argparse.ArgumentParser, option) -> None:
    """One `UpcycleOptions` field as a flag. Defaults are SUPPRESSed so that only the flags actually given override
    a --config file; the help shows the real default."""
    default = option.default if option.default is not MISSING else None
    flag = "--" + option.name.replace("_", "-")
    if option.type in (bool, "bool"):
        if default:  # on by default: the flag turns it off
            parser.add_argument("--no-" + flag[2:], dest=option.name, action="store_false", default=argparse.SUPPRESS,
                                help=f"turn off {option.metadata['help']} (default: on)".replace("%", "%%"))
        else:
            parser.add_argument(flag, dest=option.name, action="store_true", default=argparse.SUPPRESS,
                                help=f"{option.metadata['help']} (default: off)".replace("%", "%%"))
        return
    value_type = int if option.name == "top_k" else type(default) if isinstance(default, (int, float)) else str
    shown = "auto" if option.name == "top_k" else default
    parser.add_argument(flag, dest=option.name, type=value_type, choices=option.metadata.get("choices"),
                        default=argparse.SUPPRESS,
                        help=(option.metadata["help"] + ("" if shown is None else f" (default: {shown})")).replace(
                            "%", "%%"))


def add_upcycle_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "upcycle", formatter_class=_HelpFormatter,
        help="turn a dense Llama, Mistral, Qwen2 or Qwen3 checkpoint into a mixture of experts",
        description=(
            "Upcycle a dense checkpoint (folder or Hub id; Llama, Mistral, Qwen2, Qwen3 in safetensors) into a\n"
            "mixture of experts. Every option is checked against the source and the plan (per-layer shapes,\n"
            "total and active parameters, file size) is printed before any work; --dry-run stops there. Weights\n"
            "are streamed one layer at a time into a temporary folder next to OUT, renamed to OUT at the end.\n"
            "Exact modes (copies / virtual groups with renormalised top-k, no noise, no drop) are verified against\n"
            f"the dense logits in fp32 (relative error <= {DEFAULT_TOLERANCE:g}, else nothing is written); other\n"
            "modes record their measured deviation. Options may also come from a YAML file (--config) whose keys\n"
            "are the option names (and src, out); flags given on the command line win."
        ),
    )
    parser.add_argument("src", nargs="?", metavar="SRC", help="dense checkpoint folder, Hub repository id or GGUF file "
                        "(when --config names src, a single positional is OUT)")
    parser.add_argument("out", nargs="?", metavar="OUT", help="folder to create for the MoE checkpoint")
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (keys as the flags, plus src and out)")
    for option in fields(UpcycleOptions):
        _add_option(parser, option)
    parser.set_defaults(run=run_upcycle)


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (kill) raises KeyboardInterrupt, so an interrupted conversion cleans up its temporary folder."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_upcycle(args: argparse.Namespace) -> int:
    given = {name: value for name, value in vars(args).items() if name not in ("run", "command", "config", "debug")}
    options = load_options_file(args.config) if args.config else {}
    src, out = given.pop("src"), given.pop("out")
    if "src" in options and src is not None and out is None:  # `--config FILE OUT`: the file names SRC
        src, out = None, src
    src, out = src or options.get("src"), out or options.get("out")
    options = {key: value for key, value in options.items() if key not in ("src", "out")}
    if src is None:
        raise ConversionError("SRC is required: give it on the command line or as `src:` in --config")
    options.update(given)
    if out is None and not options.get("dry_run", False):
        raise ConversionError("OUT is required (unless --dry-run): give it on the command line or as `out:`")
    result = upcycle(src, out, **options)
    if result.out is None:
        print("hf-moe upcycle: dry run, nothing was written")
    else:
        print(f"hf-moe upcycle: wrote the {'exact' if result.plan.exact else 'non-exact'} MoE checkpoint to "
              f"{result.out}")
    return 0


def add_verify_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify", formatter_class=_HelpFormatter,
        help="compare the logits of a converted checkpoint with those of its dense source",
        description=(
            "Load DENSE with its transformers class and MOE with its own (hf_moe or native), both in fp32 with the\n"
            "same attention, run a few prompts (fixed sentences with DENSE's tokenizer, else seeded random ids)\n"
            "and report the max abs / relative logit error and the top-1 agreement. With --tolerance, exit code 1\n"
            "when the relative error is above it."
        ),
    )
    parser.add_argument("dense", metavar="DENSE", help="dense source checkpoint folder or GGUF file")
    parser.add_argument("moe", metavar="MOE", help="converted checkpoint folder (same vocabulary)")
    parser.add_argument("--num-prompts", type=int, default=3, help="number of prompts")
    parser.add_argument("--prompt-length", type=int, default=32, help="tokens per random prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"largest accepted relative logit error, e.g. {DEFAULT_TOLERANCE:g} for exact modes "
                             "(default: none, the report has no verdict)")
    parser.add_argument("--attn-implementation", default="eager", choices=("eager", "sdpa"),
                        help="attention kernel used by both models (full mode)")
    parser.add_argument("--mode", default="auto", choices=VERIFY_MODES,
                        help="full: both models loaded whole with their own classes; layerwise: run one layer at a "
                             "time with hf_moe's decoder layer (bounded memory); auto: full when it fits in memory")
    parser.add_argument("--output", metavar="JSON", default=None, help="also write the report to this file")
    parser.set_defaults(run=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    report = verify(args.dense, args.moe, num_prompts=args.num_prompts, prompt_length=args.prompt_length,
                    seed=args.seed, tolerance=args.tolerance, attn_implementation=args.attn_implementation,
                    mode=args.mode)
    print(f"hf-moe verify: {format_report(report)}")
    content = json.dumps(report, indent=2, sort_keys=True)
    print(content)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(content + "\n")
    return 1 if report.get("passed") is False else 0


def add_materialize_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "materialize", formatter_class=_HelpFormatter,
        help="a trained MixLoRA adapter + its base -> a standalone hf_moe MoE checkpoint (same logits)",
        description=(
            "Write BASE + a MixLoRA ADAPTER as one MoE checkpoint that loads and serves without peft: expert e =\n"
            "base FFN + merged LoRA e, router copied, top-k renormalised; attention LoRA is merged.\n"
            "Llama/Mistral bases -> hf_moe_mixtral; Qwen2/3 bases or adapters that skip layers -> hf_moe_deepseek."
        ),
    )
    parser.add_argument("base", metavar="BASE", help="the adapter's base model folder")
    parser.add_argument("adapter", metavar="ADAPTER", help="MixLoRA adapter folder (adapter_config.json + weights)")
    parser.add_argument("out", metavar="OUT", help="folder to create for the hf_moe checkpoint")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the written weights (default: the base config's)")
    _add_output_options(parser)
    parser.set_defaults(run=run_materialize)


def run_materialize(args: argparse.Namespace) -> int:
    import torch

    from .finetune.lora_moe.materialize import materialize
    from .finetune.recipes import quiet_peft_deprecations

    with quiet_peft_deprecations():
        out = materialize(args.base, args.adapter, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None,
                          overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"hf-moe materialize: wrote the hf_moe checkpoint to {out}")
    return 0


def add_finetune_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", formatter_class=_HelpFormatter,
        help="fine-tune from a YAML recipe (full, lora, mixlora, loramoe, mola, moelora, pesc, mixture_of_loras, "
             "mocle, expert_gate)",
        description=(
            "Run the fine-tune a YAML recipe describes: model (folder or Hub id), method (full, lora, mixlora,\n"
            "loramoe, mola, moelora, pesc, mixture_of_loras, mocle, expert_gate) with its peft options, data (local\n"
            "json/jsonl/csv/parquet or a Hub dataset) and training (TrainingArguments). The whole recipe is checked\n"
            "before anything is loaded. OUT gets the adapter or the full model (safetensors), the tokenizer and\n"
            "recipe.yaml. Examples: recipes/*.yaml."
        ),
    )
    parser.add_argument("recipe", metavar="RECIPE", help="YAML recipe file")
    parser.add_argument("--output", metavar="OUT", default=argparse.SUPPRESS,
                        help="output folder (default: the recipe's output_dir)")
    parser.add_argument("--max-steps", type=int, metavar="N", default=argparse.SUPPRESS,
                        help="number of optimizer steps (default: the recipe's training.max_steps)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it holds an earlier output of hf-moe (a non-empty OUT is refused "
                             "otherwise, unless the recipe resumes from its checkpoints)")
    parser.set_defaults(run=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune.recipes import run_recipe

    overrides = {}
    if "output" in args:
        overrides["output_dir"] = args.output
    if "max_steps" in args:
        overrides["training.max_steps"] = args.max_steps
    result = run_recipe(args.recipe, overwrite=args.overwrite, **overrides)
    print(f"hf-moe finetune: wrote the results to {result.output_dir}")
    return 0


def add_card_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "card", formatter_class=_HelpFormatter,
        help="(re)render the model card (README.md) of a folder hf-moe wrote",
        description=(
            "Render PATH/README.md from the model_cards/ templates and what the folder records: upcycle.yaml\n"
            "(upcycled), conversion.yaml (imported, exported, materialized), recipe.yaml and Trainer's results\n"
            "(fine-tuned), adapter_config.json (adapter); verification.json, expert_load.png and loss.png are\n"
            "included when present. Metadata keys of an existing card that hf-moe does not set are kept."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="model or adapter folder written by hf-moe")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a README.md that hf-moe did not write (its body is lost)")
    parser.set_defaults(run=run_card)


def run_card(args: argparse.Namespace) -> int:
    from .cards import render_card

    path = render_card(args.path, overwrite=args.overwrite)
    print(f"hf-moe card: wrote {path}")
    return 0


def add_push_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "push", formatter_class=_HelpFormatter,
        help="upload a model or adapter folder to the Hugging Face Hub",
        description=(
            "Upload PATH to the Hub repository REPO_ID (created if needed) in one commit: weights (safetensors),\n"
            "config with auto_map and the modeling files, tokenizer, card and pictures; for an adapter, the card\n"
            "keeps PEFT's metadata plus hf-moe's. A folder without README.md (e.g. from save_pretrained) gets a\n"
            "rendered card (architecture, parameters, loading code) uploaded as README.md; the folder is not changed.\n"
            "checkpoint-*/, runs/, hidden files and pickles stay behind.\n"
            "Log in first (`hf auth login`) or set HF_TOKEN; HF_ENDPOINT selects another Hub."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="model or adapter folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repository id, e.g. your-name/your-model")
    parser.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    parser.add_argument("--revision", metavar="BRANCH", default=None,
                        help="branch to commit to, created from main if missing (default: main)")
    parser.add_argument("--create-pr", action="store_true",
                        help="open a pull request against main with the files instead of committing to main")
    parser.set_defaults(run=run_push)


def run_push(args: argparse.Namespace) -> int:
    from .hub import push, pushed_url

    info = push(args.path, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr)
    print(f"hf-moe push: pushed {args.path} to {pushed_url(info, args.revision)} (commit {info.oid})")
    return 0


def add_quickstart_command(subparsers) -> None:
    from .quickstart import QuickstartSettings

    defaults = QuickstartSettings()
    parser = subparsers.add_parser(
        "quickstart", formatter_class=_HelpFormatter,
        help="upcycle, MixLoRA fine-tune, evaluate and materialize the shipped tiny model, offline (minutes on CPU)",
        description=(
            "The whole story on the dense Llama and the multi-task dataset that ship with hf-moe, offline:\n"
            "1. upcycle the dense model to a Mixtral-style MoE (exact, verified); 2. evaluate the dense model\n"
            "(exact match, answer perplexity); 3. fine-tune it with MixLoRA; 4. evaluate again; 5. materialize the\n"
            "MixLoRA model as a Mixtral-style checkpoint (checked against the adapter model); 6. print a summary.\n"
            "Every folder gets a card with its expert-load heatmap. The same seed gives the same numbers on the same\n"
            "kind of CPU with the same torch version; another CPU (e.g. Intel vs AMD) or torch version runs other\n"
            "matrix kernels, so the numbers differ slightly there. It takes a few minutes on 2 CPU cores (more on\n"
            "slower machines)."
        ),
    )
    parser.add_argument("--output", metavar="DIR", default=defaults.output_dir, help="folder for everything it writes")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the router init and the fine-tune (same seed, CPU kind and torch version: same "
                             "numbers)")
    parser.add_argument("--max-steps", type=int, metavar="N", default=defaults.max_steps,
                        help="MixLoRA optimizer steps")
    parser.add_argument("--batch-size", type=int, metavar="N", default=defaults.batch_size,
                        help="examples per MixLoRA optimizer step")
    parser.add_argument("--learning-rate", type=float, metavar="LR", default=defaults.learning_rate,
                        help="peak learning rate of the MixLoRA fine-tune (cosine schedule, 5%% warmup)")
    parser.add_argument("--eval-examples-per-task", type=int, metavar="N", default=defaults.eval_examples_per_task,
                        help="evaluate on the first N eval examples of each task (default: all 100)")
    parser.add_argument("--base", metavar="PATH", default=None,
                        help="dense checkpoint folder (Llama, Mistral, Qwen2, Qwen3) or GGUF file to run it on "
                             "(default: the shipped tiny Llama)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an earlier quickstart")
    parser.set_defaults(run=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import QuickstartSettings, run_quickstart

    run_quickstart(QuickstartSettings(output_dir=args.output, base=args.base, seed=args.seed,
                                      max_steps=args.max_steps, batch_size=args.batch_size,
                                      learning_rate=args.learning_rate,
                                      eval_examples_per_task=args.eval_examples_per_task, overwrite=args.overwrite))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-moe", formatter_class=_HelpFormatter,
        description="Mixture-of-experts decoders for the Hugging Face stack: conversion, fine-tuning, publishing.",
    )
    parser.add_argument("--version", action="version", version=f"hf-moe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                                       description="`hf-moe COMMAND --help` describes each one")
    for add_command in (add_quickstart_command, add_import_command, add_export_command, add_presets_command,
                        add_upcycle_command, add_verify_command, add_materialize_command, add_finetune_command,
                        add_card_command, add_push_command):
        add_command(subparsers)
    for command in subparsers.choices.values():  # `hf-moe CMD ... --debug` as well as `hf-moe --debug CMD ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `hf-moe` with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help (0) or a usage error (2, already printed by argparse)
        return exit_request.code if isinstance(exit_request.code, int) else 0
    if args.command is None:  # no command: what there is to run
        parser.print_help(sys.stderr)
        return 2
    try:
        with _terminate_as_interrupt():
            return args.run(args)
    except KeyboardInterrupt:
        left = INTERRUPTED.get(args.command, "nothing was written")
        print(f"hf-moe {args.command}: interrupted; {left}", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        code = 2 if isinstance(error, INPUT_ERRORS) else 1
        message = " ".join(str(error).split()) or "(no message)"
        if code == 1 and not isinstance(error, EXPLAINED_FAILURES):
            message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
        print(f"hf-moe {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
