"""benchmarks/common.py: the JSON result every benchmark writes, target checks, memory counter."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

import vlminterp.store  # noqa: F401  before common.meta imports nnsight: nnsight mounts methods on
# `object`, and beartype (pytest's jaxtyping hook) then fails on any vlminterp module imported later

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "common.py"
_spec = importlib.util.spec_from_file_location("benchmarks_common", _PATH)
common = sys.modules.setdefault("benchmarks_common", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(common)


def test_finish_writes_ratios_targets_and_meta(tmp_path):
    path = tmp_path / "out" / "bench.json"
    args = argparse.Namespace(quick=True, device="cpu", clock="cpu", json=str(path))
    ratios = {"speedup": 5.0, "overhead": 1.2, "extra": 0.5}
    targets = {"speedup": (">=", 4.0), "overhead": ("<=", 1.15), "missing": ("<=", 1.0)}
    meta = common.meta(args, (0.5, 0.4, 0.3), sizes={"seq": 10})
    assert common.finish(args, ratios, targets, meta) == 0
    doc = json.loads(path.read_text())
    assert doc["ratios"] == ratios
    assert doc["targets"] == {"speedup": [">=", 4.0], "overhead": ["<=", 1.15],
                              "missing": ["<=", 1.0]}
    assert doc["meta"]["targets_met"] == {"speedup": True, "overhead": False, "missing": False}
    assert doc["meta"]["loadavg_before"] == [0.5, 0.4, 0.3]
    assert len(doc["meta"]["loadavg_after"]) == 3
    assert doc["meta"]["sizes"] == {"seq": 10} and doc["meta"]["quick"] is True
    assert not [p for p in path.parent.iterdir() if p.name != "bench.json"]  # no temp file left


def test_interleaved_timings_align_repetitions():
    calls = []
    t = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                reps=4, warmup=1, clock="wall")
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(t.times["a"]) == len(t.times["b"]) == 4 and t.ratio("a", "a") == 1.0


def test_tensor_peak_counts_allocations_not_views_or_existing_storage():
    w = torch.ones(1000)
    with common.TensorPeak() as tp:
        view = w.t()[:500]  # a view of a tensor made before: no allocation
        x = torch.ones(2000)  # 8000 bytes
        y = x * 2  # 8000 more, alive at once
        del x, y
        z = torch.ones(100)
    assert tp.peak == 16000
    assert tp.still_alive() == 400 and view.numel() == 500 and z.numel() == 100
