"""The causal-tracing recipe end to end on every tiny family that takes video.

Two facts hold on any correct implementation, whatever the weights: patching the visual tokens
after the *last* decoder layer cannot change the logits at the last (text) position, so the
patched score equals the counterfactual's; and patching every visual token at ``embed`` makes
the visual input the clean run's, so the patched score equals the clean one — on the families
whose visual features also enter after the LM input (Qwen3-VL's deepstack, Gemma 4's per-layer
inputs) because the recipe carries those later inputs too (``--late_inputs carry``, the default).
With ``--late_inputs counterfactual`` they stay the counterfactual's and the score differs.
"""

import json

import numpy as np
import pytest

import recipes.counterfactual_causal_tracing as tracing_recipe
from vlminterp.data.synthetic import write_dataset
from vlminterp.models import family_of, tiny_ids
from vlminterp.store import ActivationStore

VIDEO_IDS = [i for i in tiny_ids() if i != "tiny-clip-vit" and "video" in family_of(i).modalities]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("videos") / "data", 1)


@pytest.mark.slow
@pytest.mark.parametrize("model_id", VIDEO_IDS)
def test_tracing_recipe_on_every_video_family(model_id, data, tmp_path):
    out = tmp_path / "tracing.json"
    result = tracing_recipe.main(["--annotations", str(data), "--output", str(out),
                                  "--model_id", model_id, "--limit", "1", "--layers", "all",
                                  "--swap_spans", "none", "--dump_representations"])
    assert not result["errors"], result["errors"]
    records = result["records"]
    layers = result["config"]["layers"]
    assert len(records) == 2 * len(layers)  # reverse and motion_destroy x embed + every layer
    last = layers[-1]
    for r in records:
        assert np.isfinite([r["clean_score"], r["counterfactual_score"], r["patched_score"]]).all()
        assert r["frames"] == [[0, result["config"]["num_frames"]]]  # "visual" covers the clip
        if r["layer"] == last:
            assert r["patched_score"] == pytest.approx(r["counterfactual_score"], abs=1e-4)
        if r["layer"] == "embed":
            assert r["patched_score"] == pytest.approx(r["clean_score"], abs=1e-4)
    assert (tmp_path / "tracing_heatmap.png").stat().st_size > 0
    store = ActivationStore(tmp_path / "tracing_representations")
    qid = records[0]["question_id"]
    names = sorted(k.split("/", 1)[1] for k in store.keys() if k.startswith(qid))
    assert names == ["clean", "motion_destroy", "reverse"]
    assert json.loads(out.read_text())["records"] == records


LATE_IDS = [i for i in VIDEO_IDS if family_of(i).late_inputs is not None]


@pytest.mark.slow
@pytest.mark.parametrize("model_id", LATE_IDS)
def test_without_carrying_late_inputs_embed_is_the_lm_input_alone(model_id, data, tmp_path):
    """The control: the carried inputs are what makes ``embed`` whole on these families (on
    random weights the later inputs move the score little, so the gaps are compared)."""
    gaps = {}
    for late in ("carry", "counterfactual"):
        result = tracing_recipe.main([
            "--annotations", str(data), "--output", str(tmp_path / f"{late}.json"),
            "--model_id", model_id, "--limit", "1", "--layers", "embed", "--swap_spans", "none",
            "--late_inputs", late])
        assert result["config"]["late_inputs"] == late
        gaps[late] = max(abs(r["patched_score"] - r["clean_score"]) for r in result["records"])
    print(f"{model_id}: |patched - clean| at embed: {gaps}")
    assert gaps["counterfactual"] > 10 * gaps["carry"] + 1e-6, gaps
