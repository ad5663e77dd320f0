"""Input helpers shared by the HF families."""

from __future__ import annotations


def as_list(value, name: str) -> list:
    """``None`` -> [], one item -> [item], a list/tuple -> list. Arrays of frames count as one."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def chat_texts(processor, text, kind: str | None, n_media: int, chat: bool, answer_prefix: str,
               placeholder: str | None) -> list[str]:
    """One prompt string per batch row, chat-templated or verbatim."""
    texts = as_list(text, "text") or [""]
    if n_media and len(texts) == 1 and n_media > 1:
        texts = texts * n_media
    if n_media and len(texts) != n_media:
        raise ValueError(f"text: got {len(texts)} prompts for {n_media} {kind}s; give one "
                         f"prompt, or one per {kind}")
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text[{i}]: expected a string, got {type(t).__name__}")
        if chat:
            content = ([{"type": kind}] if kind else []) + [{"type": "text", "text": t}]
            messages = [{"role": "user", "content": content}]
            t = processor.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)
        elif kind and placeholder not in t:
            raise ValueError(f"text[{i}]: chat=False needs the {kind} placeholder "
                             f"{placeholder!r} in the prompt, got {t!r}")
        out.append(t + answer_prefix)
    return out
