"""The brain benchmark's summary over --seed runs (no model is trained: run summaries are given)."""

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("brain_counterfactuals")


def _mech(cf_maes, fid):
    q = {f"q{i}": {"cf": {"mae": v}, "null_abduction": {"mae": 4 * v}} for i, v in enumerate(cf_maes)}
    return {"queries": q, "fid_samples_vs_real": fid, "hparams": {"steps": 20, "depth": 1.0, "guidance": 1.0}}


def _run(seed, hvae, cvae, diff, complete=True, size=32):
    cmd = "python benchmarks/brain_counterfactuals.py --size 32" + {0: "", 1: " --seed 1"}.get(seed, f" --seed={seed}")
    return {"command": cmd, "complete": complete, "size": size, "n_train": 2000, "n_test": 40, "steps": 3000,
            "batch_size": 32, "lr": 3e-3, "n_realism": 500, "fid_real_vs_real": 0.1 + seed / 100,
            "results": {"hvae": _mech(*hvae), "cvae": _mech(*cvae), "image-diffusion": _mech(*diff)}}


def _three():
    # per seed: hvae CF MAE 0.015/0.016/0.017 (query means), cvae 0.014 always, diffusion 0.012;
    # FID: hvae 0.3/0.2/0.4, diffusion 0.25/0.3/0.2 -> paired differences -0.05/+0.1/-0.2
    return {"s0.json": _run(0, ([0.010, 0.020], 0.3), ([0.014, 0.014], 0.9), ([0.012, 0.012], 0.25)),
            "s1.json": _run(1, ([0.012, 0.020], 0.2), ([0.014, 0.014], 0.5), ([0.012, 0.012], 0.3)),
            "s2.json": _run(2, ([0.014, 0.020], 0.4), ([0.014, 0.014], 0.7), ([0.012, 0.012], 0.2))}


def test_means_sds_and_paired_differences_match_hand_values(bench):
    t = bench.summarize_runs(_three())
    assert t["seeds"] == [0, 1, 2]
    assert t["models"]["hvae"]["cf_mae"]["per_seed"] == pytest.approx([0.015, 0.016, 0.017])
    assert t["models"]["hvae"]["cf_mae"]["mean"] == pytest.approx(0.016)
    assert t["models"]["hvae"]["cf_mae"]["sd"] == pytest.approx(0.001)  # ddof 1
    assert t["models"]["hvae"]["queries"]["q0"]["mean"] == pytest.approx(0.012)
    assert t["fid_real_vs_real"]["mean"] == pytest.approx(0.11)
    fid = t["paired"]["image-diffusion - hvae fid"]
    assert fid["per_seed"] == pytest.approx([-0.05, 0.1, -0.2])
    assert fid["mean"] == pytest.approx(-0.05)
    assert t["paired"]["hvae - cvae cf_mae"]["mean"] == pytest.approx(0.002)
    md = bench.render_seed_markdown(t, "cmd")
    assert "image-diffusion: 20 DDIM steps, depth 1.0, guidance 1.0." in md
    assert "| hvae CF MAE below cvae's | 0.0020 ± 0.0010 | 0.0010 / 0.0020 / 0.0030 | MISSED |" in md
    assert "| image-diffusion FID at least as good as hvae's | -0.050 ± 0.150 |" in md
    assert "met |" in md.splitlines()[-2]  # the FID row: mean difference below zero


@pytest.mark.parametrize("break_it, message", [
    (lambda runs: runs["s1.json"].update(complete=False), "s1.json: the run is incomplete"),
    (lambda runs: runs["s0.json"].pop("results"), "s0.json: not a brain_counterfactuals.py result"),
    (lambda runs: runs["s2.json"].update(size=64), "s2.json: size=64 differs"),
    (lambda runs: runs["s2.json"].update(command=runs["s1.json"]["command"]), "same --seed 1"),
    (lambda runs: runs["s1.json"]["results"].pop("cvae"), "s1.json: mechanisms"),
    (lambda runs: runs["s2.json"]["results"]["image-diffusion"]["hparams"].update(guidance=2.0),
     "s2.json: image-diffusion's hyperparameters"),
])
def test_runs_that_cannot_be_pooled_are_refused_by_name(bench, break_it, message):
    runs = _three()
    break_it(runs)
    with pytest.raises(ValueError, match=message):
        bench.summarize_runs(runs)


def test_summarize_cli_writes_json_and_markdown(bench, tmp_path):
    paths = []
    for name, run in _three().items():
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(run))
    bench.main(["--summarize", *map(str, paths), "--out", str(tmp_path / "out"), "--stem", "seeds"])
    table = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert table["files"] == ["s0.json", "s1.json", "s2.json"]
    assert (tmp_path / "out" / "seeds.md").read_text().startswith("# Counterfactual brain scans over --seed 0, 1, 2")
    with pytest.raises(SystemExit, match="cannot read"):
        bench.main(["--summarize", str(tmp_path / "missing.json"), str(paths[0]), "--out", str(tmp_path)])


def test_finetuning_predictor_learns_the_parents_as_the_mechanism_sees_them(bench):
    # parent_nll reads the mechanism's parent layout (one-hot scanner, standardized volumes), so the
    # fine-tuning predictor must be fitted on those columns, not on the raw volumes in mL.
    import torch

    gen = torch.Generator().manual_seed(0)
    n = 64
    scanner = torch.randint(0, 3, (n,), generator=gen)
    vol = torch.randn(n, 1, generator=gen) * 2.0 + 5.0  # a column in the layout: its mean 5, sd 2
    pa = torch.cat([torch.nn.functional.one_hot(scanner, 3).float(), vol], 1)
    x = torch.rand(n, 1, 16, 16, generator=gen)
    guide = bench.finetuning_predictor(x, pa, {"scanner": 3, "icv": 1}, {"scanner": 3, "icv": "continuous"},
                                       16, seed=0, max_epochs=1)
    assert list(guide.targets) == ["scanner", "icv"]
    assert float(guide.loc[1]) == pytest.approx(float(vol.mean()), rel=1e-5)
    assert float(guide.scale[1]) == pytest.approx(float(vol.std()), rel=1e-5)
    nll = guide.parent_nll(x, pa)
    assert nll.shape == (n,) and bool(torch.isfinite(nll).all())
