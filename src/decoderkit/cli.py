"""The `decoderkit` command: generate, chat, bench, info, train and convert.

Every subcommand follows the same contract: 0 on success, 1 on a runtime error (reported as one line on stderr, the
traceback only with `--verbose`), 2 on a usage error, 130 when interrupted with Ctrl-C. Model code, tokenizers and
rich are imported by the subcommand that needs them, after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

if TYPE_CHECKING:
    import torch

    from decoderkit.model import PreTrainedDecoder
    from decoderkit.tokenizer import Tokenizer

PROG = "decoderkit"
logger = logging.getLogger(__name__)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DTYPE_NAMES = {
    "auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model")  # fmt: skip


class CLIError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


class UsageError(CLIError):
    """A bad combination of arguments found after parsing: exit status 2."""


# ---------------------------------------------------------------------------------------------- argument types
def _number(kind: Callable[[str], Any], check: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse `type` that parses with `kind` and enforces `check`, naming the rule in the error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, ">= 0")
positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "> 0")
temperature_value = _number(float, lambda v: v > 0 and v != float("inf"), "> 0 (use --greedy for deterministic output)")
top_p_value = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
min_p_value = _number(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def dtype_name(text: str) -> str:
    """`--dtype`: a canonical dtype name from a name or alias."""
    name = DTYPE_NAMES.get(text.lower().removeprefix("torch."))
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPE_NAMES)}")
    return name


def device_name(text: str) -> str:
    """`--device`: checked for shape here; whether the device exists is checked once torch is loaded."""
    if not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda, cuda:N, mps or xpu")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error, pointing at `--help` instead of repeating the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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
                          description="Interactive conversation through the model's chat template. Reads one message "
                          "per line from stdin (a terminal or a pipe); /reset clears the history, /exit quits.")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", metavar="TEXT", help="system message opening the conversation")
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
    bench.add_argument("--new-tokens", "-t", type=positive_int, default=64, metavar="N",
                       help="tokens to generate per sequence (default 64)")
    bench.add_argument("--compile", action="store_true",
                       help="compile the decode step with a static cache (CUDA graphs on GPU); compile time excluded")
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

    convert = sub.add_parser("convert", parents=[common], help="GGUF -> HF directory, or change an HF dtype",
                             description="Write a Hugging Face model directory (safetensors + tokenizer) from a .gguf "
                             "file or from another directory, optionally in another dtype.")
    convert.add_argument("source", metavar="SOURCE", help=".gguf file, model directory or hub id in the local cache")
    convert.add_argument("output", metavar="OUTPUT", help="directory to write")
    convert.add_argument("--dtype", type=dtype_name, default=None,
                         help="dtype of the written weights (default: the source's; float32 for quantized GGUF)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    convert.add_argument("--force", action="store_true", help="write into OUTPUT even if it is not empty")
    convert.set_defaults(handler=cmd_convert)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", metavar="PATH_OR_ID", help="model directory, hub id in the local cache, or "
                       ".gguf file (default: the shipped Shakespeare model)")
    group.add_argument("--dtype", type=dtype_name, default="auto",
                       help="weight dtype: auto (the checkpoint's), float32, bfloat16, float16 (default auto)")
    group.add_argument("--device", type=device_name, default=None,
                       help="cpu, cuda, cuda:N, mps (default: cuda when available, else cpu)")


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
        if verbose:
            traceback.print_exc()
        expected = isinstance(err, (CLIError, OSError, ValueError))
        hint = "" if verbose or expected else " (run with --verbose for details)"
        print(f"{prog}: error: {_describe(err)}{hint}", file=sys.stderr)
        return EXIT_ERROR


def _describe(err: BaseException) -> str:
    """One line for an exception: OSErrors without their `[Errno N]` prefix, other types named when unexpected."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror if err.filename is None or str(err.filename) in err.strerror else (
            f"{err.filename}: {err.strerror}")
    elif isinstance(err, (CLIError, ValueError, OSError)):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (it may be replaced after setup, as in tests)."""

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))


@contextlib.contextmanager
def _cli_logging(verbose: bool, quiet: bool) -> Iterator[None]:
    """Route decoderkit's log records and warnings to stderr as one-line messages for the command's duration.

    The previous logger and warnings state comes back afterwards, so calling `main()` in-process (tests, notebooks)
    leaves no trace on the caller's logging.
    """
    import warnings

    package = logging.getLogger("decoderkit")
    saved = (package.level, package.propagate, warnings.formatwarning)
    package.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    package.addHandler(_HANDLER)
    package.propagate = False
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            elif not verbose:
                # One line per warning, without the library source line Python shows by default.
                warnings.formatwarning = lambda message, category, *_, **__: f"{PROG}: warning: {message}\n"
            yield
    finally:
        package.removeHandler(_HANDLER)
        package.level, package.propagate, warnings.formatwarning = saved


def _silence_stdout() -> None:
    # Python flushes stdout at exit; pointing it at devnull keeps a closed pipe from printing a second error.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _note(args: argparse.Namespace, message: str) -> None:
    """A status line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- model loading
