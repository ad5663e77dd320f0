"""vlminterp.sweep.patch_sweep against one plain forward per condition with a hand-written hook,
and its reuse strategies against the unreused one."""

import warnings

import numpy as np
import pytest
import torch
from planted import attend_both_ways
from support import clean_and_counterfactual, media_pair, tiny

from vlminterp import sweep
from vlminterp.metrics import logit_diff

pytestmark = pytest.mark.usefixtures("one_thread")


def metric(logits):
    return logit_diff(logits, 5, 7)


def _groups(vlm, inputs):
    vis = vlm.layout(inputs)[0].visual
    return {"first visual": vis[: len(vis) // 2].tolist(), "last visual": vis[len(vis) // 2:].tolist()}


def _module(vlm, site):
    """(module, pre-hook?, element of a tuple output) of a site, in plain HF terms."""
    layers = vlm.torch_model.model.language_model.layers
    kind, layer = site.kind, site.layer
    if kind == "embed":
        return layers[0], True
    if kind == "resid":
        return layers[layer], False
    if kind == "attn":
        return layers[layer].self_attn, False
    if kind == "mlp":
        return layers[layer].mlp, False
    if kind == "z":
        return layers[layer].self_attn.o_proj, True
    return getattr(layers[layer].self_attn, f"{kind}_proj"), False


def _hooked_metric(vlm, inputs, cond, src, dst, at):
    """Plain PyTorch: grab the site's tensor of row ``src``, then run row ``dst`` alone with a
    hook writing those values at the condition's positions (and head columns)."""
    module, pre = _module(vlm, cond.site)
    first = lambda x: x[0] if isinstance(x, tuple) else x  # noqa: E731
    saved = {}
    grab = (module.register_forward_pre_hook(lambda m, a: saved.setdefault("x", a[0].clone()))
            if pre else module.register_forward_hook(
                lambda m, a, o: saved.setdefault("x", first(o).clone())))
    vlm.forward(inputs)
    grab.remove()
    cols = slice(None)
    if cond.heads is not None:
        hd = vlm.torch_model.model.language_model.layers[cond.site.layer].self_attn.head_dim
        cols = slice(cond.heads[0] * hd, (cond.heads[0] + 1) * hd)

    def put(x):
        x = x.clone()
        x[0, cond.positions, cols] = saved["x"][src, cond.positions, cols]
        return x

    hook = (module.register_forward_pre_hook(lambda m, a: (put(a[0]), *a[1:])) if pre else
            module.register_forward_hook(lambda m, a, o: (put(o[0]), *o[1:])
                                         if isinstance(o, tuple) else put(o)))
    try:
        logits = vlm.forward(inputs.select_rows([dst]))[:, at]
    finally:
        hook.remove()
    return float(metric(logits)[0])


@pytest.mark.parametrize("strategy,rows", [("rows", 3), ("layers", 1), ("layers+prefix", 2)])
def test_sweep_equals_one_hooked_forward_per_condition(hf_vlm, strategy, rows):
    inputs = clean_and_counterfactual(hf_vlm)
    at = hf_vlm.layout(inputs)[1].last
    grid = sweep.Grid(["embed", "resid.1", "attn.2", "mlp.0", "mlp.3"], _groups(hf_vlm, inputs))
    res = sweep.patch_sweep(hf_vlm, inputs, grid, metric, strategy=strategy,
                            rows_per_forward=rows, progress=False)
    assert res.meta["strategy"] == strategy and res.dims == ("site", "positions")
    conds, _ = grid.resolve(hf_vlm, hf_vlm.layout(inputs), 1)
    base = float(metric(hf_vlm.forward(inputs.select_rows([1]))[:, at])[0])
    assert res.destination == pytest.approx(base, abs=1e-5)
    for c in conds:
        want = _hooked_metric(hf_vlm, inputs, c, 0, 1, at) - base
        assert res.values[c.index] == pytest.approx(want, abs=1e-5), (str(c.site), c.index)
    assert np.abs(res.values).max() > 1e-4  # the sweep is not vacuous


def test_head_sweep_equals_hooked_forwards_noising(hf_vlm):
    inputs = clean_and_counterfactual(hf_vlm)
    at = hf_vlm.layout(inputs)[0].last
    grid = sweep.Grid(["z.1", "q.2", "k.0"], {"visual": "visual"}, heads="all")
    res = sweep.patch_sweep(hf_vlm, inputs, grid, metric, direction="noise", progress=False)
    conds, _ = grid.resolve(hf_vlm, hf_vlm.layout(inputs), 0)
    base = float(metric(hf_vlm.forward(inputs.select_rows([0]))[:, at])[0])
    for c in conds:
        want = _hooked_metric(hf_vlm, inputs, c, 1, 0, at) - base
        assert res.values[c.index] == pytest.approx(want, abs=1e-5), (str(c.site), c.heads)
    n_kv = sweep.Site.parse("k.0", 4)
    missing = np.isnan(res.values[2, 0])  # k under GQA has fewer heads: NaN cells
    from vlminterp.attention import heads
    info = heads(hf_vlm, 0)
    assert missing.sum() == info.n_heads - info.n_kv_heads and n_kv.per_head


def _big_grid(vlm):
    spans = {f"frames {a}-{a + 1}": f"visual_frames:{a}:{a + 2}" for a in (0, 2, 4, 6)}
    spans["text"] = "text"
    return sweep.Grid(sweep.sites("embed+resid", "all", vlm.n_layers) + ["attn.1", "mlp.2"], spans)


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_reuse_equals_the_unreused_sweep(rows):
    vlm = tiny("tiny-qwen2-vl")
    inputs = clean_and_counterfactual(vlm)
    grid = _big_grid(vlm)
    plain = sweep.patch_sweep(vlm, inputs, grid, metric, strategy="rows", rows_per_forward=rows,
                              progress=False)
    for strategy in ("layers", "layers+prefix", "auto"):
        got = sweep.patch_sweep(vlm, inputs, grid, metric, strategy=strategy,
                                rows_per_forward=rows, progress=False)
        np.testing.assert_allclose(got.values, plain.values, atol=1e-5, rtol=0)
        assert got.meta["strategy"] == ("layers+prefix" if strategy == "auto" else strategy)
    assert got.meta["known_without_a_row"] >= 1  # "text" at embed: the same in both rows


def test_reuse_skips_the_unchanged_layers_and_prefix():
    vlm = tiny("tiny-qwen2-vl")
    inputs = clean_and_counterfactual(vlm)
    seq = inputs["input_ids"].shape[1]
    layers = vlm.torch_model.model.language_model.layers
    seen = {i: [] for i in range(len(layers))}
    mlp_seen = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda m, a, o, i=i: seen[i].append(tuple(a[0].shape)))
        for i, layer in enumerate(layers)]  # a skipped layer runs none of its modules
    hooks.append(layers[3].mlp.down_proj.register_forward_hook(
        lambda m, a, o: mlp_seen.append(tuple(o.shape))))
    grid = sweep.Grid(["resid.2"], {"frames 4-5": "visual_frames:4:6"})
    try:
        res = sweep.patch_sweep(vlm, inputs, grid, metric, strategy="layers+prefix",
                                progress=False)
    finally:
        for h in hooks:
            h.remove()
    p0 = int(vlm.layout(inputs)[1].videos[0].groups[2].positions[0])
    assert res.meta["forwards"] == 2
    assert [len(seen[i]) for i in range(4)] == [1, 1, 1, 2]  # layers 0-2: the prepare pass only
    assert seen[3] == [(2, seq, 64), (1, seq - p0, 64)]  # the patched row: positions >= p0
    assert mlp_seen == [(2, seq, 64), (1, 1, 64)]  # final MLP: the metric's position only


