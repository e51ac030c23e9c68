"""The training loop: AdamW with warmup + cosine decay, gradient accumulation and clipping, mixed precision,
periodic evaluation, and checkpoints that resume bit-for-bit.

A resumed run reproduces the uninterrupted run exactly because everything that decides the next step is saved: the
weights, the optimizer moments, the scheduler position, every RNG state, and the data position (the sample order of
an epoch is a pure function of the seed and the epoch, so the position is one integer). Checkpoints are written into
a temporary directory and renamed into place, so a crash mid-save never leaves a half-written checkpoint behind.

The same loop runs under `torchrun` (see `decoderkit.training.distributed`); each optimizer step's loss is normalised
by the number of target tokens (or examples) in the whole global batch, so N processes compute the same update as one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from decoderkit.fileio import save_safetensors
from decoderkit.training.data import IGNORE_INDEX, DataCollator, describe_dataset
from decoderkit.training.distributed import (
    STRATEGIES,
    DistributedContext,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_state_dicts,
    init_distributed,
    load_full_state_dicts,
    wrap_model,
)
from decoderkit.training.memory import fix_malloc_mmap_threshold
from decoderkit.training.output_dir import check_output_dir, clear_run_outputs, list_checkpoints
from decoderkit.training.rng import load_rng_state, rng_state, set_rng_state

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@dataclass
class TrainingArguments:
    """What to train for and how; names follow transformers' `TrainingArguments` where they overlap.

    The effective batch of one optimizer step is `per_device_batch_size * gradient_accumulation_steps * world_size`.
    `gradient_checkpointing` None: on for a model with LoRA adapters, off otherwise.
    """

    output_dir: str
    max_steps: int | None = None
    num_epochs: float = 1.0
    per_device_batch_size: int = 8
    per_device_eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    shuffle: bool = True
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int | None = None
    max_eval_batches: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 2
    save_final: bool = True
    resume_from: str | None = None
    overwrite_output_dir: bool = False
    strategy: str = "auto"
    device: str | None = None
    progress: bool = True
    plot: bool = True

    def validate(self) -> None:
        """Raise a ValueError naming the first argument out of range."""
        positive = ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_steps", "save_steps", "per_device_eval_batch_size", "max_eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None), got {value}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise ValueError("warmup_ratio must be in [0, 1) and warmup_steps non-negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_steps is None and self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive, got {self.num_epochs}")
        if self.strategy not in ("auto", *STRATEGIES):
            raise ValueError(f"strategy must be one of {('auto', *STRATEGIES)}, got {self.strategy!r}")


@dataclass
class TrainOutput:
    """The result of `Trainer.train`: per-step training losses (of the whole run, resumed parts included), the
    evaluations, and this invocation's wall time and throughput."""

    global_step: int
    losses: list[float]
    eval_history: list[dict[str, float]] = field(default_factory=list)
    runtime_s: float = 0.0
    tokens_per_second: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Trains a decoderkit model (any head, optionally with LoRA adapters) on a map-style dataset.

    Args:
        model: a `PreTrainedDecoder` (its `head` picks the metrics); LoRA layers may already be injected.
        args: `TrainingArguments`.
        train_dataset: examples as the `decoderkit.training.data` loaders make them.
        eval_dataset: evaluated every `eval_steps` and at the end.
        tokenizer: saved next to the final model; its pad id pads batches.
        data_collator: turns a list of examples into a batch (default `DataCollator`).
        callbacks: called as `callback(trainer)` after every optimizer step (after logging, evaluation and
            checkpointing); one returning True ends training there (rank 0 decides for all ranks), e.g. for a
            wall-clock budget or early stopping.
    """

    def __init__(self, model: nn.Module, args: TrainingArguments, train_dataset: Dataset,
                 eval_dataset: Dataset | None = None, tokenizer: Any = None,
                 data_collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]] | None = None,
                 callbacks: Sequence[Callable[[Trainer], bool | None]] = ()) -> None:
        args.validate()
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.ctx: DistributedContext = init_distributed(args.device)
        if self.ctx.device.type == "cpu":
            fix_malloc_mmap_threshold()
        self.model = model.to(self.ctx.device)
        self.head: str = getattr(model, "head", "causal_lm")
        pad = getattr(tokenizer, "pad_token_id", None)
        config = getattr(model, "config", None)
        if pad is None and config is not None:
            pad = config.pad_token_id if config.pad_token_id is not None else _first(config.eos_token_id)
        self.collator = data_collator or DataCollator(pad)
        self.output_dir = Path(args.output_dir)

        world_batch = args.per_device_batch_size * self.ctx.world_size
        if len(train_dataset) < world_batch:
            raise ValueError(f"{describe_dataset(train_dataset)}, fewer than one batch of {world_batch} "
                             "(per_device_batch_size x processes)")
        self.micro_per_epoch = len(train_dataset) // world_batch
        steps_per_epoch = max(1, self.micro_per_epoch // args.gradient_accumulation_steps)
        self.total_steps = args.max_steps or max(1, math.ceil(args.num_epochs * steps_per_epoch))
        self.warmup_steps = args.warmup_steps or int(args.warmup_ratio * self.total_steps)
        self._warn_short_data(train_dataset, steps_per_epoch)
        # Fingerprint before sharding, while every parameter is whole on this rank.
        self.fingerprint = model_fingerprint(model)

        from decoderkit.training.lora import check_exportable, has_lora

        if has_lora(model) and args.save_final:
            # An adapter that cannot be saved must fail now, not after the training it would throw away.
            check_exportable(model)
        checkpointing = args.gradient_checkpointing
        if checkpointing is None:
            # A LoRA run stores no weight gradients, so the activations are most of its memory; recomputing them
            # costs about one more forward pass.
            checkpointing = has_lora(model)
        if checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        # The causal-LM loss alone, made in chunks: full-vocabulary logits for every position never exist at once.
        self.loss_only = self.head == "causal_lm" and "skip_logits" in inspect.signature(model.forward).parameters
        strategy = args.strategy if args.strategy != "auto" else ("ddp" if self.ctx.enabled else "none")
        self.strategy = strategy if self.ctx.enabled else "none"
        self.wrapped = wrap_model(self.model, self.strategy, self.ctx)
        self.use_bf16 = (args.bf16 if args.bf16 is not None else
                         self.ctx.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, self.warmup_steps, self.total_steps, args.min_lr_ratio))
        self.step = 0
        self.samples_seen = 0
        self.losses: list[float] = []
        self.eval_history: list[dict[str, float]] = []
        self._order: torch.Tensor | None = None
        self._order_epoch: int | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def _warn_short_data(self, dataset: Dataset, steps_per_epoch: int) -> None:
        """Warn when the data holds fewer optimizer steps than the run takes, so it is seen more than once."""
        args, W = self.args, self.ctx.world_size
        batch = f"batch size {args.per_device_batch_size}"
        if W > 1:
            batch += f" x {W} processes"
        if args.gradient_accumulation_steps > 1:
            batch += f" x {args.gradient_accumulation_steps} accumulation steps"
        if self.micro_per_epoch < args.gradient_accumulation_steps:
            logger.warning("%s = %d micro-batch(es) at %s: one optimizer step takes more than all of the data",
                           describe_dataset(dataset), self.micro_per_epoch, batch)
        elif args.max_steps is not None and args.max_steps > steps_per_epoch:
            logger.warning("%s = %d optimizer step%s at %s; asked for %d steps, so the data is repeated %.3g times",
                           describe_dataset(dataset), steps_per_epoch, "s" * (steps_per_epoch != 1), batch,
                           args.max_steps, args.max_steps / steps_per_epoch)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        from decoderkit.layers.quantized import check_trainable
        from decoderkit.training.lora import has_lora

        check_trainable(self.model, adapters=has_lora(self.model))
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        # Decay matrices only: decaying norm gains and biases toward 0 hurts and is not what the recipes do.
        decay = [p for _, p in trainable if p.dim() >= 2]
        no_decay = [p for _, p in trainable if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.args.learning_rate,
                                 betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon)

    # ------------------------------------------------------------------------------------------------ data
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        n = len(self.train_dataset)
        if not self.args.shuffle:
            return torch.arange(n)
        # A fresh generator per epoch: the order depends on (seed, epoch) only, so resuming needs no saved state.
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed * 100_003 + epoch))

    def _micro_batch(self, micro_index: int) -> dict[str, torch.Tensor]:
        """This rank's share of global micro-batch `micro_index` (counted from the start of training)."""
        B, W = self.args.per_device_batch_size, self.ctx.world_size
        epoch, within = divmod(micro_index, self.micro_per_epoch)
        if epoch != self._order_epoch or self._order is None:
            self._order, self._order_epoch = self._epoch_order(epoch), epoch
        start = within * B * W + self.ctx.rank * B
        indices = self._order[start:start + B].tolist()
        return self._to_device(self.collator([self.train_dataset[i] for i in indices]))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    def count_items(self, batch: Mapping[str, torch.Tensor]) -> int:
        """How many loss terms a batch contributes: target tokens for token-level heads, examples otherwise."""
        labels = batch.get("labels")
        if labels is None:
            return int(batch["input_ids"].shape[0])
        if self.head == "causal_lm":
            return int((labels[:, 1:] != IGNORE_INDEX).sum())
        if self.head == "token_classification":
            return int((labels != IGNORE_INDEX).sum())
        return int(labels.shape[0])

    # ------------------------------------------------------------------------------------------------ training
    def train(self) -> TrainOutput:
        """Run (or resume) training to `total_steps`; returns the losses and evaluations."""
        self._prepare_output_dir()
        args = self.args
        bar = None
        if args.progress and self.ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        self.wrapped.train()
        started = time.perf_counter()
        tokens_done = 0
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < self.total_steps:
            loss, tokens = self._train_step()
            tokens_done += tokens
            window_tokens += tokens
            self.step += 1
            self.losses.append(loss)
            elapsed = time.perf_counter() - window_start
            tok_s = window_tokens / elapsed if elapsed > 0 else 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.step % args.logging_steps == 0 or self.step == self.total_steps:
                self._log({"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                           "tokens_per_second": tok_s, "elapsed_s": time.perf_counter() - started})
                window_tokens, window_start = 0, time.perf_counter()
            if self.eval_dataset is not None and args.eval_steps and self.step % args.eval_steps == 0:
                self._record_eval()
            if args.save_steps and self.step % args.save_steps == 0:
                self.save_checkpoint()
            if self.callbacks and broadcast_object(any([bool(cb(self)) for cb in self.callbacks])):
                break
        if bar is not None:
            bar.close()
        if self.eval_dataset is not None and not (self.eval_history and self.eval_history[-1]["step"] == self.step):
            self._record_eval()
        runtime = time.perf_counter() - started
        if args.save_final:
            self.save_model(self.output_dir / "final")
        if args.plot and self.ctx.is_main:
            self.plot_losses(self.output_dir / "loss_curve.png")
        return TrainOutput(self.step, list(self.losses), list(self.eval_history), runtime,
                           tokens_done / runtime if runtime > 0 else 0.0)

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns (mean loss, tokens)."""
        args, W = self.args, self.ctx.world_size
        accum = args.gradient_accumulation_steps
        first = self.samples_seen // (args.per_device_batch_size * W)
        batches = [self._micro_batch(first + k) for k in range(accum)]
        items = [self.count_items(b) for b in batches]
        total_items = float(all_reduce_sum(torch.tensor(float(sum(items)), device=self.ctx.device)))
        if total_items == 0:
            raise ValueError(f"step {self.step + 1}: no example in the global batch has a target token "
                             "(all labels are -100)")
        loss_sum = torch.zeros((), device=self.ctx.device)
        tokens = 0
        for k, (batch, n) in enumerate(zip(batches, items)):
            with self._gradient_sync(k == accum - 1), self._autocast():
                out = self.wrapped(**batch, **self._loss_only_kwargs(n))
                # DDP and FSDP average gradients over ranks; scaling by W turns that into the sum over the global
                # batch, normalised by its item count, i.e. exactly the single-process loss.
                if n:
                    loss = out.loss * (n * W / total_items)
                else:
                    loss = out.loss if self.loss_only else _zero_loss(out)
            loss.backward()
            if n:
                loss_sum += out.loss.detach().float() * n
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        if args.max_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.samples_seen += accum * args.per_device_batch_size * W
        return float(all_reduce_sum(loss_sum)) / total_items, tokens * W

    def _loss_only_kwargs(self, items: int) -> dict[str, Any]:
        if not self.loss_only:
            return {}
        # A micro-batch without targets: its loss sum over 1 is an exact 0 that still runs backward (a mean is NaN).
        return {"skip_logits": True} if items else {"skip_logits": True, "num_items_in_batch": 1}

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        # Skipping the gradient all-reduce on all but the last micro-batch saves communication; the result is equal.
        if sync or self.strategy == "none":
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return self.wrapped.no_sync()
        return _fsdp_no_sync(self.model)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Loss (per target token or example), perplexity for language modelling, and accuracy, over `dataset`."""
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("no evaluation dataset")
        B = self.args.per_device_eval_batch_size or self.args.per_device_batch_size
        W, rank = self.ctx.world_size, self.ctx.rank
        batches = math.ceil(len(dataset) / (B * W))
        if self.args.max_eval_batches:
            batches = min(batches, self.args.max_eval_batches)
        was_training = self.wrapped.training
        self.wrapped.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)  # loss sum, items, correct, counted
        for g in range(batches):
            start = g * B * W + rank * B
            indices = list(range(start, min(start + B, len(dataset))))
            # Every rank runs the same number of forwards (FSDP gathers weights collectively); a rank past the end
            # of the data repeats example 0 and counts nothing.
            weight = 1.0 if indices else 0.0
            batch = self._to_device(self.collator([dataset[i] for i in (indices or [0])]))
            with self._autocast():
                out = self.wrapped(**batch)
            n = self.count_items(batch)
            if n:
                correct, counted = self._accuracy_counts(out, batch)
                totals += weight * torch.tensor([float(out.loss) * n, n, correct, counted], dtype=torch.float64,
                                                device=self.ctx.device)
        if was_training:
            self.wrapped.train()
        totals = all_reduce_sum(totals)
        loss = float(totals[0] / totals[1]) if totals[1] else float("nan")
        metrics = {"eval_loss": loss}
        if self.head == "causal_lm":
            metrics["eval_perplexity"] = math.exp(min(loss, 700.0))
        if totals[3]:
            metrics["eval_accuracy"] = float(totals[2] / totals[3])
        return metrics

    def _accuracy_counts(self, out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        if self.head == "question_answering":
            hit = (out["start_logits"].argmax(-1) == batch["start_positions"]) & (
                out["end_logits"].argmax(-1) == batch["end_positions"])
            return int(hit.sum()), hit.numel()
        labels = batch["labels"]
        if self.head == "causal_lm":
            pred, target = out["logits"][:, :-1].argmax(-1), labels[:, 1:]
        elif self.head == "token_classification":
            pred, target = out["logits"].argmax(-1), labels
        elif labels.dtype in (torch.long, torch.int) and labels.dim() == 1:
            pred, target = out["logits"].argmax(-1), labels
        else:  # regression or multi-label: accuracy is not defined the same way
            return 0, 0
        valid = target != IGNORE_INDEX
        return int(((pred == target) & valid).sum()), int(valid.sum())

    def _record_eval(self) -> None:
        metrics = {"step": self.step, **self.evaluate()}
        self.eval_history.append(metrics)
        self._log(metrics)

    def _log(self, record: dict[str, float]) -> None:
        if not self.ctx.is_main:
            return
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _prepare_output_dir(self) -> None:
        """Resume if asked; otherwise start in an empty output directory, or in one cleared of an earlier run's files
        when `overwrite_output_dir` is set. Anything else is refused, so a second run never silently mixes into (or
        replaces) the first one's checkpoints, model and log."""
        args = self.args
        if args.resume_from is not None:
            source = self._resolve_resume(args.resume_from)
            if source is not None:
                self.load_checkpoint(source)
                return
        if self.step > 0:  # train() again on this Trainer (or after load_checkpoint) continues its own run
            return
        check_output_dir(self.output_dir, overwrite=args.overwrite_output_dir, resume_from=args.resume_from)
        barrier()  # every rank has looked before rank 0 deletes anything
        if args.overwrite_output_dir and self.ctx.is_main:
            clear_run_outputs(self.output_dir)
        barrier()

    def _resolve_resume(self, resume_from: str) -> Path | None:
        if resume_from == "latest":
            found = list_checkpoints(self.output_dir)
            if not found:
                logger.info("resume_from='latest': no checkpoint in %s yet, starting from scratch", self.output_dir)
                return None
            return found[-1]
        path = Path(resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such checkpoint directory")
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE}); checkpoints are the "
                                    "checkpoint-<step> directories inside an output directory")
        return path

    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-<step>` atomically; every rank must call it. Returns the directory."""
        final = self.output_dir / f"checkpoint-{self.step}"
        staging = self.output_dir / f".checkpoint-{self.step}.tmp"
        model_state, optim_state = full_state_dicts(self.wrapped, self.optimizer)
        if self.ctx.is_main:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
            _save_tensors({k: v for k, v in model_state.items() if k not in frozen}, staging / "model.safetensors")
            torch.save(optim_state, staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
            state = {"step": self.step, "samples_seen": self.samples_seen, "total_steps": self.total_steps,
                     "world_size": self.ctx.world_size, "losses": self.losses, "eval_history": self.eval_history,
                     "fingerprint": self.fingerprint, "args": _jsonable(dataclasses.asdict(self.args))}
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
        barrier()
        torch.save(rng_state(), staging / f"rng_state_{self.ctx.rank}.pt")
        barrier()
        if self.ctx.is_main:
            _publish_dir(staging, final)
            self._prune_checkpoints()
        barrier()
        return final

    def _prune_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if limit is None:
            return
        for old in list_checkpoints(self.output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore weights, optimizer, scheduler, RNG and data position from a checkpoint directory.

        Raises ValueError, before changing anything, when the checkpoint was written for a different model or its RNG
        state is not plain tensors and numbers (it is read with `weights_only=True`, so a crafted file runs no code).
        """
        path = Path(path)
        state = json.loads((path / STATE_FILE).read_text())
        check_fingerprint(state.get("fingerprint", {}), self.fingerprint, path)
        rng_file = path / f"rng_state_{self.ctx.rank}.pt"
        same_world = state.get("world_size") == self.ctx.world_size and rng_file.exists()
        rng = load_rng_state(rng_file) if same_world else None
        from safetensors.torch import load_file

        model_state = load_file(path / "model.safetensors")
        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        load_full_state_dicts(self.wrapped, self.optimizer, model_state, optim_state)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.losses, self.eval_history = list(state["losses"]), list(state["eval_history"])
        if state.get("total_steps") != self.total_steps:
            logger.warning("%s was written for %s total steps, this run has %s: the learning-rate schedule differs",
                           path, state.get("total_steps"), self.total_steps)
        if rng is not None:
            set_rng_state(rng)
        else:
            # A different process count cannot continue the old random streams; derive fresh ones deterministically.
            _seed_everything(self.args.seed + 7919 * self.step + self.ctx.rank)
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------------ outputs
    def save_model(self, directory: str | os.PathLike) -> None:
        """Save the trained model as a Hugging Face directory (or, for a LoRA model, the PEFT adapter), with the
        tokenizer. Every rank must call it; rank 0 writes."""
        from decoderkit.training.lora import has_lora, save_adapter

        directory = Path(directory)
        if self.strategy == "none":
            model_state = None
        else:
            model_state, _ = full_state_dicts(self.wrapped, self.optimizer)
        if self.ctx.is_main:
            if has_lora(self.model):
                save_adapter(self.model, directory, state_dict=model_state)
            elif model_state is None:
                self.model.save_pretrained(directory)
            else:
                _unsharded_copy(self.model, model_state).save_pretrained(directory)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(directory)
        barrier()

    def plot_losses(self, file: str | os.PathLike) -> Path | None:
        """Training loss per step (and evaluation loss) as a PNG; needs matplotlib (the `plot` extra)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning("matplotlib is not installed (pip install 'decoderkit[plot]'): no loss curve written")
            return None
        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
        ax.plot(range(1, len(self.losses) + 1), self.losses, lw=0.8, alpha=0.5, label="train loss")
        if len(self.losses) >= 20:
            k = max(5, len(self.losses) // 50)
            smooth = np.convolve(self.losses, np.ones(k) / k, mode="valid")
            ax.plot(range(k, len(self.losses) + 1), smooth, lw=1.5, label=f"train loss ({k}-step mean)")
        if self.eval_history:
            ax.plot([e["step"] for e in self.eval_history], [e["eval_loss"] for e in self.eval_history], "o-",
                    label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(file)
        plt.close(fig)
        return file


# ---------------------------------------------------------------------------------------------------- helpers
def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a model for resuming: its type, head, trainable parameter shapes, and a digest of a sample of
    the frozen weights (so a LoRA run cannot resume on top of a different base checkpoint)."""
    config = getattr(model, "config", None)
    digest = hashlib.sha256()
    trainable: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable[name] = list(p.shape)
        else:
            sample = p.detach().reshape(-1)[:16].float().cpu().numpy()
            digest.update(name.encode() + sample.tobytes())
    return {"model_type": getattr(config, "model_type", type(model).__name__), "head": getattr(model, "head", None),
            "trainable": trainable, "frozen_digest": digest.hexdigest()}


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    """A ValueError naming the first difference between a checkpoint's model and this one."""
    for key in ("model_type", "head"):
        if saved.get(key) != current.get(key):
            raise ValueError(f"{where}: the checkpoint is from a different model ({key} {saved.get(key)!r}; this "
                             f"model has {current.get(key)!r}); refusing to resume")
    old, new = saved.get("trainable", {}), current["trainable"]
    for name in sorted(set(old) | set(new)):
        if name not in new or name not in old or list(old[name]) != list(new[name]):
            raise ValueError(f"{where}: the checkpoint is from a different model: parameter {name!r} is "
                             f"{old.get(name, 'absent')} there and {new.get(name, 'absent')} here; refusing to resume")
    if saved.get("frozen_digest") != current.get("frozen_digest"):
        raise ValueError(f"{where}: the checkpoint was trained on top of different frozen (base) weights; "
                         "refusing to resume")


def _save_tensors(state: Mapping[str, torch.Tensor], file: Path) -> None:
    seen: dict[tuple[int, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        # Tied weights are one tensor under two names; safetensors stores each storage once.
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.contiguous()
    save_safetensors(out, file)


def _publish_dir(staging: Path, final: Path) -> None:
    """Rename a finished directory into place; an older one of the same name is swapped out, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _zero_loss(out: Mapping[str, Any]) -> torch.Tensor:
    # A micro-batch without targets still runs backward so every rank joins the same gradient collectives.
    return sum(v.float().sum() for k, v in out.items() if k.endswith("logits") and torch.is_tensor(v)) * 0.0


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _unsharded_copy(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain CPU copy of a (sharded) model from its full state dict, to save with `save_pretrained`."""
    with torch.device("meta"):
        copy = type(model)(model.decoder_config)
    copy.load_state_dict(dict(state), strict=False, assign=True)
    copy.tie_weights()
    copy.model.rebuild_buffers("cpu")
    if hasattr(model, "generation_config"):
        copy.generation_config = model.generation_config
    return copy


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


__all__ = ["TrainOutput", "Trainer", "TrainingArguments", "list_checkpoints", "lr_lambda"]
