"""The video recipes end to end on the synthetic dataset and tiny Qwen2-VL (in-process).

Covers: --help documents every flag; inference scores; tracing JSON + heatmap; resuming a killed
run; the bad-input matrix (exit status 2, one error line, no traceback; unreadable videos become
per-sample errors); Have probes on dumped representations; mean vectors (hand mean, legacy .pt
with weights_only, plugging into ablate(kind="mean")).
"""

import json
import shutil

import numpy as np
import pytest
import torch
from support import tiny

import recipes.calculate_mean_vector as mean_recipe
import recipes.counterfactual_causal_tracing as tracing_recipe
import recipes.train_have_probe as probe_recipe
import recipes.video_inference as inference_recipe
from vlminterp.video import causal_tracing as ct
from vlminterp.data.synthetic import write_dataset
from vlminterp.data.video import read_frames
from vlminterp.interventions import ablate
from vlminterp.video.multiple_choice import mc_prompt
from vlminterp.store import ActivationStore, ResultLog, load_vector

ISSUE_FLAGS = {
    inference_recipe: "--annotations --video_root --output --model_id --device --num_frames",
    tracing_recipe: "--annotations --video_root --output --representations_output --model_id "
                    "--token_slice --swap_spans --include_motion_only --dump_representations "
                    "--layers --batch_size",
    probe_recipe: "--tracing_results --representations --output --probe_type --representation "
                  "--layer_idx --annotations --label_key --mode --probe_model",
    mean_recipe: "DIR",
}
FAST = ["--layers", "embed,1", "--swap_spans", "none"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("videos") / "data", 2)  # 6 questions


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("dump") / "tracing.json"
    result = tracing_recipe.main(["--annotations", str(data), "--output", str(out),
                                  "--dump_representations", "--layers", "embed,0,1,2,3",
                                  "--swap_spans", "0:2,4:6"])
    return out, result