def test_a_bidirectional_layer_makes_auto_drop_the_prefix_reuse():
    """A model whose layer 1 attends both ways breaks the prefix reuse (earlier positions see
    the patch); the sweep must notice, say so, and still equal the plain sweep."""
    vlm = tiny("tiny-qwen2-vl")
    inputs = clean_and_counterfactual(vlm)
    handle = attend_both_ways(vlm, 1)
    grid = sweep.Grid(["embed", "resid.0", "resid.1"], {"frames 4-5": "visual_frames:4:6"})
    try:
        plain = sweep.patch_sweep(vlm, inputs, grid, metric, strategy="rows", progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = sweep.patch_sweep(vlm, inputs, grid, metric, progress=False)
        forced = sweep.patch_sweep(vlm, inputs, grid, metric, strategy="layers+prefix",
                                   progress=False)
    finally:
        handle.remove()
    assert got.meta["strategy"] == "layers"
    assert any("keys/values does not reproduce" in str(w.message) for w in caught)
    np.testing.assert_allclose(got.values, plain.values, atol=1e-5, rtol=0)
    assert np.abs(forced.values - plain.values).max() > 1e-4  # what the check guarded against


def test_patching_every_differing_position_restores_the_source_run():
    vlm = tiny("tiny-qwen2-vl")
    inputs = clean_and_counterfactual(vlm)
    grid = sweep.Grid(["embed"], {"visual": "visual", "text": "text"})
    for strategy in ("rows", "layers+prefix"):
        for direction in ("denoise", "noise"):
            res = sweep.patch_sweep(vlm, inputs, grid, metric, strategy=strategy,
                                    direction=direction, progress=False)
            assert res.normalised()[0, 0] == pytest.approx(1.0, abs=1e-4)
            assert res.values[0, 1] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("model_id", ["tiny-qwen3-vl", "tiny-gemma4"])
def test_carrying_late_inputs_makes_a_full_residual_patch_reproduce_the_source_run(model_id):
    """Qwen3-VL adds deepstack features after layers 0-1, Gemma 4 feeds every layer inputs
    derived from the LM input: patching *every* position of the residual stream at a layer
    reproduces the source run only if those later inputs come along (``carry_late``)."""
    vlm = tiny(model_id)
    inputs = media_pair(vlm, "video")
    grid = sweep.Grid(["embed", "resid.0", "resid.1"], {"all": "all"})
    at = vlm.layout(inputs)[1].last
    scores = metric(vlm.forward(inputs)[:, at])  # plain forward of [clean, counterfactual]
    want = float(scores[0] - scores[1])
    got = {carry: sweep.patch_sweep(vlm, inputs, grid, metric, progress=False, carry_late=carry)
           for carry in (True, False)}
    assert abs(want) > 1e-3
    np.testing.assert_allclose(got[True].values[:, 0], want, atol=1e-5)
    assert abs(got[False].values[0, 0] - want) > 1e-5  # embed: the LM input alone falls short


def test_grid_errors_name_the_input():
    vlm = tiny("tiny-qwen2-vl")
    inputs = clean_and_counterfactual(vlm)
    lay = vlm.layout(inputs)
    with pytest.raises(ValueError, match="site 'resid.9'.*beyond"):
        sweep.Grid(["resid.9"], ["visual"]).resolve(vlm, lay, 1)
    with pytest.raises(ValueError, match="site 'blocks.1' is not understood"):
        sweep.Grid(["blocks.1"], ["visual"]).resolve(vlm, lay, 1)
    with pytest.raises(ValueError, match=r"grid.heads: sites \['resid.1'\] have no heads"):
        sweep.Grid(["resid.1", "z.1"], ["visual"], heads="all").resolve(vlm, lay, 1)
    with pytest.raises(ValueError, match=r"grid.positions\['far'\]: positions outside"):
        sweep.Grid(["resid.1"], {"far": [10_000]}).resolve(vlm, lay, 1)
    with pytest.raises(ValueError, match="strategy 'fast'"):
        sweep.patch_sweep(vlm, inputs, sweep.Grid(["embed"], ["visual"]), metric,
                          strategy="fast", progress=False)
    with pytest.raises(ValueError, match="direction 'up'"):
        sweep.patch_sweep(vlm, inputs, sweep.Grid(["embed"], ["visual"]), metric,
                          direction="up", progress=False)
