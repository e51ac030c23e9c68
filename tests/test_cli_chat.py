"""`decoderkit chat` on a pseudo-terminal, as a person types it (issue 12, item 7): readline editing and history,
multiline input, slash commands, and the context window (`--ctx-size`)."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import run_cli, run_main, save_tiny_model

UP = "\x1b[A"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("chat") / "tiny")


@pytest.fixture(scope="module")
def roomy(tmp_path_factory) -> Path:
    """A context window no test conversation fills."""
    return save_tiny_model(tmp_path_factory.mktemp("chat") / "roomy", max_positions=1024)


def chat_on_a_terminal(model: Path, lines: list[str], cache: Path, *extra: str) -> tuple[str, str]:
    """Type `lines` into `decoderkit chat` on a pty, each after the previous prompt; (terminal text, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DECODERKIT_CACHE_DIR": str(cache), "TERM": "xterm"}
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "decoderkit", "chat", "--model", str(model), "--greedy",
                             "--max-new-tokens", "3", "--verbose", *extra], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, env=env, close_fds=True)
    os.close(slave)
    screen = b""

    def read(until: bytes | None, timeout: float) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout
        while (until is None or until not in screen) and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    return
                if not chunk:
                    return
                screen += chunk

    try:
        prompts = 0
        for line in lines:
            # Wait for the prompt that asks for this line: ">>> " for a message, "... " inside one.
            deadline = time.monotonic() + 120
            while screen.count(b">>> ") + screen.count(b"... ") <= prompts:
                read(None, 0.5)
                assert proc.poll() is None and time.monotonic() < deadline, (
                    f"no prompt for {line!r}", screen.decode("utf-8", "replace"))
            prompts = screen.count(b">>> ") + screen.count(b"... ")
            os.write(master, (line + "\r").encode())
        assert proc.wait(timeout=120) == 0
        read(None, 0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return screen.decode("utf-8", "replace"), proc.stderr.read().decode()


def sent_messages(stderr: str) -> list[int]:
    """The message count of each prompt sent to the model (from --verbose)."""
    return [int(line.split(" from ")[1].split()[0]) for line in stderr.splitlines() if "prompt:" in line]


@pytest.mark.slow
def test_chat_on_a_terminal(tmp_path, roomy):
    saved, cache = tmp_path / "conversation.json", tmp_path / "cache"
    screen, err = chat_on_a_terminal(roomy, [
        "Hello there",
        "/frobnicate",  # an error message, never a message to the model
        '"""', "first line", "second line", '"""',  # one message of two lines
        "one \\", "more",  # a trailing backslash continues the message
        "/set temperature hot", "/set top_k 5",
        UP + UP,  # readline's history: the line before the last one, `/set temperature hot`
        "/system Speak in verse.",
        f"/save {saved}",
        "/exit",
    ], cache)
    assert "context window full" not in err
    assert "unknown command /frobnicate; /help lists the commands" in err
    assert err.count("/set temperature: expected a number, got 'hot'") == 2  # typed, then recalled with arrow keys
    assert "[top_k = 5]" in err
    # Three messages went to the model: 1, then 3 (with the first exchange), then 5 messages.
    assert sent_messages(err) == [1, 3, 5]
    conversation = json.loads(saved.read_text())
    assert conversation[0] == {"role": "system", "content": "Speak in verse."}
    assert [m["content"] for m in conversation if m["role"] == "user"] == [
        "Hello there", "first line\nsecond line", "one \nmore"]
    assert [m["role"] for m in conversation[1:]] == ["user", "assistant"] * 3
    history = (cache / "chat_history").read_text().splitlines()
    assert history[0] == "Hello there" and "/set temperature hot" in history and history[-1] == "/exit"

    # A second session reads that history back: three arrow keys up is `/system Speak in verse.` again. /load
    # continues the saved conversation; /reset keeps the system message.
    screen, err = chat_on_a_terminal(roomy, [UP + UP + UP, f"/load {saved}", "And then?", "/reset", "Hi", "/exit"],
                                     cache)
    assert "[system message set]" in err
    assert f"[loaded 7 message(s) from {saved}]" in err and "[history cleared]" in err
    assert sent_messages(err) == [8, 2]  # system + six turns + the new one; after /reset, system + one
    assert "/help lists the commands" in err  # the banner


def test_chat_help_and_unknown_commands_through_a_pipe(tiny):
    proc = run_cli("chat", "--model", str(tiny), "--max-new-tokens", "2", "--verbose",
                   stdin="/help\n/nope\n/set\n/load /no/such/file.json\n /not a command\n/bye\nnever\n")
    assert proc.returncode == 0, proc.stderr
    assert "/save FILE" in proc.stdout and "/set PARAM VALUE" in proc.stdout
    assert "unknown command /nope" in proc.stderr and "usage: /set PARAM VALUE" in proc.stderr
    assert "cannot load /no/such/file.json" in proc.stderr
    assert sent_messages(proc.stderr) == [1]  # only the line that starts with a space


def test_ctx_size_trims_the_conversation(capsys, monkeypatch, tiny):
    monkeypatch.setattr(sys, "stdin", io.StringIO("To be or not\nthat is the question\nwhether tis nobler\n"))
    code, _, err = run_main(capsys, "chat", "--model", str(tiny), "--greedy", "--max-new-tokens", "12",
                            "--ctx-size", "40")
    assert code == 0, err
    assert "context window full: dropped the oldest" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("To be or not to be, that is the question\n"))
    code, _, err = run_main(capsys, "chat", "--model", str(tiny), "--max-new-tokens", "4", "--ctx-size", "8")
    assert code == 0 and "message too long for the 8-token context window" in err


def test_ctx_size_beyond_the_model_is_refused(capsys, monkeypatch, tiny):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, _, err = run_main(capsys, "chat", "--model", str(tiny), "--ctx-size", "4096")
    assert code == 2 and "--ctx-size 4096 exceeds the model's context window of 128 tokens" in err


def test_multiline_messages_and_ctrl_c_inside_one():
    from decoderkit.cli.chat import read_messages

    def typed(lines):  # what read_lines yields (None: Ctrl-C inside a message); a generator, as it takes send()
        for line in lines:  # noqa: UP028 - `yield from` a list would pass send() on to the list's iterator
            yield line

    assert list(read_messages(typed(['"""', "a", "", "b", '"""', '"""one line"""', "x \\", "y", '"""', "lost", None,
                                     "c \\", None, "kept"]))) == ["a\n\nb", "one line", "x \ny", "kept"]
