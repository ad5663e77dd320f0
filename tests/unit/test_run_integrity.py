"""Run integrity (issue 11): results logs keyed by settings, --restart, data vs configuration
errors in the per-sample loop, stale temp files, up-front checks of --output / --device / model."""

import importlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from vlminterp.checks import (RecipeError, SampleError, bad_checkpoint_file, check_device,
                              check_output, describe_load_error, load_checked)
from vlminterp.runs import (NOT_RESULT_FLAGS, discard, logged_results, open_log, recipe_main,
                            run_logged, unclassified_flags)
from vlminterp.store import (ActivationStore, ConfigMismatch, ResultLog, atomic_write,
                             clean_stale_temps, config_hash, streaming_mean)

RECIPES = ["counterfactual_causal_tracing", "video_inference", "neo2024_object_ablation",
           "neo2024_logit_lens", "neo2024_attention_knockout"]


# --- ResultLog keyed by settings -------------------------------------------------------------

def test_log_refuses_other_settings_and_names_each_difference(tmp_path):
    path = tmp_path / "r.jsonl"
    log = ResultLog(path, config={"layers": "all", "direction": "denoise", "seed": 0})
    assert not path.exists()  # settings are recorded with the first entry, not before
    log.append("a", [{"v": 1}])
    assert ResultLog(path, config={"layers": "all", "direction": "denoise", "seed": 0}).done == {"a"}
    with pytest.raises(ConfigMismatch) as info:
        ResultLog(path, config={"layers": "embed,1", "direction": "noise", "seed": 0})
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "--restart" in message
    assert '--direction "denoise" -> "noise"' in message and '--layers "all" -> "embed,1"' in message
    assert "seed" not in message
    assert info.value.differences == {"direction": ("denoise", "noise"), "layers": ("all", "embed,1")}
    with pytest.raises(ConfigMismatch, match="--new_flag null -> 3"):  # a flag added later
        ResultLog(path, config={"layers": "all", "direction": "denoise", "seed": 0, "new_flag": 3})
    assert ResultLog(path).records() == [{"v": 1}]  # config=None: no check (library use)


def test_log_without_recorded_settings_is_refused(tmp_path):
    path = tmp_path / "old.jsonl"
    ResultLog(path).append("a", [{"v": 1}])  # an older vlminterp wrote no settings line
    with pytest.raises(ConfigMismatch, match="not recorded"):
        ResultLog(path, config={"layers": "all"})


def test_killed_while_writing_the_settings_line_starts_clean(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"config": {"layers": "al')  # the first write was cut
    with pytest.warns(UserWarning, match="truncated"):
        log = ResultLog(path, config={"layers": "all"})
    log.append("a", [{"v": 1}])
    assert json.loads(path.read_text().splitlines()[0])["config"] == {"layers": "all"}
    assert ResultLog(path, config={"layers": "all"}).done == {"a"}


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
                       max_size=6))
def test_config_hash_ignores_key_order_and_sees_every_value(config):
    reordered = dict(reversed(list(config.items())))
    assert config_hash(reordered) == config_hash(config)
    for key in config:
        changed = {**config, key: ["changed", config[key]]}
        assert config_hash(changed) != config_hash(config)


# --- the per-sample loop ---------------------------------------------------------------------

def _samples(n):
    return [SimpleNamespace(question_id=f"q{i}") for i in range(n)]


def test_data_errors_are_logged_and_configuration_errors_stop_the_run(tmp_path, capsys):
    log = ResultLog(tmp_path / "r.jsonl", config={"k": 1})

    def work(s):
        if s.question_id == "q1":
            raise SampleError("no candidates")
        if s.question_id == "q2":
            raise FileNotFoundError("video file not found: x.mp4")
        return [{"question_id": s.question_id}]

    run_logged(_samples(4), log, work, "t")
    assert log.done == {"q0", "q1", "q2", "q3"}
    assert log.errors == {"q1": "SampleError: no candidates",
                          "q2": "FileNotFoundError: video file not found: x.mp4"}

    calls = []

    def positions_beyond(s):  # what TokenLayout raises for positions:999999
        calls.append(s.question_id)
        raise ValueError("token slice 'positions:999999': positions [999999] are outside the sequence")

    fresh = ResultLog(tmp_path / "s.jsonl", config={"k": 1})
    with pytest.raises(RecipeError) as info:
        run_logged(_samples(5), fresh, positions_beyond, "t")
    assert calls == ["q0"] and fresh.done == set() and not (tmp_path / "s.jsonl").exists()
    assert "sample q0" in str(info.value) and "999999" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_resume_says_how_many_it_skips_and_results_follow_this_run(tmp_path, capsys):
    log = ResultLog(tmp_path / "r.jsonl", config={"k": 1})
    run_logged(_samples(4), log, lambda s: [{"question_id": s.question_id}], "t")
    capsys.readouterr()
    log.append_error("q9", "SampleError: x")  # from an earlier run with more samples
    seen = []
    run_logged(_samples(6), log, lambda s: seen.append(s.question_id) or [{"question_id": s.question_id}], "t")
    assert seen == ["q4", "q5"]
    assert "skipping 4 of 6 samples already done" in capsys.readouterr().err
    records, errors = logged_results(_samples(2), log)
    assert [r["question_id"] for r in records] == ["q0", "q1"] and errors == {}  # --limit 2 rerun


