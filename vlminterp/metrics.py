"""Scores of a run: logit difference, answer log-probability, normalised patching effect."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor


def logit_diff(logits: Float[Tensor, "batch vocab"], correct: int | Tensor,
               incorrect: int | Tensor) -> Float[Tensor, "batch"]:
    """``logits[correct] - logits[incorrect]`` per row (token ids, scalar or per row)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, torch.as_tensor(correct)] - logits[rows, torch.as_tensor(incorrect)]


def answer_logprob(logits: Float[Tensor, "batch vocab"], answer: int | Tensor
                   ) -> Float[Tensor, "batch"]:
    """Log-probability of the answer token id(s) under ``softmax(logits)``."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return torch.log_softmax(logits.float(), dim=-1)[rows, torch.as_tensor(answer)]


def option_margin(logits: Float[Tensor, "batch vocab"], option_ids: Sequence[int],
                  correct: int) -> Float[Tensor, "batch"]:
    """Correct option's logit minus the best other option's (multiple-choice score)."""
    opts = logits[:, list(option_ids)]
    others = torch.cat([opts[:, :correct], opts[:, correct + 1:]], dim=1)
    return opts[:, correct] - others.max(dim=1).values


def normalised_effect(patched: float, corrupt: float, clean: float) -> float | None:
    """``(patched - corrupt) / (clean - corrupt)``: 1 = patch restores the clean run, 0 =
    no effect. ``None`` when the total effect is 0 (the ratio is undefined)."""
    total = clean - corrupt
    if total == 0 or math.isnan(total):
        return None
    return (patched - corrupt) / total
