"""Command line: `python -m decoderkit.training --model PATH_OR_CONFIG --data FILE... --out DIR [options]`.

`--model` is a Hugging Face model directory or a `.gguf` file (fine-tuning) or a `config.json` file (training from
scratch, with `--tokenizer`). With `--lora` the frozen base stays in the checkpoint's dtype (`--base-dtype`) while
the adapters train in float32, and activations are recomputed in the backward pass unless
`--no-gradient-checkpointing`. The task follows the data unless `--task` names it: `.txt` files are packed for
language modelling, JSONL with `messages` is chat (loss on assistant turns). Run it under
`torchrun --nproc_per_node N` for N processes (`--strategy ddp` or `fsdp`). The trained model (or, with `--lora`,
the PEFT adapter) lands in `OUT/final`, next to `log.jsonl`, `loss_curve.png` and the `checkpoint-<step>`
directories (`--resume latest` continues from the newest).
A non-empty `--out` is refused unless `--resume` continues the run in it or `--overwrite` deletes that run's files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from decoderkit.training.data import TASKS, detect_task, load_dataset
from decoderkit.training.distributed import STRATEGIES
from decoderkit.training.output_dir import check_output_dir
from decoderkit.training.trainer import Trainer, TrainingArguments

HEAD_FOR_TASK = {"causal_lm": "causal_lm", "chat": "causal_lm", "sequence_classification": "sequence_classification",
                 "token_classification": "token_classification", "question_answering": "question_answering"}
HEAD_MODULES = {"sequence_classification": ["score"], "token_classification": ["score"],
                "question_answering": ["qa_outputs"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m decoderkit.training", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model directory or .gguf file, or a config.json to train from scratch")
    p.add_argument("--data", required=True, nargs="+", help="training files (.txt, .jsonl, .csv)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, logs, final model)")
    p.add_argument("--eval-data", nargs="+", help="evaluation files, same format as --data")
    p.add_argument("--task", default="auto", choices=("auto", *TASKS))
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--block-size", type=int, default=512, help="tokens per packed block (plain text)")
    p.add_argument("--max-length", type=int, help="truncate chat / labelled examples to this many tokens")
    p.add_argument("--num-labels", type=int, help="classes of a classification head (default: the config's)")
    p.add_argument("--text-field", help="column with the text (classification tasks)")
    p.add_argument("--label-field", help="column with the label(s) (classification tasks)")

    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=8, help="examples per process per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--warmup-ratio", type=float, default=0.0)
    t.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to this fraction of --lr")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: off)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where CUDA supports it)")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (default: on with --lora)")
    t.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("evaluation, checkpoints, output")
    r.add_argument("--eval-steps", type=int)
    r.add_argument("--max-eval-batches", type=int)
    r.add_argument("--save-steps", type=int)
    r.add_argument("--save-total-limit", type=int, default=2)
    r.add_argument("--logging-steps", type=int, default=10)
    r.add_argument("--resume", help="'latest' or a checkpoint directory")
    r.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty output directory (an earlier run's files there are deleted first)")
    r.add_argument("--strategy", default="auto", choices=("auto", *STRATEGIES),
                   help="multi-process strategy under torchrun (auto: ddp)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--no-plot", action="store_true")

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the whole model")
    lora.add_argument("--lora-r", type=int, default=8)
    lora.add_argument("--lora-alpha", type=float, default=16.0)
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--lora-targets", default="q_proj,v_proj",
                      help="comma-separated module names, or 'all-linear'")
    lora.add_argument("--merge", action="store_true", help="also save the merged model to OUT/merged")
    lora.add_argument("--base-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                      help="dtype of the frozen base weights (auto: the checkpoint's; a GGUF's quantized weights "
                           "become bfloat16); the adapters train in float32 whatever it is")
    return p


def load_model(source: str, head: str, num_labels: int | None, dtype: Any = torch.float32) -> Any:
    """The model to train: from a directory or `.gguf` file in `dtype` ("auto": the checkpoint's), or randomly
    initialised in float32 from a config.json."""
    from decoderkit.model import HEAD_CLASSES

    cls = HEAD_CLASSES[head]
    overrides = {"num_labels": num_labels} if num_labels is not None else {}
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        # Training updates float weights (or float adapters over a frozen float base): the packed form is for inference
        return cls.from_pretrained(path, dtype=dtype, quantization="none", **overrides)
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        return cls.from_config({**config, **overrides}, dtype=torch.float32)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory or config file")
    return cls.from_pretrained(path, dtype=dtype, **overrides)


def base_dtype(args: argparse.Namespace, is_gguf: bool) -> Any:
    """Full fine-tuning keeps float32 weights (the optimizer updates them); LoRA freezes the base, so it stays in
    the checkpoint's dtype, and a GGUF (quantized, so of no dtype of its own) is dequantized to bfloat16."""
    if not args.lora:
        if args.base_dtype != "auto":
            raise ValueError("--base-dtype applies to --lora runs; full fine-tuning trains float32 weights")
        return torch.float32
    if args.base_dtype == "auto":
        return torch.bfloat16 if is_gguf else "auto"
    return getattr(torch, args.base_dtype)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from decoderkit.tokenizer import AutoTokenizer

    # Before anything slow: a second run must not silently replace the first one's adapter and append to its log.
    check_output_dir(args.out, overwrite=args.overwrite, resume_from=args.resume, overwrite_flag="--overwrite",
                     resume_flag="--resume latest")
    task = detect_task(args.data[0]) if args.task == "auto" else args.task
    head = HEAD_FOR_TASK[task]
    model_path = Path(args.model)
    is_gguf = model_path.is_file() and model_path.suffix.lower() == ".gguf"
    tokenizer_dir = args.tokenizer or (args.model if model_path.is_dir() or is_gguf else None)
    if tokenizer_dir is None:
        raise ValueError("--model is a config file: pass --tokenizer DIR")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    torch.manual_seed(args.seed)
    model = load_model(args.model, head, args.num_labels, base_dtype(args, is_gguf))
    fields = {k: v for k, v in (("text_field", args.text_field), ("label_field", args.label_field)) if v}
    data_kwargs = dict(block_size=args.block_size, max_length=args.max_length, num_labels=model.config.num_labels,
                       **fields)
    train = load_dataset(task, args.data, tokenizer, **data_kwargs)
    evaluation = load_dataset(task, args.eval_data, tokenizer, **data_kwargs) if args.eval_data else None
    if head == "sequence_classification" and model.config.pad_token_id is None:
        # The head finds each sequence's last token by the pad id; batches larger than one need it.
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id

    if args.lora:
        from decoderkit.training.lora import LoraConfig, apply_lora

        targets = args.lora_targets if args.lora_targets == "all-linear" else [
            t.strip() for t in args.lora_targets.split(",") if t.strip()]
        apply_lora(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                     target_modules=targets, modules_to_save=HEAD_MODULES.get(head)))
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, num_epochs=args.epochs, per_device_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio,
        max_grad_norm=args.max_grad_norm or None, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
        max_eval_batches=args.max_eval_batches, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        resume_from=args.resume, overwrite_output_dir=args.overwrite, strategy=args.strategy,
        progress=not args.no_progress, plot=not args.no_plot,
    )
    trainer = Trainer(model, training, train, eval_dataset=evaluation, tokenizer=tokenizer)
    result = trainer.train()
    if args.lora and args.merge:
        from decoderkit.training.lora import merge_and_unload

        if trainer.strategy != "none":
            raise ValueError("--merge is supported in single-process runs; merge the saved adapter afterwards")
        merge_and_unload(model).save_pretrained(Path(args.out) / "merged")
        tokenizer.save_pretrained(Path(args.out) / "merged")
    if trainer.ctx.is_main:
        summary = {"steps": result.global_step, "final_loss": result.final_loss,
                   "runtime_s": round(result.runtime_s, 2), "tokens_per_second": round(result.tokens_per_second, 1),
                   **(result.eval_history[-1] if result.eval_history else {})}
        print(json.dumps(summary))
    from decoderkit.training.distributed import shutdown_distributed

    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
