"""Tensor parallelism: 1 rank vs N ranks on one machine — decode tokens/s and what each rank holds.

    PYTHONPATH=src python benchmarks/tensor_parallel.py [--model DIR] [--ranks 2] [--new-tokens 32]

Without --model, a random fp32 Llama of ~800 MB is written once to /tmp/decoderkit-tp-bench (nothing is downloaded).
Printed: tokens/s at batch 1 for 1 rank and for N ranks (`TensorParallelGroup`, the ranks `decoderkit generate
--tensor-parallel N` starts), parameter bytes per rank (counted from the tensors each rank holds) and each process's
peak RSS (VmHWM); then the per-forward cost of DTensor's `parallelize_module` against decoderkit's plain sharded
linears on one gated MLP of the same model, under N ranks.

On a CPU the ranks share the same cores and memory bandwidth, so N ranks are not faster (each gets cores / N
threads and adds two all-reduces per layer): the figure that matters here is memory per rank. On N GPUs each rank
reads 1/N of the weights per token from its own HBM, so a memory-bound decode step approaches N times faster, minus
the NCCL all-reduce latency (two per layer, ~10-20 us each over NVLink at batch 1).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

DEFAULT_DIR = Path("/tmp/decoderkit-tp-bench")
CONFIG = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_model(directory: Path) -> Path:
    from decoderkit import AutoModelForCausalLM

    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(CONFIG).save_pretrained(directory)
    return directory


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def decode_rate(model, prompt: torch.Tensor, new_tokens: int) -> float:
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, cache_implementation="static")
    model.generate(prompt, max_new_tokens=4, **kwargs)  # warm-up
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, **kwargs)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    total = time.perf_counter() - start
    return (out.shape[1] - prompt.shape[1] - 1) / (total - prefill)


# ------------------------------------------------------------------------------------------------ DTensor vs plain
def _mlp_bench(rank: int, world: int, port: int, hidden: int, ffn: int, steps: int, out: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from decoderkit.config import DecoderConfig
    from decoderkit.layers.mlp import GatedMLP
    from decoderkit.parallel.tensor_parallel import RowParallelLinear

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    config = DecoderConfig(model_type="llama", vocab_size=8, hidden_size=hidden, num_hidden_layers=1,
                           num_attention_heads=1, num_key_value_heads=1, head_dim=hidden, intermediate_size=ffn,
                           max_position_embeddings=8)
    x = torch.randn(1, 1, hidden)

    def timed(module) -> float:
        # Reading the output waits for its all-reduce (a functional collective completes when its result is used)
        with torch.inference_mode():
            for _ in range(5):
                module(x)[0, 0, 0].item()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                module(x)[0, 0, 0].item()
            return (time.perf_counter() - start) / steps

    dtensor = parallelize_module(GatedMLP(config), init_device_mesh("cpu", (world,)),
                                 {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                  "down_proj": RowwiseParallel()})
    plain = GatedMLP(config.replace(intermediate_size=ffn // world))
    down = plain.down_proj
    plain.down_proj = RowParallelLinear(down.in_features, down.out_features, False, dist.group.WORLD)
    plain.down_proj.weight = torch.nn.Parameter(torch.randn_like(down.weight, device="cpu"))
    result = (timed(dtensor), timed(plain))
    if rank == 0:
        out["mlp"] = result
    dist.destroy_process_group()


def dtensor_overhead(world: int, hidden: int, ffn: int, steps: int = 200) -> tuple[float, float]:
    import torch.multiprocessing as mp

    from decoderkit.parallel.launch import free_port

    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_mlp_bench, args=(world, free_port(), hidden, ffn, steps, out), nprocs=world,
                       start_method="spawn")
    return out["mlp"]


def main() -> None:
    from decoderkit import AutoModelForCausalLM
    from decoderkit.parallel.launch import TensorParallelGroup

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    path = args.model or make_model(DEFAULT_DIR)
    prompt = torch.randint(3, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    print(f"CPU: {_cpu()}  load average: {os.getloadavg()}  torch {torch.__version__}")

    model = AutoModelForCausalLM.from_pretrained(path)
    total = weight_bytes(model)
    print(f"model {path}: {total / 2**20:.0f} MiB of {model.dtype} weights")
    one = decode_rate(model, prompt, args.new_tokens)
    del model
    print(f"1 rank : {one:6.2f} tok/s  weights held {total / 2**20:7.0f} MiB")

    with TensorParallelGroup.start(path, args.ranks) as group:
        many = decode_rate(group.model, prompt, args.new_tokens)
        held = weight_bytes(group.model)
        rss = [peak_rss(os.getpid())] + [peak_rss(p.pid) for p in group.processes]
        print(f"{args.ranks} ranks: {many:6.2f} tok/s  weights held by rank 0 {held / 2**20:7.0f} MiB "
              f"({held / total:.3f} of the model)  ratio tok/s {many / one:.2f}")
        print("peak RSS per rank (MiB): rank 0 includes the 1-rank run above: "
              + ", ".join(f"{r / 2**20:.0f}" for r in rss))

    config = CONFIG if args.model is None else None
    hidden, ffn = (config["hidden_size"], config["intermediate_size"]) if config else (1024, 2816)
    dtensor_s, plain_s = dtensor_overhead(args.ranks, hidden, ffn)
    print(f"gated MLP {hidden}x{ffn} at batch 1 over {args.ranks} ranks: DTensor parallelize_module "
          f"{dtensor_s * 1e6:.0f} us, plain sharded linears {plain_s * 1e6:.0f} us per forward "
          f"(DTensor / plain {dtensor_s / plain_s:.2f})")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
