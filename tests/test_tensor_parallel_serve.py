"""`--tensor-parallel 2` from the command line: `decoderkit generate` samples what one process samples (rank 0's
generator state is replayed on rank 1); the server answers an `openai` client as one process does; a killed follower
rank turns the server to 503 within the timeout; a killed server (rank 0) makes its follower exit; nothing is left
behind; a size that does not split the model is refused before any process starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import test_serve
from test_cli import assert_clean_failure, run_cli

from decoderkit import AutoModelForCausalLM
from decoderkit.serve.engine import Engine, SamplingParams
from decoderkit.tokenizer import AutoTokenizer

TIMEOUT_S = 20  # DECODERKIT_TP_TIMEOUT: the bound on every wait for a silent rank
PROMPTS = test_serve.PROMPTS[:3]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return test_serve.build_tiny_model(tmp_path_factory.mktemp("tp-serve"))


def _followers(pid: int) -> list[int]:
    """The spawned follower ranks among a process's children (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class TPServer:
    def __init__(self, model_dir: Path) -> None:
        self.port = test_serve.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DECODERKIT_TP_TIMEOUT": str(TIMEOUT_S), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "decoderkit.serve", str(model_dir), "--tensor-parallel", "2", "--port",
               str(self.port), "--served-model-name", "m", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> TPServer:
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            assert time.monotonic() < deadline, "the tensor-parallel server did not start in 120 s"
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.followers = _followers(self.proc.pid)
        assert len(self.followers) == 1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in self.followers:
            deadline = time.monotonic() + TIMEOUT_S
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _alive(pid), f"follower rank {pid} was left behind"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.slow
def test_tensor_parallel_server_answers_then_503_when_a_rank_dies(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer).start()
    try:
        expected = [engine.generate(tokenizer.encode(p), SamplingParams(max_tokens=8, temperature=0)).text
                    for p in PROMPTS]
    finally:
        engine.stop()
    with TPServer(model_dir) as server:
        client = server.client()
        texts = [client.completions.create(model="m", prompt=p, max_tokens=8, temperature=0).choices[0].text
                 for p in PROMPTS]
        assert texts == expected
        assert any(texts)

        os.kill(server.followers[0], signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT_S
        while httpx.get(f"{server.base}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "the server still reports healthy after its rank 1 died"
            time.sleep(0.2)
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert caught.value.status_code == 503
        assert server.proc.poll() is None  # rank 0 stays up to answer


@pytest.mark.slow
def test_a_killed_rank_zero_makes_the_follower_exit(model_dir):
    with TPServer(model_dir) as server:
        follower = server.followers[0]
        server.proc.kill()
        server.proc.wait()
        deadline = time.monotonic() + TIMEOUT_S
        while _alive(follower):
            assert time.monotonic() < deadline, f"follower rank still running {TIMEOUT_S} s after rank 0 died"
            time.sleep(0.2)


@pytest.mark.slow
def test_generate_samples_the_same_tokens_on_two_ranks(model_dir):
    args = ("generate", "-m", str(model_dir), "--json", "--do-sample", "--seed", "3", "--temperature", "1.5",
            "--max-new-tokens", "12", PROMPTS[0])
    env = {"DECODERKIT_TP_TIMEOUT": str(TIMEOUT_S), "OMP_NUM_THREADS": "1"}
    one, two = run_cli(*args, env=env), run_cli(*args, "--tensor-parallel", "2", env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    completions = [json.loads(p.stdout)["completions"] for p in (one, two)]
    assert completions[0] == completions[1]
    assert completions[0][0]


def test_a_size_that_does_not_split_the_model_is_refused_at_once(model_dir):
    proc = run_cli("generate", "-m", str(model_dir), "--tensor-parallel", "3", PROMPTS[0])
    assert_clean_failure(proc, 1, "tensor-parallel size 3 does not split this model: num_attention_heads=4")
