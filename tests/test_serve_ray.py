"""Ray Serve: `decoderkit serve --ray --replicas 2` starts a local Ray instance; concurrent `openai` requests through
Ray's HTTP proxy get the single-process answers from both replicas; every replica's metrics are on Ray's Prometheus
endpoint; SIGINT stops Serve and Ray with nothing left behind. Without Ray installed, a clear error names the extra."""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import test_serve

from decoderkit import AutoModelForCausalLM
from decoderkit.serve.engine import Engine, SamplingParams
from decoderkit.tokenizer import AutoTokenizer

PROMPTS = test_serve.PROMPTS
ray_installed = importlib.util.find_spec("ray") is not None


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from decoderkit.serve import ray as serve_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'decoderkit\[ray\]'"):
        serve_ray.require_ray()
    with pytest.raises(ImportError, match=r"decoderkit\[ray\]"):
        serve_ray.build_app(".", num_replicas=2)


# The whole Ray test's budget: a fresh 2-core machine brings Ray and both replicas up in well under a minute.
BUDGET_S = 240
# Ray pushes user metrics to its exporter every 10 s by default (the test reads them as soon as they are set), and
# prestarts idle workers that only compete with its own startup here (Serve's actors start workers of their own)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_metrics_report_interval_ms": "500",
           "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}
# Ray's own fixed deadlines that a machine busy with other work can miss: its raylet gets 30 s to register
# (ray/_private/node.py), and Serve kills a proxy that misses 3 health checks in a row; the test retries once on these
RAY_TRANSIENT = ("The current node timed out during startup", "failed the health check")


def _kill_left_over_ray(wait_s: float = 30) -> list[str]:
    """SIGKILL every Ray process still there after `wait_s`; their command lines. None ran before the test started
    (it checks), so every one is this test's."""
    end = time.monotonic() + wait_s
    while (left := _ray_processes()) and time.monotonic() < end:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return list(left.values())


def _ray_processes() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(name in cmdline for name in ("raylet", "gcs_server", "ray::", "dashboard/agent.py")) or (
                    "spawn_main" in cmdline and _parent_cmdline(entry).startswith("ray::")):
                found[int(entry.name)] = cmdline[:120]
    return found


def _parent_cmdline(entry: Path) -> str:
    try:
        ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
        return Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return ""


class Deadline:
    """One time budget shared by every wait of the test, each failing with what it was waiting for."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def check(self, waiting_for: str) -> None:
        if time.monotonic() >= self.end:
            pytest.fail(f"Ray Serve test: {waiting_for} within its {self.seconds:g} s budget")


class RayServer:
    """`decoderkit serve --ray` in a subprocess, stopped with SIGINT (Ctrl-C); whatever Ray left is killed after."""

    def __init__(self, model_dir: Path, replicas: int, *extra: str) -> None:
        self.args = [str(model_dir), "--ray", "--replicas", str(replicas), *extra]
        self.retried = False
        self.start()

    def start(self) -> None:
        self.port, self.metrics_port = test_serve.free_port(), test_serve.free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", **RAY_ENV}
        cmd = [sys.executable, "-m", "decoderkit.serve", *self.args, "--port", str(self.port),
               "--ray-metrics-port", str(self.metrics_port), "--served-model-name", "m", "--log-level", "warning"]
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would block Ray's log output
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def wait_ready(self, replicas: int, deadline: Deadline) -> None:
        # Every replica publishes its engine's state from the moment it is built: wait until all have, and the proxy
        # answers
        while True:
            if (self.proc.poll() is not None and not self.retried
                    and any(failure in self.output() for failure in RAY_TRANSIENT)):
                self.retried = True  # once: Ray's own deadlines, not ours
                self.log.close()
                _kill_left_over_ray()
                self.start()
            assert self.proc.poll() is None, f"decoderkit serve --ray exited early:\n{self.output()}"
            deadline.check(f"Ray Serve did not bring up {replicas} replicas; its output:\n{self.output()}")
            try:
                if (len(self.replica_metrics("total_blocks")) == replicas
                        and httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def client(self, deadline: Deadline) -> openai.OpenAI:
        """An openai client of Ray's HTTP proxy whose requests give up no later than `deadline`."""
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                             timeout=max(1.0, min(30.0, deadline.left())))

    def replica_metrics(self, name: str) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        pattern = rf'^ray_decoderkit_replica_{name}\{{[^}}]*replica="([^"]+)"[^}}]*\}} (\S+)$'
        return {tag: float(v) for tag, v in re.findall(pattern, text, re.M)}

    def stop(self, timeout_s: float = 60) -> list[str]:
        """SIGINT, then SIGKILL of the server and of any Ray process still there after `timeout_s`; the problems
        seen (an empty list when Ray shut down cleanly)."""
        problems = []
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            problems.append(f"decoderkit serve --ray did not exit {timeout_s:g} s after SIGINT")
            self.proc.kill()
            self.proc.wait()
        if left := _kill_left_over_ray():
            problems.append(f"Ray processes left behind (now killed): {left}")
        self.log.close()
        return problems


