"""Neo et al. 2024, experiment 2: the logit lens on visual tokens. Every layer's output at every
position goes through ln_final + lm_head (prompt: --question); the top-k tokens are kept.

Reports per layer the fraction of object tokens (the object's cells) and of background tokens
(outside the buffer-1 object cells) whose top-k holds the category word. Writes the JSON,
<stem>.jsonl (per-image log, reruns resume), <stem>_lens/ (top-k ids and probabilities of every
layer and position, safetensors), <stem>.png (fractions over layers), <stem>_heatmap_<i>.png
(the category word's probability over the patch grid at --heatmap_layer) and <stem>.html (hover
a patch to see its top tokens per layer; self-contained, no network).

  python -m recipes.neo2024_logit_lens --synthetic 8 --output runs/lens.json
  python -m recipes.neo2024_logit_lens --model_id llava-hf/llava-1.5-7b-hf \\
      --coco_annotations coco/annotations/instances_val2017.json --image_root coco/val2017 \\
      --output runs/lens.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlminterp import neo2024 as neo
from vlminterp.neo2024.cli import RESULT_FLAGS as COMMON_RESULT_FLAGS
from vlminterp.neo2024.cli import SELECTION_FLAGS  # noqa: F401  (not result flags here)
from vlminterp.neo2024.cli import open_results_log, results
from vlminterp.runs import as_recipe_errors, final_line, recipe_main
from vlminterp.shards import start
from vlminterp.store import ActivationStore, write_json_atomic

RESULT_FLAGS = COMMON_RESULT_FLAGS + ("question", "top_k")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.neo2024_logit_lens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    neo.add_common_args(p)
    p.add_argument("--question", default="Describe the image.", help="prompt text (default: "
                   "'Describe the image.'); every image is kept, the lens needs no right answer")
    p.add_argument("--top_k", type=int, default=5, help="tokens kept per layer and position (default 5)")
    p.add_argument("--heatmap_layer", type=int, default=None,
                   help="layer of the patch-grid heatmaps (default: three quarters of the depth)")
    p.add_argument("--heatmap_images", type=int, default=4, help="images with a heatmap (default 4)")
    p.add_argument("--html_images", type=int, default=8, help="images in the HTML view (default 8)")
    return p


@recipe_main
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = start(parser, args, argv)
    neo.check_args(parser, args)
    stem = args.output.with_suffix("")
    with as_recipe_errors():
        log = open_results_log(args, RESULT_FLAGS, outputs=[
            Path(f"{stem}_lens"), Path(f"{stem}.png"), Path(f"{stem}.html"),
            *args.output.parent.glob(f"{stem.name}_heatmap_*.png")])
        vlm = neo.load_model(args)
        layer = (3 * vlm.n_layers) // 4 if args.heatmap_layer is None else args.heatmap_layer
        if not 0 <= layer < vlm.n_layers:
            parser.error(f"--heatmap_layer: expected 0..{vlm.n_layers - 1}, got {layer}")
        coco, samples = neo.load_samples(args)
        samples = run.take(samples, key=lambda s: s.key, stores=[Path(f"{stem}_lens")])
    store = ActivationStore(Path(f"{stem}_lens"))

    def lens(s):
        record, tensors, meta = neo.lens_image(vlm, coco.load_image(s), s, k=args.top_k,
                                               question=args.question,
                                               use_polygons=not args.use_boxes)
        store.put(s.key, tensors, meta)
        return [record]

    neo.run_samples(samples, log, "logit lens", lens)
    records, errors = results(samples, log)
    summary = neo.summarize_lens(records, vlm.n_layers, args.seed)
    pngs = neo.plot_lens(summary, stem, vlm.model_id, args.top_k)
    done = [s for s in samples if s.key in store and s.key not in errors]
    neo.lens_figures(vlm, coco, done, store, stem, question=args.question, layer=layer,
                     heatmaps=args.heatmap_images, html=args.html_images)
    result = {"experiment": "neo2024_logit_lens", "model_id": vlm.model_id,
              "settings": neo.run_info(args, heatmap_layer=layer), "n_samples": len(samples),
              "errors": errors, "summary": summary, "records": records}
    write_json_atomic(args.output, result)
    figures = sorted(args.output.parent.glob(f"{stem.name}_heatmap_*.png"))
    html = [Path(f"{stem}.html")] if Path(f"{stem}.html").exists() else []
    final_line(f"{len(records)} records of {len(samples)} images",
               [args.output, *pngs, *figures, *html, Path(f"{stem}_lens")], len(errors))
    return result


if __name__ == "__main__":
    main()
