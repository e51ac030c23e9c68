"""Command line: `python -m decoderkit.training --model PATH_OR_CONFIG --data FILE... --out DIR [options]`.

`--model` is a Hugging Face model directory or a `.gguf` file (fine-tuning) or a `config.json` file (training from
scratch, with `--tokenizer`). With `--lora` the frozen base stays in the checkpoint's dtype (`--base-dtype`), or
packed with `--quantize int8|int4|gguf` (QLoRA-style), while the adapters train in float32, and activations are
recomputed in the backward pass unless `--no-gradient-checkpointing`. The task follows the data unless `--task`
names it: `.txt` files are packed for language modelling, JSONL with `messages` is chat (loss on assistant turns).
Run it under `torchrun --nproc_per_node N` for N processes (`--strategy ddp` or `fsdp`). The trained model (or,
with `--lora`, the PEFT adapter) lands in `OUT/final`, next to `log.jsonl`, `loss_curve.png` and the
`checkpoint-<step>` directories (`--resume latest` continues from the newest).
A non-empty `--out` is refused unless `--resume` continues the run in it or `--overwrite` deletes that run's files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
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


QUANTIZE_CHOICES = ("none", "int8", "int4", "gguf")
# The API names TrainingArguments and the trainer use in their messages, and the flags a user of this command typed.
FLAG_FOR_FIELD = {
    "max_steps": "--steps", "num_epochs": "--epochs", "per_device_batch_size": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum", "learning_rate": "--lr", "weight_decay": "--weight-decay",
    "warmup_steps": "--warmup-steps", "warmup_ratio": "--warmup-ratio", "min_lr_ratio": "--min-lr-ratio",
    "max_grad_norm": "--max-grad-norm", "logging_steps": "--logging-steps", "eval_steps": "--eval-steps",
    "max_eval_batches": "--max-eval-batches", "save_steps": "--save-steps", "save_total_limit": "--save-total-limit",
    "resume_from": "--resume", "overwrite_output_dir": "--overwrite", "output_dir": "--out",
    "block_size": "--block-size",
    "max_length": "--max-length", "num_labels": "--num-labels", "strategy": "--strategy",
    "per_device_eval_batch_size": "--batch-size",
}  # fmt: skip


def build_parser(prog: str = "python -m decoderkit.training") -> argparse.ArgumentParser:
    """The trainer's arguments; `prog` is the command the user typed (`decoderkit train` from the CLI).

    transformers' TrainingArguments names are accepted as second spellings (`--max-steps`, `--learning-rate`, and
    with underscores, `--max_steps`), so that a command copied from a transformers script works."""
    from decoderkit.cli.common import _Parser, non_negative_int, positive_float, positive_int
    from decoderkit.cli.threads import add_threads_arg

    def ratio(upper_open: bool) -> Any:
        def parse(text: str) -> float:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
            if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
                raise argparse.ArgumentTypeError(f"must be in [0, {'1)' if upper_open else '1]'}, got {text}")
            return value

        return parse

    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0].replace("`python -m decoderkit.training", f"`{prog}"),
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model directory or .gguf file, or a config.json to train from scratch")
    p.add_argument("--data", required=True, nargs="+", help="training files (.txt, .jsonl, .csv)")
    p.add_argument("--out", "--output-dir", required=True, help="output directory (checkpoints, logs, final model)")
    p.add_argument("--eval-data", nargs="+", help="evaluation files, same format as --data")
    p.add_argument("--task", default="auto", choices=("auto", *TASKS), help="what to train (auto: from the data)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--block-size", type=positive_int, default=512, help="tokens per packed block (plain text)")
    p.add_argument("--max-length", type=positive_int, help="truncate chat / labelled examples to this many tokens")
    p.add_argument("--num-labels", type=positive_int, help="classes of a classification head (default: the config's)")
    p.add_argument("--text-field", help="column with the text (classification tasks)")
    p.add_argument("--label-field", help="column with the label(s) (classification tasks)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks on errors")
    add_threads_arg(p)

    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", "--max-steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    t.add_argument("--epochs", "--num-train-epochs", type=positive_float, default=1.0,
                   help="passes over the training data")
    t.add_argument("--batch-size", "--per-device-train-batch-size", type=positive_int, default=8,
                   help="examples per process per micro-batch")
    t.add_argument("--grad-accum", "--gradient-accumulation-steps", type=positive_int, default=1,
                   help="micro-batches per optimizer step")
    t.add_argument("--lr", "--learning-rate", type=positive_float, default=3e-4, help="peak learning rate (AdamW)")
    t.add_argument("--weight-decay", type=ratio(False), default=0.01, help="AdamW weight decay")
    t.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warm-up steps")
    t.add_argument("--warmup-ratio", type=ratio(True), default=0.0,
                   help="linear warm-up as a fraction of the steps (when --warmup-steps is 0)")
    t.add_argument("--min-lr-ratio", type=ratio(False), default=0.0, help="cosine decays to this fraction of --lr")
    t.add_argument("--max-grad-norm", type=_non_negative_float, default=1.0,
                   help="clip gradients to this norm (0: off)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where CUDA supports it)")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (default: on with --lora)")
    t.add_argument("--seed", type=non_negative_int, default=0, help="random seed (data order, dropout, init)")

    r = p.add_argument_group("evaluation, checkpoints, output")
    r.add_argument("--eval-steps", type=positive_int, help="evaluate every N steps (default: at the end only)")
    r.add_argument("--max-eval-batches", type=positive_int, help="evaluate on at most N batches")
    r.add_argument("--save-steps", type=positive_int, help="write a checkpoint every N steps (default: none)")
    r.add_argument("--save-total-limit", type=non_negative_int, default=2,
                   help="checkpoints kept (older ones deleted; 0 keeps all)")
    r.add_argument("--logging-steps", type=positive_int, default=10, help="log the loss every N steps")
    r.add_argument("--resume", "--resume-from-checkpoint", help="'latest' or a checkpoint directory")
    r.add_argument("--overwrite", "--overwrite-output-dir", action="store_true",
                   help="start over in a non-empty output directory (an earlier run's files there are deleted first)")
    r.add_argument("--strategy", default="auto", choices=("auto", *STRATEGIES),
                   help="multi-process strategy under torchrun (auto: ddp)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-plot", action="store_true", help="do not draw loss_curve.png")

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the whole model")
    lora.add_argument("--lora-r", type=positive_int, default=8, help="adapter rank")
    lora.add_argument("--lora-alpha", type=positive_float, default=16.0, help="adapter scale numerator (alpha / r)")
    lora.add_argument("--lora-dropout", type=ratio(True), default=0.0, help="dropout on the adapters' input")
    lora.add_argument("--lora-targets", default="q_proj,v_proj",
                      help="comma-separated module names, or 'all-linear'")
    lora.add_argument("--merge", action="store_true", help="also save the merged model to OUT/merged")
    lora.add_argument("--base-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                      help="dtype of the frozen base weights (auto: the checkpoint's; a GGUF's quantized weights "
                           "become bfloat16); the adapters train in float32 whatever it is")
    lora.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                      help="keep the frozen base packed under the adapters (QLoRA-style, CPU): int8 / int4 "
                           "quantize it on load, gguf keeps a GGUF file's own quantized blocks; none (the default): "
                           "a float base")
    return p


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def in_flag_terms(message: str) -> str:
    """`message` with the API's field names replaced by this command's flags."""
    return re.sub(r"\b(" + "|".join(FLAG_FOR_FIELD) + r")\b", lambda m: FLAG_FOR_FIELD[m.group(1)], message)


def load_model(source: str, head: str, num_labels: int | None, dtype: Any = torch.float32,
               quantize: str = "none") -> Any:
    """The model to train: from a directory or `.gguf` file in `dtype` ("auto": the checkpoint's), or randomly
    initialised in float32 from a config.json. `quantize` (`QUANTIZE_CHOICES`) packs the base (LoRA runs)."""
    from decoderkit.model import HEAD_CLASSES

    cls = HEAD_CLASSES[head]
    overrides = {"num_labels": num_labels} if num_labels is not None else {}
    path = Path(source)
    is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
    if quantize == "gguf" and not is_gguf:
        raise ValueError(f"--quantize gguf keeps a GGUF file's quantized blocks; {path} is not a .gguf file (use "
                         "--quantize int8 or int4)")
    if is_gguf:
        # A float base unless asked otherwise; None keeps the file's own blocks packed
        return cls.from_pretrained(path, dtype=dtype, quantization=None if quantize == "gguf" else quantize,
                                   **overrides)
    if path.is_file():
        if quantize != "none":
            raise ValueError(f"--quantize {quantize} packs a pretrained base; {path} is a config.json (a model "
                             "trained from scratch trains every weight)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        return cls.from_config({**config, **overrides}, dtype=torch.float32)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory or config file")
    return cls.from_pretrained(path, dtype=dtype, quantization=None if quantize == "none" else quantize, **overrides)


def base_dtype(args: argparse.Namespace, is_gguf: bool) -> Any:
    """Full fine-tuning keeps float32 weights (the optimizer updates them); LoRA freezes the base, so it stays in
    the checkpoint's dtype, and a GGUF (quantized, so of no dtype of its own) is dequantized to bfloat16."""
    if not args.lora:
        if args.base_dtype != "auto":
            raise ValueError("--base-dtype applies to --lora runs; full fine-tuning trains float32 weights")
        if args.quantize != "none":
            raise ValueError(f"--quantize {args.quantize} applies to --lora runs (adapters over a frozen packed "
                             "base); full fine-tuning trains float weights: drop --quantize, or add --lora")
        return torch.float32
    if args.quantize != "none" and args.merge:
        raise ValueError(f"--merge folds the adapters into float weights; with --quantize {args.quantize} the base "
                         "is packed: drop --merge and merge the saved adapter into the float model with "
                         "`decoderkit merge`")
    if args.base_dtype == "auto":
        # a packed GGUF base: the loader's activation dtype (float32 where decoderkit's kernel runs)
        return "auto" if not is_gguf or args.quantize == "gguf" else torch.bfloat16
    return getattr(torch, args.base_dtype)


def main(argv: list[str] | None = None, prog: str = "python -m decoderkit.training") -> int:
    """Train; exit status 0 on success, 1 on an error (one line on stderr, the traceback with --verbose), 2 on a
    usage error, 130 on Ctrl-C."""
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from decoderkit.cli.threads import configure_threads

        configure_threads(args.threads)
        return run(args)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the boundary where any failure becomes one line
        from decoderkit.cli.common import _describe

        if args.verbose:
            traceback.print_exc()
        expected = isinstance(err, (ValueError, OSError))
        hint = "" if args.verbose or expected else " (run with --verbose for details)"
        print(f"{prog}: error: {in_flag_terms(_describe(err))}{hint}", file=sys.stderr)
        return 1


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
    model = load_model(args.model, head, args.num_labels, base_dtype(args, is_gguf), args.quantize)
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
