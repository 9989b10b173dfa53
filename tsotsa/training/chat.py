"""A conversation as token ids and labels: the model's own chat template renders it, the loss is taken on the
assistant turns only.

Templates such as Llama-2-chat's have no generation markers (`{% generation %}`), so the tokens of each
assistant turn are found by rendering prefixes of the conversation: for the assistant turn at index k,
`messages[:k]` (with the generation prompt, so a template's "assistant:" header stays unlearned) and
`messages[:k + 1]`; the turn's tokens are those between the two. That holds only when each rendering is a
token prefix of the next and of the whole conversation's; a template (or a tokenizer merging across a turn's
edge) for which it does not is refused, since any span taken then would be a guess. The rule is stated in
docs/training.md ("Data").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tsotsa.errors import TsotsaError
from tsotsa.training.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tsotsa.training.batches import Example


class ChatTemplateError(TsotsaError):
    """A conversation the model's chat template cannot render, or whose assistant turns cannot be told apart."""


class NoChatTemplate(ChatTemplateError):
    """The model's tokenizer has no chat template, so chat rows cannot be rendered at all."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_example(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Example:
    """The rendered conversation's tokens, labelled on the assistant turns' tokens (what the template writes
    for them, its end-of-turn tokens included) and IGNORE_INDEX elsewhere. `messages`: checked OpenAI-format
    turns (tsotsa.training.formats.chat_messages)."""
    from tsotsa.training.batches import Example

    if not has_chat_template(tokenizer):
        raise NoChatTemplate("the model has no chat template")
    full = render(messages, tokenizer)
    labels = [IGNORE_INDEX] * len(full)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:index], tokenizer, generation_prompt=True) if index else []
        through = render(messages[:index + 1], tokenizer)
        for shorter, longer, what in ((before, through, (f"messages[:{index}]", f"messages[:{index + 1}]")),
                                      (through, full, (f"messages[:{index + 1}]", "the whole conversation"))):
            if longer[:len(shorter)] != shorter:
                raise ChatTemplateError(
                    f"the chat template's tokens for {what[0]} are not a prefix of its tokens for {what[1]}, so "
                    f"the tokens of assistant turn {index} cannot be told apart")
        if len(through) == len(before):
            raise ChatTemplateError(f"the chat template renders the assistant turn {index} as no tokens")
        labels[len(before):len(through)] = full[len(before):len(through)]
    return Example(full, labels)


def render(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
           generation_prompt: bool = False) -> list[int]:
    """Token ids of the template's rendering of `messages` (no messages: no tokens); the template's own
    refusals (raise_exception: roles out of order, ...) become a ChatTemplateError."""
    if not messages:
        return []
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                            return_dict=False)
    except Exception as error:  # jinja2's TemplateError, and whatever a template's own code raises
        text = " ".join(str(error).split())[:200] or type(error).__name__
        raise ChatTemplateError(f"the chat template refused the conversation: {text}") from None
    return list(ids)