def default_model_path() -> Path:
    """The small Llama shipped in the package (decoderkit/assets/default-model)."""
    return Path(str(resources.files("decoderkit") / "assets" / "default-model"))


def locate_model(name: str | None) -> Path:
    """A local path for `--model`: a directory, a .gguf file, or a hub id found in the local cache."""
    if name is None:
        path = default_model_path()
        if not (path / "config.json").is_file():
            raise CLIError(f"no --model given and the shipped default model is missing ({path}); pass --model")
        return path
    from decoderkit.checkpoint import resolve_model_path

    try:
        path = resolve_model_path(name)
    except FileNotFoundError as err:
        message = _describe(err)
        if "download" not in message and not Path(name).exists() and "/" in name.strip("/") \
                and not name.startswith((".", "/", "~")) and not name.endswith(".gguf"):
            message += f"; fetch it with `hf download {name}` (huggingface_hub's CLI) where there is network"
        raise CLIError(message) from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.iterdir())
            listing = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise CLIError(f"{path}: not a model checkpoint (no config.json; it holds {listing or 'nothing'})")
    elif path.suffix != ".gguf":
        raise CLIError(f"{path}: not a model checkpoint (expected a directory with config.json or a .gguf file)")
    return path


def pick_device(name: str | None) -> str:
    """The requested device after checking it exists; by default cuda when available."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = name.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available on this machine")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise CLIError(f"--device {name}: XPU is not available on this machine")
    return name


def load_model(args: argparse.Namespace, tokenizer: bool = True) -> tuple[PreTrainedDecoder, Tokenizer | None, Path]:
    """The causal LM (and its tokenizer) named by `--model`, on `--device` in `--dtype`."""
    from decoderkit import AutoModelForCausalLM

    path = locate_model(args.model)
    device = pick_device(args.device)
    tok = None
    if tokenizer:
        # The tokenizer first: it is quick, and a missing one should fail before minutes of weight loading.
        from decoderkit.tokenizer import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    # The loader draws a progress bar only when stderr is a terminal; --quiet turns it off there too.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device=device,
                                                 progress=False if getattr(args, "quiet", False) else None)
    return model, tok, path


# ---------------------------------------------------------------------------------------------- streaming
class TokenStreamer:
    """A streamer with transformers' protocol (`put` / `end`) that records each row's new tokens and their timing.

    transformers' `generate` first puts the prompt ids (B, T), then each step's new tokens (B,). Row 0's text is
    written to `out` as it completes (UTF-8 safe, via the tokenizer's `StreamDecoder`) when one row is generated.
    Tokens after a row's end-of-sequence token (padding) are not recorded.
    """

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: Sequence[int], eos_ids: Sequence[int],
                 out: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = len(prompt_ids)
        self.eos_ids = set(eos_ids)
        self.out = out
        self.rows: list[list[int]] = []
        self.finished: list[bool] = []
        self.first_token_at: float | None = None
        self.ended = False
        self._prompt_seen = False
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True, prefix_ids=prompt_ids) if tokenizer else None

    def put(self, value: torch.Tensor) -> None:
        """Receive the prompt (skipped) or one step's tokens."""
        if not self._prompt_seen:
            self._prompt_seen = True
            # The prompt comes as (1, T) or (B, T); step tokens as (B,).
            if value.dim() == 2 and value.shape[-1] == self.prompt_length:
                return
        step = value.reshape(value.shape[0], -1).tolist() if value.dim() > 0 else [[int(value)]]
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.rows = [[] for _ in step]
            self.finished = [False] * len(step)
        for row, tokens in enumerate(step):
            for token in tokens:
                if self.finished[row]:
                    break
                self.rows[row].append(token)
                if token in self.eos_ids:
                    self.finished[row] = True
                elif row == 0 and len(self.rows) == 1:
                    self._emit(self._decoder.push(token) if self._decoder else "")

    def end(self) -> None:
        """The generation finished: release any held-back text."""
        self.flush()
        self.ended = True

    def flush(self) -> None:
        """Write out text held back for an incomplete character (also used after an interrupt)."""
        if self._decoder is not None and len(self.rows) <= 1:
            self._emit(self._decoder.flush())

    def _emit(self, text: str) -> None:
        if text and self.out is not None:
            self.out.write(text)
            self.out.flush()


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`generate` keyword arguments for the options given; unset ones fall back to the generation config."""
    sampling = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "min_p")}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, **sampling}
    if args.repetition_penalty is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    n = getattr(args, "num_return_sequences", 1)
    do_sample = args.do_sample
    if do_sample is False and n > 1:
        raise UsageError("--num-return-sequences > 1 needs sampling; drop --greedy")
    if do_sample is None and (sampling or n > 1):
        do_sample = True  # asking for a temperature or several samples means sampling
    if do_sample is not None:
        kwargs["do_sample"] = do_sample
    if n > 1:
        kwargs["num_return_sequences"] = n
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
        kwargs["generator"] = torch.Generator().manual_seed(args.seed)
    return kwargs


def eos_token_ids(model: PreTrainedDecoder) -> list[int]:
    """The ids that end a sequence, from the generation config (else the model config)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def fit_new_tokens(args: argparse.Namespace, model: PreTrainedDecoder, prompt_tokens: int, wanted: int) -> int:
    """`wanted` new tokens, cut to what fits the context window after the prompt (with a notice)."""
    context = model.config.max_position_embeddings
    if prompt_tokens >= context:
        raise CLIError(f"the prompt has {prompt_tokens} tokens; the model's context window is {context}")
    if prompt_tokens + wanted > context:
        _note(args, f"{PROG}: note: max new tokens cut from {wanted} to {context - prompt_tokens} to fit the "
                    f"{context}-token context window")
        return context - prompt_tokens
    return wanted


def run_generate(model: PreTrainedDecoder, prompt_ids: list[int], kwargs: dict[str, Any],
                 streamer: TokenStreamer) -> bool:
    """Generate with `streamer`; return False when interrupted by Ctrl-C (what was generated is in the streamer)."""
    import torch

    input_ids = torch.tensor([prompt_ids], device=model.device)
    try:
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs)
    except KeyboardInterrupt:
        streamer.flush()
        return False
    return True


