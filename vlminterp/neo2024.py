"""Neo et al. 2024 (arXiv 2410.07149): what the three ``recipes.neo2024_*`` programs share.

"Towards Interpreting Visual Information Processing in Vision-Language Models" asks where
LLaVA keeps object information: mean-ablating the visual tokens at the object's place in the
LM input breaks identification; the logit lens shows visual tokens turning into words of the
object late in the LM; blocking attention from object tokens to the last position in middle
to late layers hurts the answer. Everything here speaks standard names and layouts, so it runs
on LLaVA-1.5 and Qwen2-VL alike.

- Prompts (`prompt_text`, `prompt_inputs`): ``USER: <image>\\n{question} ASSISTANT: It is a``
  on LLaVA, the family's chat template + the same answer prefix elsewhere. One forward, argmax
  at the last position; `score` calls it correct when the object's first token (as it follows
  the prompt) starts with the decoded argmax token.
- The LM input is what ``vlm.layers[0]`` reads: the text embeddings with the projected image
  features already merged in (``vlm.embed``'s output does not hold them yet on LLaVA/Qwen).
  `ablate_lm_input` mean-ablates positions there; `integrated_gradients` attributes there.
- Token subsets are indices into the row's visual tokens (``layout.visual``), so one subset
  serves prompts of any length: `object_indices`, `register_indices`, `random_indices`,
  `top_indices`.
- `knockout_rows` blocks attention (query=target, key=source) per batch row and layer with an
  additive mask; `logit_lens_topk` reads every layer at every position.
"""

from __future__ import annotations

import argparse
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlminterp.data.coco import CocoObjects, ObjectSample, object_cells
from vlminterp.interventions import additive_mask, logit_lens
from vlminterp.models.base import ModelInputs

ANSWER_PREFIX = "It is a"
LAYER_GROUPS_32 = {"early": (0, 10), "mid": (11, 21), "late": (21, 32), "early_mid": (5, 15),
                   "mid_late": (15, 25), "all": (0, 32)}  # half-open, on LLaVA-1.5's 32 layers


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


# -- prompts and answers ------------------------------------------------------------------

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


