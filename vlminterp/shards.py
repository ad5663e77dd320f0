"""Splitting a recipe's samples across processes, GPUs or nodes: ``--shard I/N`` or ``auto``.

A sample belongs to shard ``sha256(sample id) mod N``: by its id, not its position, so adding
samples to a dataset never moves the others to another shard. A shard run writes every output
with a ``.shard-I-of-N`` suffix (``runs/t.json`` -> ``runs/t.shard-0-of-3.json``, its own resume
log ``runs/t.shard-0-of-3.jsonl``, ``runs/t.shard-0-of-3_heatmap.png``, ...) and a manifest,
``runs/t.shard-0-of-3.manifest.json`` (the recipe, its flags, the ids of every sample of the
unsharded run, the activation stores it writes), from which ``python -m vlminterp.merge``
writes what one unsharded run would have written (`vlminterp.merge`).

``--shard auto`` reads the launcher's environment: ``RANK``/``WORLD_SIZE`` (torchrun,
accelerate launch), ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` (a SLURM job array) or
``SLURM_PROCID``/``SLURM_NTASKS`` (srun); with ``LOCAL_RANK`` set and no ``--device``, each
process takes its own GPU. One shard (N = 1) is a plain run.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .checks import RecipeError

SHARD_NAME = re.compile(r"^(?P<stem>.+?)\.shard-(?P<index>\d+)-of-(?P<count>\d+)(?P<rest>.*)$")


def shard_index(key: str, count: int) -> int:
    """The shard (0..count-1) of the sample with id ``key``: a stable hash, the same in every
    process and Python version (unlike ``hash()``)."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def suffix(self) -> str:
        return f".shard-{self.index}-of-{self.count}"

    def owns(self, key: str) -> bool:
        return shard_index(key, self.count) == self.index

    def path(self, path) -> Path:
        """``path`` with the shard suffix before its extension (``t.json`` ->
        ``t.shard-0-of-3.json``; a folder ``reps`` -> ``reps.shard-0-of-3``)."""
        path = Path(path)
        return path.with_name(f"{path.stem}{self.suffix}{path.suffix}")


def _env_int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise RecipeError(f"--shard auto: ${name} is {env[name]!r}, not an integer") from None


def _from_env(env) -> tuple[int, int, str]:
    if "RANK" in env and "WORLD_SIZE" in env:
        return _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), "$RANK/$WORLD_SIZE"
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        index = (_env_int(env, "SLURM_ARRAY_TASK_ID") - first) // max(step, 1)
        return index, _env_int(env, "SLURM_ARRAY_TASK_COUNT"), \
            "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT (use a contiguous --array=0-N)"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS"), \
            "$SLURM_PROCID/$SLURM_NTASKS"
    raise RecipeError("--shard auto: none of RANK/WORLD_SIZE (torchrun, accelerate launch), "
                      "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (a SLURM array) or "
                      "SLURM_PROCID/SLURM_NTASKS (srun) is set; give --shard I/N")


def parse_shard(spec: str | None, env=None) -> Shard | None:
    """``"I/N"`` (0 <= I < N) or ``"auto"`` (from ``env``, default ``os.environ``) as a
    `Shard`; None for no spec or N = 1. Raises a one-line `RecipeError`."""
    if spec is None:
        return None
    if spec == "auto":
        index, count, source = _from_env(os.environ if env is None else env)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not match:
            raise RecipeError(f"--shard {spec!r}: expected I/N with 0 <= I < N (e.g. 0/4), "
                              f"or auto")
        index, count, source = int(match[1]), int(match[2]), f"--shard {spec!r}"
    if count < 1 or not 0 <= index < count:
        raise RecipeError(f"{source}: shard {index} of {count} is not one of 0..{count - 1}")
    return None if count == 1 else Shard(index, count)


def add_shard_arg(p) -> None:
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (0 <= I < N) of the "
                   "samples, split by a hash of each sample's id; outputs get a .shard-I-of-N "
                   "suffix and `python -m vlminterp.merge` combines them. 'auto' reads RANK/"
                   "WORLD_SIZE (torchrun, accelerate launch) or SLURM_ARRAY_TASK_ID/"
                   "SLURM_ARRAY_TASK_COUNT (and, without --device, takes GPU $LOCAL_RANK)")


