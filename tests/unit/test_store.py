"""Unit tests for vlminterp.store: atomic JSON, resumable JSONL, safetensors activation store."""

import json
import math
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from vlminterp.store import (
    ActivationStore,
    ResultLog,
    load_vector,
    save_vector,
    streaming_mean,
    vector_meta,
    write_json_atomic,
)


def _strict_loads(text: str):
    def refuse(const):
        raise AssertionError(f"non-strict JSON constant {const}")

    return json.loads(text, parse_constant=refuse)


# --- write_json_atomic ---------------------------------------------------------------------


def test_write_json_atomic_strict_json_and_scalar_conversion(tmp_path):
    obj = {"nan": float("nan"), "inf": [float("inf"), -float("inf")], "np": np.float32(0.5),
           "npint": np.int64(7), "t": torch.tensor(2.5), "arr": np.array([1.0, np.nan]),
           "nested": {"x": (1, float("nan"))}}
    path = write_json_atomic(tmp_path / "deep" / "dir" / "r.json", obj)
    text = path.read_text()
    assert _strict_loads(text) == {"nan": None, "inf": [None, None], "np": 0.5, "npint": 7, "t": 2.5,
                                   "arr": [1.0, None], "nested": {"x": [1, None]}}
    assert text.startswith('{\n  "nan"')  # indent=2


def test_write_json_atomic_keeps_old_file_when_serialisation_fails(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"ok": 2, "bad": [1, object()]})
    assert _strict_loads(path.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left behind


# --- ResultLog -------------------------------------------------------------------------------


def test_result_log_resume_after_kill_mid_line(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    log = ResultLog(path)
    log.append("a", [{"acc": 1.0}, {"acc": 0.0}])
    log.append("b", [{"acc": float("nan")}])
    log.append_error("c", "CUDA OOM")
    with open(path, "ab") as f:  # the process dies halfway through writing sample d
        f.write(b'{"key": "d", "records": [{"acc": 0.')

    with pytest.warns(UserWarning, match="truncated"):
        log = ResultLog(path)
    assert log.done == {"a", "b", "c"}
    assert log.errors == {"c": "CUDA OOM"}
    assert log.records() == [{"acc": 1.0}, {"acc": 0.0}, {"acc": None}]

    log.append("d", [{"acc": 0.5}])
    lines = path.read_text().splitlines()
    assert [_strict_loads(line)["key"] for line in lines] == ["a", "b", "c", "d"]
    reopened = ResultLog(path)  # no warning now: the file is clean
    assert reopened.done == {"a", "b", "c", "d"}
    assert reopened.records()[-1] == {"acc": 0.5}


def test_result_log_last_write_wins_and_retry_errors(tmp_path):
    path = tmp_path / "r.jsonl"
    log = ResultLog(path)
    log.append("a", [{"v": 1}])
    log.append_error("b", "boom")
    log.append("c", [{"v": 3}])
    log.append("a", [{"v": 10}])  # a rerun of "a" replaces it and moves it to the end
    assert ResultLog(path).records() == [{"v": 3}, {"v": 10}]
    assert ResultLog(path, retry_errors=True).done == {"a", "c"}
    log.append("b", [{"v": 2}])
    assert ResultLog(path).errors == {}
    assert ResultLog(path, retry_errors=True).done == {"a", "b", "c"}


def test_result_log_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a", "records": [{"v": 1}]}')  # hand-edited, no final newline
    log = ResultLog(path)
    assert log.done == {"a"}
    log.append("b", [{"v": 2}])
    assert [_strict_loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "b"]


def test_result_log_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a", "records": []}\nnot json\n{"key": "b", "records": []}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:2"):
        ResultLog(path)


# --- ActivationStore ---------------------------------------------------------------------------


def _example_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "resid": torch.randn(3, 5, generator=g, dtype=torch.float32),
        "half": torch.randn(4, 2, generator=g).to(torch.float16),
        "bf16": torch.randn(6, generator=g).to(torch.bfloat16),
        "pixels": torch.randint(0, 256, (2, 3, 4), generator=g, dtype=torch.uint8),
        "ids": torch.tensor([-(2**40), 0, 2**40], dtype=torch.int64),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.zeros(0, 7),
        "../weird name/.pt": torch.randn(5, 3, generator=g).T,  # non-contiguous view
    }


def _assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def test_store_round_trip_dtypes_shapes_and_meta(tmp_path):
    store = ActivationStore(tmp_path / "acts")
    tensors = _example_tensors()
    store.put("video/0001.mp4#frame=3", tensors, meta={"label": "left", "score": float("nan")})
    _assert_same(store.get("video/0001.mp4#frame=3"), tensors)
    assert list(store.get("video/0001.mp4#frame=3", names=["ids", "half"])) == ["ids", "half"]
    assert store.get("video/0001.mp4#frame=3", names=["half"])["half"].dtype == torch.float16
    assert store.meta("video/0001.mp4#frame=3") == {"label": "left", "score": None}
    with safe_open(str(next((tmp_path / "acts" / "shards").glob("*.safetensors"))), "pt") as f:
        assert all(k.isalnum() for k in f.keys())  # user names live in the index, not the file
    with pytest.raises(KeyError, match="missing"):
        store.get("missing")


def test_store_two_views_of_one_storage(tmp_path):
    base = torch.arange(12.0)
    store = ActivationStore(tmp_path)
    store.put("k", {"a": base[:6], "b": base.view(3, 4)})
    _assert_same(store.get("k"), {"a": base[:6], "b": base.view(3, 4)})


