"""Step 1 of the CLIP circuit pipeline: trace h_l, ffn_gate_l and attn_logits_l1 of an open_clip ViT.

One traced forward per batch; each batch is written as its own shard, so memory holds one batch.
Output: ``<stem>.json`` (images, layer, next_layer, shapes) + ``<stem>.shards/`` (safetensors).
Definitions: `vlminterp.circuits.trace`. Example (offline):
  python -m recipes.clip_trace --model tiny-clip-vit --synthetic 64 --target-layer 0 --out runs/trace
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

import torch

from vlminterp.checks import check_device, check_output, load_checked
from vlminterp.circuits import (TraceWriter, artifact_paths, capture_batch, check_layers, clip_model_id,
                                image_source, pretrained_tag)
from vlminterp.runs import final_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.clip_trace", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture (e.g. ViT-B-16), or tiny-clip-vit "
                   "(offline, random weights)")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag; '' or 'none' = random init")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagenet-root", type=Path, help="ImageNet root for torchvision.datasets.ImageNet")
    src.add_argument("--image-folder", type=Path, help="any folder of .jpg/.jpeg/.png/.bmp/.webp images "
                     "(recursive, sorted by path)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N generated images (seeded shapes on plain "
                     "backgrounds): no data needed")
    p.add_argument("--split", choices=["train", "val"], default="val", help="ImageNet split (default: val)")
    p.add_argument("--target-layer", type=int, required=True, help="vision block l: h_l and ffn_gate_l come from it")
    p.add_argument("--next-attn-layer", type=int, default=None,
                   help="vision block whose attention logits are recorded (default: target layer + 1)")
    p.add_argument("--max-images", type=int, default=None,
                   help="trace at most this many images (default: 32; with --synthetic N: N)")
    p.add_argument("--batch-size", type=int, default=32, help="images per traced forward and per shard (default: 32)")
    p.add_argument("--continuous-gate", action="store_true",
                   help="also store the GELU output itself as ffn_act_l [B,N,D_ffn] float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the --synthetic images and of random-init "
                   "weights (tiny-clip-vit, --pretrained none), so a rerun traces the same model (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, required=True, help="output stem: writes <stem>.json and <stem>.shards/")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    layer = args.target_layer
    next_layer = layer + 1 if args.next_attn_layer is None else args.next_attn_layer
    if args.max_images is None:
        args.max_images = args.synthetic if args.synthetic is not None else 32
    for flag, value in (("--max-images", args.max_images), ("--batch-size", args.batch_size),
                        ("--synthetic", args.synthetic if args.synthetic is not None else 1)):
        if value < 1:
            parser.exit(2, f"{parser.prog}: error: {flag}: expected a positive number, got {value}\n")
    try:
        check_output(artifact_paths(args.out).json, "--out")
        device = check_device(args.device)
        torch.manual_seed(args.seed)  # open_clip's random init draws from torch's global generator
        vlm = load_checked(clip_model_id(args.model, args.pretrained), device=device, seed=args.seed)
        check_layers(len(vlm.vision.blocks), layer, next_layer, model=args.model)
        ids, load = image_source(imagenet_root=args.imagenet_root, split=args.split,
                                 image_folder=args.image_folder, synthetic=args.synthetic,
                                 max_images=args.max_images, size=vlm.image_size, seed=args.seed)
        source = ("synthetic" if args.synthetic is not None else
                  "image_folder" if args.image_folder is not None else f"imagenet:{args.split}")
        writer = TraceWriter(args.out, {"layer": layer, "next_layer": next_layer, "model": args.model,
                                        "pretrained": pretrained_tag(args.model, args.pretrained),
                                        "seed": args.seed, "source": source})
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    for start in tqdm(range(0, len(ids), args.batch_size), desc="trace", unit="batch"):
        chunk = ids[start:start + args.batch_size]
        inputs = vlm.prepare(images=[load(start + i) for i in range(len(chunk))])
        writer.add(chunk, capture_batch(vlm, inputs, layer, next_layer, continuous=args.continuous_gate))
    path = writer.close()
    final_line(f"the trace of {len(ids)} images", [path, writer.paths.shards], 0)


if __name__ == "__main__":
    main()
