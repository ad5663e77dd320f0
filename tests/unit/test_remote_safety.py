"""Safe remote results (issue 11): vlminterp's NDIF backend never unpickles a server response
with nnsight's ``torch.load(weights_only=False)``, and refuses plain http to other hosts."""

import argparse
import io
import os
import pickle

import numpy as np
import pytest
import torch
import zstandard
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlminterp import remote
from vlminterp.remote import RemoteError, Settings, UnsafeResultError, load_result

KEY = 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "/m", "revision": null}'


class _WritesAFile:
    """A crafted response: unpickling it calls Path.write_text (any callable would do)."""

    target = None

    def __reduce__(self):
        from pathlib import Path

        return (Path.write_text, (Path(self.target), "code ran on the client"))


def _saved(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _backend(compress=True):
    backend = remote._backend_class()(KEY, host="http://127.0.0.1:1")
    backend.compress = compress
    return backend


def _compressed(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("form", ["zip", "legacy", "raw pickle"])
def test_crafted_result_is_refused_and_runs_nothing(tmp_path, form):
    _WritesAFile.target = str(tmp_path / "pwned")
    payload = {"logits": torch.ones(2), "x": _WritesAFile()}
    data = {"zip": lambda: _saved(payload),
            "legacy": lambda: _saved(payload, _use_new_zipfile_serialization=False),
            "raw pickle": lambda: pickle.dumps({"x": _WritesAFile()})}[form]()
    with pytest.raises(UnsafeResultError, match=r"refused to load (builtins.getattr|pathlib.Path.write_text)"):
        _backend().finalize(_compressed(data))
    with pytest.raises(UnsafeResultError):
        _backend().parse(data)  # a binary websocket frame
    assert not (tmp_path / "pwned").exists()


def test_the_crafted_response_does_run_code_through_nnsights_own_loader(tmp_path):
    """What the backend protects from: nnsight 0.8.1's RemoteBackend.finalize runs it."""
    from nnsight.intervention.backends.remote import RemoteBackend

    _WritesAFile.target = str(tmp_path / "pwned")
    plain = RemoteBackend(KEY, host="http://127.0.0.1:1")
    plain.compress = True
    plain.finalize(_compressed(_saved({"x": _WritesAFile()})))
    assert (tmp_path / "pwned").read_text() == "code ran on the client"


def test_refusal_surfaces_as_one_line_remote_error(tmp_path, monkeypatch):
    _WritesAFile.target = str(tmp_path / "pwned")
    backend = _backend()
    monkeypatch.setattr(type(backend).__mro__[1], "__call__",
                        lambda self, tracer=None: self.finalize(_compressed(_saved(_WritesAFile()))))
    with pytest.raises(RemoteError) as info:
        backend()
    assert "refused the result" in str(info.value) and "/m" in str(info.value)
    assert len(str(info.value).splitlines()) == 1 and not (tmp_path / "pwned").exists()


def test_legitimate_results_still_load():
    cache = DynamicCache()
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 0)
    result = {
        "logits": torch.randn(2, 5), "half": torch.ones(3, dtype=torch.bfloat16),
        "view": torch.arange(10)[2:7], "reps": {"embed": torch.ones(2, 4), 0: torch.zeros(2, 4)},
        "attn": (torch.ones(1, 2), [torch.zeros(1), None, 3, 2.5, "text", True]),
        "shape": torch.Size([2, 3]), "dtype": torch.float16, "device": torch.device("cpu"),
        "slice": slice(1, 4), "set": {1, 2}, "bytes": b"\x00\x01",
        "np": np.arange(4, dtype=np.float32), "np_scalar": np.float64(0.5),
        "output": CausalLMOutputWithPast(logits=torch.ones(1, 2)), "cache": cache,
    }
    loaded = _backend().finalize(_compressed(_saved(result)))
    assert loaded.keys() == result.keys()
    for key in ("logits", "half", "view"):
        assert torch.equal(loaded[key], result[key]) and loaded[key].dtype == result[key].dtype
    assert torch.equal(loaded["reps"][0], torch.zeros(2, 4)) and loaded["attn"][1][1:] == [None, 3, 2.5, "text", True]
    assert loaded["shape"] == torch.Size([2, 3]) and loaded["dtype"] is torch.float16
    assert loaded["slice"] == slice(1, 4) and loaded["set"] == {1, 2} and loaded["bytes"] == b"\x00\x01"
    np.testing.assert_array_equal(loaded["np"], result["np"])
    assert isinstance(loaded["output"], CausalLMOutputWithPast) and torch.equal(loaded["output"].logits, torch.ones(1, 2))
    torch.testing.assert_close(loaded["cache"].layers[0].keys, cache.layers[0].keys)
    assert load_result(_saved(result, _use_new_zipfile_serialization=False))["set"] == {1, 2}


def test_nnsight_activation_cache_and_status_frames_load():
    from nnsight.intervention.cache import Cache, Entry
    from nnsight.schema.response import ResponseModel, Status

    cache = Cache.__new__(Cache)
    cache.__dict__.update(model=None, device=None, dtype=None, detach=True, non_blocking=False,
                          include_output=True, include_inputs=False, targets=None, _open={},
                          entries={"model.layers.0": [Entry(output=torch.ones(2))]})
    frame = ResponseModel(id="job", status=Status.COMPLETED, data=_saved({"c": cache})).pickle()
    response = _backend().parse(frame)
    assert response.status is Status.COMPLETED
    loaded = _backend(compress=False).finalize(response.data)["c"]
    assert torch.equal(loaded.entries["model.layers.0"][0].output, torch.ones(2))


def test_allow_result_type_trusts_a_user_class(tmp_path):
    data = _saved({"p": _Point(1, 2)})
    with pytest.raises(UnsafeResultError, match="_Point"):
        load_result(data)
    remote.allow_result_type(_Point)
    assert load_result(data)["p"] == _Point(1, 2)


class _Point(tuple):
    def __new__(cls, x, y):
        return super().__new__(cls, (x, y))

    def __getnewargs__(self):
        return tuple(self)


# --- plain http -------------------------------------------------------------------------------

@pytest.mark.parametrize("host,ok", [
    ("http://127.0.0.1:8001", True), ("http://localhost:8001", True), ("http://[::1]:8001", True),
    ("127.0.0.1:8001", True), ("https://ndif.example.org", True), ("ndif.example.org:8001", True),
    ("http://10.0.0.5:8001", False), ("http://ndif.example.org", False),
])
def test_plain_http_only_to_this_machine(host, ok):
    if ok:
        assert Settings(host=host).check().startswith(("http://", "https://"))
    else:
        with pytest.raises(ValueError, match="--ndif-insecure") as info:
            Settings(host=host).check()
        assert len(str(info.value).splitlines()) == 1
        assert Settings(host=host, insecure=True).check() == host


def test_load_remote_refuses_insecure_host_before_any_work(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError, match="not this machine"):
        remote.load_remote("llava-hf/llava-1.5-7b-hf", host="http://203.0.113.7:8001")
    parser = argparse.ArgumentParser()
    remote.add_arguments(parser)
    args = parser.parse_args(["--remote", "--ndif-host", "http://203.0.113.7:8001", "--ndif-insecure"])
    assert args.ndif_insecure is True


def test_a_server_traceback_reports_its_exception_line():
    from vlminterp.remote import _job_failed

    tb = ("Traceback (most recent call last):\n  File \"/srv/a.py\", line 3, in f\n    g()\n"
          "  File \"/srv/b.py\", line 9, in g\n    raise KeyError('pixel_values_videos')\n"
          "KeyError: 'pixel_values_videos'\n")
    line = _job_failed("http://127.0.0.1:1", "model:{\"repo_id\": \"m\"}", tb)
    assert line == "NDIF http://127.0.0.1:1: job for m failed: KeyError: 'pixel_values_videos'"
