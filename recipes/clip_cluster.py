"""Step 2 of the CLIP circuit pipeline: cluster tokens by their FFN gate vectors (MiniBatchKMeans).

Output: ``<stem>.json`` (trace_file, layer, next_layer, num_clusters) + ``<stem>.safetensors``
(labels [B,N], centroids [K,D_ffn], cluster_sizes [K], cluster_activation_rates [K]).
Definitions: `vlminterp.circuits.cluster`. Example:
  python -m recipes.clip_cluster --trace runs/trace --num-clusters 8 --out runs/features
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlminterp.checks import check_output
from vlminterp.circuits import artifact_paths, cluster_gates, load_trace, save_artifact
from vlminterp.runs import final_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.clip_cluster", description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, required=True, help="trace written by recipes.clip_trace (stem or .json)")
    p.add_argument("--num-clusters", type=int, default=16, help="K, the number of k-means clusters (default: 16)")
    p.add_argument("--sample-tokens", type=int, default=20000,
                   help="fit k-means on this many tokens drawn at random (0 = all); all tokens are then "
                        "assigned (default: 20000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token sample and of k-means (default: 0)")
    p.add_argument("--gate-key", default="ffn_gate_l", choices=["ffn_gate_l", "ffn_act_l"],
                   help="cluster the binary gate (default) or the continuous GELU output (needs a trace "
                        "made with --continuous-gate)")
    p.add_argument("--out", type=Path, required=True, help="output stem: writes <stem>.json and <stem>.safetensors")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_output(artifact_paths(args.out).json, "--out")
        trace = load_trace(args.trace)
        result = cluster_gates(trace.tensor(args.gate_key), num_clusters=args.num_clusters,
                               sample_tokens=args.sample_tokens, seed=args.seed)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    meta = {"trace_file": str(args.trace), "layer": trace.meta.get("layer"),
            "next_layer": trace.meta.get("next_layer"), "num_clusters": args.num_clusters,
            "trace_fingerprint": trace.fingerprint}
    if args.gate_key != "ffn_gate_l":
        meta["gate_key"] = args.gate_key
    path = save_artifact(args.out, "features", meta, {
        "labels": result.labels, "centroids": result.centroids, "cluster_sizes": result.cluster_sizes,
        "cluster_activation_rates": result.cluster_activation_rates,
    })
    final_line(f"{args.num_clusters} clusters of {result.labels.numel()} tokens",
               [path, artifact_paths(args.out).arrays], 0)


if __name__ == "__main__":
    main()
