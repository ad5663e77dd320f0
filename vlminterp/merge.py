"""Merge the shards of a recipe run (``--shard I/N``) into what one unsharded run writes.

    python -m vlminterp.merge 'runs/t.shard-*-of-4.json' [--output runs/t.json]
    python -m vlminterp.merge runs/t.json          # every shard of runs/t.json

The shards must all be there, finished, and run with the same settings: the flags that change
results, as their resume logs record them, and the same samples (one line says what is
wrong). The merge writes ``OUTPUT.jsonl`` (every shard's records, in sample order), merges the
shards' activation stores, then runs the recipe's own ``main`` with the shards' flags and
``--output OUTPUT``: every sample is already done, so it loads the model without weights and
only writes the JSON and the figures, with the recipe's own summary and plotting code.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

from .checks import RecipeError
from .runs import recipe_main
from .shards import SHARD_NAME, MergeTarget, merging_into, read_manifest, shard_index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlminterp.merge",
                                description=__doc__.splitlines()[0])
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="the shards' outputs or globs "
                   "matching them (e.g. 'runs/t.shard-*-of-4.json'), or the unsharded OUTPUT "
                   "(runs/t.json) for all its shards")
    p.add_argument("--output", type=Path, default=None, help="where the merged run writes "
                   "(default: the shards' OUTPUT without the .shard-I-of-N suffix)")
    return p


def find_manifests(patterns) -> list[Path]:
    """The manifests of the shards ``patterns`` name, one per shard index 0..N-1."""
    found: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not paths:
            raise RecipeError(f"{pattern}: matches no file")
        for path in map(Path, paths):
            match = SHARD_NAME.match(path.name)
            if match:
                found.setdefault((str(path.parent), match["stem"]), set()).add(
                    (int(match["index"]), int(match["count"])))
                continue
            pattern = f"{glob.escape(path.stem)}.shard-*-of-*.manifest.json"
            siblings = list(path.parent.glob(pattern))
            if not siblings:
                raise RecipeError(f"{path}: not a shard output, and no shards of it "
                                  f"({path.stem}.shard-I-of-N.manifest.json) beside it")
            for s in siblings:
                m = SHARD_NAME.match(s.name)
                found.setdefault((str(path.parent), m["stem"]), set()).add(
                    (int(m["index"]), int(m["count"])))
    if len(found) > 1:
        runs = ", ".join(sorted(s for _, s in found))
        raise RecipeError(f"the shards are of several runs ({runs}); merge one run at a time")
    (parent, stem), shards = next(iter(found.items()))
    counts = sorted({n for _, n in shards})
    if len(counts) > 1:
        splits = " and ".join(map(str, counts))
        raise RecipeError(f"overlapping shards of {stem}: split into {splits} parts; merge the "
                          f"shards of one split")
    count = counts[0]
    manifests = [Path(parent) / f"{stem}.shard-{i}-of-{count}.manifest.json" for i in range(count)]
    for i, path in enumerate(manifests):
        if not path.is_file():
            raise RecipeError(f"shard {i}/{count} of {stem} is missing: no {path} (it has not "
                              f"started, or ran elsewhere)")
        if (i, count) not in shards:
            raise RecipeError(f"shard {i}/{count} of {stem} is missing: not among the files given")
    return manifests


def _log_lines(path: Path) -> tuple[dict | None, dict[str, dict]]:
    """``(settings header, key -> latest entry)`` of a results log (none if it does not exist)."""
    from .store import ResultLog

    if not path.exists():
        return None, {}
    try:
        log = ResultLog(path)
    except ValueError as e:  # a corrupt line
        raise RecipeError(str(e).splitlines()[0]) from None
    with open(path, "rb") as f:
        first = json.loads(f.readline() or b"{}")
    header = first if "config_hash" in first and "key" not in first else None
    return header, log.latest()


def _settings_differ(a: dict, b: dict) -> str:
    old, new = a.get("config") or {}, b.get("config") or {}
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"--{k} {json.dumps(old.get(k))} vs {json.dumps(new.get(k))}" for k in keys)


def check_shards(manifests: list[Path]) -> tuple[list[dict], dict | None, dict[str, dict]]:
    """The manifests, the shared settings header and every sample's log entry, after checking
    that the shards ran the same recipe on the same samples with the same settings, from this
    folder, and finished. Raises a one-line `RecipeError` naming the shard."""
    docs = [read_manifest(p) for p in manifests]
    count, first = len(docs), docs[0]
    header, entries = None, {}
    for i, (path, doc) in enumerate(zip(manifests, docs)):
        name = f"shard {i}/{count}"
        if doc.get("shard") != [i, count]:
            raise RecipeError(f"{path}: records shard {doc.get('shard')}, not {i}/{count}")
        for field, what in (("recipe", "recipe"), ("samples", "samples (the data or the flags "
                                                               "that select samples differ)")):
            if doc.get(field) != first.get(field):
                raise RecipeError(f"{name} ran another {what} than shard 0/{count}")
        if doc.get("cwd") != os.getcwd():
            raise RecipeError(f"{name} ran in {doc.get('cwd')}: run the merge from there (the "
                              f"shards' flags may hold paths relative to it)")
        own, latest = _log_lines(Path(doc["log"]))
        if own is not None and header is not None and own["config_hash"] != header["config_hash"]:
            raise RecipeError(f"{name} ran with other settings than the shards before it "
                              f"({_settings_differ(header, own)}); rerun it with the same flags")
        header = header or own
        mine = [k for k in doc["samples"] if shard_index(k, count) == i]
        missing = [k for k in mine if k not in latest]
        if missing:
            raise RecipeError(f"{name} is incomplete: {len(missing)} of its {len(mine)} samples "
                              f"have no result in {doc['log']} (the first: {missing[0]}); rerun "
                              f"it with the same flags to resume")
        entries.update({k: latest[k] for k in mine})
    return docs, header, entries


def write_merged_log(path: Path, header: dict | None, entries: dict[str, dict], order) -> None:
    """``path``: the header and every entry in sample order. An existing log is replaced only
    if everything in it is in the shards too."""
    from .result_log import _dumps
    from .store import atomic_write

    old_header, old = _log_lines(path)
    if old and (old_header != header or any(entries.get(k) != e for k, e in old.items())):
        raise RecipeError(f"{path} holds results that are not in these shards; remove it or "
                          f"choose another --output")
    lines = ([_dumps(header)] if header else []) + [_dumps(entries[k]) for k in order]
    text = "".join(line + "\n" for line in lines)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def merge_stores(sources, dst, order) -> None:
    """Copy every entry of the activation stores ``sources`` into the store ``dst`` (created
    or replaced), in sample order: an entry of sample ``k`` is keyed ``k`` or ``k/...``;
    others keep the order the shards wrote them in (an entry in several shards is taken once,
    from the first)."""
    from .store import ActivationStore, write_json_atomic

    stores = [ActivationStore(p) for p in map(Path, sources) if Path(p).is_dir()]
    rank = {k: i for i, k in enumerate(order)}
    first_seen = {}
    for store in stores:
        for key in store.keys():
            first_seen.setdefault(key, store)
    owner = {key: rank.get(key, rank.get(key.split("/", 1)[0], -1)) for key in first_seen}
    keys = sorted(first_seen, key=owner.__getitem__)  # stable: unowned first, in written order
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "shards").mkdir(parents=True)
    index = {}
    for n, key in enumerate(keys):
        src = first_seen[key]
        entry = json.loads(json.dumps(src._entry(key)))
        shutil.copyfile(src.root / "shards" / entry["shard"], dst / "shards" / f"{n}.safetensors")
        index[key] = {**entry, "shard": f"{n}.safetensors"}
    write_json_atomic(dst / "index.json", index)


@recipe_main
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    manifests = find_manifests(args.shards)
    docs, header, entries = check_shards(manifests)
    first = docs[0]
    base = Path(first["output"])
    output = args.output or base.with_name(SHARD_NAME.match(base.name)["stem"] + base.suffix)
    if SHARD_NAME.match(output.name):
        raise RecipeError(f"--output {str(output)!r} is a shard's name; give the merged run's")
    samples = first["samples"]
    print(f"Merging {len(docs)} shards of {first['recipe']} ({len(samples)} samples) into "
          f"{output}", file=sys.stderr)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_merged_log(output.with_suffix(".jsonl"), header, entries, samples)
    recipe = importlib.import_module(first["recipe"])
    target = MergeTarget(output, samples, [d["stores"] for d in docs])
    with merging_into(target):
        return recipe.main(first["argv"])


if __name__ == "__main__":
    main()
