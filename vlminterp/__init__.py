"""vlminterp: mechanistic interpretability of vision-language models, on nnsight."""

from .models import VLM, ModelInputs, load
from .tokens import TokenLayout, TokenSlice

__all__ = ["load", "VLM", "ModelInputs", "TokenLayout", "TokenSlice"]