def run_bad(recipe, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("recipe", list(ISSUE_FLAGS), ids=lambda m: m.__name__.split(".")[-1])
def test_help_documents_every_flag(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in recipe.build_parser()._actions:
        names = action.option_strings or [action.metavar or action.dest]
        assert action.help, f"{names} has no help text"
        assert any(n in text for n in names)
    for flag in ISSUE_FLAGS[recipe].split():
        assert flag in text


def test_video_inference_scores_option_letters(data, tmp_path):
    out = tmp_path / "inference.json"
    result = inference_recipe.main(["--annotations", str(data), "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["accuracy"]["overall"]["n"] == 6
    assert set(result["accuracy"]["per_task"]) == {"direction", "colour", "presence"}
    rec = result["records"][1]  # the colour question: 4 candidates
    vlm = tiny("tiny-qwen2-vl")
    entry = json.loads(data.read_text())[1]
    frames = read_frames(data.parent / "videos" / entry["video_name"], num_frames=8)
    logits = vlm.forward(vlm.prepare(text=mc_prompt(entry["question"], entry["candidates"]),
                                     video=[frames]))[0, -1]
    letters = vlm.tokenizer.convert_tokens_to_ids(list("ABCD"))  # line-initial, no space
    np.testing.assert_allclose(rec["scores"], logits[letters].tolist(), atol=1e-5)
    assert rec["prediction_index"] == int(np.argmax(rec["scores"]))
    assert rec["correct"] == (rec["prediction"] == entry["answer"])


def test_video_inference_logprob_scoring(data, tmp_path):
    result = inference_recipe.main(["--annotations", str(data), "--output",
                                    str(tmp_path / "lp.json"), "--scoring", "logprob"])
    rec = result["records"][0]
    assert len(rec["scores"]) == 2 and all(s < 0 for s in rec["scores"])


def test_tracing_writes_records_summary_and_heatmap(dumped):
    out, result = dumped
    assert (out.parent / "tracing_heatmap.png").stat().st_size > 0
    assert result["errors"] == [] and result["config"]["counterfactuals"] == \
        ["local_swap", "reverse", "motion_destroy"]
    # per sample: local_swap 5 slices x 5 layers + 2 counterfactuals x 5 layers
    assert len(result["records"]) == 6 * (25 + 10)
    fields = {"question_id", "counterfactual", "layer", "token_slice", "positions",
              "clean_score", "counterfactual_score", "patched_score", "effect"}
    assert fields <= set(result["records"][0])
    # random tiny weights: every |clean - cf| is below 0.05 logits, so all records are unstable
    cell = result["summary"]["reverse"]["visual"]["embed"]
    assert cell["mean_effect"] is None and cell["n"] == 0 and cell["n_unstable"] == 6
    assert result["unstable"]["excluded_from_means"] == len(result["records"])
    store = ActivationStore(out.with_name("tracing_representations"))
    assert len(store) == 6 * 4  # clean + 3 counterfactuals per question


def test_killed_tracing_run_resumes_to_the_same_json(data, tmp_path, monkeypatch):
    full_out, out = tmp_path / "full" / "tracing.json", tmp_path / "killed" / "tracing.json"
    full = tracing_recipe.main(["--annotations", str(data), "--output", str(full_out), *FAST])
    real, calls = ct.trace_sample, []

    def dies_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(kwargs["question_id"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ct, "trace_sample", dies_after_two)
    argv = ["--annotations", str(data), "--output", str(out), *FAST]
    with pytest.raises(KeyboardInterrupt):
        tracing_recipe.main(argv)
    assert not out.exists() and len(ResultLog(out.with_suffix(".jsonl")).done) == 2
    done, calls[:] = list(calls), []

    def counting(*args, **kwargs):
        calls.append(kwargs["question_id"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ct, "trace_sample", counting)
    resumed = tracing_recipe.main(argv)
    assert len(calls) == 4 and not set(calls) & set(done)  # finished samples are not recomputed
    assert json.loads(out.read_text()) == json.loads(full_out.read_text())
    assert resumed["records"] == full["records"]
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes leave no temp files


def test_star_shaped_annotations_trace_and_label_records_without_nested_fields(data, tmp_path):
    """STAR's shape (answer a word of the candidate, string frame ids, nested situations, a
    verbatim repeated entry) runs; the stored records carry its scalar fields, not situations."""
    star = []
    for e in json.loads(data.read_text())[:2]:
        star.append({"task_name": e["task_name"], "video_name": e["video_name"],
                     "question_id": "Interaction_" + e["question_id"], "question": e["question"],
                     "answer_number": e["answer_number"],
                     "candidates": [f"The {c}." for c in e["candidates"]], "answer": e["answer"],
                     "situations": {"000003": {"rel_pairs": [["person", "square"]],
                                               "rel_labels": ["on"], "actions": ["move"],
                                               "bbox": [[1.5, 2.0, 30.0, 40.5]],
                                               "bbox_labels": ["square"]}},
                     "start": 0.0, "end": 0.9, "frames_with_answer_object": ["000003", "000004"],
                     "split": "val"})
    ann = tmp_path / "star.json"
    ann.write_text(json.dumps(star + star[:1]))
    out = tmp_path / "tracing.json"
    with pytest.warns(UserWarning, match="exactly repeat an earlier one"):
        result = tracing_recipe.main(["--annotations", str(ann), "--video_root",
                                      str(data.parent / "videos"), "--output", str(out),
                                      "--dump_representations", *FAST])
    assert result["errors"] == [] and {r["question_id"] for r in result["records"]} == \
        {e["question_id"] for e in star}
    store = ActivationStore(out.with_name("tracing_representations"))
    meta = store.meta(store.keys()[0])
    assert meta["split"] == "val" and meta["task_name"] == star[0]["task_name"]
    assert "situations" not in meta and "frames_with_answer_object" not in meta
    assert meta["answer"] == star[0]["candidates"][star[0]["answer_number"]]


def _annotations(tmp_path, entries_or_text):
    path = tmp_path / "bad.json"
    path.write_text(entries_or_text if isinstance(entries_or_text, str)
                    else json.dumps(entries_or_text))
    return path


GOOD = {"video_name": "video_0000.mp4", "question": "Which way?", "candidates": ["left", "right"],
        "answer": "left", "question_id": "q0"}


@pytest.mark.parametrize("content,message", [
    ('[{"video_name": "a.mp4",', "invalid JSON at line 1"),
    ([{"question": "Which way?"}], "missing required field 'video_name'"),
    ([{**GOOD, "answer": "Jog"}], "entry 0 (question_id q0): answer 'Jog' is not among candidates"),
])
@pytest.mark.parametrize("recipe", [inference_recipe, tracing_recipe],
                         ids=["inference", "tracing"])
def test_bad_annotations_exit_2(recipe, content, message, tmp_path, capsys):
    argv = ["--annotations", str(_annotations(tmp_path, content)), "--output",
            str(tmp_path / "o.json")]
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and message in err
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("flags,message", [
    (["--swap_spans", "0:2,1:3"], "spans overlap"),
    (["--swap_spans", "0:2"], "found 1 comma-separated spans"),
    (["--swap_spans", "4:8,8:12"], "beyond the video's 8 frames"),
    (["--token_slice", "visual_frames:6:12"], "beyond the video's 8 frames"),
    (["--token_slice", "frames"], "is not understood"),
    (["--layers", "embed,9"], "beyond the model's 4 decoder layers"),
    (["--batch_size", "0"], "must be positive"),
    (["--limit", "0"], "must be positive"),
])
def test_bad_tracing_flags_exit_2(data, flags, message, tmp_path, capsys):
    line = run_bad(tracing_recipe, ["--annotations", str(data), "--output",
                                    str(tmp_path / "o.json"), *flags], capsys)
    assert line.startswith("python -m recipes.counterfactual_causal_tracing: error:")
    assert message in line
    assert not (tmp_path / "o.json").exists()


def test_missing_annotations_file_and_no_source(tmp_path, capsys):
    line = run_bad(tracing_recipe, ["--annotations", str(tmp_path / "nope.json"), "--output",
                                    str(tmp_path / "o.json")], capsys)
    assert "cannot read annotations" in line
    line = run_bad(inference_recipe, ["--output", str(tmp_path / "o.json")], capsys)
    assert "--synthetic N" in line


def test_unreadable_videos_are_per_sample_errors(data, tmp_path):
    root = tmp_path / "videos"
    shutil.copytree(data.parent / "videos", root)
    (root / "video_0001.mp4").write_bytes(b"not a video at all")
    entries = json.loads(data.read_text())[:4] + [{**GOOD, "video_name": "missing.mp4",
                                                   "question_id": "gone"}]
    ann = _annotations(tmp_path, entries)
    result = tracing_recipe.main(["--annotations", str(ann), "--video_root", str(root),
                                  "--output", str(tmp_path / "t.json"), *FAST])
    errors = {e["question_id"]: e["error"] for e in result["errors"]}
    assert set(errors) == {"0001-direction", "gone"}
    assert "VideoReadError" in errors["0001-direction"] and "not found" in errors["gone"]
    assert {r["question_id"] for r in result["records"]} == {e["question_id"]
                                                             for e in entries[:3]}
    inf = inference_recipe.main(["--annotations", str(ann), "--video_root", str(root),
                                 "--output", str(tmp_path / "i.json")])
    assert len(inf["errors"]) == 2 and len(inf["records"]) == 3


def test_synthetic_flag_runs_offline(tmp_path):
    result = inference_recipe.main(["--synthetic", "1", "--output", str(tmp_path / "i.json")])
    assert (tmp_path / "synthetic" / "annotations.json").exists()
    assert result["accuracy"]["overall"]["n"] == 3


def test_have_probes_on_dumped_representations(dumped, tmp_path):
    out, _ = dumped
    reps = out.with_name("tracing_representations")
    sweep = probe_recipe.main(["--tracing_results", str(out), "--representations", str(reps),
                               "--output", str(tmp_path / "have1.json")])
    assert [r["layer"] for r in sweep["results"]] == [0, 1, 2, 3]
    assert (tmp_path / "have1_layers.png").exists()
    r = sweep["results"][0]
    assert {"accuracy", "auroc", "majority_baseline", "control_accuracy", "selectivity"} <= set(r)
    assert r["val_groups"] == ["video_0001.mp4"] or r["val_groups"] == ["video_0000.mp4"]
    have2 = probe_recipe.main(["--representations", str(reps), "--output",
                               str(tmp_path / "have2.json"), "--probe_type", "have2",
                               "--label_key", "task_name", "--annotations",
                               str(json.loads(out.read_text())["config"]["annotations"]),
                               "--representation", "vprime", "--probe_model", "lstm",
                               "--layer_idx", "all"])
    assert have2["classes"] == ["colour", "direction", "presence"]
    pair = probe_recipe.main(["--representations", str(reps), "--output",
                              str(tmp_path / "pair.json"), "--mode", "pair", "--representation",
                              "visual_mean", "--probe_model", "logreg"])
    assert len(pair["results"]) == 1


def test_have_probe_bad_inputs(dumped, tmp_path, capsys):
    out, _ = dumped
    reps = str(out.with_name("tracing_representations"))
    base = ["--representations", reps, "--output", str(tmp_path / "p.json")]
    assert "no annotation has this field" in run_bad(
        probe_recipe, base + ["--probe_type", "have2"], capsys)
    assert "--layer_idx applies to layers_mean only" in run_bad(
        probe_recipe, base + ["--representation", "vprime", "--layer_idx", "1"], capsys)
    assert "runs over rows" in run_bad(probe_recipe, base + ["--probe_model", "lstm"], capsys)
    assert "empty or missing" in run_bad(
        probe_recipe, ["--representations", str(tmp_path / "none"), "--output",
                       str(tmp_path / "p.json")], capsys)


def test_mean_vector_equals_hand_mean_and_plugs_into_mean_ablation(dumped, tmp_path):
    out, _ = dumped
    store = ActivationStore(out.with_name("tracing_representations"))
    written = tmp_path / "mv.safetensors"
    mean = mean_recipe.main([str(store.root), "--name", "layers_mean", "--layer_idx", "1",
                             "--output", str(written)])
    hand = torch.stack([store.get(k)["layers_mean"][1] for k in store.keys()]).mean(0)
    torch.testing.assert_close(load_vector(written), hand, atol=1e-6, rtol=0)
    assert mean.shape == (64,)
    vlm = tiny("tiny-qwen2-vl")
    frames = read_frames(json_video(out), num_frames=8)
    inputs = vlm.prepare(text="Which way?", video=[frames])
    vis = vlm.layout(inputs)[0].visual
    with torch.no_grad(), vlm.trace(inputs):
        ablate(vlm.layers[1], vis, kind="mean", mean=load_vector(written))
        traced = vlm.lm_head.output[0, -1].save()

    def hook(mod, args, output):
        output = output.clone()
        output[0, vis] = hand
        return output
    handle = vlm.torch_model.model.language_model.layers[1].register_forward_hook(hook)
    try:
        ref = vlm.forward(inputs)[0, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(traced, ref, atol=1e-5, rtol=0)


def json_video(out):
    ann = json.loads(out.read_text())["config"]["annotations"]
    entry = json.loads(open(ann).read())[0]
    return f"{ann.rsplit('/', 1)[0]}/videos/{entry['video_name']}"


def test_mean_vector_reads_legacy_pt_with_weights_only(tmp_path, capsys):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    vectors = [torch.randn(16) for _ in range(3)]
    torch.save(vectors[0], legacy / "a.pt")
    torch.save({"visual_mean": vectors[1]}, legacy / "b.pt")
    torch.save({"visual_mean": vectors[2], "other": torch.zeros(2)}, legacy / "c.pt")
    mean = mean_recipe.main([str(legacy)])
    torch.testing.assert_close(mean, torch.stack(vectors).mean(0), atol=1e-6, rtol=0)
    assert (legacy / "mean_vector.safetensors").exists()
    torch.save({"visual_mean": vectors[0], "payload": _Unsafe()}, legacy / "d.pt")
    assert "weights_only" in run_bad(mean_recipe, [str(legacy)], capsys)


class _Unsafe:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse it."""
