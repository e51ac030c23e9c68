"""Inference beyond one process: tensor parallelism over torch.distributed (`tensor_parallel`, `loading`) and the
processes that run it (`launch`)."""

from decoderkit.parallel.tensor_parallel import TP_PLAN, Partition, partition, shard_model

__all__ = ["TP_PLAN", "Partition", "partition", "shard_model"]
