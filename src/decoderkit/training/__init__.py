"""Fine-tuning and pretraining: the `Trainer`, data loaders, LoRA adapters and multi-process training.

    from decoderkit.training import Trainer, TrainingArguments, load_text_dataset
    trainer = Trainer(model, TrainingArguments(output_dir="runs/x", max_steps=100), load_text_dataset(files, tok, 256))
    trainer.train()

Command line: `python -m decoderkit.training --model DIR --data FILE --out DIR [--lora]` (see `--help`).
"""

from decoderkit.training.data import (
    IGNORE_INDEX,
    TASKS,
    DataCollator,
    ExampleDataset,
    PackedDataset,
    load_chat_dataset,
    load_classification_dataset,
    load_dataset,
    load_qa_dataset,
    load_text_dataset,
    load_token_classification_dataset,
    pack_token_ids,
)
from decoderkit.training.lora import (
    LoraConfig,
    LoraLinear,
    QuantizedLora,
    apply_lora,
    has_lora,
    load_adapter,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from decoderkit.training.trainer import Trainer, TrainingArguments, TrainOutput, list_checkpoints

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "DataCollator",
    "ExampleDataset",
    "LoraConfig",
    "LoraLinear",
    "PackedDataset",
    "QuantizedLora",
    "TrainOutput",
    "Trainer",
    "TrainingArguments",
    "apply_lora",
    "has_lora",
    "list_checkpoints",
    "load_adapter",
    "load_chat_dataset",
    "load_classification_dataset",
    "load_dataset",
    "load_qa_dataset",
    "load_text_dataset",
    "load_token_classification_dataset",
    "merge_and_unload",
    "merge_lora",
    "pack_token_ids",
    "save_adapter",
    "unmerge_lora",
]
