"""Recipes with ``--remote`` on a real NDIF stack (started by conftest).

A remote run writes the same result JSON as a local run of the same saved model directory,
except the fields that say where it ran and where it wrote (RUN_FIELDS). A server that dies
mid-run stops the run with one line on stderr and exit status 1; the finished samples stay in
``<output>.jsonl`` and a rerun computes only the rest.
"""

import dataclasses
import json

import pytest

from recipes import (counterfactual_causal_tracing, neo2024_attention_knockout, neo2024_logit_lens,
                     neo2024_object_ablation, video_inference)
from vlminterp import neo2024 as neo
import torch

from vlminterp.store import ActivationStore, ResultLog

pytestmark = pytest.mark.remote
DEAD_HOST = "127.0.0.1:9"  # nothing listens there: connection refused
# Settings that legitimately differ between a local and a remote run of the same data: the
# output path, the local --device, and the --remote / --ndif-host flags themselves.
RUN_FIELDS = ("output", "device", "remote", "ndif_host")
ABLATION = ["--tasks", "vqa,polling", "--sizes", "2,4", "--ig_steps", "4"]
KNOCKOUT = neo.attention_knockout


def _neo_argv(model_dir, out, *extra):
    return ["--model_id", model_dir, "--synthetic", "2", "--keep_all", "--output", str(out),
            *extra]


def _comparable(result: dict) -> dict:
    """The result without RUN_FIELDS (neo2024 recipes: ``settings``; video: ``config``)."""
    part = "settings" if "settings" in result else "config"
    return {**result, part: {k: v for k, v in result[part].items() if k not in RUN_FIELDS}}


def _run_pair(recipe, local_argv, remote_argv, local_out, remote_out):
    recipe.main(local_argv)
    recipe.main(remote_argv)
    return json.loads(local_out.read_text()), json.loads(remote_out.read_text())


@pytest.fixture(scope="module")
def local_knockout(ndif, tmp_path_factory):
    """The uninterrupted local knockout run on tiny-llava's saved dir: its result JSON."""
    _, dirs = ndif
    out = tmp_path_factory.mktemp("local") / "knockout.json"
    neo2024_attention_knockout.main(_neo_argv(dirs["tiny-llava"], out, "--device", "cpu"))
    return json.loads(out.read_text())


def test_knockout_remote_json_equals_local(ndif, local_knockout, tmp_path):
    stack, dirs = ndif
    out = tmp_path / "knockout.json"
    neo2024_attention_knockout.main(_neo_argv(dirs["tiny-llava"], out, "--remote",
                                              "--ndif-host", stack.host))
    remote = json.loads(out.read_text())
    assert remote["settings"]["remote"] is True and remote["settings"]["ndif_host"] == stack.host
    assert "ndif_api_key" not in remote["settings"]  # a secret is never written
    assert remote["records"] and not remote["errors"]
    assert _comparable(remote) == _comparable(local_knockout)


def test_object_ablation_remote_json_equals_local(ndif, tmp_path):
    """Covers the dataset mean (a trace stopped early) and integrated gradients (autograd
    inside the remote trace)."""
    stack, dirs = ndif
    local_out, remote_out = tmp_path / "local.json", tmp_path / "remote.json"
    local, remote = _run_pair(
        neo2024_object_ablation,
        _neo_argv(dirs["tiny-llava"], local_out, "--device", "cpu", *ABLATION),
        _neo_argv(dirs["tiny-llava"], remote_out, "--remote", "--ndif-host", stack.host, *ABLATION),
        local_out, remote_out)
    assert any(r["condition"] == "ig_obj" for r in remote["records"])
    assert _comparable(remote) == _comparable(local)


def test_video_inference_remote_json_equals_local(ndif, tmp_path):
    """One clip per trace fits ndif 0.1.2's request limit on tiny-qwen2-vl."""
    stack, dirs = ndif
    argv = ["--model_id", dirs["tiny-qwen2-vl"], "--synthetic", "2"]
    local_out, remote_out = tmp_path / "local.json", tmp_path / "remote.json"
    local, remote = _run_pair(
        video_inference, [*argv, "--device", "cpu", "--output", str(local_out)],
        [*argv, "--remote", "--ndif-host", stack.host, "--output", str(remote_out)],
        local_out, remote_out)
    assert remote["config"]["remote"] is True and remote["records"] and not remote["errors"]
    assert _comparable(remote) == _comparable(local)


def test_logit_lens_remote_json_equals_local(ndif, tmp_path):
    """Per-layer top-k lists are gathered in containers saved inside the trace."""
    stack, dirs = ndif
    local_out, remote_out = tmp_path / "local.json", tmp_path / "remote.json"
    local, remote = _run_pair(
        neo2024_logit_lens, _neo_argv(dirs["tiny-llava"], local_out, "--device", "cpu"),
        _neo_argv(dirs["tiny-llava"], remote_out, "--remote", "--ndif-host", stack.host),
        local_out, remote_out)
    assert remote["records"] and _comparable(remote) == _comparable(local)


