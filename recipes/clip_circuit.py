"""Step 4 of the CLIP circuit pipeline: export the top-k (cluster, head, dst_token) edges.

Edges are ranked by |prototypes[k,h,j]|; each record holds cluster_id, head, dst_token, weight
(the prototype value) and support (the cluster's token count), grouped by head and by cluster.
Output: JSON at ``--out`` (fit_file, layer, next_layer, top_k, paths, groups) and, with
``--heatmap-dir``, one ``head_<h>.png`` (clusters × destination tokens) per head.
Definitions: `vlminterp.circuits.paths`. Example:
  python -m recipes.clip_circuit --fit runs/fit --top-k 50 --heatmap-dir runs/heatmaps --out runs/circuit.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlminterp.checks import check_output
from vlminterp.circuits import group_paths, load_artifact, save_head_heatmaps, top_k_paths
from vlminterp.runs import final_line
from vlminterp.store import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.clip_circuit", description=__doc__.splitlines()[0])
    p.add_argument("--fit", type=Path, required=True, help="prototypes written by recipes.clip_fit (stem or .json)")
    p.add_argument("--top-k", type=int, default=50, help="number of edges to export (default: 50)")
    p.add_argument("--heatmap-dir", type=Path, default=None,
                   help="if given, write head_<h>.png (K × N prototype table of head h) there")
    p.add_argument("--out", type=Path, required=True, help="output JSON file")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_output(args.out, "--out")
        fit = load_artifact(args.fit, "fit")
        paths = top_k_paths(fit["prototypes"].float(), fit["counts"].long(), top_k=args.top_k)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    write_json_atomic(args.out, {
        "fit_file": str(args.fit), "layer": fit.get("layer"), "next_layer": fit.get("next_layer"),
        "top_k": args.top_k, "paths": [p.to_dict() for p in paths], "groups": group_paths(paths),
        "fit_fingerprint": fit.get("fingerprint"),
    })
    outputs = [args.out]
    if args.heatmap_dir is not None:
        save_head_heatmaps(fit["prototypes"].float(), args.heatmap_dir, counts=fit["counts"].long())
        outputs.append(args.heatmap_dir)
    final_line(f"{len(paths)} circuit paths", outputs, 0)


if __name__ == "__main__":
    main()
