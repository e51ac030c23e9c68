"""Ray Serve: `decoderkit serve --ray --replicas 2` starts a local Ray instance; concurrent `openai` requests through
Ray's HTTP proxy get the single-process answers from both replicas; every replica's metrics are on Ray's Prometheus
endpoint; SIGINT stops Serve and Ray with nothing left behind. Without Ray installed, a clear error names the extra."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import signal
import subprocess
import sys
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


def _ray_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(name in cmdline for name in ("raylet", "gcs_server", "ray::", "dashboard/agent.py")):
                found.append(f"{entry.name}: {cmdline[:120]}")
    return found


class RayServer:
    """`decoderkit serve --ray` in a subprocess, stopped with SIGINT (Ctrl-C)."""

    def __init__(self, model_dir: Path, replicas: int) -> None:
        self.port, self.metrics_port = test_serve.free_port(), test_serve.free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [sys.executable, "-m", "decoderkit.serve", str(model_dir), "--ray", "--replicas", str(replicas),
               "--port", str(self.port), "--ray-metrics-port", str(self.metrics_port), "--served-model-name", "m",
               "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, replicas: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        # Every replica publishes its engine's state from the moment it is built: wait until all have, and the proxy
        # answers
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, f"Ray Serve did not bring up {replicas} replicas in {timeout} s"
            try:
                if (len(self.replica_metrics("total_blocks")) == replicas
                        and httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)

    def replica_metrics(self, name: str) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        pattern = rf'^ray_decoderkit_replica_{name}\{{[^}}]*replica="([^"]+)"[^}}]*\}} (\S+)$'
        return {tag: float(v) for tag, v in re.findall(pattern, text, re.M)}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not ray_installed, reason="needs the `ray` extra (ray[serve])")
def test_two_ray_replicas_serve_concurrent_openai_requests(tmp_path):
    assert not _ray_processes(), "a Ray instance is already running on this machine"
    model_dir = test_serve.build_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer).start()
    try:
        expected = {p: engine.generate(tokenizer.encode(p), SamplingParams(max_tokens=6, temperature=0)).text
                    for p in PROMPTS}
    finally:
        engine.stop()

    server = RayServer(model_dir, replicas=2)
    try:
        server.wait_ready(replicas=2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0,
                               timeout=60)

        def complete(prompt: str) -> tuple[str, str]:
            raw = client.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=6, temperature=0)
            return raw.headers["x-decoderkit-replica"], raw.parse().choices[0].text

        replicas: set[str] = set()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for _ in range(4):  # Ray routes by queue length: concurrent requests reach both replicas
                batch = PROMPTS * 4
                for prompt, (replica, text) in zip(batch, pool.map(complete, batch)):
                    assert text == expected[prompt]
                    replicas.add(replica)
                if len(replicas) == 2:
                    break
        assert len(replicas) == 2

        # Each replica's engine state, exported by Ray in Prometheus format
        deadline = time.monotonic() + 60
        while True:
            tokens = server.replica_metrics("generated_tokens_total")
            if set(tokens) == replicas and all(v > 0 for v in tokens.values()):
                break
            assert time.monotonic() < deadline, f"replica metrics not exported: {tokens}"
            time.sleep(1)
    finally:
        server.stop()
    deadline = time.monotonic() + 30
    while _ray_processes():
        assert time.monotonic() < deadline, f"Ray processes left behind: {_ray_processes()}"
        time.sleep(0.5)
    assert server.proc.returncode == 0
