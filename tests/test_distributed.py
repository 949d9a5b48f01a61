"""Under ``torchrun`` (gloo on CPU): data-parallel training ends with the same weights on every
rank, and a streamed ``simulate`` or a ``counterfactual`` query split over the ranks writes what
one process writes.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on a
small script; the processes talk over localhost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.simulate import read_run

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import medcausal as mc
    from medcausal.simulate import simulate

    torch.set_num_threads(1)
    folder, task = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    sim = mc.synthetic.scm("chain")
    if task == "fit":  # DDP: each rank trains on its share of every minibatch
        model = mc.CausalModel(sim.graph).fit(sim.sample(400, seed=0), max_epochs=4, batch_size=64,
                                              verbose=False, seed=0)
        model.save(os.path.join(folder, f"model-{rank}.mcm"))
        # no validation split: the training loss decides stopping and learning rates, on every rank alike
        model = mc.CausalModel(sim.graph).fit(sim.sample(400, seed=0), max_epochs=30, batch_size=64,
                                              val_fraction=0.0, patience=3, verbose=False, seed=0)
        model.save(os.path.join(folder, f"no-val-{rank}.mcm"))
    else:  # every rank simulates its share of the chunks into one folder
        model = mc.CausalModel.load(os.path.join(folder, "model-0.mcm"))
        for name, kw in (("plain", dict(n=230, seed=3, chunk_size=50)),
                         ("subgroup", dict(n=120, where="x3 > 0.5", seed=4, chunk_size=40)),
                         ("no-seed", dict(n=90, seed=None, chunk_size=30))):  # rank 0 draws the seed
            run = simulate(model, out=os.path.join(folder, f"{name}-{task}"), format="csv", **kw)
            print(f"rank {rank} {name}: {run.parts}", flush=True)
    torch.distributed.destroy_process_group()  # leave cleanly, as `medcausal` commands do
""")


