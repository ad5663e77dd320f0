"""Step 3 of the CLIP circuit pipeline: fit per-cluster attention-logit prototypes and score them.

prototypes[k,h,:] = mean attention-logit row of cluster-k tokens in head h; the reconstruction
Â[b,h,i,:] = prototypes[labels[b,i],h,:] is scored by mse and r2 = 1 - mse/Var against the real
logits. Streams the trace one shard at a time. Output: ``<stem>.json`` (trace_file, features_file,
layer, next_layer, mse, r2) + ``<stem>.safetensors`` (prototypes [K,H,N], counts [K]).
Definitions: `vlminterp.circuits.fit`. Example:
  python -m recipes.clip_fit --trace runs/trace --features runs/features --out runs/fit
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from vlminterp.checks import check_output
from vlminterp.circuits import (PrototypeAccumulator, ReconstructionScore, artifact_paths,
                                check_features_match_trace, load_artifact, load_trace, reconstruct,
                                save_artifact)
from vlminterp.runs import final_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.clip_fit", description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, required=True, help="trace written by recipes.clip_trace (stem or .json)")
    p.add_argument("--features", type=Path, required=True,
                   help="clusters of that trace, written by recipes.clip_cluster (stem or .json)")
    p.add_argument("--out", type=Path, required=True, help="output stem: writes <stem>.json and <stem>.safetensors")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_output(artifact_paths(args.out).json, "--out")
        trace = load_trace(args.trace)
        features = load_artifact(args.features, "features")
        check_features_match_trace(trace, features, args.features)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    labels = features["labels"].long()
    acc = PrototypeAccumulator(int(features["num_clusters"]))
    for rows, t in tqdm(trace.batches(["attn_logits_l1"]), desc="fit", unit="batch",
                        total=len(trace.meta["batches"])):
        acc.update(labels[rows], t["attn_logits_l1"].float())
    fit = acc.result()
    score = ReconstructionScore()
    for rows, t in tqdm(trace.batches(["attn_logits_l1"]), desc="score", unit="batch",
                        total=len(trace.meta["batches"])):
        score.update(t["attn_logits_l1"].float(), reconstruct(labels[rows], fit.prototypes))
    mse, r2 = score.result()
    path = save_artifact(args.out, "fit", {
        "trace_file": str(args.trace), "features_file": str(args.features), "layer": trace.meta.get("layer"),
        "next_layer": trace.meta.get("next_layer"), "mse": mse, "r2": r2,
        "trace_fingerprint": trace.fingerprint, "features_fingerprint": features.get("fingerprint"),
    }, {"prototypes": fit.prototypes, "counts": fit.counts})
    final_line(f"the fit (mse={mse:.6f}, r2={r2:.6f})", [path, artifact_paths(args.out).arrays], 0)


if __name__ == "__main__":
    main()
