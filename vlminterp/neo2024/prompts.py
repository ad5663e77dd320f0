"""The paper's three tasks, their prompts, and how an answer is scored."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from vlminterp.data.coco import ObjectSample
from vlminterp.models.base import ModelInputs

ANSWER_PREFIX = "It is a"


@dataclass(frozen=True)
class Task:
    """One of the paper's three formats. ``question`` may hold ``{category}``."""

    name: str
    question: str
    answer_prefix: str = ""
    generate: bool = False

    def answer_word(self, category: str) -> str:
        return "Yes" if self.name == "polling" else category


TASKS = {
    "vqa": Task("vqa", "What is the main object in this image?", ANSWER_PREFIX),
    "polling": Task("polling", "Is there a {category} in this image?"),
    "generative": Task("generative", "Describe this image.", generate=True),
}


def vqa_task(question: str | None = None) -> Task:
    """The vqa task, with ``question`` in place of the generic one when given."""
    return TASKS["vqa"] if not question else Task("vqa", question, ANSWER_PREFIX)


def load_questions(path: Path | None) -> dict[str, str]:
    """Per-image vqa questions: a JSON object mapping image id (as a string) or file name to
    a question, or to a list of questions (the first is used). The original's
    clean_questions.json maps every image id to a list of 0 or 1 questions: an empty list
    means the image has none (it is left out of the result). Errors name the file and the
    entry."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read the questions file ({e})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected an object mapping image ids to questions")
    out = {}
    for key, q in data.items():
        if q == []:
            continue
        q = q[0] if isinstance(q, list) else q
        if not isinstance(q, str) or not q.strip():
            raise SystemExit(f"{path}: [{key!r}]: expected a question string, got {q!r}")
        out[str(key)] = q.strip()
    return out


def question_for(questions: dict[str, str], sample: ObjectSample) -> str | None:
    return questions.get(str(sample.image_id), questions.get(sample.file_name))


# -- prompts ----------------------------------------------------------------------------------

def prompt_text(vlm, question: str, answer_prefix: str = "") -> str:
    """The verbatim prompt: LLaVA-1.5's ``USER: <image>\\n{q} ASSISTANT: {prefix}``, or the
    family's chat template (user turn with the image, generation prompt) + ``answer_prefix``."""
    if vlm.family.name == "llava":
        return f"USER: <image>\n{question} ASSISTANT:" + (f" {answer_prefix}" if answer_prefix else "")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return vlm.processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False) + answer_prefix


def prompt_inputs(vlm, images, question: str, answer_prefix: str = "") -> ModelInputs:
    """One row per image, all with the same prompt."""
    return vlm.prepare(text=prompt_text(vlm, question, answer_prefix), images=list(images),
                       chat=False)


def task_inputs(vlm, image, task: Task, category: str) -> tuple[ModelInputs, str, int]:
    """Inputs, verbatim prompt and answer token id of ``task`` on one image."""
    text = prompt_text(vlm, task.question.format(category=category), task.answer_prefix)
    inputs = vlm.prepare(text=text, images=[image], chat=False)
    return inputs, text, continuation_id(vlm, text, task.answer_word(category))


def repeat_inputs(inputs: ModelInputs, n: int) -> ModelInputs:
    """A single-row batch repeated ``n`` times."""
    return inputs.select_rows([0] * n)


def last_logits(vlm, inputs: ModelInputs, conditions, intervene, batch_size: int = 16
                ) -> Float[Tensor, "rows vocab"]:
    """Last-position logits of the single-row ``inputs`` once per entry of ``conditions``,
    ``batch_size`` rows per traced forward; inside each forward ``intervene(vlm, chunk)``
    applies the chunk's conditions (batch row ``i`` is ``chunk[i]``)."""
    out = []
    for start in range(0, len(conditions), batch_size):
        chunk = conditions[start:start + batch_size]
        with torch.no_grad(), vlm.trace(repeat_inputs(inputs, len(chunk))):
            intervene(vlm, chunk)
            logits = vlm.lm_head.output[:, -1].save()
        out.append(logits.float().cpu())
    return torch.cat(out)


# -- answers ----------------------------------------------------------------------------------

def continuation_id(vlm, text: str, word: str) -> int:
    """Id of the first token of ``word`` as it follows ``text`` (``' cat'`` after ``'It is a'``)."""
    tok = vlm.tokenizer
    sep = "" if text.endswith(("\n", " ")) else " "
    head = tok.encode(text, add_special_tokens=False)
    full = tok.encode(text + sep + word, add_special_tokens=False)
    if len(full) > len(head) and full[:len(head)] == head:
        return full[len(head)]
    return vlm.token_id(sep + word)


def token_text(vlm, token_id: int) -> str:
    return vlm.tokenizer.decode([int(token_id)], skip_special_tokens=True)


def first_token_match(vlm, generated_id: int, answer_id: int) -> bool:
    """The original's rule: the answer's first token starts with the generated token (spaces
    and BPE markers stripped, case-folded). An empty generated token is never correct."""
    got = token_text(vlm, generated_id).strip().lstrip("Ġ▁").lower()
    want = token_text(vlm, answer_id).strip().lstrip("Ġ▁").lower()
    return bool(got) and want.startswith(got)


def score(vlm, logits: Float[Tensor, "rows vocab"], answer_id: int) -> list[dict]:
    """Per row: the argmax token, whether it is correct, and the probabilities of the
    generated and of the correct token."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.argmax(dim=-1)
    return [{"token": token_text(vlm, t), "correct": first_token_match(vlm, int(t), answer_id),
             "p_generated": float(p[t]), "p_correct": float(p[answer_id])}
            for t, p in zip(top.tolist(), probs)]


def names_object(text: str, category: str) -> bool:
    """Generative task: the description names the object (word start, case-insensitive)."""
    return re.search(rf"\b{re.escape(category.lower())}", text.lower()) is not None