def repeat_inputs(inputs: ModelInputs, n: int) -> ModelInputs:
    """A single-row batch repeated ``n`` times (image tensors too: LLaVA's [B,3,H,W] and
    Qwen's flattened patches both stack images along dim 0)."""
    out = {k: torch.cat([v] * n, dim=0) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    meta = {k: list(v) * n if isinstance(v, list) else v for k, v in inputs.meta.items()}
    return ModelInputs(out, meta=meta)


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


# -- token subsets (indices into a row's visual tokens) -------------------------------------

def object_indices(span, sample: ObjectSample, buffer: int = 0, use_polygons: bool = True
                   ) -> Int[Tensor, "_n"]:
    """Indices (into the image's tokens, row-major cells) of the cells the object overlaps."""
    cols = span.grid[1]
    cells = object_cells(sample, span.geometry, buffer, use_polygons)
    return torch.tensor([r * cols + c for r, c in cells], dtype=torch.long)


def register_indices(visual: Float[Tensor, "n d"]) -> Int[Tensor, "_k"]:
    """High-norm "register" tokens: norm > mean + 2·std of the visual-token norms."""
    norms = visual.float().norm(dim=-1)
    return torch.nonzero(norms > norms.mean() + 2 * norms.std()).flatten()


def random_indices(n_visual: int, n: int, key: str, seed: int = 0) -> Int[Tensor, "_n"]:
    """``n`` distinct visual indices, seeded by (seed, sample key) so reruns agree."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    return torch.randperm(n_visual, generator=gen)[:n].sort().values


def top_indices(scores: Float[Tensor, "n"], n: int) -> Int[Tensor, "_n"]:
    return scores.argsort(descending=True)[:n].sort().values


def subset_sizes(sizes, n_visual: int, n_object: int) -> dict[str, int]:
    """``{"5": 5, ..., "obj": n_object}``, dropping sizes beyond the visual token count."""
    out = {str(n): n for n in sizes if 0 < n <= n_visual}
    out["obj"] = n_object
    return out


# -- the LM input: read, mean-ablate, attribute --------------------------------------------

def lm_input_visual(vlm, inputs: ModelInputs, row: int = 0) -> Float[Tensor, "n d"]:
    """The visual tokens of ``row`` as layer 0 reads them (projected features, merged)."""
    pos = vlm.layout(inputs)[row].visual
    with torch.no_grad(), vlm.trace(inputs) as tracer:
        visual = vlm.layers[0].input[row, pos.to(vlm.device)].detach().clone().save()
        tracer.stop()
    return visual.float().cpu()


def ablate_lm_input(vlm, positions_per_row, mean: Float[Tensor, "d"]) -> None:
    """Inside a trace: write ``mean`` over ``positions_per_row[r]`` (sequence positions, or
    None) of each row of the LM input, i.e. ``vlm.layers[0].input``."""
    h = vlm.layers[0].input
    value = mean.to(device=h.device, dtype=h.dtype)
    for row, pos in enumerate(positions_per_row):
        if pos is not None and len(pos):
            h[row, pos.to(h.device)] = value


def ablated_logits(vlm, inputs: ModelInputs, positions_per_row, mean: Float[Tensor, "d"],
                   batch_size: int = 16) -> Float[Tensor, "rows vocab"]:
    """Last-position logits of the single-row ``inputs`` once per entry of
    ``positions_per_row`` (None = unablated), ``batch_size`` rows per traced forward."""
    out = []
    for start in range(0, len(positions_per_row), batch_size):
        chunk = positions_per_row[start:start + batch_size]
        with torch.no_grad(), vlm.trace(repeat_inputs(inputs, len(chunk))):
            ablate_lm_input(vlm, chunk, mean)
            logits = vlm.lm_head.output[:, -1].save()
        out.append(logits.float().cpu())
    return torch.cat(out)


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
            ablate_lm_input(vlm, chunk, mean)
            ids = tracer.result.save()
        texts += vlm.tokenizer.batch_decode(ids[:, n_prompt:], skip_special_tokens=True)
    return texts


def integrated_gradients(vlm, inputs: ModelInputs, target_id: int, baseline: Float[Tensor, "d"],
                         steps: int = 50, batch_size: int = 10) -> Float[Tensor, "n d"]:
    """Integrated gradients of the last position's ``target_id`` logit with respect to the
    visual tokens of the (single-row) LM input, from the baseline where every visual token is
    ``baseline`` (midpoint Riemann sum over ``steps`` points, ``batch_size`` per forward).
    Returns per-token, per-dimension attributions; they sum to about f(x) - f(baseline)."""
    pos = vlm.layout(inputs)[0].visual.to(vlm.device)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    total = None
    for chunk in alphas.split(batch_size):
        a = chunk.to(vlm.device)[:, None, None]
        with torch.enable_grad(), vlm.trace(repeat_inputs(inputs, len(chunk))):
            h = vlm.layers[0].input
            x = h[:1, pos].detach().float()
            base = baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
            interp = (base + a * (x - base)).requires_grad_(True)
            edited = h.detach().clone()
            edited[:, pos] = interp.to(h.dtype)
            vlm.layers[0].input = edited
            y = vlm.lm_head.output[:, -1, target_id].float().sum()
            grad = torch.autograd.grad(y, interp)[0].sum(0).save()
            diff = (x - base)[0].save()
        total = grad if total is None else total + grad
    return (diff * total / steps).detach().float().cpu()


# -- attention knockout ---------------------------------------------------------------------

def layer_groups(n_layers: int) -> dict[str, list[int]]:
    """The original's groups on 32 layers (early 0–9, mid 11–20, late 21–31, early_mid 5–14,
    mid_late 15–24, all), scaled to ``n_layers``; each keeps at least one layer."""
    out = {}
    for name, (a, b) in LAYER_GROUPS_32.items():
        lo = min(int(math.floor(a * n_layers / 32 + 0.5)), n_layers - 1)
        hi = min(max(int(math.floor(b * n_layers / 32 + 0.5)), lo + 1), n_layers)
        out[name] = list(range(lo, hi))
    return out


def sliding_windows(n_layers: int, k: int) -> dict[str, list[int]]:
    """Windows of ``k`` consecutive layers, ``window_<start>``."""
    k = max(1, min(k, n_layers))
    return {f"window_{s}": list(range(s, s + k)) for s in range(n_layers - k + 1)}


def knockout_sets(row, object_pos: dict[int, Tensor]) -> tuple[dict, dict]:
    """Sources (keys) and targets (queries) of the knockout experiment, as sequence positions:
    sources obj_b0/obj_b1/obj_b2 (object cells with buffer), image_minus_obj_b1, visual;
    targets last, last_row (the image's bottom row of tokens), text (text positions after the
    image, the last excluded)."""
    visual = row.visual
    span = row.images[0]
    keep = ~torch.isin(visual, object_pos[1])
    sources = {f"obj_b{b}": object_pos[b] for b in (0, 1, 2)}
    sources["image_minus_obj_b1"] = visual[keep]
    sources["visual"] = visual
    text_after = row.text[(row.text > visual.max()) & (row.text != row.last)]
    targets = {"last": torch.tensor([row.last]), "last_row": span.positions[-span.grid[1]:],
               "text": text_after}
    return sources, targets


def knockout_rows(vlm, blocks) -> None:
    """Inside a trace: for each ``(row, sources, targets, layers)`` block attention from the
    source positions (keys) to the target positions (queries) of that batch row in those
    layers. The mask reaching each ``self_attn`` becomes an additive float mask (causal and
    padding kept) with the dtype's minimum at blocked entries — their weights are exactly 0
    under eager and SDPA attention. Call before reading anything from these layers."""
    by_layer: dict[int, list] = {}
    for row, src, tgt, layers in blocks:
        for layer in layers:
            by_layer.setdefault(int(layer), []).append((row, src, tgt))
    for layer in sorted(by_layer):
        attn = vlm.layers[layer].self_attn
        args, kwargs = attn.inputs
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        mask = additive_mask(kwargs.get("attention_mask"), hidden)
        lowest = torch.finfo(mask.dtype).min
        for row, src, tgt in by_layer[layer]:
            if len(src) and len(tgt):
                t, s = tgt.to(mask.device), src.to(mask.device)
                mask[row, 0, t[:, None], s[None, :]] = lowest
        attn.inputs = (args, {**kwargs, "attention_mask": mask})


def knockout_logits(vlm, inputs: ModelInputs, conditions, batch_size: int = 16
                    ) -> Float[Tensor, "rows vocab"]:
    """Last-position logits of the single-row ``inputs`` once per ``(sources, targets,
    layers)`` condition (None = no knockout), ``batch_size`` rows per traced forward."""
    out = []
    for start in range(0, len(conditions), batch_size):
        chunk = conditions[start:start + batch_size]
        blocks = [(r, *c) for r, c in enumerate(chunk) if c is not None]
        with torch.no_grad(), vlm.trace(repeat_inputs(inputs, len(chunk))):
            knockout_rows(vlm, blocks)
            logits = vlm.lm_head.output[:, -1].save()
        out.append(logits.float().cpu())
    return torch.cat(out)


# -- logit lens -----------------------------------------------------------------------------

def logit_lens_topk(vlm, inputs: ModelInputs, k: int = 5, track: list[int] | None = None):
    """Row 0 through ``ln_final`` + ``lm_head`` at every layer output and position: top-``k``
    ids and probabilities ``[layers, seq, k]``, and the summed probability of the ``track``
    token ids ``[layers, seq]`` (zeros when not given)."""
    track_ids = torch.tensor(track or [], dtype=torch.long)
    ids, probs, tracked = [], [], []
    with torch.no_grad(), vlm.trace(inputs):
        for layer in range(vlm.n_layers):
            p = torch.softmax(logit_lens(vlm, vlm.layers[layer].output[0]).float(), dim=-1)
            top = p.topk(k, dim=-1)
            ids.append(top.indices.cpu().save())
            probs.append(top.values.cpu().save())
            tracked.append(p[:, track_ids.to(p.device)].sum(-1).cpu().save())
    return torch.stack(ids), torch.stack(probs), torch.stack(tracked)


def word_token_ids(vlm, word: str) -> list[int]:
    """Token ids that stand for ``word`` in a top-k list: first tokens of its spellings
    (``word``, ``' word'``, capitalised) that decode to a prefix of it of >= 3 characters (or
    the whole word); the first token of ``' word'`` when none qualifies."""
    w = word.lower()
    ids = set()
    for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
        t = vlm.token_id(variant)
        text = token_text(vlm, t).strip().lower()
        if text and w.startswith(text) and (len(text) >= 3 or text == w):
            ids.add(t)
    return sorted(ids) or [vlm.token_id(" " + word)]


# -- command line, data, summaries --------------------------------------------------------

def add_common_args(p: argparse.ArgumentParser) -> None:
    """Model, data and output flags every neo2024 recipe takes."""
    p.add_argument("--model_id", default="tiny-llava", help="tiny-llava (offline, random weights), "
                   "tiny-qwen2-vl, llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B-Instruct or a local dir "
                   "(default: tiny-llava)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--coco_annotations", type=Path, help="COCO instances_*.json (needs --image_root)")
    data.add_argument("--synthetic", type=int, metavar="N", help="generate N images with known "
                      "objects next to --output and use them (offline)")
    p.add_argument("--image_root", type=Path, help="folder the annotations' file_name values are under")
    p.add_argument("--output", type=Path, required=True, help="results JSON; the per-image log "
                   "<output>.jsonl beside it makes reruns skip finished images")
    p.add_argument("--limit", type=int, default=None, help="use at most this many samples")
    p.add_argument("--no_curate", action="store_true", help="keep every annotation, not only "
                   "Neo et al.'s simple scenes (<= 3 annotations, a category present once with "
                   "area in [min_area, max_area])")
    p.add_argument("--max_annotations", type=int, default=3, help="curation: most annotations per image")
    p.add_argument("--min_area", type=float, default=1000.0, help="curation: least object area (px²)")
    p.add_argument("--max_area", type=float, default=2000.0, help="curation: most object area (px²)")
    p.add_argument("--use_boxes", action="store_true", help="map objects to cells by their box, "
                   "ignoring segmentation polygons")
    p.add_argument("--keep_all", action="store_true", help="keep images the un-ablated model gets "
                   "wrong too (offline demos with random-weight tiny models; recorded in the JSON)")
    p.add_argument("--batch_size", type=int, default=16, help="rows per traced forward (default 16)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="model dtype (default: float32 for tiny models, the checkpoint's otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic data and random subsets")


def add_questions_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", type=Path, default=None, help="JSON object: image id or file "
                   "name -> vqa question (or a list; the first is used), as the original's "
                   "per-image questions (default: 'What is the main object in this image?')")


def check_args(p: argparse.ArgumentParser, args) -> None:
    if args.coco_annotations is not None and args.image_root is None:
        p.error("--coco_annotations needs --image_root")
    for flag in ("synthetic", "limit", "batch_size", "ig_steps", "ig_batch_size", "max_new_tokens",
                 "top_k", "window"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            p.error(f"--{flag}: expected a positive number, got {value}")
    for flag in ("heatmap_images", "html_images"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            p.error(f"--{flag}: expected 0 or more, got {value}")


def load_model(args):
    import vlminterp

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return vlminterp.load(args.model_id, device=device, dtype=dtype)


def load_samples(args) -> tuple[CocoObjects, list[ObjectSample]]:
    """The dataset the flags name (``--synthetic`` writes it beside ``--output`` first)."""
    if args.synthetic:
        from vlminterp.data.synthetic_images import write_dataset

        root = args.output.with_name(args.output.stem + "_synthetic")
        annotations, image_root = write_dataset(root, args.synthetic, seed=args.seed), root
    else:
        annotations, image_root = args.coco_annotations, args.image_root
    coco = CocoObjects(annotations, image_root)
    samples = coco.samples(not args.no_curate, max_annotations=args.max_annotations,
                           min_area=args.min_area, max_area=args.max_area, limit=args.limit)
    if not samples:
        raise SystemExit(f"{annotations}: no samples pass the filter (try --no_curate)")
    return coco, samples


def rate(flags, seed: int = 0) -> dict:
    """Percentage of true flags with a 95% bootstrap interval (None values when empty)."""
    from vlminterp.stats import bootstrap_ci

    values = [100.0 * bool(f) for f in flags]
    if not values:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    value, lo, hi = bootstrap_ci(values, num_resamples=1000, seed=seed)
    return {"value": value, "lo": lo, "hi": hi, "n": len(values)}


def mean_ci(values, seed: int = 0) -> dict:
    from vlminterp.stats import bootstrap_ci

    values = [float(v) for v in values if v is not None]
    if not values:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    value, lo, hi = bootstrap_ci(values, num_resamples=1000, seed=seed)
    return {"value": value, "lo": lo, "hi": hi, "n": len(values)}


def run_samples(samples, log, desc: str, fn) -> None:
    """Call ``fn(sample) -> records`` for each sample the `ResultLog` has not finished, with a
    progress bar; log the records (or the sample's data error, one line) under its key."""
    from tqdm import tqdm

    from vlminterp.data.coco import CocoError

    for s in tqdm([s for s in samples if s.key not in log.done], desc=desc):
        try:
            records = fn(s)
        except CocoError as e:
            log.append_error(s.key, str(e))
            continue
        log.append(s.key, [{"key": s.key, "category": s.category, **r} for r in records])


def values(stats: list[dict], field: str = "value") -> list[float]:
    """One field of a list of `rate`/`mean_ci` results, for plotting (None -> NaN)."""
    return [math.nan if st[field] is None else st[field] for st in stats]


def run_info(args, **extra) -> dict:
    """The settings a results JSON records (paths as strings)."""
    info = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    note = ("keep_all: images the un-ablated model gets wrong are kept too (offline demo); "
            "drop rates count only initially correct images") if args.keep_all else None
    return {**info, "keep_all_note": note, **extra}


# -- one image of each experiment ------------------------------------------------------------

def vqa_task(question: str | None = None) -> Task:
    """The vqa task, with ``question`` in place of the generic one when given."""
    return TASKS["vqa"] if not question else Task("vqa", question, ANSWER_PREFIX)


def load_questions(path: Path | None) -> dict[str, str]:
    """Per-image vqa questions: a JSON object mapping image id (as a string) or file name to
    a question, or to a list of questions (the first is used), as the original's
    clean_questions file. Errors name the file and the entry."""
    import json

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
        q = q[0] if isinstance(q, list) and q else q
        if not isinstance(q, str) or not q.strip():
            raise SystemExit(f"{path}: [{key!r}]: expected a question string, got {q!r}")
        out[str(key)] = q.strip()
    return out


def question_for(questions: dict[str, str], sample: ObjectSample) -> str | None:
    return questions.get(str(sample.image_id), questions.get(sample.file_name))


def task_inputs(vlm, image, task: Task, category: str) -> tuple[ModelInputs, str, int]:
    """Inputs, verbatim prompt and answer token id of ``task`` on one image."""
    text = prompt_text(vlm, task.question.format(category=category), task.answer_prefix)
    inputs = vlm.prepare(text=text, images=[image], chat=False)
    return inputs, text, continuation_id(vlm, text, task.answer_word(category))


def run_task(vlm, task: Task, inputs: ModelInputs, answer_id: int, category: str,
             positions_per_row, mean: Float[Tensor, "d"], *, max_new_tokens: int = 40,
             batch_size: int = 16) -> list[dict]:
    """One result per entry of ``positions_per_row`` (None = unablated): the first-token
    answer for vqa/polling, the greedy description for the generative task."""
    if task.generate:
        texts = ablated_generate(vlm, inputs, positions_per_row, mean, max_new_tokens, batch_size)
        return [{"text": t, "correct": names_object(t, category)} for t in texts]
    return score(vlm, ablated_logits(vlm, inputs, positions_per_row, mean, batch_size), answer_id)


def object_ablation(vlm, image, sample: ObjectSample, mean: Float[Tensor, "d"], *,
                    tasks=("vqa", "polling", "generative"), sizes=(5, 10, 20, 40, 60, 100, 250),
                    ig_steps: int = 50, ig_batch_size: int = 4, max_new_tokens: int = 40,
                    batch_size: int = 16, seed: int = 0, keep_all: bool = False,
                    use_polygons: bool = True,
                    question: str | None = None) -> list[dict]:
    """Mean-ablate token subsets of one image at the LM input, under each task; one record
    per (task, condition). Subsets: object cells with buffer 0/1/2, register tokens, random n
    and integrated-gradients top n for each size and n = the buffer-1 object set's size.
    ``question`` replaces the vqa task's generic question (the original asked per-image ones)."""
    prepared = {t: task_inputs(vlm, image, vqa_task(question) if t == "vqa" else TASKS[t],
                               sample.category) for t in tasks}
    base = {t: run_task(vlm, TASKS[t], p[0], p[2], sample.category, [None], mean,
                        max_new_tokens=max_new_tokens, batch_size=batch_size)[0]
            for t, p in prepared.items()}
    records = [{"task": t, "condition": "baseline", "n_tokens": 0, **base[t],
                "baseline_correct": base[t]["correct"]} for t in tasks]
    kept = [t for t in tasks if keep_all or base[t]["correct"]]
    first = prepared[tasks[0]][0]
    row = vlm.layout(first)[0]
    span, n_visual = row.images[0], len(row.visual)
    subsets = {f"object_b{b}": object_indices(span, sample, b, use_polygons) for b in (0, 1, 2)}
    if not kept or not len(subsets["object_b0"]):
        reason = "object outside the model's view" if kept else "baseline incorrect"
        return [{**r, "skipped": reason} for r in records]
    subsets["register"] = register_indices(lm_input_visual(vlm, first))
    sizes = subset_sizes(sizes, n_visual, len(subsets["object_b1"]))
    for name, n in sizes.items():
        subsets[f"random_{name}"] = random_indices(n_visual, n, sample.key, seed)
    poll, _, yes = task_inputs(vlm, image, TASKS["polling"], sample.category)
    scores = integrated_gradients(vlm, poll, yes, mean, ig_steps, ig_batch_size).abs().sum(-1)
    for name, n in sizes.items():
        subsets[f"ig_{name}"] = top_indices(scores, n)
    for t in kept:
        inputs, _, answer_id = prepared[t]
        visual = vlm.layout(inputs)[0].visual
        results = run_task(vlm, TASKS[t], inputs, answer_id, sample.category,
                           [visual[idx] for idx in subsets.values()], mean,
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
        for (name, idx), res in zip(subsets.items(), results):
            changed = res.get("token", res.get("text")) != base[t].get("token", base[t].get("text"))
            records.append({"task": t, "condition": name, "n_tokens": len(idx), **res,
                            "baseline_correct": base[t]["correct"], "changed": changed,
                            "indices": idx.tolist()})
    return records


def attention_knockout(vlm, image, sample: ObjectSample, *, window: int | None = None,
                       groups: bool = True, sources=None, targets=None, batch_size: int = 16,
                       keep_all: bool = False, use_polygons: bool = True,
                       question: str | None = None) -> list[dict]:
    """Knock out attention source -> target over layer groups and sliding windows of
    ``window`` layers (default: 9 of 32, scaled) under the vqa prompt; one record per
    (source, target, layers) plus the baseline."""
    task = vqa_task(question)
    inputs, _, answer_id = task_inputs(vlm, image, task, sample.category)
    base = score(vlm, knockout_logits(vlm, inputs, [None]), answer_id)[0]
    records = [{"source": None, "target": None, "layers": "baseline", "layer_list": [], **base,
                "delta_p": 0.0, "baseline_correct": base["correct"]}]
    row = vlm.layout(inputs)[0]
    span = row.images[0]
    obj = {b: span.positions[object_indices(span, sample, b, use_polygons)] for b in (0, 1, 2)}
    if not (keep_all or base["correct"]) or not len(obj[0]):
        reason = "object outside the model's view" if len(obj[0]) else "baseline incorrect"
        return [{**records[0], "skipped": reason}]
    src_sets, tgt_sets = knockout_sets(row, obj)
    n = vlm.n_layers
    layer_sets = dict(layer_groups(n)) if groups else {}
    layer_sets.update(sliding_windows(n, window or max(1, int(math.floor(9 * n / 32 + 0.5)))))
    conds = [(s, t, name) for s in (sources or src_sets) for t in (targets or tgt_sets)
             for name in layer_sets]
    masks = []
    for s, t, name in conds:
        src, tgt = src_sets[s], tgt_sets[t]
        masks.append((src[~torch.isin(src, tgt)], tgt, layer_sets[name]))
    results = score(vlm, knockout_logits(vlm, inputs, masks, batch_size), answer_id)
    for (s, t, name), (src, tgt, layers), res in zip(conds, masks, results):
        records.append({"source": s, "target": t, "layers": name, "layer_list": layers, **res,
                        "n_sources": len(src), "n_targets": len(tgt),
                        "delta_p": res["p_correct"] - base["p_correct"],
                        "baseline_correct": base["correct"]})
    return records


def lens_image(vlm, image, sample: ObjectSample, *, k: int = 5,
               question: str = "Describe the image.", use_polygons: bool = True):
    """Logit lens of one image: the record (per layer, the fraction of object tokens and of
    background tokens — outside the buffer-1 object set — whose top-k holds the category
    word) and the tensors to store (top-k ids/probs [layers, seq, k], the category words'
    probability [layers, seq])."""
    inputs = prompt_inputs(vlm, [image], question)
    row = vlm.layout(inputs)[0]
    span = row.images[0]
    words = word_token_ids(vlm, sample.category)
    ids, probs, tracked = logit_lens_topk(vlm, inputs, k, words)
    hits = torch.isin(ids[:, row.visual], torch.tensor(words)).any(-1).float()  # [L, n_visual]
    obj = object_indices(span, sample, 0, use_polygons)
    near = object_indices(span, sample, 1, use_polygons)
    background = torch.tensor([i for i in range(len(row.visual)) if i not in set(near.tolist())],
                              dtype=torch.long)

    def fraction(idx):
        return hits[:, idx].mean(1).tolist() if len(idx) else [None] * vlm.n_layers

    record = {"category": sample.category, "category_token_ids": words, "n_object": len(obj),
              "n_background": len(background), "object_fraction": fraction(obj),
              "background_fraction": fraction(background)}
    meta = {"category": sample.category, "file_name": sample.file_name, "grid": list(span.grid),
            "word_ids": words,
            "visual": row.visual.tolist(), "object_indices": obj.tolist(),
            "tokens": vlm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())}
    tensors = {"ids": ids.to(torch.int32), "probs": probs.to(torch.float16), "category_prob": tracked}
    return record, tensors, meta


def model_view(image, geometry):
    """The part of ``image`` the patch grid covers: resized then cropped as the processor does."""
    return image.resize(geometry.resized).crop(geometry.crop_box)


def dataset_mean(vlm, coco: CocoObjects, samples, store_dir: Path, progress: bool = True
                 ) -> Float[Tensor, "d"]:
    """Mean visual token at the LM input over the dataset's images (the ablation vector and
    the integrated-gradients baseline). Each image's mean is kept in an `ActivationStore`
    under ``store_dir`` (reruns reuse it); the result is `streaming_mean` over images — the
    token mean when every image has the same token count, as on LLaVA."""
    from tqdm import tqdm

    from vlminterp.store import ActivationStore, streaming_mean

    store = ActivationStore(store_dir)
    todo = {f"image:{s.image_id}": s for s in samples}
    todo = {k: s for k, s in todo.items() if k not in store}
    for key, s in tqdm(todo.items(), desc="mean vector", disable=not progress):
        inputs = prompt_inputs(vlm, [coco.load_image(s)], TASKS["generative"].question)
        visual = lm_input_visual(vlm, inputs)
        store.put(key, {"mean": visual.mean(0)}, meta={"n_visual": len(visual)})
    return streaming_mean(store, "mean")


_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>Logit lens</title><style>
body{font-family:sans-serif;margin:16px}#wrap{display:flex;gap:24px;align-items:flex-start}
#view{position:relative;display:inline-block}#view img{display:block;image-rendering:pixelated}
.cell{position:absolute;box-sizing:border-box;border:1px solid rgba(255,255,255,.35)}
.cell:hover,.cell.on{border:2px solid #ff0;background:rgba(255,255,0,.15)}
.obj{outline:2px solid rgba(255,0,0,.8);outline-offset:-3px}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}
td.hit{background:#ffd7d7}</style></head><body>
<h2>Logit lens: top tokens of each image patch, per layer</h2>
<p>Hover a patch (red outline: the object's cells). Each row is a layer's top-K through
ln_final + lm_head; cells holding the category word are shaded.</p>
<select id="pick"></select><div id="wrap"><div id="view"></div><div id="info"></div></div>
<script>
const DATA = __DATA__;
const pick = document.getElementById("pick"), view = document.getElementById("view"),
      info = document.getElementById("info");
DATA.forEach((d, i) => { const o = document.createElement("option"); o.value = i;
  o.textContent = d.title; pick.appendChild(o); });
function show(i) {
  const d = DATA[i], scale = d.scale; view.innerHTML = ""; info.textContent = "";
  const img = document.createElement("img"); img.src = d.image;
  img.width = d.width * scale; img.height = d.height * scale; view.appendChild(img);
  d.patches.forEach((layers, p) => {
    const r = Math.floor(p / d.cols), c = p % d.cols, el = document.createElement("div");
    el.className = "cell" + (d.object.includes(p) ? " obj" : "");
    Object.assign(el.style, {left: c * d.cell * scale + "px", top: r * d.cell * scale + "px",
      width: d.cell * scale + "px", height: d.cell * scale + "px"});
    el.onmouseenter = () => table(d, p, r, c); view.appendChild(el); });
}
function table(d, p, r, c) {
  info.textContent = "";
  const h = document.createElement("h3");
  h.textContent = `patch (${r}, ${c}) - position ${d.positions[p]} - ${d.category}`;
  info.appendChild(h);
  const t = document.createElement("table");
  d.patches[p].forEach((top, layer) => { const tr = t.insertRow(); tr.insertCell().textContent = "L" + layer;
    top.forEach(([tok, prob]) => { const td = tr.insertCell();
      td.textContent = `${tok} (${prob.toFixed(3)})`; if (d.words.includes(tok.trim().toLowerCase())) td.className = "hit"; }); });
  info.appendChild(t);
}
pick.onchange = () => show(pick.value); show(0);
</script></body></html>"""


def write_lens_html(path: Path, views: list[dict]) -> Path:
    """A self-contained page (inline image and script, no network): hover a patch of an image
    to see its top tokens at every layer. ``views`` come from `lens_view`."""
    import json

    from vlminterp.store import atomic_write

    data = json.dumps(views).replace("</", "<\\/")  # no "</script>" inside the script
    page = _HTML.replace("__DATA__", data)
    return atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def lens_view(vlm, image, geometry, tensors: dict, meta: dict, title: str) -> dict:
    """One image's entry of `write_lens_html`: the model's view of the image, and per patch
    the top tokens (text, probability) of every layer."""
    import base64
    import io

    view = model_view(image, geometry)
    scale = max(1, 448 // max(view.size))
    buf = io.BytesIO()
    view.save(buf, format="PNG")
    ids, probs = tensors["ids"], tensors["probs"].float()
    vocab = {}
    patches = []
    for pos in meta["visual"]:
        layers = []
        for layer in range(ids.shape[0]):
            top = []
            for t, p in zip(ids[layer, pos].tolist(), probs[layer, pos].tolist()):
                if t not in vocab:
                    vocab[t] = token_text(vlm, t)
                top.append([vocab[t], round(p, 4)])
            layers.append(top)
        patches.append(layers)
    words = sorted({token_text(vlm, t).strip().lower() for t in meta.get("word_ids", [])}
                   | {meta["category"].lower()})
    return {"title": title, "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
            "width": view.size[0], "height": view.size[1], "scale": scale, "cell": geometry.cell,
            "cols": meta["grid"][1], "positions": meta["visual"], "object": meta["object_indices"],
            "category": meta["category"], "words": words, "patches": patches}


# -- summaries --------------------------------------------------------------------------------

def _group(records, *fields) -> dict:
    out: dict = {}
    for r in records:
        out.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    return out


def summarize_ablation(records: list[dict], seed: int = 0) -> dict:
    """Per task and condition: ``drop_pct`` — the percentage of initially correct answers that
    are wrong after ablation (the paper's metric) — and ``changed_pct`` — the percentage of
    kept images whose answer changed at all — with 95% bootstrap intervals, the mean change in
    the correct token's probability and the mean subset size."""
    base = {(r["key"], r["task"]): r for r in records if r["condition"] == "baseline"}
    out: dict = {}
    for (task, cond), rows in _group([r for r in records if r["condition"] != "baseline"],
                                     "task", "condition").items():
        deltas = [r["p_correct"] - base[(r["key"], task)]["p_correct"] for r in rows
                  if r.get("p_correct") is not None]
        out.setdefault(task, {})[cond] = {
            "drop_pct": rate([not r["correct"] for r in rows if r["baseline_correct"]], seed),
            "changed_pct": rate([r["changed"] for r in rows], seed),
            "delta_p_correct": mean_ci(deltas, seed),
            "n_tokens_mean": sum(r["n_tokens"] for r in rows) / len(rows),
        }
    for task in {t for _, t in base}:
        flags = [r["correct"] for (k, t), r in base.items() if t == task]
        out.setdefault(task, {})["baseline_accuracy_pct"] = rate(flags, seed)
    return out


def summarize_knockout(records: list[dict], seed: int = 0) -> dict:
    """Per ``source->target`` and layer set: accuracy after knockout (% correct) and the mean
    change in the correct token's probability, with 95% bootstrap intervals."""
    out: dict = {}
    for (s, t, layers), rows in _group([r for r in records if r["layers"] != "baseline"],
                                       "source", "target", "layers").items():
        out.setdefault(f"{s}->{t}", {})[layers] = {
            "layer_list": rows[0]["layer_list"],
            "accuracy_pct": rate([r["correct"] for r in rows], seed),
            "drop_pct": rate([not r["correct"] for r in rows if r["baseline_correct"]], seed),
            "delta_p_correct": mean_ci([r["delta_p"] for r in rows], seed),
        }
    base = [r["correct"] for r in records if r["layers"] == "baseline"]
    return {"baseline_accuracy_pct": rate(base, seed), "conditions": out}


def summarize_lens(records: list[dict], n_layers: int, seed: int = 0) -> dict:
    """Per layer, the mean over images of the object / background fractions, with intervals."""
    out = {}
    for field in ("object_fraction", "background_fraction"):
        out[field] = [mean_ci([r[field][layer] for r in records], seed) for layer in range(n_layers)]
    return out


# -- plots ------------------------------------------------------------------------------------

def _bars(stats: dict, path, **kw) -> None:
    from vlminterp.plots import bar_plot

    rows = list(stats.values())
    bar_plot(list(stats), values(rows), path, errors=(values(rows, "lo"), values(rows, "hi")), **kw)


def plot_ablation(summary: dict, tasks, stem: Path, model_id: str) -> None:
    """``<stem>_<task>.png``: per condition the drop rate (or, when no image was initially
    correct, the rate of changed answers) with its 95% interval."""
    for task in tasks:
        conds = {c: v for c, v in summary.get(task, {}).items() if c != "baseline_accuracy_pct"}
        if not conds:
            continue
        has_drop = any(v["drop_pct"]["n"] for v in conds.values())
        metric = "drop_pct" if has_drop else "changed_pct"
        _bars({c: v[metric] for c, v in conds.items()}, f"{stem}_{task}.png",
              ylabel="% initially correct now wrong" if has_drop else "% answers changed",
              title=f"Mean ablation at the LM input ({task}, {model_id})")


def plot_knockout(summary: dict, target: str, stem: Path, model_id: str) -> None:
    """``<stem>.png``: change in p(correct) per sliding window, one line per source (to
    ``target``); ``<stem>_groups.png``: accuracy per source and layer group."""
    from vlminterp.plots import line_plot

    per_source = {k.split("->")[0]: per for k, per in summary["conditions"].items()
                  if k.endswith(f"->{target}")}
    curves, bands, starts = {}, {}, None
    for source, per in per_source.items():
        windows = sorted((v["layer_list"][0], v["delta_p_correct"]) for k, v in per.items()
                         if k.startswith("window_"))
        if windows:
            starts, stats = [w for w, _ in windows], [c for _, c in windows]
            curves[source], bands[source] = values(stats), (values(stats, "lo"), values(stats, "hi"))
    if curves:
        line_plot(starts, curves, f"{stem}.png", bands=bands, xlabel="first layer of the window",
                  ylabel="change in p(correct token)",
                  title=f"Attention knockout -> {target} ({model_id})")
    groups = {f"{source}:{g}": v["accuracy_pct"] for source, per in per_source.items()
              for g, v in per.items() if not g.startswith("window_")}
    if groups:
        _bars(groups, f"{stem}_groups.png", ylabel="accuracy after knockout (%)",
              title=f"Knockout -> {target} by layer group ({model_id})")


def plot_lens(summary: dict, stem: Path, model_id: str, k: int) -> None:
    """``<stem>.png``: object vs background fraction per layer with 95% intervals."""
    from vlminterp.plots import line_plot

    series = {"object": summary["object_fraction"], "background": summary["background_fraction"]}
    if all(st["n"] == 0 for v in series.values() for st in v):
        return
    line_plot(list(range(len(series["object"]))), {n: values(v) for n, v in series.items()},
              f"{stem}.png", bands={n: (values(v, "lo"), values(v, "hi")) for n, v in series.items()},
              xlabel="layer", ylabel=f"fraction whose top-{k} holds the category",
              title=f"Logit lens on visual tokens ({model_id})")


def lens_figures(vlm, coco: CocoObjects, samples, store, stem: Path, *, question: str,
                 layer: int, heatmaps: int, html: int) -> None:
    """``<stem>_heatmap_<i>.png`` (the category word's lens probability over the patch grid at
    ``layer``) for the first ``heatmaps`` samples, and ``<stem>.html`` for the first ``html``."""
    from vlminterp.plots import grid_heatmap

    views = []
    for i, s in enumerate(samples[:max(heatmaps, html)]):
        image, tensors, meta = coco.load_image(s), store.get(s.key), store.meta(s.key)
        span = vlm.layout(prompt_inputs(vlm, [image], question))[0].images[0]
        if i < heatmaps:
            grid_heatmap(tensors["category_prob"][layer, meta["visual"]], f"{stem}_heatmap_{i}.png",
                         grid=span.grid, cbar_label=f"p({s.category})",
                         title=f"{s.file_name}: p({s.category}) at layer {layer}")
        if i < html:
            views.append(lens_view(vlm, image, span.geometry, tensors, meta,
                                   f"{s.file_name} ({s.category})"))
    if views:
        write_lens_html(Path(f"{stem}.html"), views)
