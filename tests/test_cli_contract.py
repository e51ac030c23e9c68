"""The command line's shared contract (issue 12, items 5, 8, 9): threads, flag spellings, one-line errors in train
and serve, serve's start line and early port binding. Driven through `python -m decoderkit` where the process
matters (environment before torch starts, exit statuses, stderr), in-process for the cheap parser checks."""

from __future__ import annotations

import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_cli import assert_clean_failure, run_cli, run_main, save_tiny_model

from decoderkit._openmp import SPIN_COUNT
from decoderkit.cli import threads as cli_threads

COMMANDS_WITH_THREADS = ["generate", "chat", "bench", "convert", "merge", "train", "serve"]


def wait_until_healthy(base: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll a started server's /health until it answers 200; fail if the process exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)


def first_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The first line the process writes on stderr, waiting at most `timeout` seconds ('' if none comes)."""
    data, deadline = b"", time.monotonic() + timeout
    while b"\n" not in data and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stderr], [], [], 0.5)[0]:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", "replace").split("\n")[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("contract") / "tiny")


# ---------------------------------------------------------------------------------------------- threads (item 5)
@pytest.mark.parametrize("command", COMMANDS_WITH_THREADS)
def test_every_command_takes_threads(capsys, command):
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0 and "-t N, --threads N" in out


def test_bench_uses_and_reports_the_thread_count(tiny):
    env = {"DECODERKIT_THREADS": "", "OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""}
    proc = run_cli("bench", "--model", str(tiny), "-t", "1", "-p", "4", "-n", "2", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["torch_threads"] == 1 and record["new_tokens"] == 2
    # Set before torch started its OpenMP pool: idle workers spin briefly, then sleep.
    assert not record["omp_wait_policy"] and record["gomp_spincount"] == SPIN_COUNT
    table = run_cli("bench", "--model", str(tiny), "-t", "2", "-p", "4", "-n", "2", env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert table.returncode == 0, table.stderr
    assert re.search(r"threads\s*│\s*2\b", table.stdout), table.stdout


def test_a_small_model_decodes_on_one_thread_unless_a_count_is_chosen(tiny):
    def run(*extra, env={"DECODERKIT_THREADS": "", "OMP_NUM_THREADS": ""}):  # noqa: B006 - read only
        return json.loads(run_cli("bench", "--model", str(tiny), "-p", "4", "-n", "2", "--json", *extra,
                                  env=env).stdout)

    assert run()["torch_threads"] == 1  # the default would be one per core
    assert run("-t", "2")["torch_threads"] == 2
    assert run(env={"DECODERKIT_THREADS": "2", "OMP_NUM_THREADS": ""})["torch_threads"] == 2


def test_packed_weights_count_toward_a_models_size():
    """A quantized model keeps its weights in buffers: SmolLM2's Q4_1 file has 0.13 MiB of parameters and 92 MiB of
    packed codes, and must keep its threads."""
    import torch

    threads = torch.get_num_threads()
    quantized = torch.nn.Module()
    quantized.register_buffer("codes", torch.zeros(cli_threads.SMALL_MODEL_BYTES + 1, dtype=torch.uint8))
    tiny = torch.nn.Linear(4, 4)
    try:
        assert cli_threads.fit_threads(quantized, 2, chosen=False) == 2
        assert cli_threads.fit_threads(tiny, 2, chosen=True) == 2
        assert cli_threads.fit_threads(tiny, 2, chosen=False) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_the_default_is_one_thread_per_usable_core_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("DECODERKIT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli_threads.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert cli_threads.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torchrun's (or the user's) choice
    assert cli_threads.default_threads() == 2
    monkeypatch.setenv("DECODERKIT_THREADS", "1")  # decoderkit's own variable wins
    assert cli_threads.default_threads() == 1


def test_short_commands_count_only_the_cores_other_processes_leave_idle(monkeypatch):
    monkeypatch.delenv("DECODERKIT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli_threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    # /proc/stat over the sample: cpu1 busy 90% of it, cpu2 40% (idle enough), cpu3 100%; cpu0 idle
    samples = iter([
        "cpu 0 0 0 0 0 0 0 0\ncpu0 0 0 0 100 0 0 0 0\ncpu1 0 0 0 100 0 0 0 0\ncpu2 0 0 0 100 0 0 0 0\n"
        "cpu3 0 0 0 100 0 0 0 0\ncpu4 0 0 0 0 0 0 0 0",
        "cpu 0 0 0 0 0 0 0 0\ncpu0 0 0 0 110 0 0 0 0\ncpu1 9 0 0 101 0 0 0 0\ncpu2 2 0 2 106 0 0 0 0\n"
        "cpu3 10 0 0 100 0 0 0 0\ncpu4 10 0 0 0 0 0 0 0",
    ])
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: io.StringIO(next(samples)))
    monkeypatch.setattr("time.sleep", lambda s: None)
    assert cli_threads.default_threads(idle_only=True) == 2  # cpu4 is not this process's
    assert cli_threads.default_threads() == 4  # the server and training: every usable core


def test_bad_thread_counts(capsys, monkeypatch, tiny):
    code, _, err = run_main(capsys, "generate", "--model", str(tiny), "-t", "0", "hi")
    assert code == 2 and "argument -t/--threads: must be a positive integer, got '0'" in err
    monkeypatch.setenv("DECODERKIT_THREADS", "many")
    code, _, err = run_main(capsys, "generate", "--model", str(tiny), "hi")
    assert code == 1 and "DECODERKIT_THREADS='many': expected a positive integer" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- flags (item 8)
def test_transformers_spelling_of_a_flag_is_accepted(tiny):
    proc = run_cli("generate", "--model", str(tiny), "--max_new_tokens", "3", "--greedy", "--json", "To be")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["prompt"] == "To be" and record["completion_tokens"] <= 3


@pytest.mark.parametrize("args, message", [
    (["generate", "--max-tokens", "3", "hi"], "unrecognized argument --max-tokens; did you mean --max-new-tokens?"),
    (["chat", "--temprature", "0.5"], "unrecognized argument --temprature; did you mean --temperature?"),
    (["train", "--model", "m", "--data", "d", "--out", "o", "--learnin-rate", "1"],
     "unrecognized argument --learnin-rate; did you mean --learning-rate?"),
    (["serve", "--prot", "80"], "unrecognized argument --prot; did you mean --port?"),
])
def test_a_misspelled_flag_is_answered_with_the_nearest(capsys, args, message):
    code, out, err = run_main(capsys, *args)
    assert code == 2 and message in err and out == ""
    assert len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------- train (item 8)
def test_train_help_names_the_command_and_documents_every_flag(capsys):
    from decoderkit.training.__main__ import build_parser

    code, out, _ = run_main(capsys, "train", "--help")
    assert code == 0 and out.startswith("usage: decoderkit train")
    undocumented = [a.option_strings for a in build_parser()._actions if a.option_strings and not a.help]
    assert undocumented == []


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], "argument --lr/--learning-rate: must be > 0, got -1"),
    (["--steps", "0"], "argument --steps/--max-steps: must be a positive integer, got 0"),
    (["--warmup-ratio", "1"], "argument --warmup-ratio: must be in [0, 1), got 1"),
])
def test_train_usage_errors_are_one_line_naming_the_flag(extra, message):
    proc = run_cli("train", "--model", "m", "--data", "d.txt", "--out", "o", *extra)
    assert_clean_failure(proc, 2, message)
    assert "learning_rate" not in proc.stderr and "max_steps" not in proc.stderr


def test_train_reports_bad_utf8_with_file_and_offset(tmp_path, tiny):
    data = tmp_path / "corpus.txt"
    good = b"To be, or not to be: that is the question. " * 3 + b"caf"
    data.write_bytes(good + b"\xe9 au lait")
    proc = run_cli("train", "--model", str(tiny), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1",
                   "--no-progress", "--no-plot")
    assert_clean_failure(proc, 1, f"{data}: not UTF-8 text (byte offset {len(good)}: b'\\xe9')")
    assert not (tmp_path / "run" / "final").exists()


def test_train_verbose_shows_the_traceback(capsys, tmp_path, tiny):
    code, _, err = run_main(capsys, "train", "--model", str(tiny), "--data", str(tmp_path / "none.txt"), "--out",
                            str(tmp_path / "run"), "--verbose")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1] == (
        f"decoderkit train: error: {tmp_path / 'none.txt'}: no such data file")


def test_train_messages_use_the_flags_not_the_api_names():
    from decoderkit.training.__main__ import in_flag_terms

    assert in_flag_terms("learning_rate must be positive; max_steps=3, overwrite_output_dir") == (
        "--lr must be positive; --steps=3, --overwrite")


# ---------------------------------------------------------------------------------------------- serve (items 8, 9)
def test_a_busy_port_fails_at_once_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The model does not exist: had it been loaded first, that would be the error.
        proc = run_cli("serve", "--model", "/no/such/model", "--port", str(port))
    assert_clean_failure(proc, 1, f"--port {port}: address 127.0.0.1:{port} is already in use")


def test_serve_usage_errors_are_one_line(capsys):
    code, _, err = run_main(capsys, "serve", "--port", "http")
    assert code == 2 and "argument --port: must be a port number in [0, 65535], got 'http'" in err
    assert len(err.strip().splitlines()) == 1


def test_serve_prints_what_it_serves_and_where(tiny):
    proc = subprocess.Popen([sys.executable, "-m", "decoderkit", "serve", "--model", str(tiny), "--port", "0",
                             "-t", "1", "--dtype", "bfloat16", "--log-level", "warning", "--verbose"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        line = first_line(proc)
        match = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        assert f"serving tiny from {tiny.resolve()} on cpu, dtype bfloat16, quantization none, 1 thread, " \
               "context 128 tokens" in line
        base = f"http://127.0.0.1:{match.group(1)}"
        wait_until_healthy(base, proc)
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["tiny"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_describes_a_quantized_model(capsys):
    import torch

    from decoderkit.cli.serve import quantization_summary
    from decoderkit.layers.quantized import Int4Linear, Int8Linear

    model = torch.nn.Sequential(Int8Linear(64, 64), Int4Linear(64, 64, group_size=32), Int4Linear(64, 64))
    assert quantization_summary(model) == "int4 (group 32), int8"
    assert quantization_summary(torch.nn.Linear(2, 2)) == "none"
    for layer in model:
        layer.activations = "bfloat16"
    assert quantization_summary(model) == "int4 (group 32), int8, bfloat16 activations"


def test_openmp_spin_count_is_set_before_torch_loads():
    code = "import os, decoderkit, torch; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    run = [sys.executable, "-c", code]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert subprocess.run(run, capture_output=True, text=True, check=True, env=env).stdout.split() == \
        ["None", SPIN_COUNT]
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "30000"}):  # the user's choice stays alone
        got = subprocess.run(run, capture_output=True, text=True, check=True, env={**env, **chosen}).stdout.split()
        assert got == [chosen.get("OMP_WAIT_POLICY", "None"), chosen.get("GOMP_SPINCOUNT", "None")]
    # Other programs a benchmark starts (llama.cpp) get the environment without decoderkit's own setting
    code = "import decoderkit._openmp as o; print(o.environment_of_others().get('GOMP_SPINCOUNT'))"
    others = [sys.executable, "-c", code]
    for chosen, want in (({}, "None"), ({"GOMP_SPINCOUNT": "30000"}, "30000")):
        got = subprocess.run(others, capture_output=True, text=True, check=True, env={**env, **chosen}).stdout
        assert got.strip() == want


def test_release_thread_pool_ends_the_calling_threads_openmp_workers():
    # GNU OpenMP keeps a worker pool for every thread that ran a parallel region; with more workers than CPUs it stops
    # spinning for all of them (the server's engine thread then decoded 4x slower). Count the process's OS threads.
    code = """
import os, decoderkit, torch
from decoderkit._openmp import release_thread_pool
torch.set_num_threads(3)
def threads(): return len(os.listdir("/proc/self/task"))
x = torch.randn(1 << 20)
before = threads()
expected = (x + 1).sum().item()  # a parallel region: the main thread's pool of 2 more workers
during = threads()
released = release_thread_pool()
after = threads()
again = (x + 1).sum().item()  # the next region starts new workers and computes as before
print(before, during, released, after, threads(), again == expected)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    before, during, released, after, later, same = got.stdout.split()
    assert int(during) == int(before) + 2 and released == "True"
    assert int(after) == int(before) and int(later) == int(during) and same == "True"
