"""Step 5 of the CLIP circuit pipeline: ablate / inject each cluster's prototype (no model re-run).

Per cluster k: ablation_effect = mean |Δ| on k's rows when prototypes[k] = 0; injection_effect =
mean |Δ| on the other rows when they are overwritten with prototypes[k]; the original's one-sided
p-values (draws of comparison rows, (ge+1)/(P+1)). Records sorted by ablation_effect.
Output: JSON at ``--out`` (features_file, fit_file, max_clusters, num_permutations, seed, effects).
Definitions (and what the p-values test): `vlminterp.circuits.causal`. Example:
  python -m recipes.clip_causal --features runs/features --fit runs/fit --out runs/causal.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlminterp.checks import check_output
from vlminterp.circuits import check_fit_matches_features, cluster_interventions, load_artifact
from vlminterp.runs import final_line
from vlminterp.store import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.clip_causal", description=__doc__.splitlines()[0])
    p.add_argument("--features", type=Path, required=True, help="clusters from recipes.clip_cluster (stem or .json)")
    p.add_argument("--fit", type=Path, required=True, help="prototypes from recipes.clip_fit (stem or .json)")
    p.add_argument("--max-clusters", type=int, default=16, help="analyse clusters 0..N-1 (default: 16)")
    p.add_argument("--num-permutations", type=int, default=200,
                   help="permutations per p-value; 0 gives p = 1 (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output JSON file")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_output(args.out, "--out")
        features = load_artifact(args.features, "features")
        fit = load_artifact(args.fit, "fit")
        check_fit_matches_features(fit, args.fit, features, args.features)
        effects = cluster_interventions(features["labels"].long(), fit["prototypes"].float(),
                                        max_clusters=args.max_clusters, num_permutations=args.num_permutations,
                                        seed=args.seed)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    write_json_atomic(args.out, {
        "features_file": str(args.features), "fit_file": str(args.fit), "max_clusters": args.max_clusters,
        "num_permutations": args.num_permutations, "seed": args.seed, "effects": [e.to_dict() for e in effects],
    })
    final_line(f"{len(effects)} cluster effects", [args.out], 0)


if __name__ == "__main__":
    main()
