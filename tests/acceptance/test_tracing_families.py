"""The causal-tracing recipe end to end on every tiny family that takes video.

Two facts hold on any correct implementation, whatever the weights: patching the visual tokens
after the *last* decoder layer cannot change the logits at the last (text) position, so the
patched score equals the counterfactual's; and where the visual features only enter the LM at
its input (placeholders overwritten or added onto), patching every visual token at ``embed``
makes the LM input the clean run's, so the patched score equals the clean one.
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
    entry = family_of(model_id).visual_entry
    for r in records:
        assert np.isfinite([r["clean_score"], r["counterfactual_score"], r["patched_score"]]).all()
        assert r["frames"] == [[0, result["config"]["num_frames"]]]  # "visual" covers the clip
        if r["layer"] == last:
            assert r["patched_score"] == pytest.approx(r["counterfactual_score"], abs=1e-4)
        if r["layer"] == "embed" and entry in ("overwrite", "add"):
            assert r["patched_score"] == pytest.approx(r["clean_score"], abs=1e-4)
    assert (tmp_path / "tracing_heatmap.png").stat().st_size > 0
    store = ActivationStore(tmp_path / "tracing_representations")
    qid = records[0]["question_id"]
    names = sorted(k.split("/", 1)[1] for k in store.keys() if k.startswith(qid))
    assert names == ["clean", "motion_destroy", "reverse"]
    assert json.loads(out.read_text())["records"] == records
