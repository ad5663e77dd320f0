"""The three Neo et al. 2024 recipes end to end on every tiny image family (one synthetic image,
the cheapest settings): records with a non-empty object subset, the same object tokens in the
three experiments, knockout only at attention layers, the plots and the final line."""

import json

import pytest
from support import tiny

from recipes import neo2024_attention_knockout, neo2024_logit_lens, neo2024_object_ablation
from vlminterp import neo2024
from vlminterp.models import family_of, tiny_ids

pytestmark = pytest.mark.slow
IMAGE_IDS = [i for i in tiny_ids()
             if i != "tiny-clip-vit" and "image" in family_of(i).modalities]


def _run(recipe, out, argv, capsys) -> tuple[dict, str]:
    recipe.main(["--synthetic", "1", "--output", str(out), *argv])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("Saved ") and line.endswith("(0 errors)") and str(out) in line
    saved = json.loads(out.read_text())
    assert saved["n_samples"] == 1 and not saved["errors"]
    return saved, line


@pytest.mark.parametrize("model_id", IMAGE_IDS)
def test_neo2024_recipes_on_every_image_family(model_id, tmp_path, capsys, monkeypatch):
    # one build of the tiny model for the three recipes (the loading path is tested elsewhere)
    monkeypatch.setattr(neo2024, "load_model", lambda args: tiny(args.model_id))
    common = ["--model_id", model_id]
    ablation, line = _run(neo2024_object_ablation, tmp_path / "ablation.json", common + [
        "--keep_all", "--tasks", "vqa", "--sizes", "2", "--ig_steps", "1", "--batch_size", "64"],
        capsys)
    by = {r["condition"]: r for r in ablation["records"]}
    assert "skipped" not in by["baseline"]
    assert 0 < by["object_b0"]["n_tokens"] <= by["object_b1"]["n_tokens"]
    assert by["object_b0"]["n_tokens"] == len(by["object_b0"]["indices"])
    assert 0.0 <= by["object_b0"]["p_correct"] <= 1.0
    assert (tmp_path / "ablation_vqa.png").stat().st_size > 1000 and "ablation_vqa.png" in line

    lens, line = _run(neo2024_logit_lens, tmp_path / "lens.json", common + [
        "--top_k", "2", "--heatmap_images", "1", "--html_images", "1"], capsys)
    record = lens["records"][0]
    assert record["n_object"] == by["object_b0"]["n_tokens"]  # the same object tokens
    assert len(record["object_fraction"]) == len(lens["summary"]["object_fraction"])
    for name in ("lens.png", "lens_heatmap_0.png", "lens.html"):
        assert (tmp_path / name).stat().st_size > 1000 and name in line

    knockout, line = _run(neo2024_attention_knockout, tmp_path / "knockout.json", common + [
        "--keep_all", "--no_groups", "--window", "2", "--sources", "obj_b0",
        "--targets", "last,last_row", "--batch_size", "64"], capsys)
    attention = set(tiny(model_id).attention_layers)
    rows = [r for r in knockout["records"] if r["layers"] != "baseline"]
    assert rows and {r["target"] for r in rows} == {"last", "last_row"}
    for r in rows:
        assert r["n_sources"] == by["object_b0"]["n_tokens"] and r["n_targets"] >= 1
        assert r["layer_list"] and set(r["layer_list"]) <= attention
        assert -1.0 <= r["delta_p"] <= 1.0
    assert (tmp_path / "knockout.png").stat().st_size > 1000 and "knockout.png" in line
