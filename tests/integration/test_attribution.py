"""vlminterp.sweep.attribution: each variant against a hand computation in plain PyTorch
(hooks + autograd on the HF model), and AtP against exact patching on a planted model."""

import numpy as np
import pytest
import torch
from support import clean_and_counterfactual, tiny
from planted import attend_both_ways, metric as planted_metric, planted_qwen2_vl
from scipy.stats import spearmanr

from vlminterp import sweep
from vlminterp.metrics import logit_diff

pytestmark = pytest.mark.usefixtures("one_thread")


def metric(logits):
    return logit_diff(logits, 5, 7)


def _modules(vlm, site):
    layers = vlm.torch_model.model.language_model.layers
    kind, layer = site.kind, site.layer
    table = {"embed": (layers[0], True), "resid": (layers[layer or 0], False)}
    if kind in table:
        return table[kind]
    attn = layers[layer].self_attn
    return {"attn": (attn, False), "mlp": (layers[layer].mlp, False), "z": (attn.o_proj, True),
            "q": (attn.q_proj, False), "k": (attn.k_proj, False),
            "v": (attn.v_proj, False)}[kind]


def _capture(vlm, sites, store, grad=False, lm_input=None):
    """Hooks saving each site's tensor (retain_grad with ``grad``); ``lm_input`` replaces
    layer 0's hidden states (a leaf that requires grad) — the IG path."""
    handles = []
    layers = vlm.torch_model.model.language_model.layers
    for site in sites:
        module, pre = _modules(vlm, site)

        def keep(x, site=site):
            x = x[0] if isinstance(x, tuple) else x
            if grad:
                x.retain_grad()
            store[site] = x

        if site.kind == "embed" and lm_input is not None:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, keep=keep: keep(a[0]))
                       if pre else module.register_forward_hook(lambda m, a, o, keep=keep: keep(o)))
    if lm_input is not None:
        def put(m, args, kwargs):
            store[sweep.Site("embed")] = lm_input
            return (lm_input, *args[1:]), kwargs
        handles.insert(0, layers[0].register_forward_pre_hook(put, with_kwargs=True))
    return handles


def _run(vlm, inputs, sites, grad=False, lm_input=None, extra=lambda: []):
    """Forward (and backward with ``grad``) with the capture hooks, then ``extra()``'s hooks
    (registered after them: they see the original outputs)."""
    store = {}
    handles = _capture(vlm, sites, store, grad, lm_input)
    handles += extra()
    try:
        with torch.set_grad_enabled(grad):
            logits = vlm.torch_model(**dict(inputs)).logits[:, -1]
            y = metric(logits).sum()
            if grad:
                y.backward()
    finally:
        for h in handles:
            h.remove()
    return store


def _cells(c):
    return (c.positions,) if c.heads is None else (c.positions[:, None], list(c.heads))


def _heads_view(vlm, site, x):
    if site.per_head:
        hd = vlm.torch_model.model.language_model.layers[site.layer].self_attn.head_dim
        return x.unflatten(-1, (-1, hd))
    return x


def _estimate(vlm, c, both, grads, dst):
    a, b = (_heads_view(vlm, c.site, both[c.site][r]) for r in (1 - dst, dst))
    g = _heads_view(vlm, c.site, grads[c.site][0])
    cell = _cells(c)
    return float(((a[cell] - b[cell]) * g[cell]).sum())


GRIDS = [(["embed", "resid.1", "attn.2", "mlp.0"], None), (["z.1", "v.2"], "all")]


