"""Import cost: `import vlminterp` and each recipe's `--help`, as ratios to `import torch`.

Each variant is a fresh Python process; its cost is the child's CPU time (user + sys, from
``getrusage(RUSAGE_CHILDREN)``), so other jobs on the machine do not skew it. Variants run
interleaved; a ratio is the median over repetitions of (variant / ``import torch``) in that
repetition. Also records which heavy modules (transformers, nnsight, open_clip, sklearn,
matplotlib) each variant imports: `import vlminterp` and `--help` need none of them.
"""

from __future__ import annotations

import os
import pkgutil
import resource
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("transformers", "nnsight", "open_clip", "sklearn", "matplotlib")
TARGETS = {"import_vlminterp_over_torch": ("<=", 1.5),
           "import_vlminterp.heavy_modules": ("<=", 0),
           "recipe_help_max_over_torch": ("<=", 1.5)}


def child_cpu(code: str) -> tuple[float, list[str]]:
    """CPU seconds of one fresh interpreter running ``code``, and the heavy modules it loaded."""
    probe = (f"{code}\nimport sys\nprint('HEAVY', *[m for m in {HEAVY!r} if m in sys.modules])")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        sys.exit(f"{code!r} failed:\n{out.stderr[-2000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("HEAVY"))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, line.split()[1:]


def recipes() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([os.path.join(ROOT, "recipes")]))


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    load0 = common.setup(args)
    names = recipes()[:2] if args.quick else recipes()
    variants = {"torch": "import torch", "vlminterp": "import vlminterp"}
    for name in names:
        variants[f"help:{name}"] = (f"import sys; sys.argv = ['{name}', '--help']\n"
                                    f"import runpy\ntry:\n    runpy.run_module('recipes.{name}', "
                                    f"run_name='__main__')\nexcept SystemExit:\n    pass")
    reps = 3 if args.quick else args.reps
    times: dict[str, list[float]] = {k: [] for k in variants}
    heavy: dict[str, list[str]] = {}
    for rep in range(reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for key in order:
            cpu, mods = child_cpu(variants[key])
            times[key].append(cpu)
            heavy[key] = mods
    ratio = {k: statistics.median(t / base for t, base in zip(times[k], times["torch"]))
             for k in variants if k != "torch"}
    rows = [[k, statistics.median(times[k]), ratio.get(k, 1.0), " ".join(heavy[k]) or "-"]
            for k in variants]
    common.print_table(rows, ["variant", "cpu s (median)", "over import torch", "heavy modules"])
    helps = [ratio[k] for k in ratio if k.startswith("help:")]
    ratios = {"import_vlminterp_over_torch": ratio["vlminterp"],
              "import_vlminterp.heavy_modules": float(len(heavy["vlminterp"])),
              "recipe_help_max_over_torch": max(helps),
              "import_vlminterp_seconds": statistics.median(times["vlminterp"]),
              **{f"{k}.over_torch": v for k, v in ratio.items() if k.startswith("help:")},
              **{f"{k}.heavy_modules": float(len(heavy[k])) for k in heavy if k != "torch"}}
    return common.finish(args, ratios, TARGETS, common.meta(args, load0, reps=reps,
                                                            heavy={k: heavy[k] for k in heavy}))


if __name__ == "__main__":
    sys.exit(main())
