"""SweepResult (the labelled array), Site specs and the sweep heatmap: no model needed."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from vlminterp.plots import sweep_heatmap
from vlminterp.sweep import Site, SweepResult, sites
from vlminterp.sweep.exact import parse_memory


def _result(heads=False):
    values = np.arange(6, dtype=float).reshape(2, 3) - 2
    dims, coords = ("site", "positions"), {"site": ["embed", "resid.0"],
                                           "positions": ["a", "b", "c"]}
    if heads:
        values = np.stack([values, values * 2], -1)
        values[1, 2, 1] = np.nan
        dims, coords = dims + ("head",), {**coords, "head": [0, 1]}
    return SweepResult(values, dims, coords, source=3.0, destination=1.0,
                       n_positions={"a": 4, "b": 4, "c": 16}, meta={"direction": "denoise"})


def test_records_normalised_and_top():
    r = _result()
    assert r.normalised()[1, 2] == pytest.approx(3 / 2)
    recs = r.records()
    assert len(recs) == 6 and recs[5] == {"site": "resid.0", "positions": "c", "value": 3.0,
                                          "normalised": 1.5}
    assert r.top(2) == [("resid.0", "c"), ("embed", "a")]  # |3| then |-2|
    zero = SweepResult(r.values, r.dims, r.coords, 1.0, 1.0)
    assert np.isnan(zero.normalised()).all()  # no total effect: undefined, not inf


def test_to_frame_gives_the_records_or_names_pandas():
    r = _result()
    try:
        frame = r.to_frame()
    except ImportError as e:
        assert "pandas" in str(e)
    else:
        assert frame.to_dict("records") == r.records()


def test_heatmap_with_heads_writes_a_png(tmp_path):
    path = sweep_heatmap(_result(heads=True), tmp_path / "h.png", normalised=True)
    assert path.stat().st_size > 1000
    assert sweep_heatmap(_result(), tmp_path / "p.png").stat().st_size > 1000


@given(st.sampled_from(["resid", "attn", "mlp", "q", "k", "v", "z"]), st.integers(-6, 5))
def test_site_specs_round_trip(kind, layer):
    site = Site.parse(f"{kind}.{layer}", 6)
    assert site.layer == layer % 6 and Site.parse(str(site), 6) == site
    assert site.first_layer == site.layer + (kind == "resid")
    assert Site.parse("embed", 6).order < site.order


def test_sites_helper():
    assert sites("embed+resid", "all", 2) == ["embed", "resid.0", "resid.1"]
    assert sites("z", [3]) == ["z.3"]
    with pytest.raises(ValueError, match="n_layers"):
        sites("resid")


@given(st.integers(1, 4096), st.sampled_from([("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30),
                                              ("MB", 10**6), ("GB", 10**9)]))
def test_parse_memory_reads_units(n, unit):
    name, size = unit
    assert parse_memory(f"{n}{name}") == n * size
    assert parse_memory(f"{n} {name.lower()}") == n * size


@given(st.floats(0.001, 1.0))
def test_parse_memory_reads_a_fraction(x):
    assert parse_memory(repr(x)) == pytest.approx(x)


@pytest.mark.parametrize("text", ["abc", "-1", "0", "4XB", "0.0", "GiB"])
def test_parse_memory_errors_name_the_flag(text):
    with pytest.raises(ValueError, match="^--max_memory"):
        parse_memory(text, "--max_memory")