@pytest.mark.parametrize("sites,heads", GRIDS)
def test_plain_atp_equals_hand_gradient(hf_vlm, sites, heads):
    inputs = clean_and_counterfactual(hf_vlm)
    vis = hf_vlm.layout(inputs)[1].visual
    grid = sweep.Grid(sites, {"a": vis[:5].tolist(), "b": vis[5:].tolist()}, heads=heads)
    got = sweep.attribution(hf_vlm, inputs, grid, metric, steps=0, qk_fix=False)
    conds, _ = grid.resolve(hf_vlm, hf_vlm.layout(inputs), 1)
    parsed = sorted({c.site for c in conds}, key=lambda s: s.order)
    both = _run(hf_vlm, inputs, parsed)
    grads = {s: t.grad for s, t in _run(hf_vlm, inputs.select_rows([1]), parsed, True).items()}
    for c in conds:
        want = _estimate(hf_vlm, c, both, grads, 1)
        assert got.values[c.index] == pytest.approx(want, rel=1e-4, abs=1e-6), str(c.site)
    assert got.method == "atp" and np.nanmax(np.abs(got.values)) > 1e-5


def test_integrated_gradients_equal_the_hand_riemann_sum():
    vlm = tiny("tiny-qwen2-vl")
    inputs = clean_and_counterfactual(vlm)
    grid = sweep.Grid(["embed", "resid.0", "mlp.2"], ["visual_frames:0:4", "visual_frames:4:8"])
    steps = 3
    got = sweep.attribution(vlm, inputs, grid, metric, steps=steps)
    conds, _ = grid.resolve(vlm, vlm.layout(inputs), 1)
    parsed = sorted({c.site for c in conds}, key=lambda s: s.order)
    both = _run(vlm, inputs, parsed)
    x_src, x_dst = both[sweep.Site("embed")][0], both[sweep.Site("embed")][1]
    total = {}
    for k in range(steps):
        alpha = (k + 0.5) / steps
        leaf = (x_dst + alpha * (x_src - x_dst))[None].clone().requires_grad_(True)
        store = _run(vlm, inputs.select_rows([1]), parsed, True, lm_input=leaf)
        for s, t in store.items():
            total[s] = total.get(s, 0) + t.grad / steps
    for c in conds:
        want = _estimate(vlm, c, both, total, 1)
        assert got.values[c.index] == pytest.approx(want, rel=1e-4, abs=1e-6), str(c.site)


def test_qk_fix_equals_the_exact_pattern_change_times_its_gradient():
    """For a query / key cell: (A_patched - A) . dm/dA, with A_patched the pattern HF's own
    eager attention returns when the q/k projection is patched by a hook."""
    vlm = tiny("tiny-qwen2-vl")
    inputs = clean_and_counterfactual(vlm)
    layer = 1
    grid = sweep.Grid([f"q.{layer}", f"k.{layer}"], ["visual_frames:2:4"], heads="all")
    got = sweep.attribution(vlm, inputs, grid, metric, steps=0, qk_fix=True)
    assert got.method == "atp*" and got.meta["qk_fix"]
    conds, _ = grid.resolve(vlm, vlm.layout(inputs), 1)
    both = _run(vlm, inputs, [c.site for c in conds[:1]] + [conds[-1].site])
    dst = inputs.select_rows([1])
    with torch.enable_grad():
        out = vlm.torch_model(**dict(dst), output_attentions=True)
        pattern = out.attentions[layer]
        pattern.retain_grad()
        metric(out.logits[:, -1]).sum().backward()
    for c in conds:
        module, _ = _modules(vlm, c.site)
        hd = 16
        cols = slice(c.heads[0] * hd, (c.heads[0] + 1) * hd)
        src = both[c.site][0]

        def put(m, a, o, c=c, cols=cols, src=src):
            o = o.clone()
            o[0, c.positions, cols] = src[c.positions, cols]
            return o
        handle = module.register_forward_hook(put)
        try:
            with torch.no_grad():
                patched = vlm.torch_model(**dict(dst), output_attentions=True).attentions[layer]
        finally:
            handle.remove()
        want = float(((patched - pattern.detach()) * pattern.grad).sum())
        assert got.values[c.index] == pytest.approx(want, rel=1e-3, abs=1e-6), \
            (str(c.site), c.heads)
    assert np.nanmax(np.abs(got.values)) > 1e-6


