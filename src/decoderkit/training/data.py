"""Training data: packed plain text, chat conversations, and labelled examples for the task heads.

Every loader reads its files up front and raises at the boundary: a missing or empty file, a record without the
expected fields (with its line number) or a label outside `num_labels` is reported before any training starts, so a
bad file can never leave a run (or its checkpoints) half-done.

Examples are dicts of plain lists (`input_ids`, `labels`, ...); `DataCollator` pads a list of them into a batch.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100
TASKS = ("causal_lm", "chat", "sequence_classification", "token_classification", "question_answering")

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------- reading files
def check_data_file(path: PathLike) -> Path:
    """The path of an existing, non-empty data file; FileNotFoundError / ValueError otherwise."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file}: no such data file")
    if not file.is_file():
        raise ValueError(f"{file}: is a directory, not a data file")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text (byte offset {err.start}: {data[err.start:err.start + 1]!r}); "
                         "re-encode it as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{file}: the data file is empty")
    return file


def read_records(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each record of a JSONL or CSV file; line numbers count from 1 as editors do."""
    file = check_data_file(path)
    if file.suffix.lower() == ".csv":
        with open(file, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            # The header is line 1; DictReader.line_num is the line the record ended on (multi-line fields).
            for row in reader:
                yield reader.line_num, dict(row)
        return
    with open(file, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{line_no}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{file}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def _field(record: Mapping[str, Any], name: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r} (the record has {sorted(record)})")
    value = record[name]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {name!r} must be a {names}, got {type(value).__name__}")
    return value


def encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` without special tokens, from a decoderkit Tokenizer or a bare `tokenizers.Tokenizer`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids.ids) if hasattr(ids, "ids") else list(ids)


def _special_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, f"{name}_token_id", None)
    return value if isinstance(value, int) else None


# ---------------------------------------------------------------------------------------------------- datasets
class ExampleDataset(Dataset):
    """A list of tokenized examples (dicts of lists or ints), padded into batches by `DataCollator`."""

    source: str | None = None  # the files it was read from, for messages

    def __init__(self, examples: Sequence[dict[str, Any]], task: str) -> None:
        self.examples = list(examples)
        self.task = task

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class PackedDataset(Dataset):
    """Fixed-length blocks cut from one long token stream; every position is a training target."""

    task = "causal_lm"
    source: str | None = None  # the files it was read from, for messages

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"blocks must have shape (num_blocks, block_size), got {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def pack_token_ids(documents: Iterable[Sequence[int]], block_size: int, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> torch.Tensor:
    """Concatenate documents (each framed by bos/eos when given) and cut the stream into (N, block_size) blocks.

    The tail shorter than a block is dropped: padding it would spend compute on nothing.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one input and one target), got {block_size}")
    stream: list[int] = []
    for doc in documents:
        if bos_token_id is not None:
            stream.append(bos_token_id)
        stream.extend(doc)
        if eos_token_id is not None:
            stream.append(eos_token_id)
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"the text holds {len(stream)} tokens, fewer than one block of block_size={block_size}")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def load_text_dataset(paths: PathLike | Sequence[PathLike], tokenizer: Any, block_size: int) -> PackedDataset:
    """Plain-text files (one document each) tokenized and packed into blocks of `block_size` tokens."""
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not files:
        raise ValueError("no data files given")
    docs = [encode(tokenizer, check_data_file(f).read_text(encoding="utf-8")) for f in files]
    return PackedDataset(pack_token_ids(docs, block_size, _special_id(tokenizer, "bos"),
                                        _special_id(tokenizer, "eos")))


# ---------------------------------------------------------------------------------------------------- chat
def render_chat_example(tokenizer: Any, messages: list[dict[str, Any]], where: str = "conversation",
                        max_length: int | None = None) -> dict[str, list[int]]:
    """Tokenize a conversation with the chat template; labels are -100 except on assistant turns.

    Each assistant turn is located by rendering the conversation up to it twice, with the generation prompt (what the
    model sees when asked to answer) and with the turn itself: the difference is exactly what the model must produce,
    end-of-turn marker included. Segments are tokenized separately so the prompt splits into tokens the way it does at
    inference time, when the answer does not exist yet. Works with any template, no `{% generation %}` markers needed.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant message, so nothing to learn from")

    def render(msgs: list[dict[str, Any]], prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages, False)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= done):
            raise ValueError(f"{where}: the chat template does not render the conversation as a growing prefix "
                             f"(it rewrites earlier turns), so assistant turn {i} cannot be located")
        segments += [(full[done:len(prompt)], False), (full[len(prompt):len(upto)], True)]
        done = len(upto)
    segments.append((full[done:], False))
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        ids = encode(tokenizer, text) if text else []
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def load_chat_dataset(path: PathLike, tokenizer: Any, max_length: int | None = None) -> ExampleDataset:
    """JSONL of `{"messages": [{"role": ..., "content": ...}, ...]}`; the loss covers assistant turns only."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; chat data needs one (tokenizer_config.json "
                         "'chat_template')")
    examples = []
    for line_no, record in read_records(path):
        where = f"{path}:{line_no}"
        messages = _field(record, "messages", where, list)
        example = render_chat_example(tokenizer, messages, where, max_length)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            raise ValueError(f"{where}: after truncation to max_length={max_length} no assistant token is left")
        examples.append(example)
    return ExampleDataset(examples, "chat")


