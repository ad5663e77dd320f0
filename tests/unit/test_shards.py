"""Issue 14: --shard parsing and the split by sample id, the loading flags' checks, the merge's
refusals (missing, incomplete, overlapping shards, other settings), merging activation stores,
and the one-line errors `vlminterp.load` raises itself."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import vlminterp
from vlminterp import load_flags
from vlminterp.checks import RecipeError
from vlminterp.merge import check_shards, find_manifests, merge_stores, write_merged_log
from vlminterp.runs import open_log
from vlminterp.shards import Shard, parse_shard, shard_index
from vlminterp.store import ActivationStore, ResultLog

KEYS = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60, unique=True)


# --- --shard -----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(2, 40))
def test_shard_spec_round_trips_or_is_refused(i, n):
    if i < n:
        assert parse_shard(f"{i}/{n}") == Shard(i, n)
    else:
        with pytest.raises(RecipeError, match=rf"shard {i} of {n} is not one of 0..{n - 1}"):
            parse_shard(f"{i}/{n}")


@pytest.mark.parametrize("spec", ["1", "a/b", "1/2/3", "-1/2", "", "1 of 2"])
def test_malformed_shard_spec_is_one_line(spec):
    with pytest.raises(RecipeError, match=r"expected I/N with 0 <= I < N") as info:
        parse_shard(spec)
    assert len(str(info.value).splitlines()) == 1


def test_one_shard_is_a_plain_run():
    assert parse_shard("0/1") is None and parse_shard(None) is None


@pytest.mark.parametrize("env,want", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, Shard(3, 8)),  # torchrun / accelerate
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, Shard(2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"},
     Shard(2, 4)),  # --array=3-6
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "2"}, Shard(2, 3)),  # --array=0-4:2
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, Shard(1, 2)),  # srun -n 2
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "1",  # the launcher wins
      "SLURM_ARRAY_TASK_COUNT": "2"}, Shard(0, 2)),
])
def test_shard_auto_reads_the_launchers_environment(env, want):
    assert parse_shard("auto", env) == want


@pytest.mark.parametrize("env,message", [
    ({}, "none of RANK/WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "$RANK is 'x', not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"},
     "shard 6 of 3 is not one of 0..2"),  # an uneven --array list
])
def test_shard_auto_errors(env, message):
    with pytest.raises(RecipeError, match=message.replace("$", r"\$").replace(".", r"\.")):
        parse_shard("auto", env)


@settings(max_examples=40, deadline=None)
@given(KEYS, KEYS, st.integers(2, 7))
def test_every_sample_in_exactly_one_shard_and_new_samples_move_none(keys, more, n):
    shards = [Shard(i, n) for i in range(n)]
    for k in keys:
        assert sum(s.owns(k) for s in shards) == 1
    before = {k: shard_index(k, n) for k in keys}
    assert {k: shard_index(k, n) for k in keys + more} | before == {
        k: shard_index(k, n) for k in keys + more}  # adding samples reassigns none


def test_split_is_pinned_and_balanced():
    # pinned: a change of the hash would move every user's finished samples to other shards
    assert [shard_index(f"{i:04d}-direction", 3) for i in range(8)] == [1, 1, 0, 2, 0, 2, 1, 1]
    assert [shard_index(f"{i}:{i + 1}", 4) for i in range(8)] == [1, 3, 3, 0, 1, 2, 0, 1]
    counts = [0] * 4
    for i in range(4000):
        counts[shard_index(f"{i}:{i + 1}", 4)] += 1
    assert all(900 < c < 1100 for c in counts), counts


def test_shard_paths():
    s = Shard(1, 3)
    assert str(s.path("runs/t.json")) == "runs/t.shard-1-of-3.json"
    assert str(s.path("runs/reps")) == "runs/reps.shard-1-of-3"


# --- loading flags -----------------------------------------------------------------------------

def _load_args(**kw):
    base = dict(model_id="org/model", device=None, dtype=None, device_map=None,
                offload_folder=None, quantization=None, remote=False)
    return SimpleNamespace(**{**base, **kw})


def test_device_map_forms(tmp_path):
    assert load_flags.parse_device_map("auto") == "auto"
    assert load_flags.parse_device_map('{"model.visual": 0, "lm_head": "cpu"}') == \
        {"model.visual": 0, "lm_head": "cpu"}
    f = tmp_path / "map.json"
    f.write_text('{"": "disk"}')
    assert load_flags.parse_device_map(str(f)) == {"": "disk"}


@pytest.mark.parametrize("spec,message", [
    ("gpus", "expected auto, balanced, balanced_low_0, sequential, a JSON object or a JSON file"),
    ("{bad json", "not valid JSON"),
    ("[0, 1]", "expected a JSON object mapping module names to devices"),
    ('{"lm_head": "gpu7"}', "module 'lm_head': 'gpu7' is not a GPU index"),
    ('{"lm_head": -1}', "module 'lm_head': -1 is not a GPU index"),
])
def test_bad_device_map_is_one_line(spec, message):
    with pytest.raises(RecipeError, match=message) as info:
        load_flags.parse_device_map(spec)
    assert str(info.value).startswith(f"--device_map {spec!r}") and "\n" not in str(info.value)


@pytest.mark.parametrize("kw,message", [
    (dict(model_id="tiny-qwen2-vl", device_map="auto"), "--device_map: 'tiny-qwen2-vl' is built in memory"),
    (dict(model_id="tiny-llava", quantization="4bit"), "--quantization: 'tiny-llava' is built in memory"),
    (dict(device="cpu", device_map="auto"), "--device and --device_map: give one"),
    (dict(device_map='{"": "disk"}'), "give --offload_folder DIR"),
    (dict(remote=True, dtype="bfloat16"), "--dtype: the NDIF server places the model"),
    (dict(device_map='{"": 5}'), "--device_map 'cuda:5'"),
])
def test_loading_flags_that_cannot_work_are_one_line(kw, message):
    with pytest.raises(RecipeError, match=message):
        load_flags.load_kwargs(_load_args(**kw))


def test_quantization_needs_bitsandbytes_and_cuda(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(RecipeError, match=r"--quantization 4bit: bitsandbytes is not installed "
                                          r"\(pip install 'vlminterp\[quant\]'\)"):
        load_flags.load_kwargs(_load_args(quantization="4bit"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="--quantization 8bit: bitsandbytes quantization needs "
                                          "a CUDA GPU; this machine has none"):
        load_flags.load_kwargs(_load_args(quantization="8bit"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    kwargs = load_flags.load_kwargs(_load_args(quantization="8bit", device="cuda:1"))
    assert kwargs == {"dtype": None, "quantization": "8bit", "device_map": {"": "cuda:1"}}


def test_dtype_auto_is_the_default_and_dtypes_reach_load(tmp_path):
    args = _load_args(model_id="tiny-qwen2-vl", dtype="auto", device="cpu")
    assert load_flags.load_kwargs(args) == {"dtype": None, "device": "cpu"}
    assert args.dtype is None  # one resume key for --dtype auto and no --dtype
    kwargs = load_flags.load_kwargs(_load_args(device_map="auto", dtype="bfloat16",
                                               offload_folder=tmp_path))
    assert kwargs == {"dtype": torch.bfloat16, "device_map": "auto", "offload_folder": str(tmp_path)}


# --- results logs: flags recorded since a log was written ------------------------------------

def test_log_resumes_when_only_new_flags_at_their_default_differ(tmp_path):
    path = tmp_path / "r.jsonl"
    ResultLog(path, config={"layers": "all"}).append("a", [{"v": 1}])
    log = open_log(path, {"layers": "all", "quantization": None})  # recorded since
    assert log.done == {"a"}
    with pytest.raises(RecipeError, match='--quantization null -> "4bit"'):
        open_log(path, {"layers": "all", "quantization": "4bit"})
    with pytest.raises(RecipeError, match='--layers "all" -> "embed"'):
        open_log(path, {"layers": "embed", "quantization": None})


# --- merge: refusals --------------------------------------------------------------------------

def _shards(tmp_path, keys, n=3, config=None, done=None, name="t"):
    """Fake finished shards of a run over ``keys``: manifests and logs, no model."""
    paths = []
    for i in range(n):
        out = tmp_path / f"{name}.shard-{i}-of-{n}.json"
        manifest = {"recipe": "recipes.video_inference", "shard": [i, n], "argv": ["--output",
                    str(tmp_path / f"{name}.json")], "cwd": os.getcwd(), "output": str(out),
                    "log": str(out.with_suffix(".jsonl")), "stores": [], "samples": keys}
        path = tmp_path / f"{name}.shard-{i}-of-{n}.manifest.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest))
        out.write_text("{}")  # the shard's own results
        log = ResultLog(out.with_suffix(".jsonl"), config=(config or {}).get(i, {"layers": "all"}))
        for k in keys:
            if shard_index(k, n) == i and (done is None or k in done):
                log.append(k, [{"key": k, "v": len(k)}])
        paths.append(path)
    return paths


KEYS9 = [f"q{i}" for i in range(9)]


def test_merge_finds_every_shard_from_a_glob_or_the_plain_output(tmp_path):
    paths = _shards(tmp_path, KEYS9)
    assert find_manifests([str(tmp_path / "t.shard-*-of-3.json")]) == paths
    assert find_manifests([str(tmp_path / "t.json")]) == paths
    docs, header, entries = check_shards(paths)
    assert header["config"] == {"layers": "all"} and set(entries) == set(KEYS9)
    write_merged_log(tmp_path / "t.jsonl", header, entries, KEYS9)
    merged = ResultLog(tmp_path / "t.jsonl", config={"layers": "all"})
    assert list(merged.latest()) == KEYS9  # sample order
    write_merged_log(tmp_path / "t.jsonl", header, entries, KEYS9)  # merging again is fine
    assert merged.records() == [{"key": k, "v": len(k)} for k in KEYS9]


def test_merge_refuses_missing_and_overlapping_shards(tmp_path):
    paths = _shards(tmp_path, KEYS9)
    with pytest.raises(RecipeError, match="shard 2/3 of t is missing: not among the files given"):
        find_manifests([str(p) for p in paths[:2]])
    paths[1].unlink()
    with pytest.raises(RecipeError, match=r"shard 1/3 of t is missing: no .*t.shard-1-of-3"):
        find_manifests([str(tmp_path / "t.json")])
    _shards(tmp_path, KEYS9, n=2)
    with pytest.raises(RecipeError, match="overlapping shards of t: split into 2 and 3 parts"):
        find_manifests([str(tmp_path / "t.shard-*")])
    with pytest.raises(RecipeError, match="matches no file"):
        find_manifests([str(tmp_path / "u.shard-*")])
    _shards(tmp_path, KEYS9, n=2, name="u")
    with pytest.raises(RecipeError, match=r"several runs \(t, u\)"):
        find_manifests([str(tmp_path / "*.shard-0-of-2.json")])


def test_merge_refuses_incomplete_shards_and_other_settings(tmp_path):
    paths = _shards(tmp_path / "a", KEYS9, done=KEYS9[:7])
    missing = [k for k in KEYS9[7:]]
    i = shard_index(missing[0], 3)
    with pytest.raises(RecipeError, match=rf"shard {i}/3 is incomplete: .* have no result .* "
                                          rf"\(the first: {missing[0]}\); rerun it"):
        check_shards(paths)
    paths = _shards(tmp_path / "b", KEYS9, config={2: {"layers": "embed"}})
    with pytest.raises(RecipeError, match='shard 2/3 ran with other settings .*--layers "all" '
                                          'vs "embed"'):
        check_shards(paths)


def test_merge_refuses_other_samples_another_folder_and_foreign_results(tmp_path, monkeypatch):
    paths = _shards(tmp_path, KEYS9)
    doc = json.loads(paths[1].read_text())
    paths[1].write_text(json.dumps({**doc, "samples": KEYS9[:-1]}))
    with pytest.raises(RecipeError, match="shard 1/3 ran another samples"):
        check_shards(paths)
    paths[1].write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match="shard 0/3 ran in .*: run the merge from there"):
        check_shards(paths)
    monkeypatch.undo()
    docs, header, entries = check_shards(paths)
    out = tmp_path / "t.jsonl"
    ResultLog(out, config={"layers": "all"}).append("q99", [{"v": 0}])  # a real run's log
    with pytest.raises(RecipeError, match="holds results that are not in these shards"):
        write_merged_log(out, header, entries, KEYS9)


def test_merge_stores_copies_every_entry_in_sample_order(tmp_path):
    a, b = ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b")
    b.put("q2/reverse", {"x": torch.full((2,), 2.0)}, meta={"q": "q2"})
    a.put("q1/reverse", {"x": torch.ones(3)}, meta={"q": "q1"})
    a.put("q1/clean", {"x": torch.zeros(1), "y": torch.eye(2)})
    b.put("q0", {"x": torch.arange(4.0)})
    for s in (a, b):  # an entry every shard holds (a dataset mean's per-image parts)
        s.put("image:7", {"mean": torch.ones(2)})
    merge_stores([tmp_path / "a", tmp_path / "b", tmp_path / "none"], tmp_path / "m",
                 ["q0", "q1", "q2"])
    m = ActivationStore(tmp_path / "m")
    assert m.keys() == ["image:7", "q0", "q1/reverse", "q1/clean", "q2/reverse"]
    for store in (a, b):
        for key in store.keys():
            got, want = m.get(key), store.get(key)
            assert got.keys() == want.keys() and m.meta(key) == store.meta(key)
            for name in want:
                torch.testing.assert_close(got[name], want[name], atol=0, rtol=0)


# --- load() names what is wrong, itself ---------------------------------------------------------

def test_load_itself_names_a_missing_dir_a_corrupt_shard_and_an_unreachable_hub(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^model_id '.*gone': no such directory$"):
        vlminterp.load(str(tmp_path / "gone"))
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llava"}))
    save_file({"w": torch.randn(8, 8)}, str(d / "model.safetensors"))
    os.truncate(d / "model.safetensors", 60)
    with pytest.raises(ValueError) as info:
        vlminterp.load(str(d))
    assert f"corrupt or truncated checkpoint file {d / 'model.safetensors'}" in str(info.value)
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and the hub cannot "
                                         "be reached") as info:
        vlminterp.load("llava-hf/llava-nonexistent-7b-hf")
    assert "\n" not in str(info.value)