def test_tracing_with_representations_remote_equals_local(ndif, tmp_path):
    """Scores, effects and every dumped representation tensor match a local run — to float
    rounding: a Ray actor computes with one thread (OMP_NUM_THREADS=1), the local run with
    torch's default, so reductions in these 8-row batches sum in a different order."""
    stack, dirs = ndif
    argv = ["--model_id", dirs["tiny-qwen2-vl"], "--synthetic", "1", "--layers", "embed,0,3",
            "--dump_representations"]
    local_out, remote_out = tmp_path / "local" / "t.json", tmp_path / "remote" / "t.json"
    local, remote = _run_pair(
        counterfactual_causal_tracing, [*argv, "--device", "cpu", "--output", str(local_out)],
        [*argv, "--remote", "--ndif-host", stack.host, "--output", str(remote_out)],
        local_out, remote_out)
    assert remote["records"] and not remote["errors"]
    for r, l in zip(remote["records"], local["records"], strict=True):
        assert (r["question_id"], r["layer"], r["token_slice"]) == (
            l["question_id"], l["layer"], l["token_slice"])
        assert r["patched_score"] == pytest.approx(l["patched_score"], rel=1e-4, abs=1e-5)
        assert (r["effect"] is None) == (l["effect"] is None)
        if r["effect"] is not None:
            assert r["effect"] == pytest.approx(l["effect"], rel=1e-3, abs=1e-4)
    stores = [ActivationStore(p.parent / "t_representations") for p in (local_out, remote_out)]
    assert stores[0].keys() == stores[1].keys() and len(stores[0]) > 0
    for key in stores[0].keys():
        a, b = stores[0].get(key), stores[1].get(key)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def _counting(monkeypatch, dies_after: int | None = None) -> list[str]:
    """Record the key of every sample the knockout recipe computes; after ``dies_after``
    samples, send the remote model's traces to DEAD_HOST (the server died)."""
    computed = []

    def knockout(vlm, image, sample, **kwargs):
        if dies_after is not None and len(computed) >= dies_after:
            vlm.settings = dataclasses.replace(vlm.settings, host=DEAD_HOST)
        computed.append(sample.key)
        return KNOCKOUT(vlm, image, sample, **kwargs)

    monkeypatch.setattr(neo, "attention_knockout", knockout)
    return computed


def test_dying_server_stops_run_and_rerun_resumes(ndif, local_knockout, tmp_path, monkeypatch,
                                                  capsys):
    stack, dirs = ndif
    out = tmp_path / "knockout.json"
    argv = _neo_argv(dirs["tiny-llava"], out, "--remote", "--ndif-host", stack.host)
    computed = _counting(monkeypatch, dies_after=1)
    with pytest.raises(SystemExit) as stopped:
        neo2024_attention_knockout.main(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"error: NDIF http://{DEAD_HOST} is unreachable")
    assert dirs["tiny-llava"] in message and "Traceback" not in err
    log = ResultLog(out.with_suffix(".jsonl"))
    assert log.done == {computed[0]} and not log.errors  # the server's fault, not the sample's
    assert not out.exists()

    finished, computed = computed[0], _counting(monkeypatch)
    neo2024_attention_knockout.main(argv)
    all_keys = {r["key"] for r in local_knockout["records"]}
    assert finished in all_keys and set(computed) == all_keys - {finished}  # not recomputed
    assert len(computed) == len(all_keys) - 1
    remote = json.loads(out.read_text())
    assert _comparable(remote) == _comparable(local_knockout)


@pytest.mark.parametrize("recipe, argv, flag", [
    (neo2024_object_ablation, ["--remote"], "--tasks generative"),
    (neo2024_attention_knockout, ["--remote", "--device", "cpu"], "--device"),
    (neo2024_attention_knockout, ["--remote", "--dtype", "float16"], "--dtype"),
    (video_inference, ["--remote", "--scoring", "logprob"], "--scoring logprob"),
], ids=["generative", "device", "dtype", "logprob"])
def test_what_cannot_run_remotely_fails_up_front(recipe, argv, flag, tmp_path, capsys):
    """No stack needed: refused while parsing, before any model or data is touched."""
    with pytest.raises(SystemExit) as refused:
        recipe.main(["--synthetic", "1", "--output", str(tmp_path / "r.json"), *argv])
    assert refused.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " + flag in message and "--remote" in message
    assert not list(tmp_path.iterdir())


def test_tiny_id_with_remote_fails_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        neo2024_attention_knockout.main(["--model_id", "tiny-llava", "--remote", "--synthetic",
                                         "1", "--output", str(tmp_path / "k.json")])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--remote: model_id 'tiny-llava' is built in-process" in err
