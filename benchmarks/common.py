"""Shared benchmark helpers: interleaved timing, peak memory, the CLI, the JSON result.

Machines are noisy (shared cores, other jobs), so absolute times are never compared across
runs: every script times its variants *interleaved* in one run (ABC, CBA, ABC, …) and reports
ratios — the median over repetitions of the per-repetition ratio, which cancels slow drifts in
load that hit both variants of one repetition alike. No benchmark asserts on time.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import warnings
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


# -- CLI ---------------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="reduced size, finishes in under a minute")
    p.add_argument("--smoke", action="store_true", help="the smallest models (narrow LM, one "
                   "vision block): checks the script runs end to end, its ratios mean nothing "
                   "(the tests' CPU run of gpu_check)")
    p.add_argument("--json", metavar="PATH", help="write {ratios, targets, meta} here")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per variant (default 7; keep >= 7)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on cpu: on a shared machine OpenMP barriers "
                        "turn other jobs' load into huge stalls; torch's choice on cuda)")
    p.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="cpu: process CPU time, immune to time the scheduler gives other jobs "
                        "(default on cpu); wall: perf_counter with cuda sync (default on cuda)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights' dtype, in the scripts that take it (the JSON's meta.dtype says "
                        "what ran) (default float32)")
    return p


def dtype(args: argparse.Namespace) -> torch.dtype:
    """``--dtype`` as a torch dtype. A script that builds its models with it calls this, so
    its JSON records the dtype it ran (others record float32 and a note)."""
    args.dtype_used = True
    return getattr(torch, args.dtype)


def setup(args: argparse.Namespace, memory: bool = False) -> tuple[float, float, float]:
    """Apply --threads, the --reps (7) and --warmup (1) defaults, silence library warnings,
    and (with ``memory=True``) the allocator setting that makes RSS track tensor frees — it
    costs a page fault per tensor, so never in a timing benchmark. Returns the load average
    at the start, for the JSON's meta."""
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads is None and not cuda:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock is None:
        args.clock = "wall" if cuda else "cpu"
    if memory:
        _fixed_mmap_threshold()
    args.reps = args.reps or 7
    args.warmup = 1 if args.warmup is None else args.warmup
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    return os.getloadavg()


def _fixed_mmap_threshold(threshold: int = 1 << 16) -> None:
    """glibc raises its mmap threshold after big frees, so freed tensors stay in RSS and hide the
    next peak; a fixed threshold sends every tensor > 64 KiB to mmap, returned on free."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# -- timing ------------------------------------------------------------------------------------
def sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


@dataclass
class Timings:
    """Seconds per repetition for each variant, repetitions aligned across variants."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, num: str, den: str) -> float:
        """Median over repetitions of time(num)/time(den) measured in the same repetition."""
        return statistics.median(a / b for a, b in zip(self.times[num], self.times[den]))

    def spread(self, name: str) -> float:
        """Interquartile range / median: how noisy this variant's repetitions were."""
        q = statistics.quantiles(self.times[name], n=4)
        return (q[2] - q[0]) / self.median(name)


def time_interleaved(variants: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 1,
                     device: str = "cpu", clock: str = "wall") -> Timings:
    """Run every variant ``warmup`` times, then ``reps`` rounds, alternating the order each round
    (A B C, C B A, …) so no variant always runs right after the same one. ``clock="cpu"``
    measures this process's CPU time (with one torch thread: the work done, whatever share of
    the cores the scheduler gave it); ``"wall"`` measures elapsed time (needed on cuda)."""
    wait = sync(device)
    now = time.process_time if clock == "cpu" else time.perf_counter
    gc.collect()
    gc.freeze()  # models, tokenizers, modules: out of every later collection (else ~0.5 s each)
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    wait()
    out = Timings({n: [] for n in names})
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            wait()
            t0 = now()
            variants[name]()
            wait()
            out.times[name].append(now() - t0)
    gc.unfreeze()
    return out


