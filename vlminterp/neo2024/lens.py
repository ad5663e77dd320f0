"""Experiment 2: the logit lens on visual tokens — every layer's output at every position
through ``ln_final`` + ``lm_head`` — and its figures: patch-grid heatmaps and a self-contained
HTML page to hover a patch and read its top tokens per layer."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import torch

from vlminterp.data.coco import CocoObjects, ObjectSample, object_cells
from vlminterp.interventions import logit_lens
from vlminterp.models.base import ModelInputs
from vlminterp.neo2024.prompts import prompt_inputs, token_text
from vlminterp.neo2024.subsets import object_indices
from vlminterp.store import atomic_write


def logit_lens_topk(vlm, inputs: ModelInputs, k: int = 5, track: list[int] | None = None):
    """Row 0 through ``ln_final`` + ``lm_head`` at every layer output and position: top-``k``
    ids and probabilities ``[layers, seq, k]``, and the summed probability of the ``track``
    token ids ``[layers, seq]`` (zeros when not given)."""
    import nnsight  # here, not at module import: keeps `--help` light

    track_ids = torch.tensor(track or [], dtype=torch.long)
    with torch.no_grad(), vlm.trace(inputs):
        # Containers made inside the trace and saved: NDIF sends back only saved objects.
        ids, probs, tracked = nnsight.save([]), nnsight.save([]), nnsight.save([])
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


def shown_view(span):
    """The view the heatmaps and the HTML page draw: the one showing the whole image — the
    first view with a pixel geometry that is not a tile (LLaVA's grid, LLaVA-NeXT's base
    view, InternVL's thumbnail, SmolVLM's global view) — else the first view."""
    whole = [v for v in span.views if v.geometry is not None and v.kind not in ("tile", "tiles")]
    return (whole or span.views)[0]


def lens_image(vlm, image, sample: ObjectSample, *, k: int = 5,
               question: str = "Describe the image.", use_polygons: bool = True):
    """Logit lens of one image: the record (per layer, the fraction of object tokens — the
    object's cells in every view — and of background tokens — every view's patches outside
    the buffer-1 object set — whose top-k holds the category word) and the tensors to store
    (top-k ids/probs [layers, seq, k], the category words' probability [layers, seq]); the
    meta names the drawn view (`shown_view`): its positions, grid and object cells."""
    inputs = prompt_inputs(vlm, [image], question)
    row = vlm.layout(inputs)[0]
    view = shown_view(row.images[0])
    words = word_token_ids(vlm, sample.category)
    ids, probs, tracked = logit_lens_topk(vlm, inputs, k, words)
    hits = torch.isin(ids[:, row.visual], torch.tensor(words)).any(-1).float()  # [L, n_visual]
    obj = object_indices(row, sample, 0, use_polygons)
    near = set(object_indices(row, sample, 1, use_polygons).tolist())
    background = torch.tensor([i for i in range(len(row.visual)) if i not in near],
                              dtype=torch.long)

    def fraction(idx):
        return hits[:, idx].mean(1).tolist() if len(idx) else [None] * vlm.n_layers

    cols = view.grid[1]
    view_object = [] if view.geometry is None else sorted(
        r * cols + c for r, c in object_cells(sample, view.geometry, 0, use_polygons))
    record = {"category": sample.category, "category_token_ids": words, "n_object": len(obj),
              "n_background": len(background), "object_fraction": fraction(obj),
              "background_fraction": fraction(background)}
    meta = {"category": sample.category, "file_name": sample.file_name, "grid": list(view.grid),
            "word_ids": words, "view": view.kind, "view_positions": view.positions.tolist(),
            "view_object": view_object,
            "visual": row.visual.tolist(), "object_indices": obj.tolist(),
            "tokens": vlm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())}
    tensors = {"ids": ids.to(torch.int32), "probs": probs.to(torch.float16), "category_prob": tracked}
    return record, tensors, meta


def model_view(image, geometry):
    """The part of ``image`` the patch grid covers: resized then cropped as the processor does
    (sizes rounded to whole pixels for the picture)."""
    size = tuple(max(1, round(float(v))) for v in geometry.resized)
    return image.resize(size).crop(tuple(round(float(v)) for v in geometry.crop_box))


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
    data = json.dumps(views).replace("</", "<\\/")  # no "</script>" inside the script
    page = _HTML.replace("__DATA__", data)
    return atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def lens_view(vlm, image, geometry, tensors: dict, meta: dict, title: str) -> dict:
    """One image's entry of `write_lens_html`: the drawn view of the image (`shown_view`:
    ``meta``'s ``view_positions``, ``grid``, ``view_object``), and per patch the top tokens
    (text, probability) of every layer."""
    view = model_view(image, geometry)
    scale = max(1, 448 // max(view.size))
    buf = io.BytesIO()
    view.save(buf, format="PNG")
    ids, probs = tensors["ids"], tensors["probs"].float()
    positions = meta.get("view_positions", meta["visual"])
    vocab = {}
    patches = []
    for pos in positions:
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
            "width": view.size[0], "height": view.size[1], "scale": scale,
            "cell": float(geometry.cell), "cols": meta["grid"][1], "positions": positions,
            "object": meta.get("view_object", meta["object_indices"]),
            "category": meta["category"], "words": words, "patches": patches}


def lens_figures(vlm, coco: CocoObjects, samples, store, stem: Path, *, question: str,
                 layer: int, heatmaps: int, html: int) -> None:
    """``<stem>_heatmap_<i>.png`` (the category word's lens probability over the patch grid of
    the drawn view, `shown_view`, at ``layer``) for the first ``heatmaps`` samples, and
    ``<stem>.html`` for the first ``html``."""
    from vlminterp.plots import grid_heatmap

    views = []
    for i, s in enumerate(samples[:max(heatmaps, html)]):
        image, tensors, meta = coco.load_image(s), store.get(s.key), store.meta(s.key)
        view = shown_view(vlm.layout(prompt_inputs(vlm, [image], question))[0].images[0])
        positions = meta.get("view_positions", meta["visual"])
        kind = "" if view.kind == "base" else f" ({view.kind} view)"
        if i < heatmaps:
            grid_heatmap(tensors["category_prob"][layer, positions], f"{stem}_heatmap_{i}.png",
                         grid=tuple(meta["grid"]), cbar_label=f"p({s.category})",
                         title=f"{s.file_name}: p({s.category}) at layer {layer}{kind}")
        if i < html and view.geometry is not None:
            views.append(lens_view(vlm, image, view.geometry, tensors, meta,
                                   f"{s.file_name} ({s.category}){kind}"))
    if views:
        write_lens_html(Path(f"{stem}.html"), views)
