"""Multi-process training under `torchrun`: process-group setup, FSDP2 / DDP wrapping, and full state dicts.

`torchrun --nproc_per_node N -m decoderkit.training ...` runs the same `Trainer` in N processes. The process group uses
gloo on CPU and NCCL on CUDA. Checkpoints hold *full* (unsharded) state dicts keyed by parameter name, gathered through
`torch.distributed.checkpoint.state_dict`, so a checkpoint written by N processes loads into M processes, or into a
plain single-process run, unchanged.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the world size and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 600.0) -> DistributedContext:
    """Join the process group that `torchrun` set up (env:// rendezvous); a single-process context otherwise.

    The backend follows the device: NCCL for CUDA, gloo for CPU. Calling it twice is harmless.
    """
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not launched_by_torchrun():
        return DistributedContext(device=torch.device(device) if device is not None else
                                  torch.device("cuda" if cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if cuda else {}))
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, strategy: str, context: DistributedContext) -> nn.Module:
    """The module to run forward/backward through: the model itself, `DistributedDataParallel`, or the model sharded
    in place with FSDP2 (`fully_shard` on each decoder layer, then on the root, which keeps tied embeddings whole).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {strategy!r}; allowed: {STRATEGIES}")
    if strategy == "none" or not context.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [context.device.index] if context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    for layer in layers if layers is not None else ():
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimizer) state dicts, unsharded, on CPU, keyed by parameter name (complete on rank 0).

    Every rank must call this: gathering FSDP shards is a collective.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    return get_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                          optimizer_state: dict[str, Any]) -> None:
    """Load full state dicts (as `full_state_dicts` returns them) into a possibly sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process); returns a new tensor."""
    values = values.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
