"""How a conversation becomes the prompt a model answers: shared by `rlhf-fast chat` and the
trainer, so that a model is trained on exactly the tokens it is later asked with.

With a chat template in the tokenizer, the prompt is that template rendered with
`add_generation_prompt=True` and tokenized without extra special tokens (the template places
its own). Without one, it is this plain template, one line per message, ending with the
assistant's header for the model to continue, tokenized with the tokenizer's usual special
tokens (a BOS for tokenizers that add one):

    System: {system}
    User: {message}
    Assistant: {answer}
    User: {message}
    Assistant:

The answer that follows the prompt is `response_text(tokenizer, answer)`: the answer itself
after a template, and after the plain template one space first, as in the history lines above.
Prompt and answer are tokenized separately and their ids concatenated (never the joined text),
so that no BPE merge crosses the boundary and the prompt ids are the ones chat feeds.
"""

from __future__ import annotations

FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class TemplateError(ValueError):
    """The tokenizer's chat template rejected these messages (one line, the template's reason)."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """Text of the conversation ending where the assistant's next answer starts: the tokenizer's
    chat template (add_generation_prompt=True) when it has one, else the plain template above."""
    if has_chat_template(tokenizer):
        try:
            return tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as error:  # jinja raises its own types; a template may raise anything
            reason = " ".join(str(error).split()) or type(error).__name__
            raise TemplateError(f"the tokenizer's chat template failed: {reason}") from None
    unknown = [m["role"] for m in messages if m["role"] not in FALLBACK_ROLES]
    if unknown:
        raise TemplateError(
            f"unknown role {unknown[0]!r} (the plain template knows {', '.join(FALLBACK_ROLES)})"
        )
    lines = [f"{FALLBACK_ROLES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines + [FALLBACK_ROLES["assistant"] + ":"])


def prompt_token_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `render_prompt`, tokenized exactly as `rlhf-fast chat` feeds them."""
    text = render_prompt(tokenizer, messages)
    add_special_tokens = not has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def response_text(tokenizer, response: str) -> str:
    """The answer as it follows the prompt: one space after the plain template's "Assistant:"
    (unless the answer is empty or already starts with whitespace, as a policy's decoded answer
    does), unchanged after a chat template."""
    if has_chat_template(tokenizer) or not response or response[:1].isspace():
        return response
    return " " + response


def response_token_ids(tokenizer, response: str) -> list[int]:
    """Token ids of the answer alone (no special tokens), to be appended to the prompt ids."""
    text = response_text(tokenizer, response)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
