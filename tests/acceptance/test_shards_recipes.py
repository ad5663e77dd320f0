"""Issue 14 on the recipes: shards merged by `python -m vlminterp.merge` write byte for byte what
one run writes (JSON, resume log, figures, activation stores); --dtype keys the results and
--device_map does not; loading flags that cannot work stop with one line."""

import json
import shutil

import pytest
import torch
from support import tiny

import recipes.counterfactual_causal_tracing as tracing_recipe
import recipes.neo2024_logit_lens as lens_recipe
import recipes.neo2024_object_ablation as ablation_recipe
import recipes.video_inference as inference_recipe
from vlminterp import merge
from vlminterp.data.synthetic import write_dataset
from vlminterp.store import ActivationStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("videos") / "data", 3)  # 9 questions


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny-qwen2-vl saved as a checkpoint folder: loaded by from_pretrained, so device maps
    apply and the merge loads it without weights."""
    vlm = tiny("tiny-qwen2-vl")
    path = tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl"
    vlm.torch_model.save_pretrained(path)
    vlm.processor.save_pretrained(path)
    return path


def _set_aside(run_dir, names, to):
    to.mkdir()
    for name in names:
        shutil.move(str(run_dir / name), str(to / name))


def test_three_tracing_shards_merge_into_the_single_run(data, checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--annotations", str(data), "--model_id", str(checkpoint), "--layers", "embed,1",
            "--swap_spans", "none", "--dump_representations", "--output", str(run / "t.json")]
    tracing_recipe.main(argv)  # the single run, set aside; the merge then writes the same paths
    outputs = ["t.json", "t.jsonl", "t_heatmap.png", "t_representations"]
    _set_aside(run, outputs, tmp_path / "single")
    sizes = []
    for i in range(3):
        shard = tracing_recipe.main(argv + ["--shard", f"{i}/3"])
        sizes.append(len({r["question_id"] for r in shard["records"]}))
    assert sorted(sizes) == [1, 3, 5]  # every shard ran samples; together all 9
    capsys.readouterr()
    merged = merge.main([str(run / "t.shard-*-of-3.json")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Saved 36 records") and str(run / "t.json") in last
    for name in outputs[:3]:
        assert (run / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert len({r["question_id"] for r in merged["records"]}) == 9
    one, many = ActivationStore(tmp_path / "single" / "t_representations"), \
        ActivationStore(run / "t_representations")
    assert many.keys() == one.keys() and len(one) == 27  # clean + 2 counterfactuals each
    for key in one.keys():
        assert many.meta(key) == one.meta(key)
        for name, t in one.get(key).items():
            torch.testing.assert_close(many.get(key)[name], t, atol=0, rtol=0)


def test_lens_shards_merge_with_figures_and_html(tmp_path):
    out = tmp_path / "run" / "l.json"
    argv = ["--synthetic", "4", "--heatmap_images", "2", "--html_images", "2", "--output", str(out)]
    lens_recipe.main(argv)
    outputs = ["l.json", "l.jsonl", "l.png", "l_heatmap_0.png", "l_heatmap_1.png", "l.html"]
    _set_aside(out.parent, outputs, tmp_path / "single")
    for i in range(2):
        lens_recipe.main(argv + ["--shard", f"{i}/2"])
    merge.main([str(out)])  # the plain output: every shard of it
    for name in outputs:  # the JSON's settings included (same --output)
        assert (out.parent / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name


def test_ablation_shards_share_the_mean_over_every_image(tmp_path):
    """The ablation vector is the mean over the whole run's images: each shard computes it
    over all of them, so its records equal the single run's."""
    out = tmp_path / "run" / "a.json"
    argv = ["--synthetic", "4", "--keep_all", "--tasks", "vqa", "--sizes", "2", "--ig_steps",
            "2", "--output", str(out)]
    ablation_recipe.main(argv)
    outputs = ["a.json", "a.jsonl", "a_vqa.png"]
    _set_aside(out.parent, outputs, tmp_path / "single")
    for i in range(2):
        ablation_recipe.main(argv + ["--shard", f"{i}/2"])
    merge.main([str(out)])
    for name in outputs:
        assert (out.parent / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name


def _fails(recipe, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        recipe.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if "sample/s]" not in line]
    assert info.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_an_unfinished_shard_is_refused_until_it_resumes(data, tmp_path, capsys):
    out = tmp_path / "i.json"
    argv = ["--annotations", str(data), "--output", str(out), "--limit", "4"]
    for i in range(2):
        inference_recipe.main(argv + ["--shard", f"{i}/2"])
    log = tmp_path / "i.shard-1-of-2.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]))  # killed before its last sample
    line = _fails(merge, [str(tmp_path / "i.shard-*")], capsys)
    assert "shard 1/2 is incomplete: 1 of its" in line and "rerun it" in line
    assert not out.exists()
    inference_recipe.main(argv + ["--shard", "1/2"])  # resumes: only the missing sample
    merged = merge.main([str(out)])
    assert [r["question_id"] for r in merged["records"]] == \
        [e["question_id"] for e in json.loads(data.read_text())[:4]]


def test_dtype_keys_results_and_device_map_does_not(data, checkpoint, tmp_path, capsys,
                                                    monkeypatch):
    import vlminterp.models
    from vlminterp.data.video import read_frames
    from vlminterp.video.multiple_choice import mc_prompt, option_ids, option_scores

    out = tmp_path / "i.json"
    argv = ["--annotations", str(data), "--model_id", str(checkpoint), "--output", str(out),
            "--limit", "2"]
    plain = inference_recipe.main(argv)
    device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                  **{f"model.language_model.layers.{i}": "disk" if i in (1, 2) else "cpu"
                     for i in range(4)},
                  "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    offload = ["--device_map", json.dumps(device_map), "--offload_folder", str(tmp_path / "off")]
    capsys.readouterr()
    inference_recipe.main(argv + offload)  # where weights live is not a result flag: resumes
    assert "skipping 2 of 2 samples already done" in capsys.readouterr().err
    loaded, real_load = [], vlminterp.models.load
    monkeypatch.setattr(vlminterp.models, "load", lambda *a, **k: loaded.append(real_load(*a, **k))
                        or loaded[-1])
    spread = inference_recipe.main(argv + offload + ["--restart"])
    placed = loaded[0].torch_model.hf_device_map  # layers 1-2 really were on disk
    assert placed["model.language_model.layers.1"] == "disk" == placed["model.language_model.layers.2"]
    assert spread["records"] == plain["records"]
    line = _fails(inference_recipe, argv + ["--dtype", "bfloat16"], capsys)
    assert '--dtype null -> "bfloat16"' in line and "--restart" in line
    half = inference_recipe.main(argv + ["--dtype", "bfloat16", "--restart"])
    import vlminterp

    vlm = vlminterp.load(str(checkpoint), dtype=torch.bfloat16)
    entries = json.loads(data.read_text())[:2]
    for rec, entry in zip(half["records"], entries):
        frames = read_frames(data.parent / "videos" / entry["video_name"], num_frames=8)
        want = option_scores(vlm, frames, mc_prompt(entry["question"], entry["candidates"]),
                             option_ids(vlm, len(entry["candidates"])))
        assert rec["scores"] == pytest.approx(want, abs=0, rel=0)
    assert [r["scores"] for r in half["records"]] != [r["scores"] for r in plain["records"]]


@pytest.mark.parametrize("flags,message", [
    (["--device_map", "auto"], "--device_map: 'tiny-qwen2-vl' is built in memory"),
    (["--quantization", "4bit", "--model_id", "/nonexistent/Qwen2-VL-7B"], "--quantization 4bit"),
    (["--shard", "3/3"], "--shard '3/3': shard 3 of 3 is not one of 0..2"),
    (["--shard", "auto"], "--shard auto: none of RANK/WORLD_SIZE"),
])
def test_bad_loading_and_shard_flags_are_one_line_before_any_work(data, tmp_path, capsys, flags,
                                                                   message, monkeypatch):
    import vlminterp.models

    for var in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(vlminterp.models, "load", lambda *a, **k: pytest.fail("loaded a model"))
    line = _fails(inference_recipe, ["--annotations", str(data), "--output",
                                     str(tmp_path / "i.json"), *flags], capsys)
    assert message in line
    assert not (tmp_path / "i.jsonl").exists()
