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

@dataclass(frozen=True)
class Prompt:
    """One row's prompt as every family takes it: the ``question`` goes into the family's own
    prompt format (its chat template; PaliGemma's ``<image><bos>question\\n``) through
    `VLM.prepare`, and ``answer_prefix`` (``'It is a'``) starts the reply."""

    question: str
    answer_prefix: str = ""

    def reply(self, vlm, word: str = "") -> str:
        """The reply text `VLM.prepare` appends: the answer prefix, then ``word``, each
        starting a new word (see `reply_separator`)."""
        text = self.answer_prefix
        if text and word and not text[-1].isspace():
            text += " "
        text += word
        return reply_separator(vlm) + text if text else ""


def reply_separator(vlm) -> str:
    """``' '`` where the family's chat prompt ends inside a line (LLaVA-1.5's ``ASSISTANT:``:
    the reply then reads ``ASSISTANT: It is a``, the original's prompt), ``''`` where it ends
    in whitespace (``assistant\\n``) or the processor has no chat template (its family's
    `VLM.prepare` places the reply: PaliGemma's after the prompt's ``\\n``)."""
    processor = vlm.processor
    if not getattr(processor, "chat_template", None):
        return ""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "" if text[-1:].isspace() else " "


def prompt_inputs(vlm, images, question: str, answer_prefix: str = "") -> ModelInputs:
    """One row per image, all with the same prompt."""
    return vlm.prepare(text=question, images=list(images),
                       answer_prefix=Prompt(question, answer_prefix).reply(vlm))


def batch_inputs(vlm, image, prompts: list[Prompt], **kw) -> ModelInputs:
    """One row per prompt, all on ``image`` (``kw`` to the processor: ``padding_side``...)."""
    return vlm.prepare(text=[p.question for p in prompts], images=[image] * len(prompts),
                       answer_prefix=[p.reply(vlm) for p in prompts], **kw)


def answer_id(vlm, image, prompt: Prompt, word: str, inputs: ModelInputs | None = None) -> int:
    """Id of the first token of ``word`` as the model would write it right after ``prompt``
    (``' cat'`` after ``'It is a'``): the first token where the prepared prompt with the word
    appended departs from ``inputs`` (the prompt's own, prepared here when not given), so it
    holds for every family's prompt format and tokenizer."""
    inputs = inputs if inputs is not None else prompt_inputs(vlm, [image], prompt.question,
                                                             prompt.answer_prefix)
    longer = vlm.prepare(text=prompt.question, images=[image],
                         answer_prefix=prompt.reply(vlm, word))
    head, full = (_real_ids(x) for x in (inputs, longer))
    if len(full) > len(head) and torch.equal(full[:len(head)], head):
        return int(full[len(head)])
    return vlm.token_id(prompt.reply(vlm, word)[len(prompt.reply(vlm)):])


def _real_ids(inputs: ModelInputs) -> Tensor:
    ids = inputs["input_ids"][0].cpu()
    mask = inputs.get("attention_mask")
    return ids if mask is None else ids[mask[0].cpu().bool()]


def task_inputs(vlm, image, task: Task, category: str) -> tuple[ModelInputs, Prompt, int]:
    """Inputs, prompt and answer token id of ``task`` on one image."""
    prompt = Prompt(task.question.format(category=category), task.answer_prefix)
    inputs = prompt_inputs(vlm, [image], prompt.question, prompt.answer_prefix)
    return inputs, prompt, answer_id(vlm, image, prompt, task.answer_word(category), inputs)


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
