"""What every subcommand shares: errors, argument types, logging, model loading, streamed generation."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from decoderkit.fileio import cache_root

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


def speculative_mode(text: str) -> str:
    """`--speculative`: `lookup` (prompt lookup) or `draft:PATH` (a draft model)."""
    if text == "lookup" or (text.startswith("draft:") and len(text) > len("draft:")):
        return text
    raise argparse.ArgumentTypeError(f"expected 'lookup' or 'draft:PATH' (a draft model with the model's tokenizer), "
                                     f"got {text!r}")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error, pointing at `--help` instead of repeating the usage block.

    transformers' spelling of a flag (`--max_new_tokens`) is taken as the flag itself, and an unknown flag is an
    error that suggests the nearest known one, instead of being left over (or read as the prompt)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        args = self._dashed(list(sys.argv[1:] if args is None else args))
        namespace, extras = super().parse_known_args(args, namespace)
        unknown = [a for a in extras if a.startswith("--") and len(a) > 2]
        if unknown:
            self.error(self.unknown_flag_message(unknown[0]))
        return namespace, extras

    def _dashed(self, args: list[str]) -> list[str]:
        """`--max_new_tokens` -> `--max-new-tokens` where the dashed spelling is one of this parser's flags."""
        out = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            name, eq, value = arg.partition("=")
            if name.startswith("--") and "_" in name:
                dashed = name.replace("_", "-")
                if dashed in self._option_string_actions:
                    out[i] = dashed + eq + value
        return out

    def unknown_flag_message(self, arg: str) -> str:
        """'unrecognized argument --x', with the nearest known flag when one is close."""
        import difflib

        name = arg.partition("=")[0]
        known = [o for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(name.replace("_", "-"), known, n=1, cutoff=0.6)
        return f"unrecognized argument {name}" + (f"; did you mean {close[0]}?" if close else "")


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


def report_error(prog: str, err: BaseException, verbose: bool) -> None:
    """The one stderr line every command prints for a failure (after the traceback with `--verbose`); a hint to rerun
    with `--verbose` when the error is not one of the expected kinds."""
    if verbose:
        traceback.print_exc()
    expected = isinstance(err, (CLIError, OSError, ValueError))
    hint = "" if verbose or expected else " (run with --verbose for details)"
    print(f"{prog}: error: {_describe(err)}{hint}", file=sys.stderr)


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


def copy_tokenizer(source: Path, output: Path) -> None:
    """The tokenizer of `source` (a model directory or .gguf file) written into the directory `output`."""
    if source.is_file():
        from decoderkit.tokenizer import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(output)
        return
    # Copied byte for byte: the directory's tokenizer files are already what transformers reads.
    import shutil

    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)


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


def add_activations_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--activations``, as generate, chat, bench and serve take it (`decoderkit.layers.quantized.set_activations`)."""
    parser.add_argument("--activations", choices=("float", "bfloat16", "int8"), default=None,
                        help="how quantized layers multiply: float (exact, the default), bfloat16 (x and weights "
                        "rounded to bfloat16, float32 sums: 1.1-1.9x faster on batches and prompts where the CPU has "
                        "AVX512-BF16), int8 (llama.cpp's int8 activations)")


def load_model(args: argparse.Namespace, tokenizer: bool = True) -> tuple[PreTrainedDecoder, Tokenizer | None, Path]:
    """The causal LM (and its tokenizer) named by `--model`, on `--device` in `--dtype`."""
    from decoderkit import AutoModelForCausalLM
    from decoderkit.cli.adapters import adapter_dir, adapter_load_quantization, apply_adapter

    path = locate_model(args.model)
    device = pick_device(args.device)
    adapter = getattr(args, "adapter", None)
    if adapter is not None:
        adapter_dir(adapter)  # before the weights load: a wrong path should not cost the load
    quantization = adapter_load_quantization(getattr(args, "quantize", None), [adapter] if adapter else [])
    tok = None
    if tokenizer:
        # The tokenizer first: it is quick, and a missing one should fail before minutes of weight loading.
        from decoderkit.tokenizer import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    # The loader draws a progress bar only when stderr is a terminal; --quiet turns it off there too.
    options = dict(dtype=args.dtype, device=device, quantization=quantization,
                   progress=False if getattr(args, "quiet", False) else None)
    activations = getattr(args, "activations", None)
    if getattr(args, "tensor_parallel", 1) > 1:
        if adapter is not None:
            raise UsageError("--adapter cannot be combined with --tensor-parallel: merge it first (`decoderkit merge`)")
        if activations is not None:
            raise UsageError("--activations applies to quantized layers, which --tensor-parallel does not split")
        from decoderkit.parallel.launch import start_tensor_parallel

        return start_tensor_parallel(path, args.tensor_parallel, **options).model, tok, path
    model = AutoModelForCausalLM.from_pretrained(path, activations=activations, **options)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    if getattr(args, "threads", None) is not None:
        from decoderkit.cli.threads import fit_threads

        args.threads = fit_threads(model, args.threads, getattr(args, "threads_chosen", True))
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


# ---------------------------------------------------------------------------------------------- compiled decoding
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def compile_choice(args: argparse.Namespace) -> bool | str:
    """`--compile` (True) / `--no-compile` (False), else `DECODERKIT_COMPILE`, else "auto"."""
    wanted = getattr(args, "compile", None)
    if wanted is None:
        value = os.environ.get("DECODERKIT_COMPILE", "").strip().lower()
        if value and value not in _TRUE + _FALSE:
            raise CLIError(f"DECODERKIT_COMPILE={value!r}: expected one of {', '.join(_TRUE + _FALSE)}")
        wanted = "auto" if not value else value in _TRUE
    return wanted


def resolve_compile(args: argparse.Namespace) -> bool | str:
    """How to run the decode step: `--compile` / `--no-compile`, else `DECODERKIT_COMPILE`, else "auto".

    "auto" (the default) runs the AOTInductor-packaged step where a package for the model's weights and the
    run's shapes is on disk (float32 / bfloat16 and quantized CPU models: see decoderkit.generation.aot_step), and the
    eager step otherwise; after such an eager run `build_step_in_background` compiles the package for the next
    start, so the first start is never made to wait minutes for a compilation. `--compile` (or `DECODERKIT_COMPILE=1`)
    compiles with torch.compile in the foreground and points inductor's on-disk caches at decoderkit's cache
    directory; `--no-compile` (or `DECODERKIT_COMPILE=0`) is always eager and builds nothing."""
    wanted = compile_choice(args)
    if wanted is True:
        use_compile_cache()
    if wanted == "auto":
        # The decode kernel's first build takes seconds to minutes: an auto start uses it once it is built (the
        # background build below builds it) instead of waiting for it
        os.environ.setdefault("DECODERKIT_KERNELS", "cached")
    args.resolved_compile = wanted
    return wanted


def build_step_in_background(args: argparse.Namespace, model: PreTrainedDecoder, path: Path, rows: int,
                             max_length: int) -> None:
    """After a run with compile "auto": start the background build of the packaged step this model and these shapes
    would use next time (with `--speculative`, of one sequence, also the packaged verify step), where the model can
    have one, it was loaded as it is on disk (no adapter; `--quantize` is passed on) and no package is there or
    being built."""
    if getattr(args, "resolved_compile", None) != "auto" or getattr(args, "adapter", None) is not None:
        return
    if getattr(args, "tensor_parallel", 1) > 1:
        return
    from decoderkit.generation.aot_step import build_in_background
    from decoderkit.generation.decode_step import compile_slots

    quantize = getattr(args, "quantize", None)
    verify = getattr(args, "speculative", None) is not None
    if build_in_background(model, str(path), args.dtype, rows, compile_slots(max_length),
                           quantization=None if quantize in (None, "none") else quantize, verify=verify):
        _note(args, f"{PROG}: compiling the decode step in the background for the next start")


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled graphs for decoderkit: `cache_root()/inductor`."""
    return cache_root() / "inductor"


