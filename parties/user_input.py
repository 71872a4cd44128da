"""The user's request and its checks: clear errors for input that cannot work, before any work."""

from __future__ import annotations

from dataclasses import dataclass

from permllm.errors import ConfigError
from protocols.selection import TABLE


@dataclass
class UserRequest:
    """model: a model spec (`parties.models`); prompt: the question (a decoder) or the sentence (an encoder);
    sampling: a `protocols.model.generation.SamplingConfig`, None for greedy."""

    model: str
    prompt: str
    max_new_tokens: int
    sampling: object = None
    expect_fingerprint: str | None = None
    selection: str = TABLE


def check_text(text, what: str) -> None:
    """A non-empty, valid UTF-8 string, or a ConfigError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"the {what} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"the {what} is not valid UTF-8") from None


def prepare_prompt(tokenizer, prompt: str, max_new_tokens: int, max_positions: int | None = None) -> list[int]:
    """The chat-templated prompt ids; clear errors for input that cannot work, before any work."""
    from permllm.model.prompts import chat_token_ids

    check_text(prompt, "prompt")
    if max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    ids = chat_token_ids(tokenizer, prompt)
    if max_positions is not None and len(ids) + max_new_tokens > max_positions:
        raise ConfigError(
            f"the prompt ({len(ids)} tokens) plus --max-new-tokens ({max_new_tokens}) exceeds the "
            f"model's {max_positions} positions"
        )
    return ids


def prepare_sentence(tokenizer, sentence: str) -> list[int]:
    """[CLS] sentence [SEP] ids for an encoder (truncated like sentence-transformers)."""
    check_text(sentence, "sentence")
    return list(tokenizer(sentence, truncation=True)["input_ids"])
