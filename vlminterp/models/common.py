"""Input helpers shared by the HF families."""

from __future__ import annotations


def as_list(value, name: str) -> list:
    """``None`` -> [], one item -> [item], a list/tuple -> list. Arrays of frames count as one."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def chat_texts(processor, text, kind: str | None, n_media: int, chat: bool, answer_prefix,
               placeholder: str | None) -> list[str]:
    """One prompt string per batch row, chat-templated or verbatim, each followed by its
    ``answer_prefix`` (one string for every row, or one per row)."""
    texts = as_list(text, "text") or [""]
    if n_media and len(texts) == 1 and n_media > 1:
        texts = texts * n_media
    if n_media and len(texts) != n_media:
        raise ValueError(f"text: got {len(texts)} prompts for {n_media} {kind}s; give one "
                         f"prompt, or one per {kind}")
    prefixes = answer_prefixes(answer_prefix, len(texts))
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
        out.append(t + prefixes[i])
    return out


def answer_prefixes(answer_prefix, n_rows: int) -> list[str]:
    """``answer_prefix`` per row: one string for every row, or a list of one per row."""
    if isinstance(answer_prefix, str):
        return [answer_prefix] * n_rows
    prefixes = list(answer_prefix)
    if len(prefixes) != n_rows or not all(isinstance(p, str) for p in prefixes):
        raise ValueError(f"answer_prefix: expected a string or {n_rows} strings (one per row), "
                         f"got {answer_prefix!r}")
    return prefixes
