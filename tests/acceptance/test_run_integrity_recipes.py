"""Issue 11 end to end on the recipes: resume keyed by settings, --restart, --limit, configuration
errors that stop a run on its first sample, one-line errors before any work, quiet decoders,
final lines, free-text generation, zero ablation, ragged mean-vector caches."""

import json

import numpy as np
import pytest
import torch
from support import tiny

import recipes.calculate_mean_vector as mean_recipe
import recipes.clip_trace as clip_trace_recipe
import recipes.counterfactual_causal_tracing as tracing_recipe
import recipes.neo2024_logit_lens as lens_recipe
import recipes.neo2024_object_ablation as ablation_recipe
import recipes.video_inference as inference_recipe
from vlminterp.data.synthetic import write_dataset
from vlminterp.data.video import read_frames, write_video
from vlminterp.store import ResultLog

FAST = ["--layers", "embed", "--swap_spans", "none"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("videos") / "data", 1)  # 3 questions


def _fails(recipe, argv, capsys, code=2):
    """Run a recipe that must stop: exit ``code``, no traceback, one stderr line; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        recipe.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "sample/s]" not in line
             and "it/s]" not in line]
    assert info.value.code == code and "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def test_rerun_with_other_settings_is_refused_then_restart_starts_over(data, tmp_path, capsys):
    out = tmp_path / "t.json"
    base = ["--annotations", str(data), "--output", str(out), "--swap_spans", "none"]
    first = tracing_recipe.main(base + ["--layers", "embed"])
    log_before = out.with_suffix(".jsonl").read_text()
    line = _fails(tracing_recipe, base + ["--layers", "embed,1", "--direction", "noise"], capsys)
    assert '--layers "embed" -> "embed,1"' in line and '--direction "denoise" -> "noise"' in line
    assert "--restart" in line
    assert out.with_suffix(".jsonl").read_text() == log_before  # nothing mixed in
    assert json.loads(out.read_text())["records"] == json.loads(json.dumps(first["records"]))
    # flags that do not change results may differ
    tracing_recipe.main(base + ["--layers", "embed", "--batch_size", "3", "--min_total_effect", "0"])
    again = tracing_recipe.main(base + ["--layers", "embed,1", "--direction", "noise", "--restart"])
    assert {r["layer"] for r in again["records"]} == {"embed", 1}
    assert {r["direction"] for r in again["records"]} == {"noise"}


def test_flag_invalid_for_the_data_stops_on_the_first_sample(data, tmp_path, capsys, monkeypatch):
    from vlminterp.video import causal_tracing as ct

    real, calls = ct.trace_sample, []
    monkeypatch.setattr(ct, "trace_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "t.json"
    line = _fails(tracing_recipe, ["--annotations", str(data), "--output", str(out), *FAST,
                                   "--token_slice", "positions:999999"], capsys)
    assert "positions [999999] are outside the sequence" in line and "sample 0000-direction" in line
    assert len(calls) == 1  # stopped on the first sample, not 3 per-sample errors
    assert not out.exists() and ResultLog(out.with_suffix(".jsonl")).done == set()
    fixed = tracing_recipe.main(["--annotations", str(data), "--output", str(out), *FAST])
    assert fixed["errors"] == [] and len(fixed["records"]) == 6


def test_limit_resume_message_temp_cleanup_and_final_line(data, tmp_path, capsys):
    out = tmp_path / "t.json"
    argv = ["--annotations", str(data), "--output", str(out), *FAST]
    stale = tmp_path / ".t.json.0123456789ab.tmp"  # a run killed inside write_json_atomic
    stale.write_text('{"records": [')
    small = tracing_recipe.main(argv + ["--limit", "1"])
    assert {r["question_id"] for r in small["records"]} == {"0000-direction"}
    assert not stale.exists()
    capsys.readouterr()
    full = tracing_recipe.main(argv + ["--limit", "3"])
    captured = capsys.readouterr()
    assert "skipping 1 of 3 samples already done" in captured.err
    assert len({r["question_id"] for r in full["records"]}) == 3
    last = captured.out.strip().splitlines()[-1]
    assert str(out) in last and str(tmp_path / "t_heatmap.png") in last and "(0 errors)" in last
    again = tracing_recipe.main(argv + ["--limit", "2"])  # results list this run's samples only
    assert len({r["question_id"] for r in again["records"]}) == 2


def test_records_carry_total_effect_and_unstable_marks(data, tmp_path):
    result = tracing_recipe.main(["--annotations", str(data), "--output", str(tmp_path / "t.json"),
                                  *FAST, "--min_total_effect", "0.004"])
    for r in result["records"]:
        assert r["total_effect"] == pytest.approx(r["clean_score"] - r["counterfactual_score"])
        assert r["unstable"] == (abs(r["total_effect"]) < 0.004)
    stable = [r for r in result["records"] if not r["unstable"]]
    cell = result["summary"]["reverse"]["visual"]["embed"]
    rev = [r["effect"] for r in stable if r["counterfactual"] == "reverse"]
    assert cell["n"] == len(rev) and cell["n_unstable"] == 3 - len(rev)
    if rev:
        assert cell["mean_effect"] == pytest.approx(np.mean(rev))
    assert result["unstable"]["excluded_from_means"] == len(result["records"]) - len(stable)


@pytest.mark.parametrize("flags,message", [
    (["--device", "gpu"], "--device 'gpu': not a torch device"),
    (["--model_id", "/nonexistent/qwen2-vl-7b"], "no such directory"),
])
def test_bad_device_and_missing_model_are_one_line(data, tmp_path, capsys, flags, message):
    line = _fails(tracing_recipe, ["--annotations", str(data), "--output",
                                   str(tmp_path / "t.json"), *FAST, *flags], capsys)
    assert message in line


@pytest.mark.parametrize("recipe,argv", [
    (tracing_recipe, ["--synthetic", "1"]),
    (inference_recipe, ["--synthetic", "1"]),
    (lens_recipe, ["--synthetic", "1"]),
])
def test_output_that_is_a_directory_fails_before_any_work(recipe, argv, tmp_path, capsys, monkeypatch):
    import vlminterp.models

    monkeypatch.setattr(vlminterp.models, "load", lambda *a, **k: pytest.fail("loaded a model"))
    line = _fails(recipe, argv + ["--output", str(tmp_path)], capsys)
    assert f"--output {str(tmp_path)!r} is a directory" in line
    assert not (tmp_path / "synthetic").exists()


def test_unreadable_video_is_quiet_and_a_short_video_warns(data, tmp_path, capfd):
    root = tmp_path / "videos"
    root.mkdir()
    (root / "broken.mp4").write_bytes(b"not a video at all")
    frames = read_frames(data.parent / "videos" / "video_0000.mp4")[:4]
    write_video(root / "short.mp4", frames)
    entries = [{**json.loads(data.read_text())[0], "video_name": v, "question_id": v}
               for v in ("broken.mp4", "short.mp4")]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(entries))
    with pytest.warns(UserWarning, match="only 4 frame.* fewer than --num_frames 8"):
        result = inference_recipe.main(["--annotations", str(ann), "--video_root", str(root),
                                        "--output", str(tmp_path / "i.json")])
    assert [e["question_id"] for e in result["errors"]] == ["broken.mp4"]
    assert "VideoReadError" in result["errors"][0]["error"] and len(result["records"]) == 1
    err = capfd.readouterr().err
    assert "moov atom" not in err and "ERROR opening" not in err  # decoder noise silenced


def test_generate_records_the_greedy_response(data, tmp_path):
    from vlminterp.video.multiple_choice import mc_prompt

    result = inference_recipe.main(["--annotations", str(data), "--output", str(tmp_path / "g.json"),
                                    "--scoring", "generate", "--max_new_tokens", "3", "--limit", "1"])
    rec = result["records"][0]
    entry = json.loads(data.read_text())[0]
    vlm = tiny("tiny-qwen2-vl")
    frames = read_frames(data.parent / "videos" / entry["video_name"], num_frames=8)
    inputs = vlm.prepare(text=mc_prompt(entry["question"], entry["candidates"]), video=[frames])
    ids, n = inputs["input_ids"], inputs["input_ids"].shape[1]
    for _ in range(3):  # greedy decoding by hand: full forward, argmax, append
        with torch.no_grad():
            logits = vlm.torch_model(**{**inputs, "input_ids": ids,
                                        "attention_mask": torch.ones_like(ids),
                                        "mm_token_type_ids": torch.nn.functional.pad(
                                            inputs["mm_token_type_ids"], (0, ids.shape[1] - n))}).logits
        nxt = logits[0, -1].argmax().view(1, 1)
        ids = torch.cat([ids, nxt], 1)
        if int(nxt) == vlm.tokenizer.eos_token_id:
            break
    assert rec["response"] == vlm.tokenizer.decode(ids[0, n:], skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)
    assert rec["scores"] is None and result["config"]["max_new_tokens"] == 3
    assert rec["correct"] == (rec["prediction_index"] == rec["answer_index"])


def test_mean_vector_of_ragged_token_caches(tmp_path, capsys):
    parts = [torch.randn(1, n, 6) for n in (5, 2, 9)]
    for i, t in enumerate(parts):
        torch.save(t, tmp_path / f"acts_{i}.pt")
    mean = mean_recipe.main([str(tmp_path)])
    torch.testing.assert_close(mean, torch.cat([p[0] for p in parts]).mean(0), atol=1e-6, rtol=0)
    assert str(tmp_path / "mean_vector.safetensors") in capsys.readouterr().out.splitlines()[-1]


# --- Neo 2024 and CLIP -------------------------------------------------------------------------

def test_coco_file_error_is_one_line(tmp_path, capsys):
    (tmp_path / "instances.json").write_text('{"images": [], "annotations": {}, "categories": []}')
    line = _fails(lens_recipe, ["--coco_annotations", str(tmp_path / "instances.json"),
                                "--image_root", str(tmp_path), "--output", str(tmp_path / "l.json")],
                  capsys)
    assert "instances.json: annotations: expected a list" in line


@pytest.mark.slow
def test_lens_resume_keyed_by_settings_and_final_line(tmp_path, capsys):
    out = tmp_path / "l.json"
    argv = ["--synthetic", "2", "--output", str(out), "--html_images", "1", "--heatmap_images", "1"]
    lens_recipe.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    for path in (out, tmp_path / "l.png", tmp_path / "l.html", tmp_path / "l_heatmap_0.png"):
        assert str(path) in last
    assert last.endswith("(0 errors)")
    line = _fails(lens_recipe, argv + ["--top_k", "3"], capsys)
    assert "--top_k 5 -> 3" in line
    lens_recipe.main(argv + ["--heatmap_images", "0"])  # a figure-only flag may change
    assert "skipping 2 of 2" in capsys.readouterr().err
    result = lens_recipe.main(argv + ["--top_k", "3", "--restart"])
    assert result["settings"]["top_k"] == 3 and len(result["records"]) == 2


@pytest.mark.slow
def test_zero_ablation_ablates_with_zeros(tmp_path):
    from vlminterp import neo2024 as neo
    from vlminterp.data.coco import CocoObjects

    out = tmp_path / "a.json"
    result = ablation_recipe.main(["--synthetic", "1", "--keep_all", "--zero_ablation", "--tasks",
                                   "vqa", "--sizes", "2", "--ig_steps", "2", "--output", str(out)])
    assert result["settings"]["zero_ablation"] is True and not (tmp_path / "a_mean").exists()
    rec = next(r for r in result["records"] if r["condition"] == "object_b1")
    coco = CocoObjects(tmp_path / "a_synthetic" / "instances_synthetic.json", tmp_path / "a_synthetic")
    sample = coco.samples(True)[0]
    vlm = tiny("tiny-llava")
    inputs, _, answer_id = neo.task_inputs(vlm, coco.load_image(sample), neo.vqa_task(None),
                                           sample.category)
    positions = vlm.layout(inputs)[0].visual[rec["indices"]]

    def zero(module, args, kwargs):
        h = kwargs["hidden_states"].clone() if "hidden_states" in kwargs else args[0].clone()
        h[0, positions] = 0.0
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": h}
        return (h, *args[1:]), kwargs

    layer0 = vlm.torch_model.model.language_model.layers[0]
    handle = layer0.register_forward_pre_hook(zero, with_kwargs=True)
    try:
        p = vlm.forward(inputs)[0, -1].float().softmax(-1)[answer_id]
    finally:
        handle.remove()
    assert rec["p_correct"] == pytest.approx(float(p), abs=1e-5)


def test_clip_trace_bad_device_is_one_line(tmp_path, capsys):
    line = _fails(clip_trace_recipe, ["--model", "tiny-clip-vit", "--synthetic", "2", "--target-layer",
                                      "0", "--device", "cuda:99", "--out", str(tmp_path / "tr")], capsys)
    assert "--device 'cuda:99'" in line
