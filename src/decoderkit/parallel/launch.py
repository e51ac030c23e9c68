"""Starting the ranks of a tensor-parallel model from one process, and keeping them in step.

`TensorParallelGroup.start(path, N)` runs in the process that owns the user-facing work (the CLI, the HTTP server):
it becomes rank 0 and spawns ranks 1..N-1 (torch.multiprocessing, spawn), which join a gloo (CPU) or NCCL (CUDA)
process group, load their shards and then follow rank 0's commands, sent over a pipe each: "generate" (the same
`generate` call, with rank 0's generator state) and, for the server, "paged_init" / "paged_forward" (the paged
runner's step for the batch rank 0 scheduled). Every collective therefore runs on every rank in the same order.
Rank 0 owns tokenisation, scheduling and HTTP; every rank ends each step with the same all-gathered logits, so a
`generate` replayed with the same generator state samples the same tokens on every rank, and the server samples on
rank 0 alone.

Failures end in bounded time: a rank that dies closes its sockets, so the collectives of the others fail at once; a
rank that hangs trips the process group's timeout; a follower whose pipe to rank 0 closes exits; rank 0 watches its
followers' process handles and, when one exits unexpectedly, tells the others to stop and runs its failure callbacks
(the server stops its engine: requests are answered 503).
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing.connection
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)

# How long a collective may wait for a silent rank before it fails (a rank that dies fails the others at once).
DEFAULT_TIMEOUT_S = float(os.environ.get("DECODERKIT_TP_TIMEOUT", "120"))


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed or disconnected."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world_size: int, init_method: str, cuda: bool, timeout_s: float) -> torch.device:
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **({"device_id": device} if cuda else {}))
    return device


def _load(path: str, load_kwargs: dict[str, Any]) -> Any:
    from decoderkit.auto import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", **load_kwargs)


def _follower_main(rank: int, world_size: int, init_method: str, cuda: bool, timeout_s: float, threads: int | None,
                   path: str, load_kwargs: dict[str, Any], conn: multiprocessing.connection.Connection) -> None:
    """A follower rank: join, load the shard, then run what rank 0 sends until told to stop or cut off."""
    if threads:
        torch.set_num_threads(threads)
    try:
        device = _join_group(rank, world_size, init_method, cuda, timeout_s)
        model = _load(path, {**load_kwargs, "device": str(device)})
        conn.send(("ready", None))
    except Exception as err:  # noqa: BLE001 - reported to rank 0, which raises it
        _send_quietly(conn, ("error", f"rank {rank}: {type(err).__name__}: {err}"))
        os._exit(1)
    follower = _Follower(model)
    while True:
        try:
            command, args = conn.recv()
        except (EOFError, OSError):
            logger.error("tensor-parallel rank %d: rank 0 disconnected; exiting", rank)
            os._exit(1)
        if command == "exit":
            break
        try:
            follower.run(command, args)
        except Exception as err:  # noqa: BLE001 - a failed collective: the group is broken, so this rank ends
            logger.error("tensor-parallel rank %d: %s failed: %s", rank, command, err)
            _send_quietly(conn, ("error", f"rank {rank}: {command}: {type(err).__name__}: {err}"))
            os._exit(1)
    dist.destroy_process_group()


def _send_quietly(conn: multiprocessing.connection.Connection, message: Any) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):
        pass


class _Follower:
    """What a follower rank holds between commands."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.runner: Any = None

    @torch.inference_mode()
    def run(self, command: str, args: tuple) -> None:
        if command == "generate":
            kwargs = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in args[0].items()}
            state = kwargs.pop("generator_state", None)
            if state is not None:
                kwargs["generator"] = torch.Generator(device=self.model.device)
                kwargs["generator"].set_state(state)
            self.model.generate(**kwargs)
        elif command == "paged_init":
            from decoderkit.serve.paged import BlockPool, PagedRunner

            num_blocks, block_size = args
            c = self.model.decoder_config
            pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks, block_size,
                             self.model.dtype, self.model.device)
            self.runner = PagedRunner(self.model, pool)
        elif command == "paged_forward":
            self.runner.forward(*args)
        else:
            raise ValueError(f"unknown tensor-parallel command {command!r}")


