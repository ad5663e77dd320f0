"""Free-text answers, as the original ``video_inference`` script gives them: greedy generation
after the prompt, then (for multiple choice) which option the response names."""

from __future__ import annotations

import re

import torch

from .multiple_choice import LETTERS, Frames


def generate_response(vlm, frames: Frames, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation of one clip's chat prompt (at most ``max_new_tokens``, stopping at
    the tokenizer's end-of-sequence token), special tokens dropped."""
    inputs = vlm.prepare(text=prompt, video=[frames])
    n = inputs["input_ids"].shape[1]
    eos = getattr(vlm.tokenizer, "eos_token_id", None)
    with torch.no_grad():
        out = vlm.torch_model.generate(**dict(inputs), max_new_tokens=max_new_tokens,
                                       do_sample=False, eos_token_id=eos)
    return vlm.tokenizer.decode(out[0, n:], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)


def response_option(response: str, candidates: list[str]) -> int | None:
    """The option a response names: a leading option letter (``"B"``, ``"B."``, ``"(B)"``,
    ``"Answer: B"``; not the article in ``"A person ..."``), else the one candidate whose text it contains (case-insensitive);
    None when it names none or several."""
    text = response.strip()
    m = re.match(r"^(?:answer\s*[:\-]?\s*)?\(?([A-Z])(?:[.):,]|$)", text, flags=re.IGNORECASE)
    if m and m.group(1).isupper() and LETTERS.index(m.group(1)) < len(candidates):
        return LETTERS.index(m.group(1))
    low = text.lower()
    names = [c.strip().rstrip(".!?").lower() for c in candidates]  # "The door." in "...the door"
    hits = [i for i, c in enumerate(names) if c and c in low]
    return hits[0] if len(hits) == 1 else None
