"""Single-process PEFT, the oracle of swarm fine-tuning: the same LoRA config, start, data and optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import AutoTokenizer, LlamaForCausalLM, get_cosine_schedule_with_warmup

from tsotsa.coordinator.data import IGNORE_INDEX, collate, load_examples, micro_batches
from tsotsa.training.export import initial_adapter
from tsotsa.training.lora import LoraSettings

COLORS = {"apple": "red", "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
          "plum": "purple", "carrot": "orange", "rose": "pink", "soil": "brown", "ash": "grey", "sea": "blue",
          "leaf": "green", "milk": "white", "night": "black", "lemon": "yellow"}


def write_color_task(path: Path, repeat: int = 1) -> Path:
    """A small task a tiny random model learns in a few steps: the color of a thing, loss on the color only."""
    rows = [{"prompt": f"the color of {thing} is", "completion": f" {color}"} for thing, color in COLORS.items()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows * repeat))
    return path


def peft_model(base_dir: Path, settings: LoraSettings) -> PeftModel:
    """The base with the run's adapter at its start (A drawn from the seed, B zero), A frozen as in the swarm."""
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, settings.peft_config())
    set_peft_model_state_dict(model, initial_adapter(base.config, settings))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_B." in name)
    return model


def train_locally(base_dir: Path, data: Path, settings: LoraSettings, *, steps: int, micro_batch: int,
                  grad_accum: int, lr: float, seq_len: int, warmup_steps: int | None = None
                  ) -> tuple[PeftModel, list[float]]:
    """Per-step losses (mean over the step's micro-batches) of plain PEFT training, and the trained model.
    `warmup_steps` given: transformers' cosine schedule with that warm-up (the Trainer's), else a constant lr."""
    model = peft_model(base_dir, settings)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = load_examples(data, tokenizer, seq_len)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = None if warmup_steps is None else get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    losses = []
    for step in range(steps):
        step_losses = []
        for index in range(step * grad_accum, (step + 1) * grad_accum):
            batch = micro_batches(examples, micro_batch, settings.seed, index, 1)[0]
            input_ids, mask, labels = collate(batch, model.config.pad_token_id or 0)
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
    examples = load_examples(data, AutoTokenizer.from_pretrained(base_dir), seq_len)
    total, count = 0.0, 0
    for first in range(0, len(examples), micro_batch):
        input_ids, mask, labels = collate(examples[first:first + micro_batch], model.config.pad_token_id or 0)
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item() * tokens
        count += tokens
    return total / count
