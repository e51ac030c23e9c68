"""Lean loading: memory-mapped same-dtype safetensors, chunked converting loads, the lean GGUF reader, one error for a
damaged GGUF file at every entry point, and the loading progress bar (on a terminal only)."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import textwrap
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.torch
import torch
from oracle import build, save
from test_cli import write_tiny_gguf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from decoderkit import AutoTokenizer, checkpoint_sources, cli
from decoderkit.gguf_file import GGUFFile
from decoderkit.gguf_model import open_gguf, read_gguf
from decoderkit.gguf_vocab import read_gguf_metadata
from decoderkit.model import DecoderForCausalLM
from decoderkit.tokenizer import tokenizer_from_gguf

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    model = build("llama", tie_word_embeddings=False).to(torch.bfloat16)
    return Path(save(model, tmp_path_factory.mktemp("bf16")))


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory) -> Path:
    # an embedding of 1 MiB in float32: many read chunks once READ_CHUNK is made small
    model = build("llama", vocab_size=4096, hidden_size=64, intermediate_size=128, tie_word_embeddings=False)
    return Path(save(model, tmp_path_factory.mktemp("fp32")))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of `path` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


# ---------------------------------------------------------------------------------------------- same dtype: mmap
def test_same_dtype_load_is_memory_mapped_and_equals_a_copied_load(bf16_dir):
    model = DecoderForCausalLM.from_pretrained(bf16_dir)
    stored = safetensors.torch.load((bf16_dir / "model.safetensors").read_bytes())  # a plain copy of every tensor
    ours = model.state_dict()
    assert model.dtype == torch.bfloat16 and set(stored) <= set(ours)
    ranges = _mapped_ranges((bf16_dir / "model.safetensors").resolve())
    assert ranges, "the checkpoint is not memory-mapped"
    for name, tensor in stored.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name  # bit for bit: bf16 equal
        pointer = ours[name].data_ptr()
        assert any(start <= pointer < end for start, end in ranges), f"{name} was copied out of the file"


def test_training_an_mmapped_load_leaves_the_file_alone(bf16_dir):
    before = _digest(bf16_dir)
    model = DecoderForCausalLM.from_pretrained(bf16_dir)
    model.train()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
    assert len(changed) == len(original)  # every weight was written to, in place
    assert _digest(bf16_dir) == before  # copy-on-write: the file is what it was
    again = DecoderForCausalLM.from_pretrained(bf16_dir)
    assert all(torch.equal(p, original[n]) for n, p in again.named_parameters())


def test_save_over_the_directory_an_mmapped_model_came_from(bf16_dir, tmp_path):
    directory = tmp_path / "model"
    DecoderForCausalLM.from_pretrained(bf16_dir).save_pretrained(directory)
    model = DecoderForCausalLM.from_pretrained(directory)
    reference = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.model.norm.weight.add_(1)
    model.save_pretrained(directory)  # replaces the file the weights are still mapped from
    reloaded = DecoderForCausalLM.from_pretrained(directory).state_dict()
    assert torch.equal(reloaded["model.norm.weight"], reference["model.norm.weight"] + 1)
    assert torch.equal(reloaded["lm_head.weight"], reference["lm_head.weight"])


# ---------------------------------------------------------------------------------------------- converting loads
class LiveCPUBytes(TorchDispatchMode):
    """The peak of the bytes held by live CPU tensor storages created while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.holders: dict[int, int] = {}  # storage address -> tensors alive on it
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.holders:
                    self.holders[key], self.sizes[key] = 0, storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.holders[key] += 1
                weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.live -= self.sizes.pop(key)


def test_converting_load_holds_one_chunk_of_the_source_dtype(fp32_dir, monkeypatch):
    chunk = 64 * 1024
    monkeypatch.setattr(checkpoint_sources, "READ_CHUNK", chunk)
    stored = safetensors.torch.load_file(fp32_dir / "model.safetensors")
    largest = max(t.numel() * t.element_size() for t in stored.values())
    assert largest >= 8 * chunk  # the test means something only if a whole tensor would not fit in a chunk
    with LiveCPUBytes() as tracker:
        model = DecoderForCausalLM.from_pretrained(fp32_dir, dtype=torch.bfloat16)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # the model's bf16 tensors plus one read chunk (and a few bytes of small tensors), never a whole fp32 tensor
    assert tracker.peak <= weights + chunk + 4096, (tracker.peak, weights, largest)
    ours = model.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(ours[name], tensor.to(torch.bfloat16)), name  # converted correctly across chunk edges


