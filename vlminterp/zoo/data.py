"""Write a zoo model's task data in the recipes' formats (held-out stream, seeded).

    python -m vlminterp.zoo.data tiny-qwen2-vl-motion --out runs/motion --n 8
    python -m vlminterp.zoo.data tiny-llava-objects --out runs/objects --n 16

Video: ``OUT/annotations.json`` + ``OUT/videos/`` (``--annotations`` of the video recipes), N
items of each question kind. Images: ``OUT/instances_synthetic.json`` + ``OUT/images/`` (COCO
format: ``--coco_annotations OUT/instances_synthetic.json --image_root OUT`` of the Neo 2024
recipes, ``--image-folder OUT/images`` of the CLIP recipes), N images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlminterp.zoo.specs import SPECS


def write(zoo_id: str, out: Path, n: int, seed: int = 1) -> Path:
    if n < 1:
        raise ValueError(f"--n: expected a positive number, got {n}")
    if SPECS[zoo_id].task.startswith("vlminterp.zoo.video_model"):
        from vlminterp.zoo.video_task import write_dataset

        return write_dataset(out, n, seed)
    from vlminterp.data.synthetic_images import write_dataset

    return write_dataset(out, n, seed, style="zoo")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlminterp.zoo.data", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(SPECS), help="zoo model whose task data to write")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n", type=int, default=8, help="items per question kind (video) or images "
                   "(default: 8)")
    p.add_argument("--seed", type=int, default=1, help="seed (default: 1, the cards' held-out seed)")
    args = p.parse_args(argv)
    try:
        path = write(args.name, args.out, args.n, args.seed)
    except ValueError as e:
        p.error(str(e))
    print(f"Wrote {args.name} task data to {path}")


if __name__ == "__main__":
    main()
