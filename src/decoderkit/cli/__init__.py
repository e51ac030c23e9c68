"""The `decoderkit` command: generate, chat, bench, info, train, serve, convert and merge.

Every subcommand follows the same contract: 0 on success, 1 on a runtime error (reported as one line on stderr, the
traceback only with `--verbose`), 2 on a usage error, 130 when interrupted with Ctrl-C. Model code, tokenizers and
rich are imported by the subcommand that needs them, after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from decoderkit.cli.adapters import add_merge_parser
from decoderkit.cli.chat import HELP as CHAT_HELP
from decoderkit.cli.chat import cmd_chat
from decoderkit.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    UsageError,
    _cli_logging,
    _Parser,
    _silence_stdout,
    add_activations_arg,
    default_model_path,
    device_name,
    dtype_name,
    min_p_value,
    non_negative_int,
    positive_float,
    positive_int,
    report_error,
    speculative_mode,
    temperature_value,
    top_p_value,
)
from decoderkit.cli.inspect import _has_chat_template, cmd_bench, cmd_info
from decoderkit.cli.manage import cmd_convert, cmd_serve, cmd_train
from decoderkit.cli.text import cmd_generate
from decoderkit.cli.threads import add_threads_arg, configure_threads, threads_from_environment

__all__ = ["_has_chat_template", "build_parser", "default_model_path", "main"]

# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The `decoderkit` argument parser with all subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS lets the flag be given before or after the subcommand without the subparser resetting it.
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show debug logging and full tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, banners, statistics or warnings")

    parser = _Parser(prog=PROG, description="Run, inspect, benchmark, convert and fine-tune decoder-only language "
                     "models (Llama, Gemma, GPTBigCode, MPT) from Hugging Face checkpoints and GGUF files.")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help="full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", default=False, help="no progress, banners or warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    gen = sub.add_parser("generate", parents=[common], help="complete a prompt",
                         description="Complete a prompt, streaming the text to stdout as it is generated.")
    gen.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt; read from stdin when omitted or '-'")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--num-return-sequences", "-n", type=positive_int, default=1, metavar="N",
                     help="completions to sample for the prompt (default 1; more than 1 implies --do-sample)")
    gen.add_argument("--json", action="store_true", help="print one JSON record (model, prompt, completions, "
                     "prompt_tokens, completion_tokens, timings) instead of streaming text")
    gen.set_defaults(handler=cmd_generate)

    chat = sub.add_parser("chat", parents=[common], help="talk to a model with its chat template",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Interactive conversation through the model's chat template. Reads messages "
                          "from stdin (a terminal, with line editing and history, or a pipe).\n\n" + CHAT_HELP)
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", metavar="TEXT", help="system message opening the conversation")
    chat.add_argument("--ctx-size", "-c", type=positive_int, default=None, metavar="N",
                      help="context window in tokens, prompt and reply together (default: the model's); the oldest "
                      "turns are dropped to stay within it")
    chat.add_argument("--chat-template", metavar="FILE_OR_TEXT",
                      help="a Jinja chat template (file or inline text) to use instead of the tokenizer's")
    chat.set_defaults(handler=cmd_chat)

    bench = sub.add_parser("bench", parents=[common], help="measure prefill/decode speed and memory",
                           description="Time greedy generation on random prompt tokens: prefill and decode tokens/s, "
                           "time to first token, peak memory.")
    _add_model_args(bench)
    bench.add_argument("--batch-size", "-b", type=positive_int, default=1, metavar="B", help="sequences (default 1)")
    bench.add_argument("--prompt-tokens", "-p", type=positive_int, default=128, metavar="P",
                       help="prompt length per sequence (default 128)")
    bench.add_argument("--new-tokens", "-n", type=positive_int, default=64, metavar="N",
                       help="tokens to generate per sequence (default 64)")
    bench.add_argument("--json", action="store_true", help="print one JSON record instead of a table")
    bench.set_defaults(handler=cmd_bench)

    info = sub.add_parser("info", parents=[common], help="describe a checkpoint without loading its weights",
                          description="Family, parameter count, dtype, context length, rope type, tokenizer and files "
                          "of a checkpoint, read from its config and file headers (no weights are loaded).")
    info.add_argument("model", nargs="?", metavar="MODEL", help="directory, hub id in the local cache or .gguf file "
                      "(default: the shipped model)")
    info.add_argument("--json", action="store_true", help="print one JSON record instead of a table")
    info.set_defaults(handler=cmd_info)

    # The trainer parses its own arguments (including --help), so everything after `train` goes to it untouched.
    train = sub.add_parser("train", help="fine-tune a model (forwards to `python -m decoderkit.training`)",
                           add_help=False, description="Forward all arguments to the decoderkit trainer.")
    train.set_defaults(handler=cmd_train, trainer_args=[])
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (forwards to `python -m decoderkit.serve`)",
                           add_help=False, description="Forward all arguments to the decoderkit server.")
    serve.set_defaults(handler=cmd_serve, trainer_args=[])

    convert = sub.add_parser("convert", parents=[common], help="GGUF <-> HF directory, or change an HF dtype",
                             description="Write a Hugging Face model directory (safetensors + tokenizer) from a .gguf "
                             "file or from another directory, optionally in another dtype; or, when OUTPUT ends in "
                             ".gguf, a llama.cpp GGUF file from a model directory.")
    convert.add_argument("source", metavar="SOURCE", help=".gguf file, model directory or hub id in the local cache")
    convert.add_argument("output", metavar="OUTPUT", help="directory to write, or a .gguf file")
    convert.add_argument("--dtype", type=dtype_name, default=None,
                         help="dtype of the written weights (default: the source's; float32 for quantized GGUF)")
    convert.add_argument("--type", default=None, dest="gguf_type",
                         help="GGUF output: weight type, one of auto, f32, f16, bf16, q8_0, q4_0, q4_1 (default auto: "
                         "bf16 for a bfloat16 model, else f16, as llama.cpp's converter)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    convert.add_argument("--force", action="store_true", help="write into OUTPUT even if it is not empty")
    add_threads_arg(convert)
    convert.set_defaults(handler=cmd_convert)
    add_merge_parser(sub, [common])
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", metavar="PATH_OR_ID", help="model directory, hub id in the local cache, or "
                       ".gguf file (default: the shipped Shakespeare model)")
    group.add_argument("--dtype", type=dtype_name, default="auto",
                       help="weight dtype: auto (the checkpoint's), float32, bfloat16, float16 (default auto)")
    group.add_argument("--device", type=device_name, default=None,
                       help="cpu, cuda, cuda:N, mps (default: cuda when available, else cpu)")
    group.add_argument("--quantize", choices=("int8", "int4", "none"), default=None,
                       help="weights: int8 / int4 (quantized on load, CPU), none (float; a GGUF file dequantized); "
                       "default: a GGUF file's quantized tensors stay packed, an HF checkpoint stays float")
    add_activations_arg(group)
    add_threads_arg(group)
    group.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT directory, as `decoderkit train --lora` "
                       "writes) merged into the model's weights after loading; the base must be float (a GGUF file "
                       "is dequantized)")
    group.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                       help="split the model over N ranks (processes started here; gloo on CPU, NCCL on CUDA)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="compile the decode step with a static cache (CUDA graphs on GPU); off by default "
                       "(DECODERKIT_COMPILE=1 changes that default); compiled code is cached in "
                       "~/.cache/decoderkit/inductor (DECODERKIT_CACHE_DIR) so a second start skips most of it")
    spec = parser.add_argument_group("speculative decoding", "Same output as plain decoding, faster where the text "
                                     "repeats the prompt (lookup) or a small model predicts it well (draft); batch 1.")
    spec.add_argument("--speculative", type=speculative_mode, metavar="lookup|draft:PATH",
                      help="propose tokens by prompt lookup, or with a draft model (same tokenizer) at PATH")
    spec.add_argument("--num-speculative-tokens", type=positive_int, metavar="K",
                      help="most tokens proposed per step (default: 10 for lookup, the generation config's "
                      "num_assistant_tokens for a draft); fewer after rejections")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation", "Unset options take the checkpoint's generation_config.json. "
                                      "Any sampling option implies --do-sample unless --greedy is given.")
    group.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N",
                       help="tokens to generate at most (default 128)")
    group.add_argument("--temperature", type=temperature_value, metavar="T", help="sampling temperature, > 0")
    group.add_argument("--top-k", type=non_negative_int, metavar="K", help="keep the K most likely tokens (0: all)")
    group.add_argument("--top-p", type=top_p_value, metavar="P", help="nucleus sampling mass, in (0, 1]")
    group.add_argument("--min-p", type=min_p_value, metavar="P",
                       help="drop tokens below P times the top probability, in [0, 1]")
    group.add_argument("--repetition-penalty", type=positive_float, metavar="R", help="> 1 discourages repeats")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_true", default=None, help="sample")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="always take the most likely token")
    group.add_argument("--seed", type=non_negative_int, metavar="S", help="random seed, for reproducible sampling")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("decoderkit")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the `decoderkit` command; return the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `train` / `serve` belongs to that program, its --help included: argparse must not look at it.
    command_at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    forwarded = argv[command_at:command_at + 1] in (["train"], ["serve"])
    trainer_args = argv[command_at + 1:] if forwarded else None
    try:
        args = parser.parse_args(argv if trainer_args is None else argv[:command_at + 1])
    except SystemExit as stop:  # --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if trainer_args is not None:
        args.trainer_args = trainer_args
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    prog = f"{PROG} {args.command}"
    try:
        with _cli_logging(verbose, quiet):
            if hasattr(args, "threads"):
                args.threads_chosen = args.threads is not None or threads_from_environment() is not None
                args.threads = configure_threads(args.threads, idle_only=True)  # short-lived commands
            return args.handler(args)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as err:
        print(f"{prog}: error: {err} (see '{prog} --help')", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`decoderkit generate ... | head`): not an error worth a message.
        _silence_stdout()
        return EXIT_ERROR
    except Exception as err:  # noqa: BLE001 - the boundary where any failure becomes one line
        report_error(prog, err, verbose)
        return EXIT_ERROR
