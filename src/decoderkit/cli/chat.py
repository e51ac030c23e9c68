"""`decoderkit chat`: a conversation through the model's chat template, with Ollama's input conventions.

On a terminal, lines are read with the standard library's `readline` (line editing, Ctrl-R search, arrow-key history
kept in `$DECODERKIT_CACHE_DIR/chat_history`, by default `~/.cache/decoderkit/chat_history`): it ships with Python
and costs no dependency, where prompt_toolkit would add a package and its start-up time for a few key bindings more.
A message spans several lines between `\"\"\"` lines, or by ending lines with a backslash. A line starting with `/` is
a command (`/help` lists them) and never goes to the model; start the line with a space to send such text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decoderkit.cli.common import (
    EXIT_OK,
    CLIError,
    TokenStreamer,
    UsageError,
    _describe,
    _note,
    cache_root,
    eos_token_ids,
    generation_kwargs,
    load_model,
    logger,
    min_p_value,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_compile,
    run_generate,
    speculative_kwargs,
    temperature_value,
    top_p_value,
)
from decoderkit.cli.text import _decode_stdin, _raw

if TYPE_CHECKING:
    from decoderkit.tokenizer import Tokenizer

HELP = """Commands:
  /help                     this list
  /reset                    forget the conversation (the system message stays); also /clear
  /system TEXT              set the system message (/system alone removes it)
  /save FILE                write the conversation as JSON (OpenAI's messages list)
  /load FILE                continue a conversation saved with /save
  /set PARAM VALUE          temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, seed
  /set greedy | /set sample always take the most likely token | sample
  /show                     the generation settings
  /exit                     quit (also /quit, /bye, Ctrl-D)
A message spans lines between \"\"\" lines, or with a backslash at the end of each line but the last."""
# /set PARAM: (the generate keyword, the parser of its value); the parsers are the command-line flags' own.
SETTABLE: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temperature": ("temperature", temperature_value), "top_k": ("top_k", non_negative_int),
    "top_p": ("top_p", top_p_value), "min_p": ("min_p", min_p_value),
    "repetition_penalty": ("repetition_penalty", positive_float), "max_new_tokens": ("max_new_tokens", positive_int),
    "seed": ("seed", non_negative_int),
}  # fmt: skip
SAMPLING = ("temperature", "top_k", "top_p", "min_p")


def _complain(message: str) -> None:
    """A command the user got wrong: said on stderr even with --quiet, and the chat goes on."""
    print(message, file=sys.stderr, flush=True)


def history_file() -> Path:
    """Where the terminal's input history is kept."""
    return cache_root() / "chat_history"


def _start_readline() -> Callable[[], None]:
    """Line editing and persistent history for `input()`; returns the function that saves the history."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return lambda: None
    path = history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # no history yet, or an unreadable file: start afresh
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as err:
            logger.warning("cannot save the chat history to %s: %s", path, _describe(err))

    return save


def read_lines(interactive: bool) -> Generator[str | None, bool, None]:
    """Raw input lines: `input()` with a prompt on a terminal, plain lines from a pipe."""
    stdin = sys.stdin
    if stdin is None:
        raise CLIError("stdin is closed; chat reads messages from stdin")
    continued = False
    while True:
        try:
            line = input("... " if continued else ">>> ") if interactive else _decode_stdin(_raw(stdin).readline())
        except EOFError:
            return
        except KeyboardInterrupt:
            if not interactive:
                raise
            # As in Python's own prompt: Ctrl-C drops what is being typed (None: the message begun, too); Ctrl-D or
            # /exit quits.
            print(flush=True)
            if continued:
                continued = yield None
            continue
        except UnicodeDecodeError as err:  # a terminal in a non-UTF-8 locale
            raise CLIError(f"stdin is not valid {err.encoding} text (byte {err.start})") from None
        if not interactive and not line:
            return
        line = line.rstrip("\r\n")
        continued = yield line  # the reader says whether the next line continues a message


def read_messages(lines: Generator[str | None, bool, None]) -> Iterator[str]:
    """Whole inputs from lines: a `\"\"\"` block or backslash-continued lines become one message."""
    try:
        line = next(lines)
        while True:
            message: str | None = line
            if line is not None and line.strip().startswith('"""'):
                parts, rest = [], line.strip()[3:]
                while rest is not None and not rest.endswith('"""'):
                    parts.append(rest)
                    rest = lines.send(True)
                message = None if rest is None else "\n".join([*parts, rest[:-3]]).strip("\n")
            elif line is not None and line.endswith("\\"):
                parts = []
                while line is not None and line.endswith("\\"):
                    parts.append(line[:-1])
                    line = lines.send(True)
                message = None if line is None else "\n".join([*parts, line])
            if message is not None:
                yield message
            line = lines.send(False)
    except StopIteration:
        return


