"""Chat records and packing for causal-LM fine-tuning.

A chat record is `{"messages": [{"role": ..., "content": ...}, ...]}`. It is
rendered with the tokenizer's own chat template, and only the assistant
turns are learned: every other token's label is -100. The assistant spans are
found by rendering the conversation up to each turn (the prompt with the
generation prefix, then the turn itself) and keeping the characters in
between, so the template decides what an assistant turn looks like,
end-of-turn tokens included.
"""

from __future__ import annotations

from qelalora.errors import DataError

from ..recipe import DataSection

IGNORE = -100


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _opening(tokenizer) -> str:
    """What the template puts before a conversation's first turn (a default system prompt, the assistant
    header) when that turn is the assistant's: not to be learned."""
    from jinja2 import TemplateError

    try:
        return _render(tokenizer, [], generation_prompt=True)
    except (TemplateError, IndexError, ValueError):  # templates that cannot render an empty conversation
        return ""


def _assistant_spans(tokenizer, messages: list[dict], full: str, where: str) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True) if i else _opening(tokenizer)
        upto = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(prompt) and full.startswith(upto)):
            raise DataError(f"{where}: the chat template renders earlier turns differently once later ones follow, "
                            "so the assistant turns cannot be located; use prompt_field / completion_field records")
        spans.append((len(prompt), len(upto)))
    return spans


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a text 'role' and 'content', got {str(m)[:80]!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn to learn from")
    return messages


def chat_examples(records: list[dict], section: DataSection, tokenizer) -> list[dict]:
    """Tokenised conversations, labels on the assistant turns only, cut to max_length."""
    if not records:
        return []
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{section.source}: chat records need a tokenizer with a chat template, and this one has none "
                        "(use a chat model, or prompt_field / completion_field records; ONNX folders' torch-free "
                        "tokenizer cannot render chat templates, so evaluate chat runs with PyTorch)")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{section.source}: chat records need a fast tokenizer (character offsets)")
    out = []
    for i, record in enumerate(records, 1):
        where = f"{section.source}, example {i}"
        messages = _check_messages(record.get(section.messages_field), where)
        text = _render(tokenizer, messages)
        spans = _assistant_spans(tokenizer, messages, text, where)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                            max_length=section.max_length)
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE
                  for tok, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"])]
        if all(label == IGNORE for label in labels[1:]):
            continue  # the assistant turns start beyond max_length
        out.append({"input_ids": encoded["input_ids"], "labels": labels})
    return out


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples (labels kept) and cut the stream into max_length blocks; the tail is kept, shorter."""
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids.extend(e["input_ids"])
        labels.extend(e.get("labels", e["input_ids"]))
    blocks = [{"input_ids": ids[i : i + max_length], "labels": labels[i : i + max_length]} for i in range(0, len(ids), max_length)]
    return [b for b in blocks if any(label != IGNORE for label in b["labels"][1:])]