def test_store_replace_order_reopen_and_iter(tmp_path):
    root = tmp_path / "acts"
    store = ActivationStore(root)
    keys = ["z", "a", "m/1", "ünï code", ""]
    for i, key in enumerate(keys):
        store.put(key, {"x": torch.full((2,), float(i))}, meta={"i": i})
    store.put("a", {"x": torch.full((3,), 100.0), "y": torch.ones(1)})
    assert len(store) == 5 and "a" in store and "b" not in store
    assert store.keys() == keys  # replacement keeps the key's position
    assert len(list((root / "shards").glob("*.safetensors"))) == 5  # the old shard of "a" is gone

    reopened = ActivationStore(root)
    assert reopened.keys() == keys
    assert torch.equal(reopened.get("a")["x"], torch.full((3,), 100.0))
    assert reopened.meta("a") == {} and reopened.meta("m/1") == {"i": 2}
    seen = [(k, d["x"][0].item()) for k, d in reopened.iter(names=["x"])]
    assert seen == [("z", 0.0), ("a", 100.0), ("m/1", 2.0), ("ünï code", 3.0), ("", 4.0)]
    for extra in ["new1", "new2", "new3"]:  # after reopen, new shards never overwrite old ones
        reopened.put(extra, {"x": torch.full((2,), -1.0)})
    final = ActivationStore(root)
    assert final.keys() == keys + ["new1", "new2", "new3"]
    assert [d["x"][0].item() for _, d in final.iter()] == [0.0, 100.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0]


@pytest.mark.parametrize("content", ['{"a": {"shard": "0.safe', "[1, 2]", '{"a": {"names": []}}'])
def test_store_corrupt_index_names_file(tmp_path, content):
    (tmp_path / "index.json").write_text(content)
    with pytest.raises(ValueError, match="index.json") as info:
        ActivationStore(tmp_path)
    assert str(tmp_path / "index.json") in str(info.value)
    assert "\n" not in str(info.value)


# --- streaming_mean --------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 6),
    rows=st.lists(st.integers(0, 4), min_size=1, max_size=5).filter(lambda r: sum(r) > 0),
    seed=st.integers(0, 2**16),
)
def test_streaming_mean_matches_cat_mean(d, rows, seed):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(n, d, generator=g) * 10 + 3 for n in rows]
    with tempfile.TemporaryDirectory() as root:
        store = ActivationStore(root)
        for i, m in enumerate(mats):
            store.put(f"s{i}", {"h": m, "v": m.sum(0).to(torch.float16)})
        by_rows = streaming_mean(root, "h", over="rows")
        by_key = streaming_mean(store, "v")
    assert by_rows.dtype == torch.float32 and by_rows.shape == (d,)
    torch.testing.assert_close(by_rows, torch.cat(mats).double().mean(0).float())
    want = torch.stack([m.sum(0).to(torch.float16) for m in mats]).double().mean(0).float()
    torch.testing.assert_close(by_key, want)


def test_streaming_mean_errors_name_the_input(tmp_path):
    store = ActivationStore(tmp_path / "s")
    store.put("first", {"h": torch.ones(2, 4)})
    store.put("odd one", {"other": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="'odd one'.*'h'"):
        streaming_mean(store, "h", over="rows")
    store.put("odd one", {"h": torch.ones(3, 5)})
    with pytest.raises(ValueError, match=r"'odd one'.*\(5,\).*'first'.*\(4,\)"):
        streaming_mean(store, "h", over="rows")
    with pytest.raises(ValueError, match="over"):
        streaming_mean(store, "h", over="cols")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        streaming_mean(tmp_path / "empty", "h")
    with pytest.raises(ValueError, match="no samples"):
        streaming_mean(ActivationStore(tmp_path / "never_written"), "h")


def test_streaming_mean_legacy_pt_directory(tmp_path):
    vecs = [torch.randn(8) for _ in range(3)]
    torch.save(vecs[0], tmp_path / "a.pt")
    torch.save({"mean": vecs[1], "extra": torch.zeros(2)}, tmp_path / "b.pt")
    torch.save({"mean": vecs[2]}, tmp_path / "c.pt")
    torch.testing.assert_close(streaming_mean(tmp_path, "mean"), torch.stack(vecs).mean(0))
    torch.save({"other": torch.ones(8)}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="d.pt"):
        streaming_mean(tmp_path, "mean")


def _touch(path):
    Path(path).write_text("code ran")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_legacy_pt_with_pickled_object_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(str(marker))))  # control: an unrestricted load runs the code
    assert marker.exists()
    marker.unlink()

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"mean": _Payload(str(marker))}, legacy / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt.*weights_only"):
        streaming_mean(legacy, "mean")
    assert not marker.exists()


# --- vectors ----------------------------------------------------------------------------------------


def test_save_load_vector_round_trip_with_metadata(tmp_path):
    v = torch.randn(16).to(torch.float16)
    path = save_vector(tmp_path / "mean_vector.safetensors", v, meta={"layer": 3, "model": "tiny"})
    got = load_vector(path)
    assert got.dtype == torch.float16 and torch.equal(got, v)
    assert vector_meta(path) == {"layer": "3", "model": "tiny"}
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["mean_vector"]
    assert torch.equal(load_vector(tmp_path), v)  # a directory means its mean_vector.safetensors
    assert math.isclose(float(load_vector(save_vector(tmp_path, torch.ones(2)))[0]), 1.0)
