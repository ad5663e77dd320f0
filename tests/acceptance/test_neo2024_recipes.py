"""The three Neo et al. 2024 recipes end to end on --synthetic 3: JSON numbers in range, plots,
the HTML view, resuming, --help, bad data."""

import json
import re

import pytest

from recipes import neo2024_attention_knockout, neo2024_logit_lens, neo2024_object_ablation

pytestmark = pytest.mark.slow
RECIPES = [neo2024_object_ablation, neo2024_logit_lens, neo2024_attention_knockout]


def _pct(stat):
    assert stat["value"] is None or 0.0 <= stat["lo"] <= stat["value"] <= stat["hi"] <= 100.0
    return stat["value"]


def _lines(path):
    return path.read_text().count("\n")


def test_object_ablation_end_to_end_and_resume(tmp_path):
    out = tmp_path / "ablation.json"
    argv = ["--synthetic", "3", "--keep_all", "--output", str(out), "--sizes", "2,4",
            "--ig_steps", "4", "--max_new_tokens", "3"]
    result = neo2024_object_ablation.main(argv)
    saved = json.loads(out.read_text())
    assert saved["settings"]["keep_all"] is True and "keep_all" in saved["settings"]["keep_all_note"]
    assert saved["n_samples"] == 3 and not saved["errors"]
    for task in ("vqa", "polling", "generative"):
        conds = saved["summary"][task]
        assert {"object_b0", "object_b1", "object_b2", "register", "random_obj", "ig_obj"} <= set(conds)
        assert _pct(conds["baseline_accuracy_pct"]) is not None
        for name, c in conds.items():
            if name != "baseline_accuracy_pct":
                # an image whose subset is empty (no register token) is counted apart
                assert c["changed_pct"]["n"] + c["n_empty"] == 3
                assert (_pct(c["changed_pct"]) is None) == (c["n_empty"] == 3)
                _pct(c["drop_pct"])
        assert (tmp_path / f"ablation_{task}.png").stat().st_size > 1000
    probs = [r[k] for r in saved["records"] for k in ("p_correct", "p_generated") if k in r]
    assert probs and all(0.0 <= p <= 1.0 for p in probs)
    assert all(r["n_tokens"] <= 16 for r in saved["records"])  # tiny LLaVA: 4x4 visual tokens
    log = out.with_suffix(".jsonl")
    lines = _lines(log)
    again = neo2024_object_ablation.main(argv)  # resumes: nothing left to do
    assert _lines(log) == lines and again["summary"] == result["summary"]


def test_logit_lens_end_to_end_with_html(tmp_path):
    out = tmp_path / "lens.json"
    neo2024_logit_lens.main(["--synthetic", "3", "--output", str(out), "--heatmap_images", "2"])
    saved = json.loads(out.read_text())
    assert len(saved["records"]) == 3
    for field in ("object_fraction", "background_fraction"):
        assert len(saved["summary"][field]) == 4  # one entry per layer of the tiny LM
        for stat in saved["summary"][field]:
            assert stat["value"] is None or 0.0 <= stat["lo"] <= stat["value"] <= stat["hi"] <= 1.0
    assert (tmp_path / "lens.png").exists() and (tmp_path / "lens_heatmap_1.png").exists()
    assert not (tmp_path / "lens_heatmap_2.png").exists()
    page = (tmp_path / "lens.html").read_text()
    assert "onmouseenter" in page and "data:image/png;base64," in page
    assert not re.search(r"(src|href)=[\"']https?:", page)  # self-contained
    data = json.loads(page.split("const DATA = ", 1)[1].split(";\n", 1)[0])
    assert len(data) == 3 and len(data[0]["patches"]) == 16 and len(data[0]["patches"][0]) == 4
    assert len(data[0]["patches"][0][0]) == 5  # top-5 (token, probability) per layer


