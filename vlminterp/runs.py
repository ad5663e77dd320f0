"""What every resumable recipe shares: the settings that key its results log, ``--restart``,
``--limit``, the per-sample loop that tells a sample's data error from a configuration error,
the final line, and one-line exits.

A results log records the flags that change results (`result_config`); a rerun with other values
is refused with one line naming them (`open_log`), never mixed. Output, device, progress and
resume flags (`NOT_RESULT_FLAGS`) are left out, so they can change between runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from pathlib import Path

from .checks import RecipeError, SampleError

# Flags that never change a finished sample's records: where results go, where the model runs
# (device, device map), how many rows share a forward, which samples this run covers (limit,
# shard), and how a run resumes.
NOT_RESULT_FLAGS = frozenset({
    "output", "out", "representations_output", "device", "remote", "ndif_host", "ndif_api_key",
    "ndif_insecure", "retry_errors", "restart", "limit", "batch_size", "ig_batch_size",
    "min_total_effect", "include_unstable", "heatmap_layer", "heatmap_images", "html_images",
    "plot_target", "shard", "device_map", "offload_folder", "max_memory",
})


def add_run_args(p, limit: bool = True) -> None:
    """``--restart`` (and ``--limit`` unless the recipe has its own)."""
    p.add_argument("--restart", action="store_true", help="discard the results log and outputs "
                   "of an earlier run with this --output and start over (needed when flags that "
                   "change results differ from that run's)")
    if limit:
        p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N "
                       "samples (a later run with a larger N resumes and adds the rest)")


def _value(v):
    if isinstance(v, Path):
        return os.path.abspath(v)
    return v


def result_config(args, flags) -> dict:
    """``{flag: value}`` of the flags that change results (paths made absolute)."""
    return {f: _value(getattr(args, f, None)) for f in flags}


def unclassified_flags(parser, result_flags) -> list[str]:
    """Parser destinations that are neither result flags nor `NOT_RESULT_FLAGS` (a test keeps
    this empty, so a new flag is never silently left out of the resume key)."""
    return sorted(a.dest for a in parser._actions if a.dest != "help"
                  and a.dest not in result_flags and a.dest not in NOT_RESULT_FLAGS)


def discard(paths) -> None:
    """Remove earlier outputs for ``--restart``: files, and folders that are activation stores
    (an ``index.json`` inside) or empty. Anything else is refused, never deleted."""
    for path in map(Path, paths):
        if path.is_dir():
            if not (path / "index.json").is_file() and any(path.iterdir()):
                raise RecipeError(f"--restart: {path} is not an activation store written by this "
                                  f"recipe; not deleting it (remove it yourself)")
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def open_log(path, config: dict, *, restart: bool = False, retry_errors: bool = False,
             outputs=()):
    """The `ResultLog` at ``path`` keyed by ``config``. ``restart``: first discard it and
    ``outputs``. Temp files of killed atomic writes of ``outputs`` are removed. Settings that
    differ from the log's raise a one-line `RecipeError`."""
    from .store import ConfigMismatch, ResultLog, clean_stale_temps

    path = Path(path)
    if restart:
        discard([path, *outputs])
    clean_stale_temps([path, *outputs])
    try:
        return ResultLog(path, retry_errors=retry_errors, config=config)
    except ConfigMismatch as e:
        if _only_new_default_flags(path, config):
            return ResultLog(path, retry_errors=retry_errors, config=None)
        raise RecipeError(str(e)) from None
    except (ValueError, OSError) as e:  # a corrupt line in the middle of the log
        raise RecipeError(f"{_first_line(e)}; pass --restart to discard the log") from None


def _only_new_default_flags(path: Path, config: dict) -> bool:
    """The log's recorded settings equal ``config`` but for flags recorded since it was
    written, all at their default None (e.g. --quantization): the same settings, resumable."""
    import json

    from .result_log import _jsonable

    try:
        with open(path, "rb") as f:
            old = json.loads(f.readline()).get("config")
    except (OSError, ValueError, AttributeError):
        return False
    new = json.loads(json.dumps(_jsonable(config)))
    return isinstance(old, dict) and all(new.get(k, object()) == v for k, v in old.items()) \
        and all(new[k] is None for k in set(new) - set(old))


