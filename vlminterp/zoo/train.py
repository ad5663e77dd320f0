"""Train one zoo model on CPU, seeded, and write its weights, card and loss curve.

    python -m vlminterp.zoo.train tiny-qwen2-vl-motion --seed 0

Writes ``OUT/NAME.safetensors`` (weights), ``OUT/NAME.json`` (the model card: architecture,
task, training settings and time, held-out accuracy, the planted mechanism) and
``OUT/NAME_loss.png``; OUT defaults to the package's ``vlminterp/zoo/weights``. The same seed,
torch version and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vlminterp.store import atomic_write, write_json_atomic
from vlminterp.zoo.specs import SPECS, ZooSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"
EVAL_SEED = 1  # held-out data: a different seed *and* stream than training's (seed, 0)


def import_name(spec: str):
    """``"package.module:attr"`` -> the attribute."""
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"{spec!r}: expected 'module:name'")
    return getattr(importlib.import_module(module), attr)


def tokenizer_digest(processor) -> str | None:
    """A hash of the tokenizer's vocabulary: the weights only fit the vocabulary they were
    trained with (the tiny tokenizers are trained in-process from a word list)."""
    tok = getattr(processor, "tokenizer", None)
    if tok is None:
        return None
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _lr(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(spec: ZooSpec, seed: int = 0, *, steps: int | None = None, builder: str | None = None,
          out_dir: Path = WEIGHTS_DIR, eval_n: int | None = None, progress: bool = True) -> dict:
    """Train ``spec``'s model and write weights, card and loss curve under ``out_dir``."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from vlminterp.plots import line_plot

    steps = steps or spec.steps
    builder = builder or spec.builder
    torch.manual_seed(seed)
    model, processor = import_name(builder)(seed=seed, **spec.builder_kwargs)
    task_cls = import_name(spec.task)
    task = task_cls(model, processor)
    model.train()
    # tasks may train helpers that are not shipped (e.g. an auxiliary probe)
    params = [p for p in model.parameters() if p.requires_grad] + \
        list(getattr(task, "extra_parameters", list)())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 0])
    losses = []
    start_wall, start_cpu = time.time(), time.process_time()
    task.self_check(np.random.default_rng([seed, 2]))
    bar = tqdm(range(steps), desc=f"train {spec.zoo_id}", unit="step", disable=not progress)
    with task.fast():
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = _lr(step, steps, spec.lr)
            loss = task.loss(rng, spec.batch_size, progress=step / steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    wall, cpu = time.time() - start_wall, time.process_time() - start_cpu
    model.eval()
    dtype = getattr(torch, spec.storage_dtype)
    # cloned: tied weights (OneVision's lm_head = embeddings) share storage, which safetensors refuses
    state = {k: v.detach().to(dtype).clone().contiguous() for k, v in model.state_dict().items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{spec.zoo_id}.safetensors"
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    card = {
        "zoo_id": spec.zoo_id, "description": spec.description,
        "architecture": {"base": spec.base, "builder": builder, "builder_kwargs": spec.builder_kwargs,
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "tokenizer_digest": tokenizer_digest(processor)},
        "task": {"module": spec.task, "data": spec.data},
        "training": {"seed": seed, "steps": steps, "batch_size": spec.batch_size, "lr": spec.lr,
                     "optimizer": "AdamW (weight decay 0.01), 50 warm-up steps, cosine decay, "
                                  "gradient norm clipped at 1",
                     "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "python": platform.python_version(),
                     "final_loss": float(np.mean(losses[-50:]))},
        "storage_dtype": spec.storage_dtype,
        "weights": {"file": weights.name, "bytes": weights.stat().st_size,
                    "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()},
        "mechanism": spec.mechanism,
    }
    from vlminterp.zoo import evaluate_model

    card["heldout"] = evaluate_model(spec, model, processor, seed=EVAL_SEED,
                                     n=eval_n or spec.eval_n, stored_dtype=dtype)
    png = out_dir / f"{spec.zoo_id}_loss.png"
    window = max(1, steps // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    line_plot(np.arange(len(smooth)) + window, {"training loss (moving mean)": smooth}, png,
              xlabel="step", ylabel="cross-entropy",
              title=f"{spec.zoo_id}: seed {seed}, {steps} steps x {spec.batch_size}")
    write_json_atomic(out_dir / f"{spec.zoo_id}.json", card)
    return card


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlminterp.zoo.train", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(SPECS), help="zoo model to train")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and training data (default: 0)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the spec's)")
    p.add_argument("--builder", default=None, help="tiny builder 'module:function' returning "
                   "(model, processor) to train the task on another architecture (default: the spec's)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the "
                   "package's vlminterp/zoo/weights, where vlminterp.load finds zoo models)")
    p.add_argument("--eval_n", type=int, default=None, help="held-out items per question kind / "
                   "class for the card (default: the spec's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; on tiny models "
                   "more threads cost more than they save)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps: expected a positive number, got {args.steps}")
    torch.set_num_threads(args.threads)
    card = train(SPECS[args.name], args.seed, steps=args.steps, builder=args.builder,
                 out_dir=args.out, eval_n=args.eval_n)
    acc = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in card["heldout"]["by_kind"].items())
    print(f"Trained {args.name} in {card['training']['wall_seconds']:.0f} s; held-out accuracy {acc}; "
          f"saved {args.out / card['weights']['file']}, {args.name}.json and {args.name}_loss.png")
    return card


if __name__ == "__main__":
    main()
