"""Step 6 of the CLIP circuit pipeline: test the top circuit edges against the real attention logits.

For each of the first --top-n paths (k,h,j): zero prototypes[k,h,j]; edge_effect = mean |Δ| of the
reconstruction on cluster k's rows; alignment_gain = mean increase of |real - reconstruction| there;
p-values by relabelling random same-size row sets, (ge+1)/(P+1). Records sorted by edge_effect.
Output: JSON at ``--out`` (trace_file, features_file, fit_file, circuit_file, top_n,
num_permutations, seed, effects). Definitions: `vlminterp.circuits.causal`. Example:
  python -m recipes.clip_target_causal --trace runs/trace --features runs/features --fit runs/fit \\
      --circuit runs/circuit.json --out runs/target_causal.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from vlminterp.checks import check_output
from vlminterp.circuits import (check_circuit_matches_fit, check_features_match_trace,
                                check_fit_matches_features, edge_columns, load_artifact, load_trace,
                                target_edge_effects)
from vlminterp.runs import final_line
from vlminterp.store import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.clip_target_causal", description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, required=True, help="trace from recipes.clip_trace (stem or .json)")
    p.add_argument("--features", type=Path, required=True, help="clusters from recipes.clip_cluster (stem or .json)")
    p.add_argument("--fit", type=Path, required=True, help="prototypes from recipes.clip_fit (stem or .json)")
    p.add_argument("--circuit", type=Path, required=True, help="paths JSON from recipes.clip_circuit")
    p.add_argument("--top-n", type=int, default=20, help="test the first N paths of the circuit (default: 20)")
    p.add_argument("--num-permutations", type=int, default=200,
                   help="random relabellings per p-value; 0 gives p = 1 (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the relabellings (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output JSON file")
    return p


def _read_circuit(path: Path) -> dict:
    try:
        circuit = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"circuit file {path}: cannot read it ({str(e).splitlines()[0]})") from None
    if not isinstance(circuit, dict) or not isinstance(circuit.get("paths"), list):
        raise ValueError(f"circuit file {path} has no 'paths' list")
    return circuit


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_output(args.out, "--out")
        trace = load_trace(args.trace)
        features = load_artifact(args.features, "features")
        fit = load_artifact(args.fit, "fit")
        check_features_match_trace(trace, features, args.features)
        check_fit_matches_features(fit, args.fit, features, args.features)
        circuit = _read_circuit(args.circuit)
        check_circuit_matches_fit(circuit, args.circuit, fit, args.fit)
        paths = circuit["paths"][:args.top_n]
        batches = tqdm(trace.batches(["attn_logits_l1"]), desc="edges", unit="batch", total=len(trace.meta["batches"]))
        real = torch.cat([edge_columns(t["attn_logits_l1"].float(), paths) for _, t in batches], dim=1)
        effects = target_edge_effects(features["labels"].long(), fit["prototypes"].float(), real, paths,
                                      num_permutations=args.num_permutations, seed=args.seed)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    write_json_atomic(args.out, {
        "trace_file": str(args.trace), "features_file": str(args.features), "fit_file": str(args.fit),
        "circuit_file": str(args.circuit), "top_n": args.top_n, "num_permutations": args.num_permutations,
        "seed": args.seed, "effects": [e.to_dict() for e in effects],
    })
    final_line(f"{len(effects)} target-edge effects", [args.out], 0)


if __name__ == "__main__":
    main()