# -- memory ------------------------------------------------------------------------------------
class TensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the ``with`` block and alive at once.

    Counts each storage once (views share it), checks which ones died before every op, so the
    peak is exact at op granularity; kernels' internal scratch memory is not seen. nnsight runs
    intervention code in greenlets on the same thread, so saved copies are counted too."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.bytes -= self.live.pop(key)[1]
        # views and in-place results share an input's storage: not an allocation
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live and ref.cdata not in inputs:
                    n = t.untyped_storage().nbytes()
                    self.live[ref.cdata] = (ref, n)
                    self.bytes += n
        self.peak = max(self.peak, self.bytes)
        return out

    def still_alive(self) -> int:
        """Bytes allocated in the block that are still referenced (e.g. saved results)."""
        return sum(n for ref, n in self.live.values() if not ref.expired())

    def mark(self) -> None:
        """Restart the peak from what is alive now (see `peak_memory`'s ``mark``)."""
        self.peak = self.bytes


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: str = "cpu", mark=None) -> dict:
    """Peak memory of one call of ``fn`` above what was allocated before it, three ways:
    ``tensor_peak`` (CPU: `TensorPeak`; CUDA: ``max_memory_allocated``), ``rss_peak`` (VmHWM
    after a reset; includes allocator slack, None where it cannot be reset) and
    ``tracemalloc_peak`` (Python-heap objects only: tensors' data is not seen by tracemalloc).
    With ``mark`` (a module), ``tensor_peak`` counts only from that module's (last) call on:
    what is alive then plus the peak after, e.g. the language model's part of a VLM forward.
    ``retained``: bytes allocated in the call still alive after it; ``result``: fn's return."""
    gc.collect()
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base_rss = _rss_kib("VmRSS")
    can_rss = _reset_rss_peak()
    tracemalloc.start()
    tp = TensorPeak()
    reset = torch.cuda.reset_peak_memory_stats if cuda else tp.mark
    handle = None if mark is None else mark.register_forward_pre_hook(lambda *_: reset())
    try:
        if cuda:
            result = fn()
            torch.cuda.synchronize()
            tensor_peak = torch.cuda.max_memory_allocated() - base_cuda
            retained = torch.cuda.memory_allocated() - base_cuda
        else:
            with tp:
                result = fn()
            tensor_peak, retained = tp.peak, tp.still_alive()
    finally:
        if handle is not None:
            handle.remove()
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = (_rss_kib("VmHWM") - base_rss) * 1024 if can_rss else None
    return {"tensor_peak": tensor_peak, "retained": retained, "rss_peak": rss_peak,
            "tracemalloc_peak": py_peak, "result": result}