# ---------------------------------------------------------------------------------------------------- task heads
def _label(value: Any, num_labels: int, label_names: Sequence[str] | None, where: str) -> int:
    if isinstance(value, str):
        if label_names is not None and value in label_names:
            return list(label_names).index(value)
        try:
            value = int(value)
        except ValueError:
            hint = f"; known names: {list(label_names)}" if label_names else " (pass label_names to use names)"
            raise ValueError(f"{where}: label {value!r} is not an integer{hint}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: label {value!r} must be an integer class index")
    if not 0 <= value < num_labels:
        raise ValueError(f"{where}: label {value} is outside [0, {num_labels - 1}] (num_labels={num_labels})")
    return value


def load_classification_dataset(path: PathLike, tokenizer: Any, num_labels: int, max_length: int | None = None,
                                text_field: str = "text", label_field: str = "label",
                                label_names: Sequence[str] | None = None) -> ExampleDataset:
    """JSONL / CSV with a text and an integer (or named) label per record, for sequence classification.

    The model scores the last non-padding token, so no EOS is appended: the text's own last token carries the label.
    """
    examples = []
    for line_no, record in read_records(path):
        where = f"{path}:{line_no}"
        text = _field(record, text_field, where, str)
        label = _label(_field(record, label_field, where), num_labels, label_names, where)
        ids = _with_bos(tokenizer, encode(tokenizer, text))[:max_length]
        if not ids:
            raise ValueError(f"{where}: field {text_field!r} is empty")
        examples.append({"input_ids": ids, "labels": label})
    return ExampleDataset(examples, "sequence_classification")


def load_token_classification_dataset(path: PathLike, tokenizer: Any, num_labels: int, max_length: int | None = None,
                                      text_field: str = "tokens", label_field: str = "labels",
                                      label_names: Sequence[str] | None = None) -> ExampleDataset:
    """JSONL / CSV with words and one label per word, for token classification.

    `text_field` holds a list of words (or a string split on whitespace; CSV labels are space-separated). As in
    transformers' recipes, a word's first token carries its label and its other tokens are -100.
    """
    examples = []
    for line_no, record in read_records(path):
        where = f"{path}:{line_no}"
        words = _field(record, text_field, where, (str, list))
        words = words.split() if isinstance(words, str) else words
        tags = _field(record, label_field, where, (str, list))
        tags = tags.split() if isinstance(tags, str) else tags
        if len(words) != len(tags):
            raise ValueError(f"{where}: {len(words)} words but {len(tags)} labels; give one label per word")
        if not words:
            raise ValueError(f"{where}: no words")
        ids: list[int] = []
        labels: list[int] = []
        if _special_id(tokenizer, "bos") is not None:
            ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
        for k, (word, tag) in enumerate(zip(words, tags)):
            if not isinstance(word, str):
                raise ValueError(f"{where}: word {k} must be a string, got {type(word).__name__}")
            label = _label(tag, num_labels, label_names, f"{where}: word {k}")
            # Words after the first carry their leading space, as they would inside running text.
            word_ids = encode(tokenizer, word if k == 0 else " " + word)
            ids += word_ids
            labels += [label] + [IGNORE_INDEX] * (len(word_ids) - 1)
        examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return ExampleDataset(examples, "token_classification")