def test_grad_drop_equals_hand_backward_with_each_layer_detached():
    vlm = tiny("tiny-llava")
    inputs = clean_and_counterfactual(vlm)
    grid = sweep.Grid(["embed", "resid.1", "attn.2"], {"visual": "visual"})
    got = sweep.attribution(vlm, inputs, grid, metric, grad_drop=True)
    assert got.meta["signed"] is False and got.method == "atp*-graddrop"
    conds, _ = grid.resolve(vlm, vlm.layout(inputs), 1)
    parsed = [c.site for c in conds]
    both = _run(vlm, inputs, parsed)
    layers = vlm.torch_model.model.language_model.layers
    per_layer = []
    for layer in layers:
        def detach(layer=layer):
            return [layer.self_attn.register_forward_hook(lambda m, a, o: (o[0].detach(), *o[1:])),
                    layer.mlp.register_forward_hook(lambda m, a, o: o.detach())]
        store = _run(vlm, inputs.select_rows([1]), parsed, True, extra=detach)
        grads = {s: (t.grad if t.grad is not None else torch.zeros_like(t))
                 for s, t in store.items()}
        per_layer.append([_estimate(vlm, c, both, grads, 1) for c in conds])
    want = np.abs(np.array(per_layer)).sum(0) / (len(layers) - 1)
    np.testing.assert_allclose(got.values.ravel(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 3])
def test_atp_ranks_the_planted_effects_like_exact_patching(seed):
    vlm, inputs = planted_qwen2_vl(seed)
    spans = {f"frames {a}-{a + 1}": f"visual_frames:{a}:{a + 2}" for a in (0, 2, 4, 6)}
    grid = sweep.Grid(sweep.sites("embed+resid", "all", vlm.n_layers), spans)
    exact = sweep.patch_sweep(vlm, inputs, grid, planted_metric, progress=False)
    e = np.where(np.abs(exact.values) < 1e-5, 0.0, exact.values)  # batching noise is 0
    # the planted mechanism: nothing in frames 0-1 or from layer 2 on; redness order; the
    # layer-1 head has read the corrupt tokens before layer 1's output is patched
    assert (e[:, 0] == 0).all() and (e[3:] == 0).all()
    assert (e[0, 2] > e[0, 3] > e[0, 1] > 0) and e[0, 2] == pytest.approx(e[1, 2])
    assert e[2, 2] < e[1, 2]
    estimate = sweep.attribution(vlm, inputs, grid, planted_metric, steps=4)
    rho = spearmanr(e.ravel(), estimate.values.ravel())[0]
    overlap = len(set(exact.top(5)) & set(estimate.top(5)))  # the top 5 are far from noise
    assert rho >= 0.9 and overlap >= 4, (rho, overlap)


def test_whole_model_gradients_where_the_language_model_alone_cannot_replay_the_runs():
    """Layer 1 attending both ways: earlier positions see the patch, so the prefix cache of
    the language-model-only path is wrong; attribution must notice (the source run is not
    reproduced) and take its gradients through the whole model — equal to hand autograd."""
    vlm = tiny("tiny-qwen2-vl")
    inputs = clean_and_counterfactual(vlm)
    handle = attend_both_ways(vlm, 1)
    grid = sweep.Grid(["embed", "resid.0", "mlp.2"], ["visual_frames:0:4", "visual_frames:4:8"])
    try:
        got = sweep.attribution(vlm, inputs, grid, metric, steps=0)
        conds, _ = grid.resolve(vlm, vlm.layout(inputs), 1)
        parsed = sorted({c.site for c in conds}, key=lambda s: s.order)
        both = _run(vlm, inputs, parsed)
        grads = {s: t.grad for s, t in _run(vlm, inputs.select_rows([1]), parsed, True).items()}
    finally:
        handle.remove()
    assert got.meta["gradient_path"] == "whole model"
    for c in conds:
        want = _estimate(vlm, c, both, grads, 1)
        assert got.values[c.index] == pytest.approx(want, rel=1e-4, abs=1e-6), str(c.site)