def use_compile_cache() -> None:
    """Point inductor's FX graph cache (and its compiled C++ code) at `compile_cache_dir()`, unless the user chose a
    directory with `TORCHINDUCTOR_CACHE_DIR`, and make the CPU graph storable there.

    Storable: MKL's prepacked weights are opaque tensors the FX graph cache refuses ("mkldnn tensors
    unpickleable"), so with prepacking every start recompiles the step (minutes on a busy 2-core machine); without
    it a warm start skips inductor's code generation and the C++ build, for a few percent of decode speed. Safe
    across checkpoints: freezing folds the weights before the cache key is taken and the frozen weights stay inputs
    of the cached code (their shapes and dtypes are in the key, their values are not), so a cached graph never
    carries another model's weights (tests/test_compile_default.py runs two models through one cache).
    """
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing inductor's config writes its default directory into the environment: that one is not a user's choice
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
    inductor_config.cpp.weight_prepack = False


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


def speculative_kwargs(args: argparse.Namespace, model: PreTrainedDecoder) -> dict[str, Any]:
    """`generate` keyword arguments for `--speculative` and `--num-speculative-tokens` (none without them). A
    `draft:PATH` model is loaded like the model (dtype, device, quantization) and checked against it now, so a
    mismatch fails before any generation."""
    mode, tokens = getattr(args, "speculative", None), getattr(args, "num_speculative_tokens", None)
    if mode is None:
        if tokens is not None:
            raise UsageError("--num-speculative-tokens needs --speculative lookup|draft:PATH")
        return {}
    if mode == "lookup":
        return {"prompt_lookup_num_tokens": tokens or 10}
    from decoderkit import AutoModelForCausalLM
    from decoderkit.generation.speculative import check_draft

    path = locate_model(mode.removeprefix("draft:"))
    draft = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device=str(model.device),
                                                 quantization=getattr(args, "quantize", None),
                                                 progress=False if getattr(args, "quiet", False) else None)
    try:
        check_draft(model, draft)
    except ValueError as err:
        raise CLIError(f"--speculative {mode}: {err}") from None
    return {"assistant_model": draft, **({"num_assistant_tokens": tokens} if tokens else {})}


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
    context = model.decoder_config.max_position_embeddings
    if prompt_tokens >= context:
        raise CLIError(f"the prompt has {prompt_tokens} tokens; the model's context window is {context}")
    if prompt_tokens + wanted > context:
        _note(args, f"{PROG}: note: max new tokens cut from {wanted} to {context - prompt_tokens} to fit the "
                    f"{context}-token context window")
        return context - prompt_tokens
    return wanted


def run_generate(model: PreTrainedDecoder, prompt_ids: list[int], kwargs: dict[str, Any],
                 streamer: TokenStreamer) -> bool:
    """Generate with `streamer`; return False when interrupted by Ctrl-C (what was generated is in the streamer).

    Several sequences with speculative decoding decode as a batch whose rows keep different numbers of tokens per
    step, which streams nothing: the streamer then gets the finished rows at the end."""
    import torch

    input_ids = torch.tensor([prompt_ids], device=model.device)
    speculative = "prompt_lookup_num_tokens" in kwargs or "assistant_model" in kwargs
    try:
        with torch.inference_mode():
            if speculative and kwargs.get("num_return_sequences", 1) > 1:
                out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
                streamer.put(input_ids)
                streamer.put(out[:, input_ids.shape[1]:])
                streamer.end()
            else:
                model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs)
    except KeyboardInterrupt:
        streamer.flush()
        return False
    return True


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
