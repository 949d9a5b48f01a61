"""benchmarks/brain_change_decomposition.py: the demo models' counterfactual error, decomposed."""

import json
import warnings

import numpy as np
import pytest

import medcausal as mc
from medcausal.demo import DEMO_SETTINGS


def test_the_decomposition_adds_up_and_names_a_missing_model(tmp_path, load_benchmark, monkeypatch):
    script = load_benchmark("brain_change_decomposition")
    s = DEMO_SETTINGS["quick"]
    sim = mc.synthetic.BrainMRI(shape=(s["size"], s["size"]), progress=False)
    train = sim.sample(64, seed=0)
    with pytest.raises(SystemExit, match="model.mcm"):
        script.main(["--models", str(tmp_path), "--quick", "--out", str(tmp_path)])
    for name, file in script.MODELS.items():  # barely trained: the script only needs the demo's files
        model = mc.CausalModel(sim.graph, mechanisms={"mri": {"name": name, **s["image_hparams"]}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(train, seed=0, max_steps=2, batch_size=32, verbose=False)
        model.save(tmp_path / file)
    monkeypatch.setitem(DEMO_SETTINGS["quick"], "n_test", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script.main(["--models", str(tmp_path), "--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "brain_change_decomposition.json").read_text())["rows"]
    assert len(rows) == 6 and {r["model"] for r in rows} == {"hvae", "cvae"}
    for r in rows:  # the MAE splits into the changed pixels and the rest
        p = r["changed_fraction"]
        assert r["cf_mae"] == pytest.approx(p * r["missed"] + (1 - p) * r["error_elsewhere"], rel=1e-6)
        assert np.isfinite(r["true_parents_mae"]) and r["unchanged_mae"] > 0
    assert "captured" in (tmp_path / "brain_change_decomposition.md").read_text()
