"""The demos. The brain-MRI demo (``medcausal demo --quick``) is tested through the CLI in
tests/test_cli.py::test_demo_quick; here, the earlier tabular demo, kept as a function."""

import json

import pytest

from medcausal.demo import DEMO_SETTINGS, QUERIES, run_tabular_demo
from medcausal.errors import MedCausalError


def test_demo_asks_the_issue_interventions_at_the_promised_sizes():
    # do(age), do(disease), do(sex) on 64x64 scans in the full run; toy sizes in --quick.
    assert [next(iter(q)) for q in QUERIES.values()] == ["age", "disease", "sex"]
    assert QUERIES["do(age+20)"]["age"](60.0) == 80.0 and QUERIES["do(sex flip)"]["sex"](1) == 0
    assert DEMO_SETTINGS["full"]["size"] == 64 and DEMO_SETTINGS["quick"]["size"] < 64


@pytest.mark.slow
def test_tabular_demo_flow_beats_additive(tmp_path):
    report = run_tabular_demo(tmp_path, quick=True, verbose=False)
    rows = json.loads((tmp_path / "report.json").read_text())["results"]
    flow = [r["cf_mse_x100"] for r in rows if r["mechanism"] == "flow"]
    additive = [r["cf_mse_x100"] for r in rows if r["mechanism"] == "additive"]
    assert len(flow) == len(additive) == 3
    assert sum(flow) < sum(additive)  # exact abduction beats the additive model on this SCM
    assert report.exists() and (tmp_path / "counterfactuals.png").stat().st_size > 1000


def test_a_failed_demo_rerun_leaves_no_stale_report(tmp_path, monkeypatch):
    import medcausal.synthetic
    from medcausal.demo import run_tabular_demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("# report of an earlier run")
    (out / "report.json").write_text("{}")

    def broken(*a, **k):
        raise MedCausalError("simulator failed")

    monkeypatch.setattr(medcausal.synthetic, "scm", broken)
    with pytest.raises(MedCausalError):
        run_tabular_demo(out, quick=True, verbose=False)
    # was: the earlier report stayed beside whatever this run had written, looking complete
    assert not (out / "report.md").exists() and not (out / "report.json").exists()
