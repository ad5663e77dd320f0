"""Have-1 / Have-2 probes on representations stored by counterfactual_causal_tracing.

Have-1: does the representation tell the clean clip from its counterfactual (binary)?
Have-2: does the clean representation predict an annotation label (multi-class)?
Split by video (20% held out), with majority baseline, shuffled-label control and selectivity;
``--layer_idx all`` sweeps layers_mean's layers and plots the curve. Definitions: `vlminterp.video.probes`.
Example: python -m recipes.train_have_probe --representations runs/demo/tracing_representations \\
  --output runs/demo/have1.json --representation layers_mean --layer_idx all
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from vlminterp.video import probes
from vlminterp.data.videoqa import KNOWN_FIELDS, load_annotations
from vlminterp.plots import line_plot
from vlminterp.checks import check_output
from vlminterp.runs import final_line
from vlminterp.store import ActivationStore, write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.train_have_probe",
                                description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--tracing_results", type=Path, help="tracing JSON: only its successfully traced questions "
      "are used (default: every question in the store)")
    a("--representations", type=Path, required=True, help="activation store written by "
      "counterfactual_causal_tracing --dump_representations")
    a("--output", type=Path, required=True, help="result JSON (and OUTPUT_layers.png for a sweep)")
    a("--probe_type", choices=["have1", "have2"], default="have1", help="have1: clean vs "
      "counterfactual (binary); have2: predict --label_key (multi-class) (default: have1)")
    a("--representation", choices=probes.REPRESENTATIONS, default="layers_mean",
      help="stored representation to probe (default: layers_mean)")
    a("--layer_idx", default="all", help="layers_mean row: an index, or 'all' to sweep every "
      "layer (default: all)")
    a("--annotations", type=Path, help="annotations JSON with the Have-2 labels (default: the "
      "annotation fields stored with each representation)")
    a("--label_key", default="question_type", help="annotation field Have-2 predicts "
      "(default: question_type)")
    a("--mode", choices=["single", "pair"], default="single", help="Have-1 inputs: single "
      "(clean -> 1, counterfactual -> 0) or pair ([clean; cf] -> 1, [cf; clean] -> 0)")
    a("--probe_model", choices=probes.PROBE_MODELS, default="linear", help="linear | mlp (hidden "
      "128) | lstm (over vprime rows) | logreg (scikit-learn) (default: linear)")
    a("--counterfactual", action="append", help="Have-1: only this counterfactual (repeatable; "
      "default: all stored)")
    a("--seed", type=int, default=0, help="seed of the split, probe init and shuffled control")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_output(args.output)
        store = ActivationStore(args.representations)
        if not len(store):
            raise ValueError(f"--representations {str(args.representations)!r}: empty or missing "
                             f"activation store")
        keep = _traced_questions(args.tracing_results) if args.tracing_results else None
        layers = _layers(args, store)
        results = []
        for layer in layers:
            if args.probe_type == "have1":
                x, y, groups = probes.have1_dataset(store, args.representation, layer, args.mode,
                                                    args.counterfactual, keep)
                classes = ["counterfactual", "clean"]
            else:
                x, y, groups, classes = probes.have2_dataset(
                    store, args.representation, _labels(args, store), layer, keep)
            results.append({"layer": layer, **probes.evaluate_probe(args.probe_model, x, y, groups,
                                                                     seed=args.seed)})
    except ValueError as e:
        parser.error(str(e))
    summary = probes.compare_with_baselines(results)
    out = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "classes": classes, "summary": summary, "results": results}
    outputs = [args.output]
    if len(layers) > 1:
        png = line_plot(layers, {k: [r[k] for r in results] for k in
                                 ("accuracy", "control_accuracy", "majority_baseline")},
                        args.output.with_name(args.output.stem + "_layers.png"), xlabel="layer",
                        ylabel="validation accuracy", notes={"accuracy": f"n_val={results[0]['n_val']}"},
                        title=textwrap.fill(f"{args.probe_type} {args.probe_model}: best layer "
                                            f"{summary['best_layer']} {summary['verdict']}", 70))
        out["plot"] = png.name
        outputs.append(png)
    write_json_atomic(args.output, out)
    final_line(f"{len(results)} probe result(s) (best layer {summary['best_layer']}: accuracy "
               f"{summary['accuracy']:.3f}, {summary['verdict']})", outputs, 0)
    return out


def _layers(args, store) -> list:
    if args.representation != "layers_mean":
        if args.layer_idx != "all":
            raise ValueError(f"--layer_idx applies to layers_mean only, not {args.representation}")
        return [None]
    n = store.get(store.keys()[0], ["layers_mean"])["layers_mean"].shape[0]
    if args.layer_idx == "all":
        return list(range(n))
    try:
        return [int(args.layer_idx)]
    except ValueError:
        raise ValueError(f"--layer_idx {args.layer_idx!r}: expected an integer or 'all'") from None


def _traced_questions(path: Path) -> set[str]:
    try:
        return {r["question_id"] for r in json.loads(path.read_text())["records"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--tracing_results {str(path)!r}: not a tracing result ({e})") from None


def _labels(args, store) -> dict:
    if args.annotations:
        key = args.label_key
        labels = {s.question_id: getattr(s, key) if key in KNOWN_FIELDS else s.extra.get(key)
                  for s in load_annotations(args.annotations)}  # AnnotationError: ValueError
    else:
        labels = {m["question_id"]: m.get(args.label_key) for m in map(store.meta, store.keys())
                  if "question_id" in m}
    if not any(v is not None for v in labels.values()):
        raise ValueError(f"--label_key {args.label_key!r}: no annotation has this field")
    return labels


if __name__ == "__main__":
    main()