# ---------------------------------------------------------------------------------------------- the GGUF reader
def _same_as_gguf_reader(path: Path) -> None:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields)
    for key, field in fields.items():
        assert ours.fields[key].types == field.types and ours.fields[key].contents() == field.contents(), key
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape.tolist(), a.n_bytes, a.data_offset) == \
            (b.name, b.tensor_type, b.shape.tolist(), b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
        assert np.shares_memory(a.data, ours.data)  # left in the file's map


def test_gguf_reader_reads_what_the_gguf_package_reads(tiny_gguf):
    _same_as_gguf_reader(tiny_gguf)


@pytest.mark.slow
def test_gguf_reader_on_smollm2():
    from test_gguf_model import _smollm2_path

    path = _smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed")
    _same_as_gguf_reader(path)


def _entry_points(path: Path, capsys) -> dict[str, str]:
    """What each way of opening a GGUF file says about `path` (the error message; "" when it loads)."""
    said = {}
    calls = {
        "from_pretrained": lambda: DecoderForCausalLM.from_pretrained(path),
        "from_pretrained(quantization='none')": lambda: DecoderForCausalLM.from_pretrained(path, quantization="none"),
        "read_gguf": lambda: read_gguf(path),
        "open_gguf": lambda: open_gguf(path),
        "AutoTokenizer": lambda: AutoTokenizer.from_pretrained(path),
        "tokenizer_from_gguf": lambda: tokenizer_from_gguf(path),
        "read_gguf_metadata": lambda: read_gguf_metadata(path),
    }
    for name, call in calls.items():
        try:
            call()
            said[name] = ""
        except ValueError as err:
            said[name] = str(err)
    for command in (["info", str(path)], ["generate", "--model", str(path), "--max-new-tokens", "1", "hi"]):
        code = cli.main(command)
        err = capsys.readouterr().err
        said[command[0]] = err.strip() if code else ""
    return said


def test_truncated_gguf_says_so_at_every_entry_point(tiny_gguf, tmp_path, capsys):
    data = tiny_gguf.read_bytes()
    for size in (0, 3, 23, 30, 200, len(data) // 3, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        for entry, message in _entry_points(cut, capsys).items():
            assert f"{cut}: truncated or corrupt GGUF file (" in message, (size, entry, message)
            assert len(message.splitlines()) == 1


def test_corrupt_gguf_headers_give_clear_errors(tiny_gguf, tmp_path):
    """Random bytes written over the header and metadata: each load works or fails with a ValueError that names the
    file, never with a parser's internals (struct, numpy or index errors)."""
    data = tiny_gguf.read_bytes()
    header_end = GGUFFile(tiny_gguf).tensors[0].data_offset
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad.gguf"
    for _ in range(150):
        damaged = bytearray(data)
        at = int(rng.integers(4, header_end))
        damaged[at:at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        bad.write_bytes(bytes(damaged))
        for call in (open_gguf, read_gguf, tokenizer_from_gguf):
            try:
                call(bad)
            except ValueError as err:
                assert str(bad) in str(err), (at, err)
                assert not any(word in str(err) for word in ("unpack", "buffer", "index out of range")), (at, err)


def test_damaged_safetensors_file_is_named(bf16_dir, tmp_path):
    data = (bf16_dir / "model.safetensors").read_bytes()
    for size in (0, 7, 100, len(data) // 2, len(data) - 1):
        directory = tmp_path / f"cut{size}"
        directory.mkdir()
        (directory / "config.json").write_bytes((bf16_dir / "config.json").read_bytes())
        (directory / "model.safetensors").write_bytes(data[:size])
        with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated safetensors file"):
            DecoderForCausalLM.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------- progress bar
_SLOW_LOAD = textwrap.dedent("""
    import os, sys, time
    from decoderkit import checkpoint_sources
    from decoderkit.model import DecoderForCausalLM

    mapped = checkpoint_sources.StoredTensor.mapped

    def slowly(self):  # a load long enough (about 1.3 s) for the bar to appear
        time.sleep(0.06)
        return mapped(self)

    checkpoint_sources.StoredTensor.mapped = slowly
    os.environ["DECODERKIT_NO_PROGRESS"] = "1"
    DecoderForCausalLM.from_pretrained(sys.argv[1])
    sys.stderr.write("@@switched on@@")
    sys.stderr.flush()
    del os.environ["DECODERKIT_NO_PROGRESS"]
    DecoderForCausalLM.from_pretrained(sys.argv[1])
""")


def _run_with_stderr(stderr_tty: bool, directory: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    env.pop("TQDM_DISABLE", None)
    command = [sys.executable, "-c", _SLOW_LOAD, str(directory)]
    if not stderr_tty:
        return subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=300).stderr
    leader, follower = pty.openpty()
    # a terminal of 0 columns (a fresh pty's size) gets no bar from tqdm; a real one has a size
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        try:
            chunk = os.read(leader, 4096) if ready else b""
        except OSError:  # the pty is closed once the child has exited
            chunk = b""
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_progress_bar_on_a_terminal_only(tiny_gguf, bf16_dir):
    on_tty = _run_with_stderr(True, bf16_dir)
    quiet, _, shown = on_tty.partition("@@switched on@@")
    assert "loading" not in quiet  # DECODERKIT_NO_PROGRESS=1
    assert "loading model.safetensors" in shown or f"loading {bf16_dir.name}" in shown, on_tty
    assert "%|" in shown  # tqdm's bar
    piped = _run_with_stderr(False, bf16_dir)
    assert "@@switched on@@" in piped and "loading" not in piped and "%|" not in piped


def test_loading_pauses_the_garbage_collector_and_restores_it(tmp_path, monkeypatch):
    # A full collection during a load walks torch's whole heap for nothing (90 ms of a 262 ms GGUF load): the loader
    # runs with the collector off, and leaves it as the caller had it, also when the load fails.
    import gc

    from decoderkit import checkpoint

    seen: list[bool] = []
    real = checkpoint._load_pretrained

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_load_pretrained", spy)
    path = tmp_path / "m"
    save(build("llama"), path)
    was = gc.isenabled()
    try:
        gc.enable()
        DecoderForCausalLM.from_pretrained(path)
        assert seen == [False] and gc.isenabled()
        with pytest.raises(FileNotFoundError):
            DecoderForCausalLM.from_pretrained(tmp_path / "missing")
        assert seen == [False, False] and gc.isenabled()
        gc.disable()  # the caller's choice stays
        DecoderForCausalLM.from_pretrained(path)
        assert not gc.isenabled()
    finally:
        gc.enable() if was else gc.disable()