def _single_process_answers(model_dir: Path, max_tokens: int) -> dict[str, str]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer).start()
    try:
        return {p: engine.generate(tokenizer.encode(p), SamplingParams(max_tokens=max_tokens, temperature=0)).text
                for p in PROMPTS}
    finally:
        engine.stop()


@pytest.mark.slow
@pytest.mark.skipif(not ray_installed, reason="needs the `ray` extra (ray[serve])")
def test_two_ray_replicas_serve_concurrent_openai_requests(tmp_path):
    assert not _ray_processes(), "a Ray instance is already running on this machine"
    deadline = Deadline(BUDGET_S)
    model_dir = test_serve.build_tiny_model(tmp_path / "model")
    expected = _single_process_answers(model_dir, max_tokens=4)  # first: Ray's startup wants the cores to itself
    server = RayServer(model_dir, replicas=2)
    problems: list[str] = []
    try:
        server.wait_ready(replicas=2, deadline=deadline)
        client = server.client(deadline)

        def complete(prompt: str) -> tuple[str, str]:
            raw = client.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=4, temperature=0)
            return raw.headers["x-decoderkit-replica"], raw.parse().choices[0].text

        replicas: set[str] = set()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            while len(replicas) < 2:  # Ray routes by queue length: concurrent requests reach both replicas
                deadline.check(f"concurrent requests reached only replicas {sorted(replicas)}")
                batch = PROMPTS * 2
                for prompt, (replica, text) in zip(batch, pool.map(complete, batch)):
                    assert text == expected[prompt]
                    replicas.add(replica)

        # Each replica's engine state, exported by Ray in Prometheus format
        while True:
            tokens = server.replica_metrics("generated_tokens_total")
            if set(tokens) == replicas and all(v > 0 for v in tokens.values()):
                break
            deadline.check(f"replica metrics not exported: {tokens}")
            time.sleep(0.5)
    finally:
        problems = server.stop()
    assert not problems, problems
    assert server.proc.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not ray_installed, reason="needs the `ray` extra (ray[serve])")
def test_a_tensor_parallel_ray_replica_answers_as_one_process(tmp_path):
    assert not _ray_processes(), "a Ray instance is already running on this machine"
    deadline = Deadline(BUDGET_S)
    model_dir = test_serve.build_tiny_model(tmp_path / "model")
    expected = _single_process_answers(model_dir, max_tokens=4)
    server = RayServer(model_dir, 1, "--tensor-parallel", "2")
    problems: list[str] = []
    try:
        server.wait_ready(replicas=1, deadline=deadline)
        followers = [cmd for pid, cmd in _ray_processes().items() if "spawn_main" in cmd]
        assert len(followers) == 1, f"the replica should have started one follower rank: {followers}"
        client = server.client(deadline)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: client.completions.create(
                model="m", prompt=p, max_tokens=4, temperature=0).choices[0].text, PROMPTS))
        assert answers == [expected[p] for p in PROMPTS]
    finally:
        problems = server.stop()
    assert not problems, problems  # the follower rank is gone with Ray too
    assert server.proc.returncode == 0
