"""Experiment 1: mean-ablate token subsets of the LM input and score the answer.

The LM input is what ``vlm.layers[0]`` reads: the text embeddings with the projected image
features already merged in (``vlm.embed``'s output does not hold them yet on LLaVA/Qwen).
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from vlminterp.data.coco import CocoObjects, ObjectSample
from vlminterp.interventions import ablate, expand_rows
from vlminterp.models.base import ModelInputs
from vlminterp.neo2024.prompts import (TASKS, Prompt, Task, batch_inputs, names_object,
                                       prompt_inputs, repeat_inputs, score, task_inputs, vqa_task)
from vlminterp.neo2024.subsets import (integrated_gradients, object_indices, random_indices,
                                       register_indices, subset_sizes, top_indices)


def lm_input_visual(vlm, inputs: ModelInputs, row: int = 0) -> Float[Tensor, "n d"]:
    """The visual tokens of ``row`` as layer 0 reads them (projected features, merged)."""
    pos = vlm.layout(inputs)[row].visual
    with torch.no_grad(), vlm.trace(inputs) as tracer:
        visual = vlm.layers[0].input[row, pos.to(vlm.device)].detach().clone().save()
        tracer.stop()
    return visual.float().cpu()


def dataset_mean(vlm, coco: CocoObjects, samples, store_dir: Path, progress: bool = True
                 ) -> Float[Tensor, "d"]:
    """Mean visual token at the LM input over the dataset's images (the ablation vector and
    the integrated-gradients baseline): every patch token of every view counts once, so an
    image cut into more tiles weighs more (on LLaVA-1.5 every image has 576 tokens and this is
    the mean of the images' means). Each image's mean and token count are kept in an
    `ActivationStore` under ``store_dir`` (reruns reuse them)."""
    from tqdm import tqdm

    from vlminterp.store import ActivationStore

    store = ActivationStore(store_dir)
    todo = {f"image:{s.image_id}": s for s in samples}
    todo = {k: s for k, s in todo.items() if k not in store}
    for key, s in tqdm(todo.items(), desc="mean vector", disable=not progress):
        inputs = prompt_inputs(vlm, [coco.load_image(s)], TASKS["generative"].question)
        visual = lm_input_visual(vlm, inputs)
        store.put(key, {"mean": visual.mean(0)}, meta={"n_visual": len(visual)})
    total, count = None, 0
    for key in store.keys():
        n = int(store.meta(key)["n_visual"])
        part = store.get(key, ["mean"])["mean"].double() * n
        total, count = (part if total is None else total + part), count + n
    if total is None:
        raise ValueError(f"{store_dir}: no image to average (the mean vector's store is empty)")
    return (total / count).float()


def _ablate_rows(vlm, positions_per_row, mean: Float[Tensor, "d"]) -> None:
    """Inside a trace: `ablate` each row's positions (sequence positions, or None) of the LM
    input with ``mean``."""
    for row, pos in enumerate(positions_per_row):
        if pos is not None and len(pos):
            ablate(vlm.layers[0], pos, "mean", mean=mean, rows=[row], at="input")


def ablated_rows(vlm, inputs: ModelInputs, conditions, mean: Float[Tensor, "d"],
                 batch_size: int = 16) -> Float[Tensor, "rows vocab"]:
    """Last-real-position logits for each ``(input row, positions or None)`` of
    ``conditions``, ``batch_size`` conditions per traced forward: the vision tower runs once
    per input row (`expand_rows`) and only the rows' last positions reach ``lm_head``.
    ``inputs`` may hold several prompts (right-padded: real tokens keep their positions)."""
    lay = vlm.layout(inputs)
    lasts = sorted({lay[r].last for r, _ in conditions})
    keep = torch.tensor(lasts)
    out = []
    for start in range(0, len(conditions), batch_size):
        chunk = conditions[start:start + batch_size]
        rows = [r for r, _ in chunk]
        where = torch.tensor([lasts.index(lay[r].last) for r in rows])
        with torch.no_grad(), vlm.trace(inputs, logits_to_keep=keep):
            expand_rows(vlm, rows)
            _ablate_rows(vlm, [p for _, p in chunk], mean)
            logits = vlm.lm_head.output[torch.arange(len(chunk)), where].save()
        out.append(logits.float().cpu())
    return torch.cat(out)


def ablated_logits(vlm, inputs: ModelInputs, positions_per_row, mean: Float[Tensor, "d"],
                   batch_size: int = 16) -> Float[Tensor, "rows vocab"]:
    """Last-position logits of the single-row ``inputs`` once per entry of
    ``positions_per_row`` (None = unablated), ``batch_size`` rows per traced forward."""
    return ablated_rows(vlm, inputs, [(0, p) for p in positions_per_row], mean, batch_size)


def ablated_generate(vlm, inputs: ModelInputs, positions_per_row, mean: Float[Tensor, "d"],
                     max_new_tokens: int = 40, batch_size: int = 16) -> list[str]:
    """Greedy continuations, one per entry of ``positions_per_row``; the ablation applies to
    the prompt's forward (later steps read the image only through the KV cache)."""
    texts = []
    n_prompt = inputs["input_ids"].shape[1]
    for start in range(0, len(positions_per_row), batch_size):
        chunk = positions_per_row[start:start + batch_size]
        with torch.no_grad(), vlm.model.generate(**dict(repeat_inputs(inputs, len(chunk))),
                                                 max_new_tokens=max_new_tokens,
                                                 do_sample=False) as tracer:
            _ablate_rows(vlm, chunk, mean)
            ids = tracer.result.save()
        texts += vlm.tokenizer.batch_decode(ids[:, n_prompt:], skip_special_tokens=True)
    return texts


def run_task(vlm, task: Task, inputs: ModelInputs, answer_id: int, category: str,
             positions_per_row, mean: Float[Tensor, "d"], *, max_new_tokens: int = 40,
             batch_size: int = 16) -> list[dict]:
    """One result per entry of ``positions_per_row`` (None = unablated): the first-token
    answer for vqa/polling, the greedy description for the generative task."""
    if task.generate:
        texts = ablated_generate(vlm, inputs, positions_per_row, mean, max_new_tokens, batch_size)
        return [{"text": t, "correct": names_object(t, category)} for t in texts]
    return score(vlm, ablated_logits(vlm, inputs, positions_per_row, mean, batch_size), answer_id)


def _scored_tasks(vlm, image, prompts: dict[str, Prompt], answers: dict[str, int], conditions,
                  mean: Float[Tensor, "d"], batch_size: int) -> tuple[dict, ModelInputs]:
    """The first-token tasks (vqa, polling) as rows of one batch: each prompt processed once
    (right-padded), ``conditions`` = [(task, indices into the visual tokens or None)] scored
    ``batch_size`` rows per forward. Returns ({task: [result per condition]}, the batch)."""
    names = list(prompts)
    inputs = batch_inputs(vlm, image, [prompts[t] for t in names], padding_side="right")
    lay = vlm.layout(inputs)
    rows = [(names.index(t), None if idx is None else lay[names.index(t)].visual[idx])
            for t, idx in conditions]
    logits = ablated_rows(vlm, inputs, rows, mean, batch_size)
    out: dict = {t: [] for t in names}
    for (t, _), row_logits in zip(conditions, logits):
        out[t] += score(vlm, row_logits[None], answers[t])
    return out, inputs


def _subsets(vlm, image, sample: ObjectSample, visual: Float[Tensor, "n d"],
             mean: Float[Tensor, "d"], object_sets: dict, *, sizes, ig_steps: int,
             ig_batch_size: int | None, seed: int) -> dict:
    """Every subset to ablate besides the object's cells: register tokens (``visual``: the LM
    input's visual tokens), then random n and integrated-gradients top n (polling prompt,
    "Yes") for each size. IG steps go ``ig_batch_size`` per forward+backward (None: as many
    as fit `vlminterp.sweep.rows_for_memory`'s budget with every layer's activations kept)."""
    n_visual = len(visual)
    subsets = dict(object_sets)
    subsets["register"] = register_indices(visual)
    sizes = subset_sizes(sizes, n_visual, len(object_sets["object_b1"]))
    for name, n in sizes.items():
        subsets[f"random_{name}"] = random_indices(n_visual, n, sample.key, seed)
    poll, _, yes = task_inputs(vlm, image, TASKS["polling"], sample.category)
    if ig_batch_size is None:
        from vlminterp.sweep import rows_for_memory

        seq = poll["input_ids"].shape[1]
        ig_batch_size = max(1, rows_for_memory(vlm, seq) // (2 * vlm.n_layers))
    scores = integrated_gradients(vlm, poll, yes, mean, ig_steps, ig_batch_size).abs().sum(-1)
    for name, n in sizes.items():
        subsets[f"ig_{name}"] = top_indices(scores, n)
    return subsets


def _run(vlm, image, sample: ObjectSample, prepared: dict, tasks, index_sets,
         mean: Float[Tensor, "d"], max_new_tokens: int, batch_size: int) -> dict:
    """{task: one result per entry of ``index_sets`` (indices into the visual tokens, or None
    = unablated)}: the first-token tasks as rows of shared forwards, the generative one as
    rows of shared generations."""
    prompts = {t: prepared[t][1] for t in tasks if not TASKS[t].generate}
    answers = {t: prepared[t][2] for t in tasks}
    out: dict = {}
    if prompts:
        out, _ = _scored_tasks(vlm, image, prompts, answers,
                               [(t, idx) for t in prompts for idx in index_sets], mean, batch_size)
    for t in tasks:
        if TASKS[t].generate:
            inputs = prepared[t][0]
            visual = vlm.layout(inputs)[0].visual
            out[t] = run_task(vlm, TASKS[t], inputs, answers[t], sample.category,
                              [None if idx is None else visual[idx] for idx in index_sets], mean,
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
    return out


def object_ablation(vlm, image, sample: ObjectSample, mean: Float[Tensor, "d"], *,
                    tasks=("vqa", "polling", "generative"), sizes=(5, 10, 20, 40, 60, 100, 250),
                    ig_steps: int = 50, ig_batch_size: int | None = None,
                    max_new_tokens: int = 40, batch_size: int = 16, seed: int = 0,
                    keep_all: bool = False, use_polygons: bool = True,
                    question: str | None = None) -> list[dict]:
    """Mean-ablate token subsets of one image at the LM input, under each task; one record
    per (task, condition). Subsets: object cells with buffer 0/1/2, register tokens, random n
    and integrated-gradients top n for each size and n = the buffer-1 object set's size.
    ``question`` replaces the vqa task's generic question (the original asked per-image ones).
    Batched: (task x subset) rows share forwards (``batch_size`` rows each, the first-token
    tasks' prompts in one batch) and generations; with ``keep_all`` the baselines ride along
    with the subsets, else they run first to decide which tasks to keep."""
    prepared = {t: task_inputs(vlm, image, vqa_task(question) if t == "vqa" else TASKS[t],
                               sample.category) for t in tasks}
    first = prepared[tasks[0]][0]
    row = vlm.layout(first)[0]
    objects = {f"object_b{b}": object_indices(row, sample, b, use_polygons) for b in (0, 1, 2)}
    run = dict(vlm=vlm, image=image, sample=sample, prepared=prepared, mean=mean,
               max_new_tokens=max_new_tokens, batch_size=batch_size)
    subsets, results = None, None

    def make_subsets():
        return _subsets(vlm, image, sample, lm_input_visual(vlm, first), mean, objects,
                        sizes=sizes, ig_steps=ig_steps, ig_batch_size=ig_batch_size, seed=seed)

    if keep_all and len(objects["object_b0"]):
        subsets = make_subsets()
        both = _run(tasks=tasks, index_sets=[None, *subsets.values()], **run)
        base = {t: r[0] for t, r in both.items()}
        results = {t: r[1:] for t, r in both.items()}
    else:
        base = {t: r[0] for t, r in _run(tasks=tasks, index_sets=[None], **run).items()}
    records = [{"task": t, "condition": "baseline", "n_tokens": 0, **base[t],
                "baseline_correct": base[t]["correct"]} for t in tasks]
    kept = [t for t in tasks if keep_all or base[t]["correct"]]
    if not kept or not len(objects["object_b0"]):
        reason = "object outside the model's view" if kept else "baseline incorrect"
        return [{**r, "skipped": reason} for r in records]
    if results is None:
        subsets = make_subsets()
        results = _run(tasks=kept, index_sets=list(subsets.values()), **run)
    for t in kept:
        for (name, idx), res in zip(subsets.items(), results[t]):
            changed = res.get("token", res.get("text")) != base[t].get("token", base[t].get("text"))
            records.append({"task": t, "condition": name, "n_tokens": len(idx), **res,
                            "baseline_correct": base[t]["correct"], "changed": changed,
                            "indices": idx.tolist()})
    return records