def nbytes(obj) -> int:
    """Total bytes of the tensors in a nested structure (dict / list / tuple of tensors)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj)
               if isinstance(t, torch.Tensor))


# -- output ------------------------------------------------------------------------------------
def print_table(rows: list[list], headers: list[str]) -> None:
    cells = [[_fmt(c) for c in row] for row in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) if k else c.ljust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 1000 else f"{x:.3g}"
    return str(x)


def check(ratios: dict[str, float], targets: dict[str, tuple[str, float]]) -> dict[str, bool]:
    ok = {}
    for name, (op, value) in targets.items():
        r = ratios.get(name)
        ok[name] = r is not None and (r <= value if op == "<=" else r >= value)
    return ok


def meta(args: argparse.Namespace, load_before: tuple[float, ...], **extra) -> dict:
    """Run context for the JSON: load averages before/after, threads, versions, sizes."""
    import nnsight
    import transformers

    info = {
        "quick": bool(args.quick), "device": args.device, "clock": args.clock,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "nnsight": getattr(nnsight, "__version__", "0.8.1"), "platform": platform.platform(),
        "ratio_definition": "median over interleaved repetitions of the per-repetition ratio",
    }
    if str(args.device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    requested = getattr(args, "dtype", "float32")
    info["dtype"] = requested if getattr(args, "dtype_used", False) else "float32"
    if info["dtype"] != requested:
        info["dtype_note"] = f"--dtype {requested} was given, but this script runs float32"
    info.update(extra)
    return info


def finish(args: argparse.Namespace, ratios: dict[str, float],
           targets: dict[str, tuple[str, float]], meta_info: dict) -> int:
    """Print the targets verdict and write the JSON if asked; returns 0 (never fails on time)."""
    ok = check(ratios, targets)
    if targets:
        print()
        print_table([[n, ratios.get(n), f"{op} {v}", "ok" if ok[n] else "MISSED"]
                     for n, (op, v) in targets.items()], ["target", "measured", "wanted", ""])
    meta_info["targets_met"] = ok
    if args.json:
        write_json({"ratios": ratios, "targets": {k: list(v) for k, v in targets.items()},
                    "meta": meta_info}, args.json)
        print(f"\nwrote {args.json}")
    return 0


def write_json(obj: dict, path: str) -> None:
    try:
        from vlminterp.store import write_json_atomic
    except ImportError:  # the store module is optional for the benchmarks
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return
    write_json_atomic(path, obj)


# -- models ------------------------------------------------------------------------------------
def realistic_qwen2_vl(max_pixels: int, device: str = "cpu", layers: int = 4, vision_depth: int = 4,
                       seed: int = 0, plain_copy: bool = True, hidden: int = 1536,
                       intermediate: int = 8960, heads: int = 12, kv_heads: int = 2):
    """Qwen2-VL with the 2B model's widths (LM 1536/8960, 12 heads, 2 kv heads; vision 1280 wide,
    16 heads) but ``layers`` decoder layers and ``vision_depth`` vision blocks, random weights,
    SDPA attention as the real checkpoint loads. Uses the tiny model's offline tokenizer
    (vocab_size = len(tokenizer)) with a processor that lets frames be ``max_pixels`` large.
    ``hidden``/``intermediate``/``heads``/``kv_heads`` shrink the LM (deep but narrow sweeps).
    Returns ``(vlm, plain)``: the wrapped `VLM` and an unwrapped copy with the same weights (the
    baseline: nnsight's wrapper adds a little even to untraced calls), None without plain_copy."""
    import copy

    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from vlminterp.models import tiny, wrap

    tok = tiny.build_qwen2_vl(seed)[1].tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.QWEN_SPECIALS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": [m * hidden // heads // 128 for m in (16, 24, 24)]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, embed_dim=1280, hidden_size=hidden, num_heads=16,
                           mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval().to(device)
    plain = copy.deepcopy(model) if plain_copy else None
    kw = dict(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14, merge_size=2,
              temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        video_processor=Qwen2VLVideoProcessor(do_sample_frames=False, **kw),
        tokenizer=tok, chat_template=tiny.QWEN_CHAT_TEMPLATE)
    return wrap(model, processor, f"qwen2-vl-{hidden}w-{layers}layers", "qwen2_vl"), plain


def tiny_plain(model_id: str, device: str = "cpu"):
    """An unwrapped copy of a tiny model with the weights `vlminterp.load(model_id)` gets (same
    seed), for the plain-forward and hand-hook baselines."""
    from vlminterp.models import tiny

    if model_id == "tiny-clip-vit":
        model = tiny.build_clip_vit(0)[0]
    elif model_id == "tiny-llava":
        model = tiny.build_llava(0)[0]
    else:
        model = tiny.build_qwen2_vl(0, version="2.5" if "2.5" in model_id else "2")[0]
    return model.to(device=device, dtype=torch.float32).eval()


def random_video(seed: int, frames: int = 8, size: int = 112):
    import numpy as np

    return np.random.RandomState(seed).randint(0, 255, (frames, size, size, 3), dtype=np.uint8)


def random_image(seed: int, w: int = 80, h: int = 60):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def qwen_vision_share(vlm, inputs, reps: int = 3) -> float:
    """How much one vision-tower pass costs relative to one language-model pass, for a Qwen2-VL
    ``vlm`` on a one-row ``inputs`` (median CPU seconds of the tower alone / of the rest of a
    forward). Reported next to sweep ratios: a loop that reruns the tower per condition gains
    more from reuse the larger this is (Qwen2-VL-7B on 8 frames of 336x336: about 0.35)."""
    model = vlm.torch_model
    kw = {"pixel_values_videos": inputs["pixel_values_videos"],
          "grid_thw": inputs["video_grid_thw"]}
    full, tower = [], []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.process_time()
            model(**dict(inputs), logits_to_keep=1, use_cache=False)
            t1 = time.process_time()
            model.model.visual(kw["pixel_values_videos"], grid_thw=kw["grid_thw"])
            t2 = time.process_time()
            full.append(t1 - t0)
            tower.append(t2 - t1)
    v = statistics.median(tower)
    return v / max(statistics.median(full) - v, 1e-9)


def widened(model_id: str, device: str = "cpu", hidden: int = 1536, intermediate: int = 8960,
            heads: int = 12, kv_heads: int = 2, layers: int = 4, seed: int = 0):
    """A tiny family's model with its language model widened to a real checkpoint's widths (the
    2B-class defaults: 1536/8960, 12 heads of 128, 2 kv heads; ``layers`` decoder layers) and
    its tiny vision tower and processor kept (the projector follows the LM width). With a long
    prompt this puts the LM's cost per module near a real checkpoint's, which is what trace
    overhead is relative to. Returns ``(vlm, plain)`` like `realistic_qwen2_vl`."""
    import copy

    from vlminterp.models import family_of, wrap
    from vlminterp.models.tiny import seeded_model

    fam = family_of(model_id)
    model, processor = fam.tiny[model_id](seed)
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    text.hidden_size, text.intermediate_size = hidden, intermediate
    text.num_attention_heads, text.num_key_value_heads = heads, kv_heads
    text.num_hidden_layers, text.head_dim = layers, hidden // heads
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i % len(text.layer_types)] for i in range(layers)]
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" in rope:  # the real checkpoints' split of a 128-wide head
        rope["mrope_section"] = [16, 24, 24]
    vision = getattr(config, "vision_config", None)
    if vision is not None and hasattr(vision, "out_hidden_size"):
        vision.out_hidden_size = hidden
    model = seeded_model(type(model), config, seed, attn_implementation="sdpa").to(device)
    plain = copy.deepcopy(model)
    return wrap(model, processor, f"{model_id}-{hidden}w-{layers}layers", fam), plain


SMOKE = dict(hidden=256, intermediate=512, heads=4, kv_heads=2, vision_depth=1)
"""`realistic_qwen2_vl` sizes under ``--smoke``."""