class TensorParallelGroup:
    """Rank 0 of a tensor-parallel group this process started; `model` is rank 0's shard (its `generate` is mirrored
    on every rank)."""

    def __init__(self, model: Any, processes: list[Any], pipes: list[multiprocessing.connection.Connection]) -> None:
        self.model = model
        self.processes, self.pipes = processes, pipes
        self.failure: str | None = None
        self._closing = False
        self._on_failure: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._watchdog = threading.Thread(target=self._watch, name="decoderkit-tp-watchdog", daemon=True)
        self._watchdog.start()
        plain_generate = model.generate
        model.generate = lambda *args, **kwargs: self._generate(plain_generate, *args, **kwargs)

    @property
    def world_size(self) -> int:
        return len(self.processes) + 1

    @classmethod
    def start(cls, path: str | os.PathLike, world_size: int, *, device: str | torch.device | None = None,
              timeout_s: float = DEFAULT_TIMEOUT_S, **load_kwargs: Any) -> TensorParallelGroup:
        """Spawn ranks 1..world_size-1, join them as rank 0 and load every shard. `load_kwargs` go to
        `from_pretrained` (dtype, attn_implementation, ...). CPU ranks share the cores: each gets cores / N threads."""
        from decoderkit.checkpoint import resolve_model_path
        from decoderkit.config import DecoderConfig
        from decoderkit.parallel.tensor_parallel import partition

        if world_size < 2:
            raise ValueError(f"tensor-parallel size must be at least 2, got {world_size}")
        location = resolve_model_path(path)
        if location.is_dir():  # a size that does not split the model fails here, before any process starts
            partition(DecoderConfig.from_pretrained(location), 0, world_size)
        cuda = torch.device(device).type == "cuda" if device not in (None, "auto") else torch.cuda.is_available()
        if cuda and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor-parallel size {world_size} needs {world_size} CUDA devices; "
                             f"{torch.cuda.device_count()} are visible")
        threads = None if cuda else max(1, (os.cpu_count() or 1) // world_size)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        context = mp.get_context("spawn")
        processes, pipes = [], []
        for rank in range(1, world_size):
            ours, theirs = context.Pipe()
            proc = context.Process(target=_follower_main, name=f"decoderkit-tp-rank{rank}", daemon=True,
                                   args=(rank, world_size, init_method, cuda, timeout_s, threads, str(location),
                                         load_kwargs, theirs))
            proc.start()
            theirs.close()
            processes.append(proc)
            pipes.append(ours)
        try:
            if threads:
                torch.set_num_threads(threads)
            device0 = _join_group(0, world_size, init_method, cuda, timeout_s)
            model = _load(str(location), {**load_kwargs, "device": str(device0)})
            for rank, pipe in enumerate(pipes, 1):
                if not pipe.poll(timeout_s):
                    raise TensorParallelError(f"tensor-parallel rank {rank} did not load within {timeout_s:g} s")
                status, detail = pipe.recv()
                if status != "ready":
                    raise TensorParallelError(detail)
        except BaseException as err:
            # A follower that failed first (its own error, reported on its pipe) explains rank 0's broken collective
            reported = [] if isinstance(err, (ValueError, TensorParallelError)) else _reported_errors(pipes)
            _stop_processes(processes, pipes)
            if dist.is_initialized():
                dist.destroy_process_group()
            if reported:
                raise TensorParallelError("; ".join(reported)) from err
            raise
        return cls(model, processes, pipes)

    # ------------------------------------------------------------------------------------------------ commands
    def broadcast(self, command: str, *args: Any) -> None:
        """Send a command to every follower (rank 0 then does the same work itself)."""
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        with self._lock:
            for rank, pipe in enumerate(self.pipes, 1):
                try:
                    pipe.send((command, args))
                except (OSError, ValueError):
                    self._fail(f"tensor-parallel rank {rank} is gone (its pipe closed)")
                    raise TensorParallelError(self.failure) from None

    def _generate(self, plain_generate: Callable[..., Any], input_ids: Any = None, **kwargs: Any) -> Any:
        # Tensors travel through the pipe on the CPU; the streamer stays here (rank 0 owns the output)
        shared = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items() if k != "streamer"}
        generator = shared.pop("generator", None)
        if generator is not None:
            shared["generator_state"] = generator.get_state()
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.cpu()
        self.broadcast("generate", {"input_ids": input_ids, **shared})
        try:
            return plain_generate(kwargs.pop("input_ids", None) if input_ids is None else input_ids.to(
                self.model.device), **kwargs)
        except RuntimeError as err:
            raise TensorParallelError(self.failure or f"tensor-parallel generate failed: {err}") from err

    def attach_engine(self, engine: Any) -> None:
        """Make a serving `Engine` built on `model` run its steps on every rank; a failed rank stops it (503)."""
        self.broadcast("paged_init", engine.pool.num_blocks, engine.pool.block_size)
        engine.runner = _MirroredRunner(engine.runner, self)
        self.on_failure(lambda reason: threading.Thread(target=engine.stop, daemon=True).start())

    def on_failure(self, callback: Callable[[str], None]) -> None:
        self._on_failure.append(callback)
        if self.failure is not None:
            callback(self.failure)

    # ------------------------------------------------------------------------------------------------ failure
    def _watch(self) -> None:
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self.processes, 1)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._closing:
            return
        rank = sentinels[ready[0]]
        self._fail(f"tensor-parallel rank {rank} exited unexpectedly (exit code {self.processes[rank - 1].exitcode})")

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        logger.error("%s; stopping the other ranks", reason)
        for pipe in self.pipes:
            pipe.close()  # followers waiting for a command see the pipe close and exit
        for callback in self._on_failure:
            callback(reason)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every follower (bounded wait, then terminate) and leave the process group."""
        if self._closing:
            return
        self._closing = True
        _stop_processes(self.processes, self.pipes, timeout_s)
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> TensorParallelGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _MirroredRunner:
    """A `PagedRunner` whose every step is first sent to the follower ranks."""

    def __init__(self, runner: Any, group: TensorParallelGroup) -> None:
        self.runner, self.group = runner, group

    def forward(self, segments: Any, all_positions: bool = False) -> torch.Tensor:
        self.group.broadcast("paged_forward", list(segments), all_positions)
        try:
            return self.runner.forward(segments, all_positions)
        except RuntimeError as err:
            raise TensorParallelError(self.group.failure or f"tensor-parallel step failed: {err}") from err

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def _reported_errors(pipes: list[multiprocessing.connection.Connection], wait_s: float = 2.0) -> list[str]:
    errors = []
    for pipe in pipes:
        try:
            if pipe.poll(wait_s):
                status, detail = pipe.recv()
                if status == "error":
                    errors.append(detail)
        except (EOFError, OSError):
            pass
    return errors


def _stop_processes(processes: list[Any], pipes: list[multiprocessing.connection.Connection],
                    timeout_s: float = 10.0) -> None:
    for pipe in pipes:
        try:
            pipe.send(("exit", ()))
        except (OSError, ValueError):
            pass
        pipe.close()
    for proc in processes:
        proc.join(timeout_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def start_tensor_parallel(path: str | os.PathLike, world_size: int, **kwargs: Any) -> TensorParallelGroup:
    """`TensorParallelGroup.start`, closed when the process exits (the CLI and the server use it)."""
    import atexit

    group = TensorParallelGroup.start(path, world_size, **kwargs)
    atexit.register(group.close)
    return group
