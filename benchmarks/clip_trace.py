"""Throughput and memory of the CLIP trace step vs a plain batched ``encode_image``.

Model: open_clip ViT-B-16, random init (``vlminterp.load("open_clip:ViT-B-16")``); the plain
baseline is an unwrapped open_clip copy with the same weights. Variants, on the same prepared
batch of synthetic images (preprocessing is the same for all, so it is left out):
  plain    ``model.encode_image(pixels)``;
  capture  ``vlminterp.circuits.capture_batch`` — what ``recipes.clip_trace`` runs per batch:
           one trace saving block l's ``ln_2`` / ``mlp.gelu`` and block l+1's ``ln_1``, then the
           attention logits, the uint8 gate and the float32 copies on CPU;
  recipe   capture + ``TraceWriter.add`` (one safetensors shard per batch), as the recipe loops.
Targets: images/s of capture >= 0.9x plain; tensor peak of one capture <= 1.5x (peak of one
plain batch + the bytes of the captured output); and the recipe over several batches peaks no
higher than 1.1x one batch (each batch is written and dropped, so memory holds one batch).

    python benchmarks/clip_trace.py [--quick] [--json PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import vlminterp  # noqa: E402
from vlminterp.circuits import TraceWriter, capture_batch, synthetic_image  # noqa: E402

TARGETS = {"capture_over_plain_images_per_s": (">=", 0.9),
           "capture_peak_over_plain_peak_plus_output": ("<=", 1.5),
           "recipe_peak_over_one_batch": ("<=", 1.1)}
LAYER, NEXT = 5, 6


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    load0 = common.setup(args)
    dev = args.device
    reps, warmup = args.reps, args.warmup
    batch, n_batches = (2, 2) if args.quick else (32, 3)

    import open_clip

    vlm = vlminterp.load("open_clip:ViT-B-16", device=dev)
    plain = open_clip.create_model("ViT-B-16", pretrained=None).to(dev).eval()
    plain.load_state_dict(vlm.torch_model.state_dict())
    images = [synthetic_image(i, vlm.image_size) for i in range(batch * n_batches)]
    batches = [vlm.prepare(images=images[k * batch:(k + 1) * batch]) for k in range(n_batches)]
    inputs = batches[0]
    tmp = tempfile.TemporaryDirectory(prefix="clip_trace_bench_")

    def run_plain():
        with torch.no_grad():
            return plain.encode_image(inputs["image"])

    def run_capture():
        return capture_batch(vlm, inputs, LAYER, NEXT)

    def run_recipe(which=(0,)):
        writer = TraceWriter(os.path.join(tmp.name, "trace"), {"layer": LAYER, "next_layer": NEXT})
        for k in which:
            ids = [f"synthetic:0:{k * batch + i}" for i in range(batch)]
            writer.add(ids, capture_batch(vlm, batches[k], LAYER, NEXT))
        writer.close()

    with torch.no_grad():  # the trace reads the same network as encode_image
        block = plain.visual.transformer.resblocks[LAYER]
        got = {}
        hook = block.ln_2.register_forward_hook(lambda m, a, o: got.__setitem__("h", o))
        plain.encode_image(inputs["image"])
        hook.remove()
    out = run_capture()
    torch.testing.assert_close(out["h_l"], got["h"].float().cpu(), atol=1e-5, rtol=1e-5)

    variants = {"plain": run_plain, "capture": run_capture}
    if not args.quick:
        variants["recipe"] = run_recipe
    t = common.time_interleaved(variants, reps=reps, warmup=warmup, device=dev, clock=args.clock)

    one = common.peak_memory(run_capture, dev)
    stored = common.nbytes(one.pop("result"))
    base = common.peak_memory(run_plain, dev)
    base.pop("result")
    rec1 = common.peak_memory(lambda: run_recipe((0,)), dev)
    recn = common.peak_memory(lambda: run_recipe(tuple(range(n_batches))), dev)
    rec1.pop("result"), recn.pop("result")
    tmp.cleanup()

    ratios = {
        "capture_over_plain_images_per_s": t.ratio("plain", "capture"),
        "capture_peak_over_plain_peak_plus_output":
            one["tensor_peak"] / (base["tensor_peak"] + stored),
        "recipe_peak_over_one_batch": recn["tensor_peak"] / rec1["tensor_peak"],
        "capture_peak_over_plain_peak": one["tensor_peak"] / base["tensor_peak"],
        "output_over_plain_peak": stored / base["tensor_peak"],
    }
    if "recipe" in variants:
        ratios["recipe_over_plain_images_per_s"] = t.ratio("plain", "recipe")
    rows = [[name, 1e3 * t.median(name), batch / t.median(name), t.ratio("plain", name),
             t.spread(name)] for name in variants]
    print(f"\nclip trace (ViT-B-16 random init, {dev}, {args.clock} clock, "
          f"{torch.get_num_threads()} thread(s), batch {batch}, block {LAYER} -> {NEXT}, "
          f"{reps} interleaved reps)")
    common.print_table(rows, ["variant", "ms / batch", "images/s", "speed vs plain", "IQR/med"])
    def mib(m):
        return [m["tensor_peak"] / 2**20, None if m["rss_peak"] is None else m["rss_peak"] / 2**20]

    print()
    common.print_table([
        ["plain encode_image, 1 batch", *mib(base)], ["capture, 1 batch", *mib(one)],
        ["  of which the captured output", stored / 2**20, None],
        ["recipe, 1 batch", *mib(rec1)], [f"recipe, {n_batches} batches", *mib(recn)],
    ], ["peak memory", "tensor MiB", "rss MiB (allocator slack included)"])
    return common.finish(args, ratios, TARGETS, common.meta(
        args, load0, reps=reps, warmup=warmup, batch=batch, batches_in_recipe_run=n_batches,
        layer=LAYER, next_layer=NEXT, stored_bytes=stored,
        memory={"plain": base, "capture": one, "recipe_1": rec1, f"recipe_{n_batches}": recn},
        images_per_s={name: batch / t.median(name) for name in variants}))


if __name__ == "__main__":
    sys.exit(main())
