"""Single-process PEFT, the oracle of swarm fine-tuning: the same LoRA config, start, data and optimizer.

It is built from transformers, peft and torch alone: nothing from tsotsa is imported and none of its
functions is copied. Tokenization, the data order and A's start are written here from the rules
docs/training.md states ("Data", "Aggregation"), so a bug in the product's own helpers shows as a mismatch
instead of being shared by the swarm and its reference.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer, LlamaForCausalLM, get_cosine_schedule_with_warmup

IGNORE_INDEX = -100  # the label transformers' loss skips

COLORS = {"apple": "red", "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
          "plum": "purple", "carrot": "orange", "rose": "pink", "soil": "brown", "ash": "grey", "sea": "blue",
          "leaf": "green", "milk": "white", "night": "black", "lemon": "yellow"}


def write_color_task(path: Path, repeat: int = 1) -> Path:
    """A small task a tiny random model learns in a few steps: the color of a thing, loss on the color only."""
    rows = [{"prompt": f"the color of {thing} is", "completion": f" {color}"} for thing, color in COLORS.items()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows * repeat))
    return path


def peft_model(base_dir: Path, *, r: int, alpha: float, dropout: float, target_modules: tuple[str, ...],
               seed: int) -> PeftModel:
    """The base with LoRA at the run's start: B zero (PEFT's), each A PEFT's own init drawn from a generator
    seeded by the run's seed and A's saved name; A frozen, as in the swarm."""
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    for name, parameter in model.named_parameters():
        key = name.replace(".default", "")  # the name PEFT saves it under
        if ".lora_A." in key:
            digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            with torch.no_grad():
                torch.nn.init.kaiming_uniform_(parameter, a=math.sqrt(5), generator=generator)
        parameter.requires_grad_(".lora_B." in key)
    return model


# Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca, train.py), the rule docs/training.md states.
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_WITHOUT_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def examples(data: Path, tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: EOS appended; a prompt row learns only its completion, which is
    tokenized without BOS; a text row learns every token; an Alpaca row is a prompt row of Alpaca's prompt
    and its output; a chat row (OpenAI "messages" or ShareGPT "conversations") is `chat_tokens`."""
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    eos = [tokenizer.eos_token_id]
    out = []
    for row in rows:
        if "messages" in row or "conversations" in row:
            turns = row.get("messages") or [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}
                                            for turn in row["conversations"]]
            out.append(chat_tokens(turns, tokenizer))
            continue
        if "instruction" in row:
            template = ALPACA_WITH_INPUT if row.get("input") else ALPACA_WITHOUT_INPUT
            row = {"prompt": template.format(**{"input": "", **row}), "completion": row["output"]}
        if "text" in row:
            ids = tokenizer(row["text"]).input_ids + eos
            out.append((ids, ids))
        else:
            prompt = tokenizer(row["prompt"]).input_ids
            completion = tokenizer(row["completion"], add_special_tokens=False).input_ids + eos
            out.append((prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    assert all(len(ids) <= seq_len for ids, _ in out)
    return out


def chat_tokens(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """A conversation under Llama-2-chat's template, found by characters rather than by rendering prefixes:
    the template's text of the whole conversation, tokenized with offsets; the labels are the tokens that lie
    in the text the template writes for an assistant turn, " " + content.strip() + " " + EOS."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for message in messages:
        if message["role"] == "assistant":
            piece = f" {message['content'].strip()} {tokenizer.eos_token}"
            start = text.index(piece, cursor)
            spans.append((start, start + len(piece)))
            cursor = start + len(piece)
    labels = []
    for token, (first, last) in zip(encoded.input_ids, encoded.offset_mapping):
        inside = any(start <= first and last <= end for start, end in spans)
        assert inside or not any(first < end and start < last for start, end in spans), "a token straddles a turn"
        labels.append(token if inside else IGNORE_INDEX)
    return list(encoded.input_ids), labels


def batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention mask and labels (padding ignored by the loss)."""
    def padded(sequences, value):
        return pad_sequence([torch.tensor(s, dtype=torch.int64) for s in sequences], batch_first=True,
                            padding_value=value)
    return (padded([ids for ids, _ in rows], pad_id), padded([[1] * len(ids) for ids, _ in rows], 0),
            padded([labels for _, labels in rows], IGNORE_INDEX))


def stream(count: int, seed: int, length: int) -> list[int]:
    """The first `length` row indices of the data stream: epoch e's order is
    randperm(count) under manual_seed(seed * 1_000_003 + e), the epochs laid end to end."""
    order: list[int] = []
    epoch = 0
    while len(order) < length:
        order += torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        epoch += 1
    return order[:length]


def train_locally(base_dir: Path, data: Path, lora: dict, *, steps: int, micro_batch: int, grad_accum: int,
                  lr: float, seq_len: int, warmup_steps: int | None = None) -> tuple[PeftModel, list[float]]:
    """Per-step losses (mean over the step's micro-batches) of plain PEFT training, and the trained model.
    `lora`: r, alpha, dropout, target_modules, seed. Micro-batch i is stream positions
    [i * micro_batch, (i + 1) * micro_batch). `warmup_steps` given: transformers' cosine schedule with that
    warm-up (the Trainer's), else a constant lr."""
    model = peft_model(base_dir, **lora)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = examples(data, tokenizer, seq_len)
    order = stream(len(rows), lora["seed"], steps * grad_accum * micro_batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = None if warmup_steps is None else get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    losses = []
    for step in range(steps):
        step_losses = []
        for index in range(step * grad_accum, (step + 1) * grad_accum):
            picked = [rows[i] for i in order[index * micro_batch:(index + 1) * micro_batch]]
            input_ids, mask, labels = batch(picked, tokenizer.pad_token_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            (loss / grad_accum).backward()
            step_losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(sum(step_losses) / len(step_losses))
    return model, losses


@torch.no_grad()
def eval_loss(model, base_dir: Path, data: Path, seq_len: int, micro_batch: int) -> float:
    """Token-weighted mean loss over the file (transformers' own loss per batch), as the coordinator reports it."""
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = examples(data, tokenizer, seq_len)
    total, count = 0.0, 0
    for first in range(0, len(rows), micro_batch):
        input_ids, mask, labels = batch(rows[first:first + micro_batch], tokenizer.pad_token_id)
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item() * tokens
        count += tokens
    return total / count
