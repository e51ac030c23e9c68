"""Reading Hugging Face model directories and GGUF files (writing lives in `decoderkit.saving`).

Loading happens in two passes. The *plan* reads only the checkpoint's names, shapes and dtypes (safetensors headers,
pickled metadata of a memory-mapped ``.bin``) and maps them onto a model built on the meta device, so every problem
(unexpected or missing weights, a shape that does not fit the config, a truncated file) is reported before a byte of
weight data is read. The *materialise* pass then takes each tensor once, in file order, into its final place: a
safetensors tensor already in the target dtype (on the CPU) stays in safetensors' private memory map of the file,
nothing copied (writing to it, as training does, copies the written pages and leaves the file alone); one in another
dtype, or bound for another device, is read and converted a few megabytes at a time straight into its final tensor; a
tensor a family must reshape (fused projections) is read whole into one reused buffer (a memory-mapped ``.bin``: its
mapping) and copied into the target dtype and device. Nothing is randomly initialised and thrown away, and peak memory
stays near the size of the weights in the target dtype (benchmarks/load.py measures it; the sources live in
`decoderkit.checkpoint_sources`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from decoderkit.checkpoint_sources import (
    SHOWN,
    SafetensorsSource,
    Source,
    StoredTensor,
    TorchBinSource,
    listing,
    open_gguf_source,
)
from decoderkit.config import DecoderConfig, read_config_json
from decoderkit.families import Family, get_family

if TYPE_CHECKING:
    from decoderkit.model import PreTrainedDecoder

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "double": torch.float64,
}
HEAD_ROLES = ("lm_head", "score", "qa_outputs", "classifier")
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Every weight file a save of ours (or of transformers) may leave behind; a new save removes the old ones.
WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def resolve_dtype(dtype: Any, config: DecoderConfig | None = None) -> torch.dtype | None:
    """A floating torch dtype from a torch dtype, its name, or "auto" (the config's dtype); None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point dtype; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name == "auto":
            saved = config.dtype if config is not None else None
            return resolve_dtype(saved) if saved not in (None, "auto") else None
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"unknown dtype {dtype!r}; allowed: a torch dtype, 'auto', or one of {sorted(DTYPES)}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device from a name; "auto" picks CUDA when available. Unavailable devices are an error here."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r} ({err}); use 'cpu', 'cuda', 'cuda:N', 'meta' or 'auto'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested, but CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} requested, but only {torch.cuda.device_count()} CUDA device(s) "
                             "are visible")
    return device


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '10KiB' / 1234 -> bytes (powers of 1000 unless spelled with 'i', as in transformers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB', '500MB' or an integer of bytes")
        base = 1024 if m.group(3) else 1000
        value = int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


# ---------------------------------------------------------------------------------------------- locating files
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_model_path(
    name: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local directory or file as given, else a hub repo id looked up in the local Hugging Face cache.

    The hub is asked only when the cache lacks the repo and neither `local_files_only` nor HF_HUB_OFFLINE is set.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    text = os.fspath(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if text.endswith((".gguf", ".json", ".safetensors", ".bin")) or text.startswith((".", "/", "~")):
            raise HFValidationError("a file path")
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(f"{text}: no such file or directory (and not a hub repo id)") from None
    # huggingface_hub reads these variables once, at import; a process (or test) may set them later.
    offline = local_files_only or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE") or (
            os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, or a cache entry without the requested revision
        if offline:
            raise FileNotFoundError(
                f"{text}: not a local path, and not in the Hugging Face cache ({cache_dir or 'default location'}) "
                f"while offline (HF_HUB_OFFLINE or local_files_only); fetch it first with "
                f"`hf download {text}` on a machine with network access ({type(err).__name__})"
            ) from None
    try:
        # Fetch safetensors only; .bin weights are fetched only when the repo has no safetensors.
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        folder = Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(text, revision=revision, cache_dir=cache_dir,
                                            allow_patterns=[*patterns, "*.bin"]))
        return folder
    except Exception as err:
        raise FileNotFoundError(
            f"{text}: not a local path, not in the local Hugging Face cache, and the download failed ({err})"
        ) from None


def weight_files(directory: Path) -> tuple[list[Path], str, dict[str, str] | None]:
    """The weight files of a directory, their format ('safetensors' or 'bin') and the shard index's weight map."""
    # safetensors first: a directory may also hold .bin files of an older save.
    for index_name, single, fmt in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "bin")):
        index = directory / index_name
        if index.exists():
            twice: list[tuple[str, Any, Any]] = []
            try:
                weight_map = json.loads(index.read_text(),
                                        object_pairs_hook=functools.partial(_pairs_to_dict, twice=twice))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: invalid shard index ({type(err).__name__}: {err})") from None
            # json keeps the last of repeated keys: a tensor named twice would silently come from one of its shards.
            clash = next(((name, a, b) for name, a, b in twice if isinstance(a, str) and isinstance(b, str) and a != b),
                         None)
            if clash is not None:
                raise ValueError(f"{index}: the shard index names tensor {clash[0]} twice, in {clash[1]} and in "
                                 f"{clash[2]}; each tensor must be in exactly one shard")
            files = sorted({directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(f"{index} names shard files that are missing: {listing(missing)}")
            return files, fmt, weight_map
        if (directory / single).exists():
            return [directory / single], fmt, None
    raise FileNotFoundError(
        f"{directory}: no weights found; expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
    )


def _pairs_to_dict(pairs: list[tuple[str, Any]], twice: list[tuple[str, Any, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, noting in `twice` each (key, first value, later value) of a repeated key."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            twice.append((key, out[key], value))
        out[key] = value
    return out



# ---------------------------------------------------------------------------------------------- loading
@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was after it). A load allocates thousands of
    objects (modules, parameters, tensor views) into a heap that torch's import has already filled with hundreds of
    thousands: that triggers a full collection, which walks all of them and finds nothing to free. On the SmolLM2
    Q4_1 GGUF it was 90 ms of a 262 ms load (2-core Zen 5)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_pretrained(cls: type[PreTrainedDecoder], path: str | os.PathLike, **kwargs: Any) -> PreTrainedDecoder:
    """Build `cls` from a checkpoint; see `PreTrainedDecoder.from_pretrained` and `_load_pretrained`."""
    with collection_paused():
        return _load_pretrained(cls, path, **kwargs)


def _load_pretrained(
    cls: type[PreTrainedDecoder], path: str | os.PathLike, *, dtype: Any = None, attn_implementation: str | None = None,
    device: str | torch.device | None = None, config: DecoderConfig | None = None, progress: bool | None = None,
    gguf_file: str | None = None, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False, quantization: Any = None, activations: str | None = None, **overrides: Any,
) -> PreTrainedDecoder:
    """Build `cls` from a checkpoint; see `PreTrainedDecoder.from_pretrained`.

    `path` is a model directory, a `.gguf` file, or a hub repo id in the local cache; `gguf_file` names a GGUF file
    inside that directory or repo. `dtype` None or "auto" keeps the checkpoint's dtype (GGUF: float32, which holds
    dequantized values exactly, also as the activations of a file that stays quantized, except bfloat16 where
    decoderkit's quantized kernel cannot be built and torch's run instead). `quantization` (see
    `decoderkit.quantization.resolve_load_quantization`): None keeps a GGUF file's quantized tensors packed and an HF
    checkpoint float; "none" dequantizes a GGUF file; "int8" / "int4" / a QuantizationConfig quantize float weights
    as they are read. `activations` (see `decoderkit.layers.quantized.set_activations`): how quantized layers
    multiply, "float" (None, the default: exact) or "int8" (llama.cpp's way, faster). `progress` None shows a bar
    only on a terminal. Other keyword arguments override config.json fields (e.g. `num_labels=3`).
    """
    from decoderkit.layers.quantized import check_activations, set_activations
    from decoderkit.model import check_overrides, prepare_config
    from decoderkit.quantization import prepare_quantized, resolve_load_quantization

    check_activations(activations)

    location = resolve_model_path(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if gguf_file is not None:
        location = location / gguf_file
        if not location.is_file():
            raise FileNotFoundError(f"{location}: no such GGUF file")
    device = resolve_device(device)
    explicit = resolve_dtype(dtype if dtype != "auto" else None)
    is_gguf = location.is_file() and location.suffix == ".gguf"
    quantize, native = resolve_load_quantization(quantization, is_gguf, device)
    directory: Path | None = None
    if is_gguf:
        source, hf_config = open_gguf_source(location, explicit, native)
        native = source.native
    elif location.is_dir():
        directory = location
        if not (location / "config.json").exists() and (ggufs := sorted(p.name for p in location.glob("*.gguf"))):
            raise FileNotFoundError(f"{location}: no config.json found; it holds GGUF files ({listing(ggufs)}): "
                                    "pass gguf_file=<name> to load one")
        hf_config = read_config_json(location)
        files, fmt, weight_map = weight_files(location)
        source = (SafetensorsSource(files, weight_map, str(location)) if fmt == "safetensors"
                  else TorchBinSource(files, str(location)))
    else:
        raise ValueError(f"{location}: expected a model directory (with config.json) or a .gguf file")
    if overrides:
        check_overrides(config if config is not None else hf_config, overrides)
    config = prepare_config(config if config is not None else hf_config, attn_implementation, overrides)
    # "auto" (transformers 5's default too): config.json's dtype, else the dtype the weights are stored in.
    target = explicit or resolve_dtype("auto", config) or source.checkpoint_dtype or torch.float32
    if not target.is_floating_point:
        target = torch.float32
    config = config.replace(dtype=str(target).removeprefix("torch."))

    with torch.device("meta"), _skip_init():
        model = cls(config)
    expected = expected_tensors(model)
    converters: dict[str, Any] = {}
    if quantize is not None or native:
        from decoderkit.gguf_model import gguf_tensor_types

        types = None
        if native:
            plan_names = _Plan(model, get_family(config.model_type), config, expected, source.label)
            types = {ours: qtype for hf, (qtype, shape) in gguf_tensor_types(source.reader, source.config).items()
                     for ours, _ in plan_names.translate(hf, torch.empty(shape, device="meta"))}
        load = prepare_quantized(model, target, quantize, types)
        expected = {**{k: v for k, v in expected.items() if k not in load.replaced}, **load.logical}
        converters = load.converters
    set_activations(model, activations)
    family = get_family(config.model_type)
    plan = _Plan(model, family, config, expected, source.label)
    if source.entries is not None:
        for entry in source.entries:
            plan.add(entry.name, entry.meta())
        plan.check()
    if device.type == "meta":
        # Nothing is read: the parameters stay on the meta device, in the target dtype.
        model.to(dtype=target)
        state: dict[str, torch.Tensor] = {}
        if source.entries is None:
            # GGUF: gguf_config has matched the file's tensors to the config; no tensor is decoded to recheck it.
            plan.found = set(expected)
    else:
        state = _materialise(plan, source, target, device, progress, converters)
    plan.check()
    _assign(model, state, plan.missing_heads(), device, target, source.label)
    model.eval()
    _attach_generation_config(model, directory, hf_config)
    given = Path(path).expanduser()
    model.name_or_path = str(given.absolute()) if given.exists() else os.fspath(path)
    return model


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Turn torch.nn.init's functions into no-ops while a model is built on the meta device.

    Initialising meta tensors does nothing useful, and `normal_` on meta imports torch._dynamo (2 s in a fresh
    process). transformers patches the same functions for the same reason; the patch is process-wide while it lasts.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def expected_tensors(model: PreTrainedDecoder) -> dict[str, torch.Tensor]:
    """Our state-dict names -> meta tensors, one name per tensor (a tied lm_head is not a tensor of its own)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


class _Plan:
    """Which checkpoint tensors fill which of our tensors, and what is wrong with the fit."""

    def __init__(self, model: PreTrainedDecoder, family: Family, config: DecoderConfig,
                 expected: dict[str, torch.Tensor], label: str) -> None:
        self.family, self.config, self.expected, self.label = family, config, expected, label
        self.model_type = config.model_type
        # A tied model has no lm_head tensor of its own; the checkpoint's copy (if any) is skipped without comment.
        self.tied_head = config.tie_word_embeddings and hasattr(model, "lm_head")
        self.needed: set[str] = set()
        self.found: set[str] = set()
        self.unexpected: list[str] = []
        self.unused_heads: list[str] = []
        self.mismatched: list[str] = []

    def translate(self, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        try:
            pairs = self.family.hf_to_ours(hf_name, tensor, self.config)
        except (RuntimeError, ValueError) as err:  # a fused tensor that does not split as the config says
            self.mismatched.append(f"{hf_name}: shape {tuple(tensor.shape)} does not fit the config ({err})")
            return []
        out = []
        for name, value in pairs:
            if name.split(".")[0] == "classifier":  # GPTBigCode's and MPT's token-classification head
                name = "score" + name[len("classifier"):]
            out.append((name, value))
        return out

    def add(self, hf_name: str, tensor: torch.Tensor) -> None:
        for name, value in self.translate(hf_name, tensor):
            want = self.expected.get(name)
            if want is None:
                role = name.split(".")[0]
                if role not in HEAD_ROLES:
                    self.unexpected.append(hf_name)
                elif not (self.tied_head and name == "lm_head.weight"):
                    self.unused_heads.append(hf_name)
                continue
            if tuple(value.shape) != tuple(want.shape):
                self.mismatched.append(f"{hf_name} has shape {tuple(value.shape)}; the config expects "
                                       f"{tuple(want.shape)} (for {name})")
                continue
            self.needed.add(hf_name)
            self.found.add(name)

    def check(self) -> None:
        """Raise a ValueError naming every misfit; log head weights that have no place in this head."""
        problems = []
        if self.unexpected:
            problems.append(f"{len(self.unexpected)} weights that a {self.model_type} model does not have: "
                            f"{listing(self.unexpected)}")
        if self.mismatched:
            problems.append(f"{len(self.mismatched)} shape mismatches: " + "; ".join(self.mismatched[:SHOWN])
                            + (" ..." if len(self.mismatched) > SHOWN else ""))
        missing = [n for n in self.expected if n not in self.found and n.split(".")[0] not in HEAD_ROLES]
        if missing:
            problems.append(f"{len(missing)} weights missing from the checkpoint: {listing(missing)}")
        if problems:
            raise ValueError(f"{self.label}: the checkpoint does not fit the {self.model_type} config: "
                             + "; ".join(problems))
        if self.unused_heads:
            logger.info("%s: head weights not used by this model: %s", self.label, listing(self.unused_heads))
            self.unused_heads = []

    def missing_heads(self) -> list[str]:
        return [n for n in self.expected if n not in self.found]


def _materialise(plan: _Plan, source: Source, dtype: torch.dtype, device: torch.device,
                 progress: bool | None, converters: dict[str, Any]) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    from decoderkit.gguf_model import GGUFBlocks

    if source.entries is None:
        total = source.total_bytes
        wanted: Callable[[str], bool] = lambda name: True  # noqa: E731 - GGUF: names are checked as they arrive
    else:
        total = sum(e.nbytes for e in source.entries if e.name in plan.needed)
        wanted = plan.needed.__contains__
    # A tensor produced in fresh CPU memory in the target dtype becomes the model's own without a copy.
    keep = source.fresh and device.type == "cpu"
    state: dict[str, torch.Tensor] = {}
    with tqdm(total=total, desc=f"loading {os.path.basename(source.label)}", unit="B", unit_scale=True,
              leave=False, **progress_bar_options(progress)) as bar:
        for hf_name, tensor, nbytes in source.tensors(wanted, pinned=device.type == "cuda"):
            if isinstance(tensor, StoredTensor):
                if _place_stored(plan, state, hf_name, tensor, dtype, device, converters):
                    bar.update(nbytes)
                    continue
                # reshaped by the family, or quantized: whole, into the reused buffer unless a quantizer may keep it
                tensor = tensor.read(keep=bool(converters))
            blocks = tensor if isinstance(tensor, GGUFBlocks) else None
            if source.entries is None:
                plan.add(hf_name, tensor if blocks is None else torch.empty(blocks.shape, device="meta"))
                if hf_name not in plan.needed:
                    continue
            if blocks is None:
                pairs = plan.translate(hf_name, tensor)
            else:
                # codes, scales and offsets go through the same row moves (fused splits)
                moved = [plan.translate(hf_name, part) for part in blocks.parts()]
                pairs = [(pieces[0][0], blocks.with_parts([t for _, t in pieces]))
                         for pieces in zip(*moved, strict=True)]
            for name, value in pairs:
                if name not in plan.expected or name in state:
                    continue
                if name in converters:
                    state.update(converters[name](value))
                    continue
                if isinstance(value, GGUFBlocks):  # a quantized tensor of a layer that stays float
                    value = value.dequantize()
                want = dtype if value.is_floating_point() else value.dtype
                if keep and value is tensor and value.dtype == want and value.is_contiguous():
                    state[name] = value  # produced straight into its final place: no copy at all
                    continue
                # One copy, straight into the final dtype and device; the source tensor is released after.
                out = torch.empty(value.shape, device=device, dtype=want)
                out.copy_(value)
                state[name] = out
            bar.update(nbytes)
            tensor = value = None  # a converted tensor's source is freed before the next one is read
    return state


def _place_stored(plan: _Plan, state: dict[str, torch.Tensor], hf_name: str, stored: StoredTensor,
                  dtype: torch.dtype, device: torch.device, converters: dict[str, Any]) -> bool:
    """Place a safetensors tensor that only changes its name on the way in; False when it needs the whole tensor."""
    placeholder = stored.entry.meta()
    pairs = plan.translate(hf_name, placeholder)
    if len(pairs) != 1 or pairs[0][1] is not placeholder or pairs[0][0] in converters:
        return False
    name = pairs[0][0]
    if name not in plan.expected or name in state:
        return True
    stored_dtype = stored.entry.dtype
    want = dtype if stored_dtype.is_floating_point else stored_dtype
    if device.type == "cpu" and stored_dtype == want:
        state[name] = stored.mapped()
    else:
        out = torch.empty(stored.entry.shape, dtype=want, device=device)
        stored.read_into(out)
        state[name] = out
    return True


def progress_bar_options(progress: bool | None) -> dict[str, Any]:
    """tqdm keywords for a loading bar: `progress` True shows it, False hides it, None (the default) shows it on a
    terminal only, and only once a load has taken a second; DECODERKIT_NO_PROGRESS=1 hides it unless asked for."""
    if progress is None and _env_true("DECODERKIT_NO_PROGRESS"):
        progress = False
    if progress is None:
        # disable=None: tqdm checks that its stream (stderr) is a terminal
        return {"disable": None, "delay": 1.0}
    return {"disable": not progress}


def _assign(model: PreTrainedDecoder, state: dict[str, torch.Tensor], missing: list[str], device: torch.device,
            dtype: torch.dtype, label: str) -> None:
    _assign_tensors(model, state)
    if missing:
        logger.warning("%s: these head weights are not in the checkpoint and were newly initialised "
                       "(train them before use): %s", label, ", ".join(missing))
        with torch.no_grad():
            for name in missing:
                module_name, _, param_name = name.rpartition(".")
                module = model.get_submodule(module_name)
                fresh = torch.empty(getattr(module, param_name).shape, device=device, dtype=dtype)
                if device.type != "meta":
                    if param_name == "bias":
                        fresh.zero_()
                    else:
                        fresh.normal_(0.0, model.decoder_config.initializer_range)
                setattr(module, param_name, torch.nn.Parameter(fresh))
    model.tie_weights()
    model.model.rebuild_buffers(device)


def _assign_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=False, assign=True)`` for tensors the plan has already named and shaped.

    torch's version visits every module with a filtered copy of the whole state dict (a quarter of a second for a
    30-layer model); this sets each tensor on its module, with the same rule: a parameter stays a parameter with its
    ``requires_grad``.
    """
    modules = dict(model.named_modules())
    for name, value in state.items():
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        current = module._parameters.get(attr, module._buffers.get(attr))
        if current is None or current.shape != value.shape:
            raise RuntimeError(f"{name}: {tuple(value.shape)} read for a model tensor of shape "
                               f"{None if current is None else tuple(current.shape)}")
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=current.requires_grad)
        else:
            module._buffers[attr] = value


def _attach_generation_config(model: PreTrainedDecoder, directory: Path | None, hf_config: dict[str, Any]) -> None:
    from decoderkit.generation.config import GenerationConfig

    if directory is not None and (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    else:
        model.generation_config = GenerationConfig.from_model_config(hf_config)
