"""The sweep writes tidy, pandas-readable results with backprop as the baseline."""

import csv
import json

import pytest

from chainprod.bench import FIELDS, Sweep, problems, read_results, run_sweep


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    sweep = Sweep(depths=[16, 64], widths=[4], workers=[1, 2], backends=["vectorized", "threads", "nosuch"],
                  methods=["backprop", "auto", "sklansky"], structures=["dense", "diagonal"], repeats=2)
    meta = run_sweep(sweep, str(out), progress=False, command="test", log=lambda *a: None)
    return out, meta


def test_csv_rows_and_columns(small_sweep):
    out, meta = small_sweep
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == FIELDS
    assert all(r["status"] == "ok" for r in rows)
    # backprop measured for every problem
    probs = {(r["structure"], r["depth"], r["width"]) for r in rows}
    bps = {(r["structure"], r["depth"], r["width"]) for r in rows if r["method"] == "backprop"}
    assert probs == bps and len(probs) == 4
    for r in rows:
        for k in ("forward_median", "backward_median", "total_median", "speedup_backward", "predicted_total"):
            assert float(r[k]) > 0
        assert float(r["backward_min"]) <= float(r["backward_median"]) <= float(r["backward_max"])
    # auto rows where the model chose backprop itself are labelled so, and have no scan trace
    assert all(r["schedule"] != "backprop (auto)" or r["method"] == "auto" for r in rows)
    scans = [r for r in rows if not r["schedule"].startswith("backprop")]
    assert all(int(r["measured_rounds"]) >= 1 and int(r["peak_concurrency"]) >= 1 for r in scans)
    assert all(float(r["flops"]) > 0 and float(r["brent_bound"]) > 0 for r in scans)


def test_missing_backend_is_skipped_not_fatal(small_sweep):
    out, meta = small_sweep
    data = json.loads((out / "results.json").read_text())
    assert any(s.get("backend") == "nosuch" for s in data["skipped"])
    assert data["command"] == "test" and "numpy" in data["versions"] and data["machine"]["cpus"]


def test_read_back(small_sweep):
    out, _ = small_sweep
    rows = read_results(str(out))
    assert isinstance(rows[0]["depth"], int) and isinstance(rows[0]["backward_median"], float)
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(out / "results.csv")
    assert set(FIELDS) <= set(df.columns) and len(df) == len(rows)
    pd.read_json(out / "results.json", typ="series")


def test_problems_order_and_product():
    s = Sweep(depths=[8, 64], widths=[2, 4], structures=["dense"], batches=[1, 2], dtypes=["float64"])
    ps = problems(s)
    assert len(ps) == 8 and ps[0][1] == 8
