"""Writes random-weight Llama checkpoints in the real Hugging Face layout.

There is no model hub here, so tests, the demo and the benchmarks build their models with this; the
files are exactly what `LlamaForCausalLM.save_pretrained` and a trained `tokenizers` BPE write, so the code
that reads them reads a real Llama-2 directory the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# Llama-2-chat's own template, as meta-llama/Llama-2-7b-chat-hf ships it in tokenizer_config.json: the
# checkpoints' chat path (the HTTP API's /v1/chat/completions, chat training data) is tested on it.
CHAT_TEMPLATES = {
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}

_CORPUS = """\
The swarm pools ordinary lab machines so that together they can serve a large language model.
Every machine hosts a span of transformer blocks and keeps the attention cache of its sessions.
A client embeds the prompt, streams hidden states through the chain of peers and samples the next token.
Students and small labs own many desktops, a few gaming cards and some laptops, but no single large server.
When a peer leaves, the client finds another route for the missing blocks and replays what it sent.
Fine-tuning runs in rounds: each peer trains the low-rank adapters of its own blocks.
The coordinator aggregates the replicas, evaluates the result and writes a checkpoint that anyone can load.
Numbers from zero to nine: 0 1 2 3 4 5 6 7 8 9. Letters: a b c d e f g h i j k l m n o p q r s t u v w x y z.
Once upon a time a small team set out to make the best software in its field, measured and tested.
"""


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained locally, so any text encodes without unknown tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(  # Llama prepends <s> to every text
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        padding_side="left",
    )


def make_tiny_model(
    out_dir: Path | str,
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 512,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    chat_template: str | None = None,
) -> Path:
    """Writes config.json, model safetensors (sharded when `shard_size` is given) and tokenizer files;
    `chat_template`: a name in `CHAT_TEMPLATES` whose template the tokenizer files carry."""
    if chat_template is not None and chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {chat_template!r}; known: {', '.join(CHAT_TEMPLATES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab)
    if chat_template is not None:
        tokenizer.chat_template = CHAT_TEMPLATES[chat_template]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # a GPU initializes a 7B-shaped model in seconds
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir
