"""The README demo runs the zoo's trained video model on the --synthetic videos it was trained for.

`python -m recipes.counterfactual_causal_tracing --synthetic 4 --output runs/demo/tracing.json`
with no --model_id traces ``tiny-qwen2-vl-motion``; the synthetic set's questions (written as mp4,
decoded again) are ones the model answers, and the heatmap shows the planted structure: the
clean visual tokens at the LM input restore the whole answer (effect 1) for every counterfactual
that changes it.
"""

import json

import pytest

import recipes.counterfactual_causal_tracing as tracing_recipe
import recipes.video_inference as inference_recipe

pytestmark = pytest.mark.slow


def test_demo_traces_the_trained_model_and_shows_the_planted_structure(tmp_path):
    out = tmp_path / "demo" / "tracing.json"
    result = tracing_recipe.main(["--synthetic", "4", "--output", str(out)])
    assert result["config"]["model_id"] == "tiny-qwen2-vl-motion"
    assert (out.parent / "tracing_heatmap.png").stat().st_size > 0
    summary = result["summary"]
    for cf in ("reverse", "motion_destroy"):
        embed = summary[cf]["visual"]["embed"]
        assert embed["n"] >= 4 and embed["mean_effect"] == pytest.approx(1.0, abs=1e-4), (cf, embed)
    stable = [r for r in result["records"] if not r["unstable"]]
    assert stable and all(abs(r["total_effect"]) >= 0.05 for r in stable)


def test_demo_questions_are_ones_the_model_answers(tmp_path):
    out = tmp_path / "inference.json"
    result = inference_recipe.main(["--synthetic", "4", "--model_id", "tiny-qwen2-vl-motion",
                                    "--output", str(out)])
    acc = result["accuracy"]
    assert acc["overall"]["n"] == 12 and acc["overall"]["accuracy"] == 1.0, acc
    assert json.loads(out.read_text())["config"]["model_id"] == "tiny-qwen2-vl-motion"