def _run(command, cwd, timeout):
    """Run ``command`` in its own session; on a timeout kill the whole session (torchrun's workers
    too, which would otherwise outlive it) and fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{command[5:]} did not finish in {timeout} s (a rank left waiting?)")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(tmp_path, *args, timeout=300):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    return _run([*TORCHRUN, str(script), str(tmp_path), *args], tmp_path, timeout)


def test_ddp_fit_and_a_simulation_split_over_two_ranks(tmp_path):
    fit = _torchrun(tmp_path, "fit")
    assert fit.returncode == 0, fit.stderr[-3000:]
    for stem in ("model", "no-val"):  # DDP kept the ranks in step
        weights = [mc.CausalModel.load(tmp_path / f"{stem}-{r}.mcm").mechanisms.state_dict() for r in (0, 1)]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), stem
    models = [mc.CausalModel.load(tmp_path / "model-0.mcm")]

    split = _torchrun(tmp_path, "ranks")
    assert split.returncode == 0, split.stderr[-3000:]
    assert "rank 1 plain" in split.stdout and "rank 0 plain" in split.stdout
    for name, kw in (("plain", dict(n=230, seed=3, chunk_size=50)),
                     ("subgroup", dict(n=120, where="x3 > 0.5", seed=4, chunk_size=40)),
                     ("no-seed", dict(n=90, seed=None, chunk_size=30))):
        ours = read_run.__globals__["_read_sidecar"](tmp_path / f"{name}-ranks")
        if kw["seed"] is None:  # every rank drew with the seed rank 0 drew and recorded
            kw["seed"] = ours["seed"]
        alone = mc.simulate(models[0], out=tmp_path / f"{name}-alone", format="csv", **kw)
        both = read_run(tmp_path / f"{name}-ranks")
        pd.testing.assert_frame_equal(both, alone.read())  # the same patients, whoever drew them
        assert [p["chunk"] for p in ours["parts"]] == list(range(len(alone.parts)))
        assert ours["status"] == "complete" and (tmp_path / f"{name}-ranks" / "_SUCCESS").is_file()
        for key in ("drawn", "accepted", "acceptance_rate"):  # the ranks' rejection counts, merged
            assert ours.get(key) == alone.info.get(key), key
        if name == "subgroup":
            assert alone.info["drawn"] > alone.info["accepted"] > 0  # it did reject


def test_cli_simulate_under_torchrun_and_a_refused_run_stops_every_rank(tmp_path):
    sim = mc.synthetic.scm("chain")
    model = mc.CausalModel(sim.graph).fit(sim.sample(200, seed=0), max_epochs=1, verbose=False)
    model.save(tmp_path / "model.mcm")
    command = [*TORCHRUN, "-m", "medcausal.cli", "simulate", str(tmp_path / "model.mcm"), "-n", "130", "--seed", "5",
               "--chunk-size", "30", "--out", str(tmp_path / "ranks"), "--format", "csv", "--quiet"]
    done = _run(command, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 130 simulated patients in 5 part(s)") == 1  # said once, by rank 0
    alone = mc.simulate(mc.CausalModel.load(tmp_path / "model.mcm"), 130, seed=5, chunk_size=30,
                        out=tmp_path / "alone", format="csv")
    pd.testing.assert_frame_equal(read_run(tmp_path / "ranks"), alone.read())
    # again, into the folder now taken: rank 0 refuses, and rank 1 stops with it rather than wait
    again = _run(command, tmp_path, timeout=180)
    assert again.returncode != 0
    assert again.stderr.count("already exists and is not empty") == 2  # rank 1 stopped with rank 0's error
    pd.testing.assert_frame_equal(read_run(tmp_path / "ranks"), alone.read())  # the run there is intact


def test_cli_counterfactual_split_over_two_ranks_matches_one_process(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=n)
    b = rng.random(n) < 1 / (1 + np.exp(-2 * x))
    df = pd.DataFrame({"x": x, "b": b, "y": x + b + rng.normal(size=n)})
    graph = mc.CausalGraph({"x": "continuous", "b": "binary", "y": "continuous"},
                           edges=[("x", "b"), ("b", "y"), ("x", "y")])
    mc.CausalModel(graph).fit(df, max_epochs=2, verbose=False).save(tmp_path / "model.mcm")
    patients = df[:101].copy()
    patients.to_csv(tmp_path / "patients.csv", index=False)
    # ids repeated as in a long layout (0..33, 0..33, ...): a repeated id's noise is keyed by its
    # occurrence, so all rows of one id must be answered together, whichever rank takes them
    patients.assign(id=np.tile(np.arange(34), 3)[:101]).to_csv(tmp_path / "repeated.csv", index=False)

    def command(runner, out, patients="patients.csv", *extra):
        return [*runner, "-m", "medcausal.cli", "counterfactual", str(tmp_path / "model.mcm"), "--input",
                str(tmp_path / patients), "--do", "x=2", "--seed", "3", "--out", str(tmp_path / out), *extra]

    for name, extra in (("plain", ()), ("repeated", ("--id-column", "id"))):
        source = "patients.csv" if name == "plain" else "repeated.csv"
        alone = _run(command([sys.executable], f"{name}-alone.csv", source, *extra), tmp_path, timeout=120)
        assert alone.returncode == 0, alone.stderr[-3000:]
        both = _run(command(TORCHRUN, f"{name}-ranks.csv", source, *extra), tmp_path, timeout=300)
        assert both.returncode == 0, both.stderr[-3000:]
        assert both.stdout.count("wrote 101 counterfactuals") == 1  # rank 0 wrote them all
        ranks, one = pd.read_csv(tmp_path / f"{name}-ranks.csv"), pd.read_csv(tmp_path / f"{name}-alone.csv")
        pd.testing.assert_frame_equal(ranks, one)  # b's posterior noise follows the unit, not the rank
        assert one["b"].nunique() == 2 and (one["x"] == 2).all()
    # a bad value in rank 1's half: every rank stops with rank 1's error, and no file is written
    bad = df[:10].astype({"y": object})
    bad.loc[8, "y"] = "oops"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    failed = _run(command(TORCHRUN, "bad-cf.csv", "bad.csv"), tmp_path, timeout=180)
    assert failed.returncode != 0
    assert failed.stderr.count("error: rank 1: column 'y' (variable 'y') has 1 non-numeric") == 2
    assert not (tmp_path / "bad-cf.csv").exists()