def load_qa_dataset(path: PathLike, tokenizer: Any, max_length: int | None = None) -> ExampleDataset:
    """JSONL / CSV of `question`, `context`, `answer` (text found in the context; `answer_start`, a character offset
    into the context, picks one occurrence), for extractive question answering.

    The input is "question\\ncontext"; start/end positions are the answer's first and last token. The context is
    tokenized in three pieces (before, answer, after) so the answer's boundaries are token boundaries.
    """
    examples = []
    for line_no, record in read_records(path):
        where = f"{path}:{line_no}"
        question = _field(record, "question", where, str)
        context = _field(record, "context", where, str)
        answer = _field(record, "answer", where, str)
        if not answer:
            raise ValueError(f"{where}: field 'answer' is empty")
        start = record.get("answer_start")
        if start in (None, ""):
            start = context.find(answer)
            if start < 0:
                raise ValueError(f"{where}: the answer {answer!r} does not occur in the context")
        else:
            start = int(start)
            if context[start:start + len(answer)] != answer:
                raise ValueError(f"{where}: answer_start={start} does not point at the answer {answer!r} in the "
                                 f"context (found {context[start:start + len(answer)]!r})")
        prefix = _with_bos(tokenizer, encode(tokenizer, question + "\n" + context[:start]))
        answer_ids = encode(tokenizer, answer)
        ids = prefix + answer_ids + encode(tokenizer, context[start + len(answer):])
        first, last = len(prefix), len(prefix) + len(answer_ids) - 1
        if max_length is not None and last >= max_length:
            raise ValueError(f"{where}: the answer ends at token {last}, beyond max_length={max_length}")
        examples.append({"input_ids": ids[:max_length], "start_positions": first, "end_positions": last})
    return ExampleDataset(examples, "question_answering")


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = _special_id(tokenizer, "bos")
    return ([bos] + ids) if bos is not None else ids


def detect_task(path: PathLike) -> str:
    """'causal_lm' for plain text, 'chat' for JSONL whose first record has `messages`; else a ValueError."""
    file = check_data_file(path)
    if file.suffix.lower() in (".jsonl", ".json"):
        for _, record in read_records(file):
            if "messages" in record:
                return "chat"
            break
        raise ValueError(f"{file}: JSONL without 'messages'; pass the task (sequence_classification, "
                         "token_classification or question_answering) explicitly")
    if file.suffix.lower() == ".csv":
        raise ValueError(f"{file}: CSV data needs the task named explicitly (sequence_classification, "
                         "token_classification or question_answering)")
    return "causal_lm"


def load_dataset(task: str, paths: PathLike | Sequence[PathLike], tokenizer: Any, *, block_size: int = 512,
                 max_length: int | None = None, num_labels: int = 2, **fields: Any) -> Dataset:
    """Dispatch to the loader of `task` (one of `TASKS`). The dataset's `source` names the files, for messages."""
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {TASKS}")
    if task != "causal_lm" and len(files) != 1:
        raise ValueError(f"task {task!r} reads one JSONL/CSV file, got {len(files)}")
    if task == "causal_lm":
        dataset: Dataset = load_text_dataset(files, tokenizer, block_size)
    elif task == "chat":
        dataset = load_chat_dataset(files[0], tokenizer, max_length)
    elif task == "sequence_classification":
        dataset = load_classification_dataset(files[0], tokenizer, num_labels, max_length, **fields)
    elif task == "token_classification":
        dataset = load_token_classification_dataset(files[0], tokenizer, num_labels, max_length, **fields)
    else:
        dataset = load_qa_dataset(files[0], tokenizer, max_length)
    dataset.source = ", ".join(Path(f).name for f in files)
    return dataset


def describe_dataset(dataset: Dataset) -> str:
    """'corpus.txt gives 3 blocks of 512 tokens' (or 'the training data has 40 examples' without a `source`)."""
    blocks = getattr(dataset, "blocks", None)
    n = len(dataset)
    what = f"{n} block{'s' * (n != 1)} of {blocks.shape[1]} tokens" if blocks is not None else \
        f"{n} example{'s' * (n != 1)}"
    source = getattr(dataset, "source", None)
    return f"{source} gives {what}" if source else f"the training data has {what}"


# ---------------------------------------------------------------------------------------------------- batching
class DataCollator:
    """Pads examples to the longest in the batch: input ids with `pad_token_id`, labels with -100, and an
    `attention_mask` marking the real tokens. Scalar fields (class labels, answer positions) are stacked."""

    def __init__(self, pad_token_id: int | None = 0, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(e["input_ids"]) for e in examples]
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if all(n == T for n in lengths):
            batch = {"input_ids": torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])}
        else:
            ids = torch.full((len(examples), T), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(examples), T, dtype=torch.long)
            for i, e in enumerate(examples):
                ids[i, : lengths[i]] = torch.as_tensor(e["input_ids"])
                mask[i, : lengths[i]] = 1
            batch = {"input_ids": ids, "attention_mask": mask}
        for key in examples[0]:
            if key == "input_ids":
                continue
            values = [e[key] for e in examples]
            if isinstance(values[0], (int, float)) or (torch.is_tensor(values[0]) and values[0].dim() == 0):
                batch[key] = torch.tensor(values)
            else:
                out = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
                for i, v in enumerate(values):
                    out[i, : len(v)] = torch.as_tensor(v)
                batch[key] = out
        return batch
