"""benchmarks/gpu_check.py: runs each benchmark script as a subprocess within a shared time
budget and writes one JSON; on CPU with --quick (slow) so it cannot rot."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import vlminterp.store  # noqa: F401  (see test_benchmarks_json: before nnsight is imported)

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("benchmarks_gpu_check", BENCH / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

FAKE = '''import argparse, json, sys, time
p = argparse.ArgumentParser()
for flag in ("--device", "--dtype", "--json", "--reps", "--warmup"):
    p.add_argument(flag)
p.add_argument("--quick", action="store_true")
p.add_argument("--smoke", action="store_true")
a = p.parse_args()
{body}
json.dump({{"ratios": {{"speedup": 12.5}}, "targets": {{"speedup": [">=", 10.0]}},
           "meta": {{"device": a.device, "dtype": a.dtype, "quick": a.quick, "reps": a.reps,
                    "smoke": a.smoke,
                    "targets_met": {{"speedup": True}}}}}}, open(a.json, "w"))
'''


def test_statuses_budget_and_one_json(tmp_path, monkeypatch, capsys):
    (tmp_path / "fast.py").write_text(FAKE.format(body=""))
    (tmp_path / "slow.py").write_text(FAKE.format(body="time.sleep(30)"))
    (tmp_path / "broken.py").write_text(FAKE.format(body="sys.exit('no such model: x')"))
    monkeypatch.setattr(gpu_check, "HERE", tmp_path)
    out = tmp_path / "out" / "check.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--budget", "9", "--json", str(out),
                         "--scripts", "fast,absent,slow,broken"])
    doc = json.loads(out.read_text())
    runs = doc["scripts"]
    assert list(runs) == ["fast", "absent", "slow", "broken"] and rc == 1  # broken failed
    assert runs["fast"]["status"] == "ok" and runs["fast"]["ratios"] == {"speedup": 12.5}
    assert runs["fast"]["targets_met"] == {"speedup": True}
    assert runs["fast"]["meta"] == {"device": "cpu", "dtype": "float32", "quick": True,
                                    "smoke": True,
                                    "reps": "2", "targets_met": {"speedup": True}}
    assert runs["absent"] == {"status": "absent", "note": f"absent.py is not in {tmp_path}; skipped"}
    assert runs["slow"]["status"] == "timeout" and runs["slow"]["seconds"] < 10
    assert runs["broken"]["status"] == "failed" and "no such model: x" in runs["broken"]["error"]
    assert doc["wall_s"] < 15 and doc["dtype"] == "float32" and doc["gpu"] is None
    assert "absent.py is not in" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_runs_the_real_benchmarks_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--json", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["scripts"]
    for name in ("trace_overhead", "patch_sweep"):
        assert runs[name]["status"] == "ok", runs[name]
        assert runs[name]["meta"]["device"] == "cpu" and runs[name]["meta"]["quick"] is True
        assert runs[name]["ratios"] and all(v > 0 for v in runs[name]["ratios"].values()
                                            if isinstance(v, (int, float)))
    assert "realistic.c_over_a" in runs["trace_overhead"]["ratios"]
    assert runs["attribution"]["status"] in ("ok", "absent")