@contextlib.contextmanager
def as_recipe_errors():
    """Inside the block, a ValueError (a bad flag value, an unusable file) becomes a one-line
    `RecipeError`: for a recipe's set-up, before the per-sample loop."""
    try:
        yield
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(_first_line(e)) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _data_errors() -> tuple:
    from .data.coco import CocoError
    from .data.video import VideoReadError

    return (SampleError, OSError, VideoReadError, CocoError)


def run_logged(samples, log, work, desc: str, key=lambda s: s.question_id) -> None:
    """``work(sample) -> records`` for each sample the log has not finished, with a progress
    bar; says how many it skips. A sample's data error (`SampleError`, a missing or unreadable
    file) is logged as that sample's error and the run goes on. Any other ValueError is a flag
    that does not fit the data and would fail every sample: the run stops with one line
    (`RecipeError`) and nothing is logged for the sample. A `RemoteError` propagates."""
    from tqdm import tqdm

    from .shards import merging

    todo = [s for s in samples if key(s) not in log.done]
    skipped = len(samples) - len(todo)
    if todo and merging():
        raise RecipeError(f"{len(todo)} samples have no result in the shards' logs (the first: "
                          f"{key(todo[0])})")
    if skipped:
        errors = sum(1 for s in samples if key(s) in log.errors)
        note = f", {errors} of them recorded errors (--retry_errors retries them)" if errors else ""
        print(f"Resuming {log.path}: skipping {skipped} of {len(samples)} samples already "
              f"done{note}", file=sys.stderr)
    data_errors = _data_errors()
    for s in tqdm(todo, desc=desc, unit="sample", total=len(samples), initial=skipped):
        try:
            records = work(s)
        except data_errors as e:
            log.append_error(key(s), f"{type(e).__name__}: {_first_line(e)}")
            continue
        except RecipeError:
            raise
        except ValueError as e:
            raise RecipeError(f"sample {key(s)}: {_first_line(e)} (not a problem of this sample's "
                              f"file, so it would fail every sample: check the flags; finished "
                              f"samples are kept)") from None
        log.append(key(s), records)


def logged_results(samples, log, key=lambda s: s.question_id) -> tuple[list[dict], dict]:
    """``(records, errors)`` of this run's samples only, in sample order (a log may hold more
    samples from an earlier run with a larger --limit)."""
    order = {key(s): i for i, s in enumerate(samples)}
    by_key: dict = {}
    for k, e in log.latest().items():
        if k in order and "records" in e:
            by_key[k] = e["records"]
    records = [r for k in sorted(by_key, key=order.__getitem__) for r in by_key[k]]
    errors = {k: log.errors[k] for k in sorted(log.errors, key=lambda q: order.get(q, -1))
              if k in order}
    return records, errors


def final_line(what: str, outputs, errors: int) -> str:
    """The one line a recipe ends with: what it saved, every output path, the error count."""
    line = f"Saved {what} to {', '.join(str(o) for o in outputs)} ({errors} errors)"
    print(line)
    return line


def recipe_main(main):
    """Decorate a recipe's ``main``: a `RecipeError` (a bad flag, file or model) stops the run
    with ``PROG: error: MESSAGE`` on one line and exit status 2; a `RemoteError` (NDIF server
    unreachable, died, refused the job) with ``error: MESSAGE`` and exit status 1. Neither is a
    sample's error: finished samples are already in the results log, so a rerun resumes."""
    from .remote import RemoteError

    spec = main.__globals__.get("__spec__")
    prog = f"python -m {spec.name if spec else main.__module__}"

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RemoteError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except RecipeError as e:
            print(f"{prog}: error: {_first_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None

    return run