def test_attention_knockout_end_to_end(tmp_path):
    out = tmp_path / "knockout.json"
    neo2024_attention_knockout.main(["--synthetic", "3", "--keep_all", "--batch_size", "64",
                                     "--output", str(out)])
    saved = json.loads(out.read_text())
    conds = saved["summary"]["conditions"]
    assert len(conds) == 5 * 3
    groups = {"early", "mid", "late", "early_mid", "mid_late", "all"}
    assert set(conds["obj_b1->last"]) == groups | {"window_0", "window_1", "window_2", "window_3"}
    for per in conds.values():
        for c in per.values():
            _pct(c["accuracy_pct"])
            assert c["accuracy_pct"]["n"] == 3
            assert -1.0 <= c["delta_p_correct"]["value"] <= 1.0
    assert (tmp_path / "knockout.png").exists() and (tmp_path / "knockout_groups.png").exists()


def test_recipes_on_qwen2_vl_with_per_image_questions(tmp_path):
    out = tmp_path / "knockout_qwen.json"
    (tmp_path / "q.json").write_text(json.dumps({"1": ["What animal is this?"]}))
    neo2024_attention_knockout.main(["--model_id", "tiny-qwen2-vl", "--synthetic", "2", "--keep_all",
                                     "--sources", "obj_b1,visual", "--targets", "last",
                                     "--questions", str(tmp_path / "q.json"), "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"]["questions"] == str(tmp_path / "q.json")
    assert saved["model_id"] == "tiny-qwen2-vl" and set(saved["summary"]["conditions"]) == {
        "obj_b1->last", "visual->last"}
    out = tmp_path / "ablation_qwen.json"
    neo2024_object_ablation.main(["--model_id", "tiny-qwen2-vl", "--synthetic", "2", "--keep_all",
                                  "--tasks", "vqa", "--sizes", "2", "--ig_steps", "2",
                                  "--output", str(out)])
    assert json.loads(out.read_text())["summary"]["vqa"]["object_b0"]["changed_pct"]["n"] == 2


def test_only_with_questions_restricts_the_run_to_images_that_have_one(tmp_path, capsys):
    questions = tmp_path / "clean_questions.json"  # the original's shape: id -> 0 or 1 questions
    questions.write_text(json.dumps({"1": [], "2": ["What is in the picture?"], "3": []}))
    out = tmp_path / "knockout.json"
    result = neo2024_attention_knockout.main([
        "--synthetic", "3", "--keep_all", "--sources", "obj_b1", "--targets", "last", "--no_groups",
        "--window", "4", "--questions", str(questions), "--only_with_questions", "--output", str(out)])
    assert result["n_samples"] == 1 and {r["key"].split(":")[0] for r in result["records"]} == {"2"}
    with pytest.raises(SystemExit):
        neo2024_attention_knockout.main(["--synthetic", "3", "--only_with_questions",
                                         "--output", str(tmp_path / "k.json")])
    assert "--only_with_questions needs --questions FILE" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.__name__.split(".")[-1])
def test_help_documents_every_flag(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--help"])
    text = capsys.readouterr().out
    for action in recipe.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help
    assert "--synthetic" in text and "llava-hf/llava-1.5-7b-hf" in text


def test_bad_arguments_and_missing_images(tmp_path, capsys):
    with pytest.raises(SystemExit):
        neo2024_object_ablation.main(["--synthetic", "2", "--output", str(tmp_path / "a.json"),
                                      "--tasks", "vqa,caption"])
    assert "--tasks: expected a comma list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        neo2024_attention_knockout.main(["--synthetic", "2", "--output", str(tmp_path / "k.json"),
                                         "--window", "0"])
    assert "--window: expected a positive number, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        neo2024_logit_lens.main(["--coco_annotations", str(tmp_path / "x.json"),
                                 "--output", str(tmp_path / "b.json")])
    assert "--coco_annotations needs --image_root" in capsys.readouterr().err
    ann = {"images": [{"id": 1, "file_name": "gone.png", "width": 64, "height": 64}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 40, 36],
                            "area": 1440}],
           "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    out = tmp_path / "lens.json"
    result = neo2024_logit_lens.main(["--coco_annotations", str(tmp_path / "ann.json"),
                                      "--image_root", str(tmp_path), "--output", str(out)])
    assert list(result["errors"]) == ["1:1"] and "gone.png: cannot read image" in result["errors"]["1:1"]
