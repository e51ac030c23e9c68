"""transformers' model methods beyond the forward pass: embeddings access and resizing, parameter counts, tuple
outputs, and the keyword arguments `from_pretrained` takes.

`TransformersCompatMixin` is mixed into every head (`decoderkit.model.PreTrainedDecoder`); the keyword tables here
are the one list `from_pretrained` checks, so a new loading option is added in one place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributions import constraints

from decoderkit.outputs import ModelOutput

# Keywords `from_pretrained` honours, beyond config.json fields (which override the file's, as in transformers).
FROM_PRETRAINED_KEYWORDS: tuple[str, ...] = (
    "dtype", "torch_dtype", "attn_implementation", "device", "device_map", "quantization", "activations", "config",
    "progress",
    "gguf_file", "revision", "cache_dir", "local_files_only", "tp_plan",
)

# Keywords transformers takes that have nothing to do here: accepted, each for the reason given.
ACCEPTED_WITHOUT_EFFECT: dict[str, str] = {
    "trust_remote_code": "decoderkit never runs code from a checkpoint; its families are built in",
    "low_cpu_mem_usage": "weights are always placed as they are read, never built twice",
    "use_safetensors": "safetensors files are preferred whenever a directory has them",
    "token": "nothing is downloaded: hub ids are read from the local cache",
    "use_auth_token": "nothing is downloaded: hub ids are read from the local cache",
    "proxies": "nothing is downloaded: hub ids are read from the local cache",
    "resume_download": "nothing is downloaded: hub ids are read from the local cache",
    "_from_auto": "transformers' internal marker",
}

# Keywords transformers takes that decoderkit cannot honour: an error saying why, never a silent drop.
UNSUPPORTED: dict[str, str] = {
    "force_download": "decoderkit never downloads; fetch the model with huggingface-cli first",
    "output_loading_info": "a load either fits the checkpoint exactly or raises, so there is no loading info",
    "subfolder": "pass the subfolder's path itself",
    "variant": "pass the variant's file directory itself",
    "max_memory": "a model runs on one device here; pass device= or device_map= with one device",
    "offload_folder": "decoderkit does not offload weights to disk",
    "offload_state_dict": "decoderkit does not offload weights to disk",
    "offload_buffers": "decoderkit does not offload weights to disk",
    "from_tf": "only PyTorch (safetensors / .bin) and GGUF checkpoints are read",
    "from_flax": "only PyTorch (safetensors / .bin) and GGUF checkpoints are read",
    "quantization_config": "use quantization= ('int8', 'int4' or a decoderkit QuantizationConfig)",
    "key_mapping": "the families map checkpoint names themselves",
}

# transformers' names for device_map strategies; with one device in the process each means "all on that device".
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def split_from_pretrained_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(loading options, config overrides) from `from_pretrained`'s keywords; unsupported ones raise here.

    Whether each override names a config field is checked once config.json is read (`check_config_overrides`).
    """
    options, overrides = {}, {}
    for key, value in kwargs.items():
        if key in UNSUPPORTED:
            if key == "force_download" and not value:
                continue
            raise TypeError(f"from_pretrained: {key}= is not supported: {UNSUPPORTED[key]}")
        if key in ACCEPTED_WITHOUT_EFFECT:
            continue
        (options if key in FROM_PRETRAINED_KEYWORDS else overrides)[key] = value
    return options, overrides


def check_config_overrides(transformers_fields: dict[str, Any], aliases: dict[str, str],
                           overrides: dict[str, Any]) -> None:
    """TypeError for a keyword that is neither a loading option nor a field of the checkpoint's config."""
    config_keys = {k for k in transformers_fields if not k.startswith("_")} | set(aliases) | {"num_labels"}
    unknown = sorted(k for k in overrides if k not in config_keys)
    if unknown:
        raise TypeError(
            f"from_pretrained got unexpected keyword argument(s) {unknown}; allowed: the loading options "
            f"{sorted(FROM_PRETRAINED_KEYWORDS)}, the config fields of this checkpoint ({sorted(config_keys)}), and "
            f"transformers' {sorted(ACCEPTED_WITHOUT_EFFECT)} (accepted, no effect here)")


def resolve_device_map(device_map: Any, device: Any) -> Any:
    """The one device a `device_map` names ("auto", "cpu", "cuda:0", an index, or a dict of module -> device)."""
    if device_map is None:
        return device
    if isinstance(device_map, dict):
        targets = {_device_name(v) for v in device_map.values()}
        if not targets:
            raise ValueError("device_map is an empty dict; map module names (or '') to a device")
        if len(targets) > 1:
            raise ValueError(f"device_map places modules on several devices ({sorted(targets)}); decoderkit runs a "
                             "model on one device in a process: map every module to the same device, or use "
                             "tensor parallelism to spread one model over several")
        (chosen,) = targets
    elif isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        chosen = "auto"
    else:
        chosen = _device_name(device_map)
    if chosen in ("disk", "meta") and not isinstance(device_map, str):
        raise ValueError(f"device_map maps modules to {chosen!r}; decoderkit does not offload weights")
    if device is not None and _device_name(device) != chosen and chosen != "auto":
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
    return device if device is not None and chosen == "auto" else chosen


