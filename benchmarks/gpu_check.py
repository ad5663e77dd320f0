"""The GPU check: trace_overhead, patch_sweep and attribution in one invocation, one JSON.

Prepared for a session that is lent a GPU for a few minutes: one command, at most ``--budget``
seconds (default 480), runs each benchmark script present in this folder as a subprocess with
``--device DEVICE --dtype DTYPE --json ...`` at its full (realistic) size, shares the budget
among them (a script that runs past its share is stopped and recorded as such), skips a
script that is absent (saying so) and writes one JSON:

    {"device", "gpu", "dtype", "quick", "budget_s", "wall_s",
     "scripts": {name: {"status": ok | failed | timeout | absent, "seconds", "command",
                        "ratios", "targets", "targets_met", "meta", "error"}}}

``meta.dtype`` of each script says which dtype it really ran (a script that does not take
``--dtype`` runs float32). ``--quick`` is a smoke run (the scripts' ``--quick`` sizes, 2
repetitions, no warmup; on CPU also ``--smoke``, the smallest models): it shows the scripts
still run, not what they measure; the tests run it on CPU so this check cannot rot.

    python benchmarks/gpu_check.py --device cuda --json gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick --json /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("trace_overhead", "patch_sweep", "attribution")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="weights' dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--json", metavar="PATH", default="gpu_check.json",
                   help="where to write the combined JSON (default: gpu_check.json)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all scripts "
                   "together (default 480: 8 minutes)")
    p.add_argument("--quick", action="store_true", help="smoke run: the scripts' --quick "
                   "sizes, 2 repetitions, no warmup (on cpu also --smoke: the smallest models)")
    p.add_argument("--scripts", default=",".join(SCRIPTS),
                   help=f"comma list of scripts to run (default: {','.join(SCRIPTS)})")
    return p


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_script(name: str, args, dtype: str, timeout: float) -> dict:
    """Run ``benchmarks/NAME.py`` with the check's flags; its status, time and JSON."""
    path = HERE / f"{name}.py"
    if not path.is_file():
        return {"status": "absent", "note": f"{path.name} is not in {HERE}; skipped"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        command = [sys.executable, str(path), "--device", args.device, "--dtype", dtype,
                   "--json", str(out)]
        if args.quick:
            command += ["--quick", "--reps", "2", "--warmup", "0"]
            if args.device == "cpu":  # the tests' run: that every script works, not its ratios
                command += ["--smoke"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            return {"status": "timeout", "seconds": time.perf_counter() - t0,
                    "command": command[1:], "error": f"stopped after its {timeout:.0f} s share "
                    f"of --budget; last output: {_tail(stderr, 3)}"}
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            return {"status": "failed", "seconds": seconds, "command": command[1:],
                    "error": f"exit {proc.returncode}: {_tail(proc.stderr)}"}
        doc = json.loads(out.read_text())
    return {"status": "ok", "seconds": seconds, "command": command[1:], **doc,
            "targets_met": doc.get("meta", {}).get("targets_met", {})}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.scripts.split(",") if n.strip()]
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: CUDA is not available on this machine")
    start, results = time.perf_counter(), {}
    for i, name in enumerate(names):
        present = [n for n in names[i:] if (HERE / f"{n}.py").is_file()]
        share = (args.budget - (time.perf_counter() - start)) / max(len(present), 1)
        print(f"{name}: {'running' if name in present else 'absent, skipped'}"
              + (f" (up to {share:.0f} s)" if name in present else ""), file=sys.stderr)
        results[name] = run_script(name, args, dtype, max(share, 1.0))
    doc = {"device": args.device, "gpu": _gpu_name(args.device), "dtype": dtype,
           "quick": args.quick, "budget_s": args.budget, "wall_s": time.perf_counter() - start,
           "scripts": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    for name, r in results.items():
        ratios = ", ".join(f"{k} {v:.3g}" for k, v in r.get("ratios", {}).items()
                           if isinstance(v, (int, float)))
        print(f"{name:15s} {r['status']:8s} {r.get('seconds', 0):6.1f} s  "
              f"{r.get('error') or r.get('note') or ratios}")
    print(f"wrote {args.json}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name()


if __name__ == "__main__":
    sys.exit(main())