# ---------------------------------------------------------------------------------------------- generate
def read_prompt(args: argparse.Namespace) -> str:
    """The prompt argument, or all of stdin when it is absent or '-'."""
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    stdin = sys.stdin
    if stdin is None:
        raise UsageError("no PROMPT given and stdin is closed")
    if args.prompt is None and stdin.isatty():
        raise UsageError("no PROMPT given; pass it as an argument or pipe it on stdin")
    try:
        return _decode_stdin(_raw(stdin).read(), "utf-8-sig")
    except OSError as err:
        raise CLIError(f"cannot read the prompt from stdin: {_describe(err)}") from None


def _raw(stdin: TextIO) -> Any:
    # Bytes, decoded here: Python's own stdin decoding depends on the locale (and in the C locale lets invalid bytes
    # through as surrogates that fail later, deep inside the tokenizer).
    return getattr(stdin, "buffer", stdin)


def _decode_stdin(data: str | bytes, encoding: str = "utf-8") -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise CLIError(f"stdin is not valid UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """`decoderkit generate`: complete a prompt, streaming text or printing one JSON record."""
    prompt = read_prompt(args)
    kwargs = generation_kwargs(args)
    start = time.perf_counter()
    model, tok, path = load_model(args)
    load_s = time.perf_counter() - start
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise CLIError("the prompt is empty and the tokenizer adds no start token; give some text")
    kwargs["max_new_tokens"] = fit_new_tokens(args, model, len(prompt_ids), kwargs["max_new_tokens"])
    n = args.num_return_sequences
    stream = not args.json and n == 1
    streamer = TokenStreamer(tok, prompt_ids, eos_token_ids(model), out=sys.stdout if stream else None)

    begin = time.perf_counter()
    completed = run_generate(model, prompt_ids, kwargs, streamer)
    total_s = time.perf_counter() - begin
    rows = streamer.rows or [[] for _ in range(n)]
    texts = [completion_text(tok, prompt_ids, row) for row in rows]
    completion_tokens = sum(len(row) for row in rows)
    ttft = streamer.first_token_at - begin if streamer.first_token_at is not None else None

    if args.json:
        record = {
            "model": str(path), "prompt": prompt, "completions": texts, "prompt_tokens": len(prompt_ids),
            "completion_tokens": completion_tokens,
            "timings": {"load_s": round(load_s, 4), "time_to_first_token_s": _round(ttft), "total_s": round(total_s, 4),
                        "tokens_per_s": _round(completion_tokens / total_s if total_s > 0 else None, 2)},
            "interrupted": not completed,
        }
        print(json.dumps(record, ensure_ascii=False))
    elif stream:
        print(flush=True)
    else:
        for i, text in enumerate(texts):
            print(f"--- completion {i + 1} ---\n{text}", flush=True)
    if not args.json:
        rate = completion_tokens / total_s if total_s > 0 else 0.0
        _note(args, f"[{len(prompt_ids)} prompt + {completion_tokens} new tokens in {total_s:.2f} s, {rate:.1f} "
                    f"tokens/s; load {load_s:.2f} s]")
    if not completed:
        _note(args, f"{PROG} generate: interrupted")
        return EXIT_INTERRUPTED
    return EXIT_OK


def completion_text(tok: Tokenizer, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
    """The text `ids` add after the prompt, exactly as streamed.

    Decoding the new ids on their own can differ at the start: a SentencePiece decoder drops the first token's
    leading space, which after a prompt is a real space.
    """
    decoder = tok.stream_decoder(skip_special_tokens=True, prefix_ids=prompt_ids)
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------------- chat
def read_messages(prompt: str) -> Any:
    """User lines: `input()` on a terminal (line editing, a prompt), plain lines from a pipe."""
    stdin = sys.stdin
    if stdin is None:
        raise CLIError("stdin is closed; chat reads messages from stdin")
    interactive = stdin.isatty()
    while True:
        try:
            line = input(prompt) if interactive else _decode_stdin(_raw(stdin).readline())
        except EOFError:
            return
        except UnicodeDecodeError as err:  # a terminal in a non-UTF-8 locale
            raise CLIError(f"stdin is not valid {err.encoding} text (byte {err.start})") from None
        if not interactive and not line:
            return
        yield line.rstrip("\r\n")


def load_chat_template(value: str) -> str:
    """`--chat-template`: the contents of a file, or the text itself."""
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise CLIError(f"--chat-template {value}: no such file (and not an inline Jinja template)")
    return value


def cmd_chat(args: argparse.Namespace) -> int:
    """`decoderkit chat`: a conversation over stdin/stdout with history trimmed to the context window."""
    kwargs = generation_kwargs(args)
    model, tok, path = load_model(args)
    if args.chat_template is not None:
        tok.chat_template = load_chat_template(args.chat_template)
    if not tok.chat_template:
        raise CLIError(f"{path}: the tokenizer has no chat template; pass --chat-template, or use `generate`")
    context = model.config.max_position_embeddings
    if kwargs["max_new_tokens"] >= context:
        raise UsageError(f"--max-new-tokens {kwargs['max_new_tokens']} leaves no room for the conversation in the "
                         f"model's {context}-token context window")
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    eos = eos_token_ids(model)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        _note(args, f"Chatting with {path}. Commands: /reset clears the history, /exit quits (or Ctrl-D).")

    for line in read_messages(">>> " if interactive else ""):
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            history.clear()
            _note(args, "[history cleared]")
            continue
        history.append({"role": "user", "content": line})
        prompt_ids = _fit_history(args, tok, opening, history, context - kwargs["max_new_tokens"])
        if prompt_ids is None:
            history.pop()
            _note(args, f"[message too long for the {context}-token context window with --max-new-tokens "
                        f"{kwargs['max_new_tokens']}; not sent]")
            continue
        logger.info("prompt: %d tokens from %d message(s)", len(prompt_ids), len(opening) + len(history))
        streamer = TokenStreamer(tok, prompt_ids, eos, out=sys.stdout)
        completed = run_generate(model, prompt_ids, kwargs, streamer)
        reply = tok.decode(streamer.rows[0] if streamer.rows else [], skip_special_tokens=True)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})
        if not completed:
            _note(args, "[reply interrupted]")
    return EXIT_OK


def _fit_history(args: argparse.Namespace, tok: Tokenizer, opening: list[dict[str, str]],
                 history: list[dict[str, str]], budget: int) -> list[int] | None:
    """The prompt ids of the conversation, dropping the oldest turns (in place) until it fits `budget` tokens."""
    while True:
        ids = tok.apply_chat_template(opening + history, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        if len(ids) <= budget:
            return ids
        if len(history) <= 1:
            return None
        # Drop a whole exchange (user + assistant) so the history never starts with an assistant turn.
        dropped = 2 if len(history) > 2 and history[1]["role"] == "assistant" else 1
        del history[:dropped]
        _note(args, f"[context window full: dropped the oldest {'exchange' if dropped == 2 else 'message'}]")


# ---------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    """`decoderkit bench`: prefill and decode throughput, time to first token and peak memory."""
    import resource

    import torch

    start = time.perf_counter()
    model, _, path = load_model(args, tokenizer=False)
    load_s = time.perf_counter() - start
    config = model.config
    if args.prompt_tokens + args.new_tokens > config.max_position_embeddings:
        raise UsageError(f"--prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} exceeds the "
                         f"model's context window of {config.max_position_embeddings}")
    device = model.device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_tokens), generator=generator)
    prompt = prompt.to(device)
    # Every sequence runs to exactly `--new-tokens`: the end-of-sequence token is never allowed to stop it early.
    kwargs: dict[str, Any] = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    if args.compile:
        kwargs["compile"] = True

    def timed_run(ids: torch.Tensor, new_tokens: int) -> tuple[float, float | None, int]:
        streamer = TokenStreamer(None, ids[0].tolist(), [])
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                 **{**kwargs, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - begin
        first = streamer.first_token_at - begin if streamer.first_token_at is not None else None
        return total, first, out.shape[-1] - ids.shape[-1] if isinstance(out, torch.Tensor) else new_tokens

    # A warm-up run takes one-off costs (allocator growth, kernel selection) out of the measurement. Compiled code is
    # specialised to the static cache's shapes, so then the warm-up must be the measured run itself.
    if args.compile:
        timed_run(prompt, args.new_tokens)
    else:
        timed_run(prompt[:, : min(8, args.prompt_tokens)], min(2, args.new_tokens))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total_s, ttft, generated = timed_run(prompt, args.new_tokens)
    b = args.batch_size
    decode_s = total_s - ttft if ttft is not None else None
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    decode_tps = b * (generated - 1) / decode_s if decode_s and generated > 1 else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    record = {
        "model": str(path), "device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": model.num_parameters(), "batch_size": b, "prompt_tokens": args.prompt_tokens,
        "new_tokens": generated, "load_s": round(load_s, 4),
        "time_to_first_token_s": _round(ttft), "prefill_tokens_per_s": _round(b * args.prompt_tokens / ttft, 2)
        if ttft else None, "decode_tokens_per_s": _round(decode_tps, 2), "total_s": round(total_s, 4),
        # Each decode step reads every weight once: this is the bandwidth the decode rate implies (roofline check).
        "decode_weight_read_gb_per_s": _round(weights_bytes * decode_tps / b / 1e9, 3) if decode_tps else None,
        "weights_bytes": weights_bytes, "peak_rss_bytes": rss_bytes,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "compiled": args.compile, "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
    }
    if args.json:
        print(json.dumps(record))
    else:
        _print_table(f"bench: {path.name}", {
            "device / dtype": f"{record['device']} / {record['dtype']}",
            "batch x prompt + new": f"{b} x {args.prompt_tokens} + {generated}",
            "load": f"{load_s:.2f} s",
            "time to first token": _fmt(ttft, "{:.4f} s"),
            "prefill": _fmt(record["prefill_tokens_per_s"], "{:,.1f} tokens/s"),
            "decode": _fmt(decode_tps, "{:,.1f} tokens/s"),
            "decode weight reads": _fmt(record["decode_weight_read_gb_per_s"], "{:.2f} GB/s"),
            "peak RSS": _size(rss_bytes),
            "CUDA max allocated": _size(record["cuda_max_allocated_bytes"]),
        })
    return EXIT_OK


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _print_table(title: str, rows: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # paths must stay whole, not end in an ellipsis
    for key, value in rows.items():
        table.add_row(key, str(value))
    Console(soft_wrap=True).print(table)


# ---------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    """`decoderkit info`: what a checkpoint is, from its config and file headers only."""
    path = locate_model(args.model)
    record = gguf_info(path) if path.is_file() else directory_info(path)
    if args.json:
        print(json.dumps(record))
        return EXIT_OK
    rows = {k: v for k, v in record.items() if k != "files"}
    rows["parameters"] = f"{record['parameters']:,} ({record['parameters_source']})" if record["parameters"] else "-"
    rows.pop("parameters_source")
    rows["total_size"] = _size(record["total_size_bytes"])
    rows.pop("total_size_bytes")
    rows["files"] = ", ".join(f"{f['name']} ({_size(f['size_bytes'])})" for f in record["files"])
    _print_table(f"info: {path}", rows)
    return EXIT_OK


def _config_summary(hf: dict[str, Any]) -> dict[str, Any]:
    from decoderkit.config import DecoderConfig

    config = DecoderConfig.from_hf_dict(hf)
    return {
        "family": config.model_type,
        "architectures": hf.get("architectures") or [],
        "context_length": config.max_position_embeddings,
        "position_embedding": config.position_embedding,
        "rope_type": config.rope_type if config.position_embedding == "rope" else None,
        "rope_theta": config.rope_parameters.get("rope_theta") if config.position_embedding == "rope" else None,
        "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
        "attention_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_word_embeddings,
        "_config": config,
    }


def _count_from_config(config: Any) -> int:
    """Parameters of the causal LM the config describes, built on the meta device (no memory, no init)."""
    import torch

    from decoderkit.model import DecoderForCausalLM

    with torch.device("meta"):
        model = DecoderForCausalLM(config)
    return model.num_parameters()


def directory_info(path: Path) -> dict[str, Any]:
    """`info` for a Hugging Face model directory: config.json plus safetensors headers (no tensor data read)."""
    from decoderkit.checkpoint import weight_files
    from decoderkit.config import read_config_json

    hf = read_config_json(path)
    summary = _config_summary(hf)
    config = summary.pop("_config")
    files, fmt = weight_files(path)[:2]  # (files, format, weight map) in newer versions
    parameters, dtypes = None, {}
    if fmt == "safetensors":
        from safetensors import safe_open

        parameters = 0
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        tensor = f.get_slice(name)  # header only: shape and dtype without reading data
                        count = 1
                        for dim in tensor.get_shape():
                            count *= dim
                        parameters += count
                        dtype = str(tensor.get_dtype())
                        dtypes[dtype] = dtypes.get(dtype, 0) + count
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise CLIError(f"{file}: unreadable safetensors header ({_describe(err)})") from None
        source = "safetensors headers"
    if parameters is None:
        parameters, source = _count_from_config(config), "config shapes"
    dtype = max(dtypes, key=dtypes.get) if dtypes else hf.get("dtype", hf.get("torch_dtype"))
    listing = sorted(p for p in path.iterdir() if p.is_file())
    tokenizer = (path / "tokenizer.json").is_file()
    chat_template = tokenizer and _has_chat_template(path)
    return {
        "path": str(path), "format": f"huggingface ({fmt})", **summary, "parameters": parameters,
        "parameters_source": source, "dtype": _short_dtype(dtype), "tokenizer": tokenizer,
        "chat_template": chat_template, "total_size_bytes": sum(p.stat().st_size for p in listing),
        "files": [{"name": p.name, "size_bytes": p.stat().st_size} for p in listing],
    }


def _short_dtype(dtype: Any) -> str | None:
    if dtype is None:
        return None
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64",
             "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
    return names.get(str(dtype), str(dtype).removeprefix("torch."))


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def gguf_info(path: Path) -> dict[str, Any]:
    """`info` for a .gguf file: metadata and tensor headers (memory-mapped; nothing is dequantized)."""
    from decoderkit.gguf_model import gguf_config, open_gguf

    reader = open_gguf(path)
    hf = gguf_config(reader)
    summary = _config_summary(hf)
    summary.pop("_config")
    types: dict[str, int] = {}
    parameters = 0
    for tensor in reader.tensors:
        count = int(tensor.n_elements)
        parameters += count
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + count
    field = reader.get_field("tokenizer.chat_template")
    size = path.stat().st_size
    return {
        "path": str(path), "format": "gguf", **summary, "parameters": parameters, "parameters_source": "gguf tensors",
        # GGUF mixes types (e.g. Q4_K with F32 norms): name the one holding most weights, then the rest.
        "dtype": max(types, key=types.get) if types else None,
        "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
        "tokenizer": reader.get_field("tokenizer.ggml.tokens") is not None, "chat_template": field is not None,
        "total_size_bytes": size, "files": [{"name": path.name, "size_bytes": size}],
    }


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    """`decoderkit train ...`: run `python -m decoderkit.training ...` in this process."""
    import importlib.util
    import runpy

    try:
        found = importlib.util.find_spec("decoderkit.training.__main__") is not None
    except ImportError:
        found = False
    if not found:
        raise CLIError("the trainer (decoderkit.training) is not available in this installation")
    saved = sys.argv
    sys.argv = [f"{PROG} train", *args.trainer_args]
    try:
        runpy.run_module("decoderkit.training", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or EXIT_OK
        print(stop.code, file=sys.stderr)
        return EXIT_ERROR
    finally:
        sys.argv = saved
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """`decoderkit serve ...`: the OpenAI-compatible server (needs the `serve` extra: fastapi, uvicorn)."""
    try:
        from decoderkit.serve.app import main as serve_main
    except ImportError as err:
        raise CLIError(f"the server needs the serve extra ({err}); pip install 'decoderkit[serve]'") from None
    return serve_main(args.trainer_args)


# ---------------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    """`decoderkit convert`: a .gguf file or model directory to a (re-typed) Hugging Face directory."""
    from decoderkit import AutoModelForCausalLM

    source = locate_model(args.source)
    output = Path(args.output)
    if output.exists() and output.resolve() == source.resolve():
        raise UsageError("OUTPUT must differ from SOURCE (the weights are read while the output is written)")
    if output.exists() and not output.is_dir():
        raise CLIError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not args.force:
        raise CLIError(f"{output}: directory is not empty; pass --force to write into it")
    if source.is_dir() and args.dtype is None:
        raise UsageError("converting a model directory needs --dtype (a .gguf source needs no options)")
    from decoderkit.checkpoint import parse_size

    try:
        parse_size(args.max_shard_size)
    except ValueError as err:
        raise UsageError(f"--max-shard-size: {err}") from None

    start = time.perf_counter()
    # A quantized GGUF tensor has no dtype of its own: it is dequantized to float32 unless told otherwise.
    dtype = args.dtype or ("float32" if source.is_file() else "auto")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device="cpu",
                                                 progress=False if getattr(args, "quiet", False) else None)
    model.save_pretrained(output, max_shard_size=args.max_shard_size)
    if source.is_file():
        from decoderkit.tokenizer import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(output)
    else:
        # Copied byte for byte: the directory's tokenizer files are already what transformers reads.
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, output / name)
    _note(args, f"wrote {output} ({str(model.dtype).removeprefix('torch.')}, {model.num_parameters():,} parameters) "
                f"in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
