"""Multiple-choice video QA: the prompt, the option letters' token ids, and scoring one clip.

The original study's prompt is ``"{question}\\nOptions:\\nA. ...\\nB. ...\\nAnswer:"`` inside the
model's chat template; an option is scored by the logit of its letter at the last position
(`option_scores`), or by the log-probability of its full text as the reply (`candidate_logprobs`).
"""

from __future__ import annotations

import inspect
import string

import numpy as np
import torch
from jaxtyping import UInt8

LETTERS = string.ascii_uppercase
Frames = UInt8[np.ndarray, "t h w 3"]


def mc_prompt(question: str, candidates: list[str]) -> str:
    """The original study's prompt: ``"{question}\\nOptions:\\nA. ...\\nB. ...\\nAnswer:"``."""
    if len(candidates) > len(LETTERS):
        raise ValueError(f"{len(candidates)} candidates: at most {len(LETTERS)} option letters")
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(candidates))
    return f"{question}\nOptions:\n{options}\nAnswer:"


def option_ids(vlm, n: int, chat: bool = True) -> list[int]:
    """Token ids of the option letters as the model would emit them. Under the chat template
    the reply starts right after the generation prompt (``...assistant\\n``), so the letter is
    a line-initial ``"A"``; a plain prompt ending in ``"Answer:"`` continues with ``" A"``."""
    ids = [vlm.token_id(letter if chat else " " + letter) for letter in LETTERS[:n]]
    if len(set(ids)) != n:
        raise ValueError(f"option letters {list(LETTERS[:n])} do not map to distinct tokens: {ids}")
    return ids


def last_logits_kwargs(vlm) -> dict:
    """Forward kwargs for a run that needs only the last position's logits (skip the
    [B, seq, vocab] projection) and no key/value cache; those the model does not take are
    left out, and ``logits_to_keep`` where the family says it is unsafe (Gemma 4's KV-shared
    layers then run on the last position only: `Family.logits_to_keep`)."""
    params = inspect.signature(vlm.torch_model.forward).parameters
    keep = (("logits_to_keep", 1),) if vlm.family.logits_to_keep else ()
    return {k: v for k, v in (*keep, ("use_cache", False)) if k in params}


def option_scores(vlm, frames: Frames, prompt: str, ids: list[int]) -> list[float]:
    """The option letters' logits at the last position of one clip's chat prompt."""
    inputs = vlm.prepare(text=prompt, video=[frames])
    keep = last_logits_kwargs(vlm)
    at = -1 if "logits_to_keep" in keep else vlm.layout(inputs)[0].last
    with torch.no_grad(), vlm.trace(inputs, **keep):
        logits = vlm.lm_head.output[0, at].save()
    return logits[list(ids)].float().tolist()


def candidate_logprobs(vlm, frames: Frames, prompt: str, candidates: list[str]) -> list[float]:
    """Summed log-probability of each full candidate text as the assistant's reply (one plain
    forward per candidate, teacher-forced after the chat prompt)."""
    prompt_ids = vlm.prepare(text=prompt, video=[frames])["input_ids"][0]
    out = []
    for cand in candidates:
        inputs = vlm.prepare(text=prompt, video=[frames], answer_prefix=cand)
        ids = inputs["input_ids"][0]
        n = len(prompt_ids)
        if len(ids) <= n or not torch.equal(ids[:n], prompt_ids):
            raise ValueError(f"candidate {cand!r} does not tokenize as a continuation of the prompt")
        logp = torch.log_softmax(vlm.forward(inputs)[0].float(), dim=-1)
        out.append(float(logp[torch.arange(n - 1, len(ids) - 1), ids[n:]].sum()))
    return out