def _device_name(value: Any) -> str:
    if isinstance(value, bool):
        raise ValueError(f"device_map value {value!r} is not a device")
    if isinstance(value, int):
        return f"cuda:{value}"
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"device_map value {value!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or an integer")


class TransformersCompatMixin:
    """The parts of transformers' `PreTrainedModel` that scripts call besides forward and generate."""

    config: Any
    decoder_config: Any
    model: Any

    # ------------------------------------------------------------------------------------------ outputs
    def _output(self, out: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
        """transformers' tuples when `return_dict=False` (or `config.return_dict` is False): the set fields in
        order (loss first when computed, then logits, past_key_values, hidden_states, attentions)."""
        if return_dict is None:
            return_dict = self.config.return_dict
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        if not hasattr(self, "lm_head"):
            raise ValueError(f"{type(self).__name__} has no output embeddings (no language-modelling head)")
        self.lm_head = new_embeddings

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (a tied head is the embedding), as transformers counts them."""
        embedding_names = {f"{name}.weight" for name, module in self.named_modules()
                           if isinstance(module, nn.Embedding)}
        return sum(p.numel() for name, p in self.named_parameters()
                   if not (exclude_embeddings and name in embedding_names) and (p.requires_grad or not only_trainable))

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Grow or shrink the vocabulary, as transformers does.

        New rows are drawn from a normal with the old rows' mean and 1e-9 times their covariance (`mean_resizing`,
        so the new tokens barely move the next-token distribution), or N(0, initializer_range) otherwise; an untied
        output head grows the same way, a tied one stays tied. `pad_to_multiple_of` rounds the size up.
        `config.vocab_size` follows. Returns the input embedding.
        """
        old = self.get_input_embeddings()
        if pad_to_multiple_of is not None:
            if not _positive_int(pad_to_multiple_of):
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
            size = old.weight.shape[0] if new_num_tokens is None else new_num_tokens
            new_num_tokens = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return old
        if not _positive_int(new_num_tokens):
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        head = self.get_output_embeddings()
        if head is not None and not isinstance(head, nn.Linear):
            raise ValueError(f"resize_token_embeddings: the output head is a {type(head).__name__}; a quantized "
                             "model cannot be resized, resize the float model and quantize it afterwards")
        std = self.decoder_config.initializer_range
        _resize_rows(old, new_num_tokens, mean_resizing, std)
        old.num_embeddings = new_num_tokens
        if old.padding_idx is not None and old.padding_idx >= new_num_tokens:
            old.padding_idx = None
        if head is not None and head.weight is not old.weight:
            if head.weight.shape[0] != new_num_tokens:
                self.set_output_embeddings(_resized_linear(head, new_num_tokens, mean_resizing, std))
            else:
                head.out_features = new_num_tokens
        self.decoder_config.vocab_size = new_num_tokens
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        if head is not None and isinstance(self.get_output_embeddings(), nn.Linear):
            self.get_output_embeddings().out_features = new_num_tokens
        return old


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _mean_rows(old: torch.Tensor, added: int) -> torch.Tensor:
    """transformers' `_init_added_embeddings_weights_with_mean`: N(mean, 1e-9 cov) of the old rows, or the mean."""
    weight = old.float()
    mean = weight.mean(0)
    centered = weight - mean
    covariance = centered.T @ centered / weight.shape[0]
    scaled = 1e-9 * covariance
    if bool(constraints.positive_definite.check(scaled).all()):
        dist = torch.distributions.multivariate_normal.MultivariateNormal(mean, covariance_matrix=scaled)
        return dist.sample((added,)).to(old.dtype)
    return mean[None].repeat(added, 1).to(old.dtype)


def _new_rows(old: torch.Tensor, added: int, mean_resizing: bool, std: float) -> torch.Tensor:
    if mean_resizing:
        return _mean_rows(old, added)
    return torch.empty(added, old.shape[1], dtype=old.dtype, device=old.device).normal_(0.0, std)


def _resize_rows(module: nn.Embedding, n: int, mean_resizing: bool, std: float) -> None:
    """Resize an embedding's weight in place (the same Parameter object, so optimizers and ties still see it)."""
    weight = module.weight
    old_n = weight.shape[0]
    if n <= old_n:
        weight.data = weight.data[:n].clone()
        return
    weight.data = torch.cat([weight.data, _new_rows(weight.data, n - old_n, mean_resizing, std).to(weight.device)])


def _resized_linear(head: nn.Linear, n: int, mean_resizing: bool, std: float) -> nn.Linear:
    old_n = head.weight.shape[0]
    new = nn.Linear(head.in_features, n, bias=head.bias is not None, device=head.weight.device,
                    dtype=head.weight.dtype)
    keep = min(old_n, n)
    new.weight[:keep] = head.weight[:keep]
    if n > old_n:
        new.weight[old_n:] = _new_rows(head.weight, n - old_n, mean_resizing, std)
    if head.bias is not None:
        new.bias[:keep] = head.bias[:keep]
        if n > old_n:
            if mean_resizing:
                bias = head.bias.float()
                new.bias[old_n:] = torch.empty(n - old_n).normal_(float(bias.mean()), 1e-9 * float(bias.std()))
            else:
                new.bias[old_n:] = 0.0
    new.weight.requires_grad_(head.weight.requires_grad)
    return new
