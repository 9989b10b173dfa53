"""The row formats of fine-tuning data, told apart by their keys and brought to three canonical shapes.

People keep fine-tuning data in a handful of shapes: plain text, prompt/completion pairs, OpenAI chat
(`messages`), ShareGPT (`conversations`) and Alpaca (`instruction`, `input`, `output`). Every row is
checked here on its own, and reduced to the shape its tokenizing needs:

* `{"text": str}`                           loss on every token
* `{"prompt": str, "completion": str}`      loss on the completion (Alpaca rows become this)
* `{"messages": [{"role", "content"}, ...]}` loss on the assistant turns (ShareGPT rows become this)

so that tsotsa.training.batches tokenizes three shapes, not five, and a ShareGPT row trains exactly as the
same conversation in OpenAI's format. A bad row raises `RowError` with what is wrong and no location; the
caller (coordinator/data.py) adds the file and line. Keys of no format (an "id", a "source") are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from tsotsa.errors import TsotsaError

Message = dict[str, str]
Fields = dict[str, Union[str, list[Message]]]

# Stanford Alpaca's two prompts, verbatim (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT); the output
# follows "### Response:" directly, as there.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# Each format's keys, in the order messages name them; a row holding keys of two formats is refused.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt": ("prompt", "completion"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
}
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {**FORMAT_KEYS, "alpaca": ("instruction", "output")}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user",
                  "assistant": "assistant"}


class RowError(TsotsaError):
    """One row cannot be used; the message says why, without the file and line (the caller adds them)."""


def describe(fmt: str) -> str:
    """A format's keys as messages write them: "prompt"/"completion"."""
    return "/".join(f'"{key}"' for key in FORMAT_KEYS[fmt])


def row_format(obj: Mapping[str, object]) -> str:
    """Which format a row is in, from its keys alone: exactly one format's keys must be there."""
    found = [fmt for fmt, keys in FORMAT_KEYS.items() if any(key in obj for key in keys)]
    if len(found) > 1:
        raise RowError(f"has both {describe(found[0])} and {describe(found[1])}; use one format a row")
    if not found:
        raise RowError('needs "text", "prompt" and "completion", "messages", "conversations", or '
                       '"instruction" and "output"')
    missing = [key for key in REQUIRED_KEYS[found[0]] if key not in obj]
    if missing:
        raise RowError(f'"{missing[0]}" is missing')
    return found[0]


def canonical_fields(obj: Mapping[str, object]) -> Fields:
    """The row in its canonical shape (module docstring); RowError for a row that no format accepts."""
    fmt = row_format(obj)
    if fmt == "text":
        return {"text": _nonempty(obj, "text")}
    if fmt == "prompt":
        return {"prompt": _string(obj, "prompt"), "completion": _nonempty(obj, "completion")}
    if fmt == "alpaca":
        return alpaca_fields(obj)
    if fmt == "chat":
        return {"messages": chat_messages(obj["messages"])}
    return {"messages": sharegpt_messages(obj["conversations"])}


def alpaca_fields(obj: Mapping[str, object]) -> Fields:
    """Stanford Alpaca's prompt (with or without the input) and the output as the completion; an "input"
    that is null or "" means no input, as in the Alpaca data."""
    instruction = _nonempty(obj, "instruction")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError(f'"input" must be a string, got {type(extra).__name__}')
    if extra:
        _encodable(extra, '"input"')
        prompt = ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return {"prompt": prompt, "completion": _nonempty(obj, "output")}


def chat_messages(value: object) -> list[Message]:
    """OpenAI's format: a list of {"role", "content"} objects."""
    return _conversation(value, "messages", "role", "content", {role: role for role in ROLES}, "role",
                         ", ".join(ROLES), {})


def sharegpt_messages(value: object) -> list[Message]:
    """ShareGPT's format: a list of {"from": system|human|gpt (or user|assistant), "value"} objects."""
    return _conversation(value, "conversations", "from", "value", SHAREGPT_ROLES, '"from"',
                         "system, human, gpt (or user, assistant)", {"user": "human", "assistant": "gpt"})


def _conversation(value: object, field: str, role_key: str, content_key: str, roles: dict[str, str], label: str,
                  allowed: str, names: dict[str, str]) -> list[Message]:
    """The turns of `field` as messages: each turn's `role_key` mapped through `roles`, its `content_key` text."""
    messages = []
    for index, turn in enumerate(_turn_list(value, field)):
        where = f"{field}[{index}]"
        speaker = _turn_string(turn, role_key, where)
        if speaker not in roles:
            raise RowError(f"{where}: {label} {speaker[:40]!r} is not one of {allowed}")
        messages.append({"role": roles[speaker], "content": _turn_string(turn, content_key, where)})
    return _checked_conversation(messages, field, names)


def _checked_conversation(messages: list[Message], key: str, shown: dict[str, str]) -> list[Message]:
    """An optional system turn first, then user and assistant alternating from a user turn (Llama-2-chat's
    rule, which most chat templates share), with at least one assistant turn that says something. `shown`:
    how the row itself names a role (ShareGPT's human, gpt), for the messages."""
    first = 1 if messages[0]["role"] == "system" else 0
    if first == len(messages):
        raise RowError(f'"{key}" holds only a system turn: nothing to learn')
    for index in range(first, len(messages)):
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        role = messages[index]["role"]
        if role != expected:
            raise RowError(f"{key}[{index}]: expected {shown.get(expected, expected)}, got {shown.get(role, role)} "
                           "(after an optional system turn, user and assistant turns alternate, starting with user)")
        if role == "assistant" and not messages[index]["content"].strip():
            raise RowError(f"{key}[{index}]: an assistant turn with empty content")
    if not any(message["role"] == "assistant" for message in messages):
        raise RowError(f'"{key}" has no assistant turn: nothing to learn')
    return messages


def _turn_list(value: object, key: str) -> list:
    if not isinstance(value, list):
        raise RowError(f'"{key}" must be a list, got {type(value).__name__}')
    if not value:
        raise RowError(f'"{key}" is empty')
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(f"{key}[{index}] must be an object, got {type(turn).__name__}")
    return value


def _turn_string(turn: Mapping[str, object], key: str, where: str) -> str:
    if key not in turn:
        raise RowError(f'{where}: "{key}" is missing')
    return _string(turn, key, f"{where}: ")


def _string(obj: Mapping[str, object], key: str, where: str = "") -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise RowError(f'{where}"{key}" must be a string, got {type(value).__name__}')
    _encodable(value, f'{where}"{key}"')
    return value


def _nonempty(obj: Mapping[str, object], key: str) -> str:
    value = _string(obj, key)
    if value == "":
        raise RowError(f'"{key}" is empty')
    return value


def _encodable(value: str, what: str) -> None:
    try:
        value.encode("utf-8")  # JSON can escape a lone surrogate, which no tokenizer accepts
    except UnicodeEncodeError:
        raise RowError(f"{what} holds an unpaired \\u surrogate escape") from None