# -- the merge: vlminterp.merge runs the recipe's own main with every sample already done -----

@dataclass
class MergeTarget:
    """What a merge gives the recipe it runs: the output, the sample ids every shard listed,
    and each shard's activation stores (in the order the recipe names them)."""

    output: Path
    samples: list[str]
    stores: list[list[str]] = field(default_factory=list)

    def fill(self, keys: list[str], stores) -> None:
        from .merge import merge_stores

        if keys != self.samples:
            raise RecipeError(f"the merged run selects {len(keys)} samples, the shards listed "
                              f"{len(self.samples)} others: the data or the flags that select "
                              f"samples changed since the shards ran")
        for j, dst in enumerate(stores):
            merge_stores([s[j] for s in self.stores], dst, keys)


_MERGE: contextvars.ContextVar[MergeTarget | None] = contextvars.ContextVar("merge", default=None)


def merging() -> bool:
    """Inside `vlminterp.merge`: the recipe loads no weights and runs no sample."""
    return _MERGE.get() is not None


@contextlib.contextmanager
def merging_into(target: MergeTarget):
    token = _MERGE.set(target)
    try:
        yield target
    finally:
        _MERGE.reset(token)


# -- what a recipe calls -----------------------------------------------------------------------

@dataclass
class ShardRun:
    """This run's share of the samples (see `start`)."""

    shard: Shard | None
    args: object
    argv: list[str]
    prog: str
    target: MergeTarget | None = None

    def own_dir(self, path) -> Path:
        """A folder only this shard writes (``path`` itself when unsharded): for data a run
        generates next to its output, which concurrent shards must not write at once."""
        return Path(path) if self.shard is None else Path(path) / f"shard-{self.shard.index}" \
            f"-of-{self.shard.count}"

    def take(self, samples: list, key, stores=()) -> list:
        """The samples of this shard, in order (all of them when unsharded). ``key(sample)``
        is the sample's id; ``stores``: the activation stores the run writes. A shard writes
        its manifest; inside a merge the shards' stores are merged into ``stores`` first."""
        keys = [str(key(s)) for s in samples]
        if self.target is not None:
            self.target.fill(keys, [Path(p) for p in stores])
            return samples
        if self.shard is None:
            return samples
        mine = [s for s, k in zip(samples, keys) if self.shard.owns(k)]
        from .store import write_json_atomic

        output = Path(self.args.output)
        write_json_atomic(manifest_path(output), {
            "recipe": self.prog.split()[-1], "shard": [self.shard.index, self.shard.count],
            "argv": self.argv, "cwd": os.getcwd(), "output": str(output),
            "log": str(output.with_suffix(".jsonl")), "stores": [str(p) for p in stores],
            "samples": keys})
        print(f"Shard {self.shard}: {len(mine)} of {len(samples)} samples (split by a hash of "
              f"the sample id)", file=sys.stderr)
        return mine


def manifest_path(output) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}.manifest.json")


def start(parser, args, argv, outputs=("output",)) -> ShardRun:
    """Right after parsing: ``--shard`` applied to ``args`` (the ``outputs`` flags get the
    shard suffix; ``auto`` without ``--device`` takes GPU ``$LOCAL_RANK``). Inside a merge:
    the merge's output, no shard, no ``--restart`` or ``--retry_errors``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    target = _MERGE.get()
    if target is not None:
        args.output, args.shard, args.restart = target.output, None, False
        if hasattr(args, "retry_errors"):
            args.retry_errors = False
        return ShardRun(None, args, argv, parser.prog, target)
    shard = parse_shard(args.shard)
    if shard is not None:
        placed = getattr(args, "device_map", None) or getattr(args, "remote", False)
        if args.shard == "auto" and getattr(args, "device", "") is None and not placed:
            args.device = _local_gpu()
        for flag in outputs:
            if getattr(args, flag, None) is not None:
                setattr(args, flag, shard.path(getattr(args, flag)))
    return ShardRun(shard, args, argv, parser.prog)


def _local_gpu() -> str | None:
    import torch

    if "LOCAL_RANK" not in os.environ or not torch.cuda.is_available():
        return None
    return f"cuda:{_env_int(os.environ, 'LOCAL_RANK') % torch.cuda.device_count()}"


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("samples"), list):
            raise ValueError("not a shard manifest")
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: cannot read the shard manifest "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return manifest
