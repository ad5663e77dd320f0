"""Mean vector of a stored representation, for mean ablation (``ablate(kind="mean", mean=...)``).

Streams over an activation store (or a folder of legacy ``*.pt`` tensors, read with
``torch.load(weights_only=True)``; the original script's ``[1, N, d]`` caches, N differing per
file, average over all their tokens) in constant memory and writes ``mean_vector.safetensors``
(tensor ``mean_vector`` [d]; load it with ``vlminterp.store.load_vector``).
Example: python -m recipes.calculate_mean_vector runs/demo/tracing_representations
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlminterp.checks import check_output
from vlminterp.runs import final_line
from vlminterp.store import legacy_ndim, save_vector, streaming_mean


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.calculate_mean_vector",
                                description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, metavar="DIR", help="activation store folder (index.json + "
                   "shards/) or a folder of legacy *.pt tensors")
    p.add_argument("--name", default="visual_mean", help="tensor to average: visual_mean, "
                   "inputs_mean, layers_mean (with --layer_idx), vprime (over its rows), or the "
                   "key inside legacy .pt dicts (default: visual_mean)")
    p.add_argument("--layer_idx", type=int, help="row of a [n_layers, d] tensor (layers_mean)")
    p.add_argument("--over", choices=["sample", "rows"], help="average each stored tensor as one "
                   "sample, or every d-vector of every [..., d] tensor (default: rows for vprime "
                   "and for legacy *.pt caches of [1, N, d] tensors — the original script's mean "
                   "over all their tokens, N may differ per file — else sample)")
    p.add_argument("--output", type=Path, help="output file (default: DIR/mean_vector.safetensors)")
    return p


def main(argv: list[str] | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.error(f"DIR {str(args.dir)!r} is not a folder")
    output = args.output or args.dir / "mean_vector.safetensors"
    try:
        check_output(output)
        legacy = (not (args.dir / "index.json").exists()
                  and (legacy_ndim(args.dir, args.name) or 0) >= 3)
        over = args.over or ("rows" if args.name == "vprime" or legacy else "sample")
        mean = streaming_mean(args.dir, args.name, over=None if over == "sample" else "rows")
        if args.layer_idx is not None:
            if mean.ndim != 2 or not -mean.shape[0] <= args.layer_idx < mean.shape[0]:
                raise ValueError(f"--layer_idx {args.layer_idx}: {args.name} mean has shape "
                                 f"{tuple(mean.shape)}, not [n_layers, d] with that row")
            mean = mean[args.layer_idx]
        if mean.ndim != 1:
            raise ValueError(f"the mean of {args.name!r} has shape {tuple(mean.shape)}; a mean "
                             f"vector is [d]: pick a row with --layer_idx or use --over rows")
    except ValueError as e:
        parser.error(str(e))
    path = save_vector(output, mean, meta={"source": str(args.dir), "name": args.name,
                                           "over": over, "layer_idx": args.layer_idx})
    final_line(f"the mean of {args.name!r} over {over} (shape {tuple(mean.shape)})", [path], 0)
    return mean


if __name__ == "__main__":
    main()