def test_discard_removes_our_outputs_and_refuses_a_foreign_folder(tmp_path):
    store = ActivationStore(tmp_path / "reps")
    store.put("a", {"x": torch.ones(2)})
    (tmp_path / "out.json").write_text("{}")
    discard([tmp_path / "out.json", tmp_path / "reps", tmp_path / "missing.png"])
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "reps").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(RecipeError, match="not an activation store"):
        discard([tmp_path / "mine"])
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_open_log_restart_and_mismatch(tmp_path):
    path, out = tmp_path / "r.jsonl", tmp_path / "r.json"
    open_log(path, {"layers": "all"}).append("a", [{"v": 1}])
    out.write_text("{}")
    with pytest.raises(RecipeError, match="--layers"):
        open_log(path, {"layers": "0"}, outputs=[out])
    assert out.exists()
    log = open_log(path, {"layers": "0"}, restart=True, outputs=[out])
    assert log.done == set() and not out.exists() and not path.exists()


def test_recipe_main_exits_with_one_line(capsys):
    @recipe_main
    def main():
        raise RecipeError("--output 'x' is a directory")

    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.endswith("error: --output 'x' is a directory\n")


@pytest.mark.parametrize("name", RECIPES)
def test_every_flag_is_classified_as_changing_results_or_not(name):
    """A new flag must be added to RESULT_FLAGS (it keys the resume log) or to
    NOT_RESULT_FLAGS / SELECTION_FLAGS, or results of two settings could mix."""
    recipe = importlib.import_module(f"recipes.{name}")
    selection = getattr(recipe, "SELECTION_FLAGS", ())
    assert unclassified_flags(recipe.build_parser(), set(recipe.RESULT_FLAGS) | set(selection)) == []
    assert not set(recipe.RESULT_FLAGS) & (NOT_RESULT_FLAGS - {"limit"})


# --- temp files of killed atomic writes ---------------------------------------------------------

def test_stale_temps_are_cleaned_and_other_files_kept(tmp_path):
    out = tmp_path / "r.json"

    def killed(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, killed)  # a clean kill removes its temp...
    stale = tmp_path / ".r.json.0123456789ab.tmp"
    stale.write_text("half")  # ...a SIGKILL does not
    other = tmp_path / ".other.json.0123456789ab.tmp"  # another run's output
    other.write_text("in progress")
    assert clean_stale_temps([out]) == 1
    assert not stale.exists() and other.exists()


def test_activation_store_cleans_a_killed_put(tmp_path):
    store = ActivationStore(tmp_path)
    store.put("a", {"x": torch.ones(2)})
    (tmp_path / "shards" / ".1.safetensors.0123456789ab.tmp").write_bytes(b"half")
    save_file({"t0": torch.zeros(1)}, str(tmp_path / "shards" / "1.safetensors"))  # no index entry
    (tmp_path / ".index.json.0123456789ab.tmp").write_text("{")
    again = ActivationStore(tmp_path)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["0.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "shards"]
    torch.testing.assert_close(again.get("a")["x"], torch.ones(2))


# --- ragged legacy caches ------------------------------------------------------------------------

def test_streaming_mean_over_ragged_token_caches(tmp_path):
    parts = [torch.randn(1, n, 8) for n in (3, 7, 1)]  # the original's [1, N, d] files
    for i, t in enumerate(parts):
        torch.save(t, tmp_path / f"{i}.pt")
    mean = streaming_mean(tmp_path, "visual_mean", over="rows")
    torch.testing.assert_close(mean, torch.cat([p[0] for p in parts]).mean(0), atol=1e-6, rtol=0)


# --- up-front checks --------------------------------------------------------------------------

def test_check_output(tmp_path):
    with pytest.raises(RecipeError, match="is a directory"):
        check_output(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecipeError, match="cannot create its folder"):
        check_output(tmp_path / "file" / "r.json")
    assert check_output(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    assert list((tmp_path / "new").iterdir()) == []  # the write probe is gone


@pytest.mark.parametrize("spec,message", [
    ("gpu", "not a torch device"), ("cuda:x", "not a torch device"), ("meta", "unsupported"),
])
def test_check_device_rejects_bad_devices(spec, message):
    with pytest.raises(RecipeError, match=message):
        check_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_check_device_without_cuda():
    with pytest.raises(RecipeError, match="no CUDA device"):
        check_device("cuda:0")
    assert check_device(None) == "cpu" and check_device("cpu") == "cpu"


def _checkpoint(tmp_path, name="llava-ckpt"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llava"}))
    for i in range(2):
        save_file({"w": torch.randn(64, 64)}, str(d / f"model-0000{i + 1}-of-00002.safetensors"))
    return d


@pytest.mark.parametrize("damage,reason", [
    (lambda p: os.truncate(p, os.path.getsize(p) // 2), "incomplete metadata"),
    (lambda p: p.write_bytes(b"\xff" * 40), "header"),
])
def test_load_names_the_corrupt_or_truncated_shard(tmp_path, damage, reason):
    d = _checkpoint(tmp_path)
    shard = d / "model-00002-of-00002.safetensors"
    assert bad_checkpoint_file(d) is None
    damage(shard)
    with pytest.raises(RecipeError) as info:
        load_checked(str(d))
    message = str(info.value)
    assert str(shard) in message and reason in message and len(message.splitlines()) == 1


def test_load_errors_for_missing_models(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="no such directory"):
        load_checked(str(tmp_path / "gone-llava"))
    with pytest.raises(RecipeError, match="model_id 'nonexistent/model'") as info:
        load_checked("nonexistent/model")  # vlminterp's own one-line message
    assert len(str(info.value).splitlines()) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecipeError) as info:
        load_checked("llava-hf/llava-nonexistent-7b-hf")
    assert "not in the local Hugging Face cache" in str(info.value)
    error = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    assert "hub cannot be reached" in describe_load_error("Qwen/Qwen2-VL-404", error)