class Conversation:
    """The system message, the turns, and the generation settings that slash commands change."""

    def __init__(self, args: argparse.Namespace, kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs
        self.system: str | None = args.system
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, text: str) -> bool:
        """Run a slash command; False when it asks to quit."""
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help" or name == "/?":
            print(HELP, flush=True)
        elif name in ("/reset", "/clear"):
            self.history.clear()
            _note(self.args, "[history cleared]")
        elif name == "/system":
            self.system = rest or None
            _note(self.args, "[system message set]" if rest else "[system message removed]")
        elif name == "/save":
            self._save(rest)
        elif name == "/load":
            self._load(rest)
        elif name == "/set":
            self._set(rest)
        elif name == "/show":
            shown = {k: v for k, v in self.kwargs.items() if k not in ("generator", "compile")}
            print(", ".join(f"{k}={v}" for k, v in shown.items()) or "(the generation config's defaults)", flush=True)
        else:
            _complain(f"unknown command {name}; /help lists the commands (start the line with a space to "
                             "send it as a message)")
        return True

    def _save(self, file: str) -> None:
        from decoderkit.fileio import write_atomic

        if not file:
            _complain("usage: /save FILE")
            return
        try:
            write_atomic(Path(file).expanduser(), json.dumps(self.messages(), ensure_ascii=False, indent=1) + "\n")
        except OSError as err:
            _complain(f"cannot save to {file}: {_describe(err)}")
            return
        _note(self.args, f"[saved {len(self.messages())} message(s) to {file}]")

    def _load(self, file: str) -> None:
        if not file:
            _complain("usage: /load FILE")
            return
        try:
            messages = json.loads(Path(file).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            _complain(f"cannot load {file}: {_describe(err)}")
            return
        valid = isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages)
        if not valid:
            _complain(f"cannot load {file}: expected a JSON list of {{role, content}} messages as /save "
                             "writes (roles system, user, assistant)")
            return
        systems = [m["content"] for m in messages if m["role"] == "system"]
        self.system = systems[0] if systems else None
        self.history = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        _note(self.args, f"[loaded {len(messages)} message(s) from {file}]")

    def _set(self, rest: str) -> None:
        param, _, value = rest.partition(" ")
        param, value = param.replace("-", "_"), value.strip()
        if param in ("greedy", "sample"):
            self.kwargs["do_sample"] = param == "sample"
            _note(self.args, f"[{param}]")
            return
        if param not in SETTABLE or not value:
            _complain(f"usage: /set PARAM VALUE with PARAM one of {', '.join(SETTABLE)}; or /set greedy, "
                             "/set sample")
            return
        key, parse = SETTABLE[param]
        try:
            parsed = parse(value)
        except argparse.ArgumentTypeError as err:
            _complain(f"/set {param}: {err}")
            return
        if key == "seed":
            import torch

            self.kwargs["generator"] = torch.Generator().manual_seed(parsed)
        else:
            self.kwargs[key] = parsed
        if key in SAMPLING and self.kwargs.get("do_sample") is None:
            self.kwargs["do_sample"] = True  # as on the command line: a sampling option means sampling
        _note(self.args, f"[{param} = {parsed}]")


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
    kwargs.update(speculative_kwargs(args, model))
    kwargs["compile"] = resolve_compile(args)
    if args.chat_template is not None:
        tok.chat_template = load_chat_template(args.chat_template)
    if not tok.chat_template:
        raise CLIError(f"{path}: the tokenizer has no chat template; pass --chat-template, or use `generate`")
    limit = model.decoder_config.max_position_embeddings
    context = args.ctx_size or limit
    if context > limit:
        raise UsageError(f"--ctx-size {context} exceeds the model's context window of {limit} tokens")
    if kwargs["max_new_tokens"] >= context:
        raise UsageError(f"--max-new-tokens {kwargs['max_new_tokens']} leaves no room for the conversation in the "
                         f"{context}-token context window")
    chat = Conversation(args, kwargs)
    eos = eos_token_ids(model)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    save_history = _start_readline() if interactive else (lambda: None)
    if interactive:
        _note(args, f"Chatting with {path} ({context}-token context). /help lists the commands, /exit quits "
                    "(or Ctrl-D); \"\"\" starts and ends a message of several lines.")
    try:
        for text in read_messages(read_lines(interactive)):
            if not text.strip():
                continue
            if text.startswith("/"):
                if not chat.command(text.strip()):
                    break
                continue
            _reply(args, tok, model, chat, text, context, eos)
    finally:
        save_history()
    return EXIT_OK


def _reply(args: argparse.Namespace, tok: Tokenizer, model: Any, chat: Conversation, text: str, context: int,
           eos: list[int]) -> None:
    kwargs = chat.kwargs
    budget = context - kwargs["max_new_tokens"]
    if budget <= 0:
        _note(args, f"[max_new_tokens {kwargs['max_new_tokens']} leaves no room in the {context}-token context; "
                    "/set max_new_tokens lower]")
        return
    chat.history.append({"role": "user", "content": text})
    prompt_ids = _fit_history(args, tok, chat, budget)
    if prompt_ids is None:
        chat.history.pop()
        _note(args, f"[message too long for the {context}-token context window with max_new_tokens "
                    f"{kwargs['max_new_tokens']}; not sent]")
        return
    logger.info("prompt: %d tokens from %d message(s)", len(prompt_ids), len(chat.messages()))
    streamer = TokenStreamer(tok, prompt_ids, eos, out=sys.stdout)
    completed = run_generate(model, prompt_ids, kwargs, streamer)
    reply = tok.decode(streamer.rows[0] if streamer.rows else [], skip_special_tokens=True)
    print(flush=True)
    chat.history.append({"role": "assistant", "content": reply})
    if not completed:
        _note(args, "[reply interrupted]")


def _fit_history(args: argparse.Namespace, tok: Tokenizer, chat: Conversation, budget: int) -> list[int] | None:
    """The prompt ids of the conversation, dropping the oldest turns (in place) until it fits `budget` tokens."""
    history = chat.history
    while True:
        ids = tok.apply_chat_template(chat.messages(), add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        if len(ids) <= budget:
            return ids
        if len(history) <= 1:
            return None
        # Drop a whole exchange (user + assistant) so the history never starts with an assistant turn.
        dropped = 2 if len(history) > 2 and history[1]["role"] == "assistant" else 1
        del history[:dropped]
        _note(args, f"[context window full: dropped the oldest {'exchange' if dropped == 2 else 'message'}]")

