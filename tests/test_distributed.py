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

from conftest import repeated_visits

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


@pytest.mark.slow  # torchrun, 20-55 s; the default run keeps the DP-over-two-ranks test
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


@pytest.mark.slow  # torchrun, 20-55 s; the default run keeps the DP-over-two-ranks test
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


@pytest.mark.slow  # torchrun, 20-55 s; the default run keeps the DP-over-two-ranks test
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


PATIENT_GRAPH = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])


def _patient_privacy():
    from medcausal.privacy import Privacy

    return Privacy(noise_multiplier=1.0, delta=1e-3, unit_column="patient", standardize="bounds", noise_seed=9,
                   public_bounds={"x": (-4, 4), "y": (-12, 12)})


PATIENT_PRIVACY = _patient_privacy()

DP_SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    import numpy as np
    import torch
    from torch import nn
    import medcausal as mc
    from medcausal.privacy import Privacy, PrivacyError
    from medcausal.privacy.engine import PrivatePlan

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    folder = sys.argv[1]
    rank = int(os.environ["RANK"])
    sys.path.insert(0, sys.argv[2])
    from conftest import repeated_visits
    from test_distributed import PATIENT_GRAPH, PATIENT_PRIVACY
    sim = mc.synthetic.scm("chain")
    df = sim.sample(600, seed=0)
    bounds = {"x1": (-5, 5), "x2": (-2, 15), "x3": (-15, 15)}
    for name, privacy in (("pinned", Privacy(noise_multiplier=1.0, noise_seed=5, public_bounds=bounds)),
                          ("fresh", Privacy(epsilon=4.0, public_bounds=bounds))):  # rank 0 draws the seed
        model = mc.CausalModel(sim.graph).fit(df, seed=0, privacy=privacy, max_epochs=3, batch_size=64,
                                              verbose=False)
        model.save(os.path.join(folder, f"{name}-{rank}.mcm"))
    model = mc.CausalModel(PATIENT_GRAPH).fit(repeated_visits(), seed=0, privacy=PATIENT_PRIVACY, max_epochs=2,
                                              batch_size=10, verbose=False)  # records of 3 rows each
    model.save(os.path.join(folder, f"patients-{rank}.mcm"))

    # DP-SGD's noise, under DDP: zero gradients, so one SGD step (lr 1) is -noise / B
    sigma, clip, n, b, steps = 1.3, 0.7, 64, 16, 20
    out = {}
    for mode in ("vmap", "hooks", "ghost"):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 10))
        zero = type("Zero", (nn.Module,), {"forward": lambda self, batch: 0.0 * self.net(batch["x"]).sum(-1)})()
        zero.net = module
        plan = PrivatePlan(privacy=Privacy(noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode=mode),
                           codecs={}, data=None, seed=123, delta=1e-5, n_rows=n, n_records=n,
                           record_of_row=np.arange(n), unit_label="row", batch_size=b, sample_rate=b / n,
                           steps_per_epoch=n // b, steps=steps, noise_multiplier=sigma, stats_noise_multiplier=None)
        params = list(zero.parameters())
        session = plan.attach(zero, torch.optim.SGD(params, lr=1.0), {"x": torch.randn(n, 40)})
        updates, shares = [], []
        try:
            batches = ((r,) for _ in range(steps) for (r,) in session.loader)
            for _ in range(steps):
                (records,) = next(batches)
                shares.append(records.tolist())
                before = torch.cat([p.detach().flatten().clone() for p in params])
                assert session.step(records)
                updates.append(torch.cat([p.detach().flatten() for p in params]) - before)
        finally:
            session.close()
        out[mode] = {"updates": torch.stack(updates).double().tolist(), "shares": shares,
                     "history": plan.history}
    with open(os.path.join(folder, f"noise-{rank}.json"), "w") as f:
        json.dump(out, f)

    try:  # secure noise cannot be agreed on by the ranks: refused, on every rank
        mc.CausalModel(sim.graph).fit(df, privacy=Privacy(epsilon=4.0, public_bounds=bounds, secure_mode=True),
                                      max_epochs=1, verbose=False)
    except PrivacyError as e:
        print(f"rank {rank} refused: {e}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


def _assert_takes_the_steps_of_one_process(ranks):
    """With the noise pinned, two ranks take the steps one process takes: the same Poisson batches
    (split between the ranks), rank 0's noise once, the clipped sums all-reduced. Up to float
    rounding of the sums' order (30 Adam steps)."""
    import warnings

    from medcausal.privacy import Privacy

    sim = mc.synthetic.scm("chain")
    bounds = {"x1": (-5, 5), "x2": (-2, 15), "x3": (-15, 15)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = mc.CausalModel(sim.graph).fit(sim.sample(600, seed=0), seed=0, max_epochs=3, batch_size=64,
                                              verbose=False,
                                              privacy=Privacy(noise_multiplier=1.0, noise_seed=5, public_bounds=bounds))
    mine, theirs = alone.mechanisms.state_dict(), ranks.mechanisms.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], rtol=1e-4, atol=1e-5, msg=k)
    assert {k: v for k, v in ranks.privacy.items() if k != "weights_sha256"} == \
        {k: v for k, v in alone.privacy.items() if k != "weights_sha256"}
    assert alone.fit_info["world_size"] == 1 and ranks.fit_info["world_size"] == 2


def test_private_training_over_two_ranks_takes_the_steps_of_one_process(tmp_path):
    import json
    import math

    import numpy as np

    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    done = _run([*TORCHRUN, str(script), str(tmp_path), os.path.dirname(__file__)], tmp_path, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("pinned", "fresh"):  # the ranks agree: the same weights and the same ledger
        models = [mc.CausalModel.load(tmp_path / f"{name}-{r}.mcm") for r in (0, 1)]
        weights = [m.mechanisms.state_dict() for m in models]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), name
        assert models[0].privacy == models[1].privacy and models[0].privacy["steps"] == 30
        assert models[0].codecs == models[1].codecs, name  # one set of noisy statistics
    _assert_takes_the_steps_of_one_process(mc.CausalModel.load(tmp_path / "pinned-0.mcm"))
    # records of several rows (a patient's visits): a rank takes whole records
    alone = mc.CausalModel(PATIENT_GRAPH).fit(repeated_visits(), seed=0, privacy=PATIENT_PRIVACY, max_epochs=2,
                                              batch_size=10, verbose=False)
    ranks = [mc.CausalModel.load(tmp_path / f"patients-{r}.mcm") for r in (0, 1)]
    assert ranks[0].privacy["n_records"] == 40 and ranks[0].privacy["steps"] == 8
    for k, v in alone.mechanisms.state_dict().items():
        assert torch.equal(ranks[0].mechanisms.state_dict()[k], ranks[1].mechanisms.state_dict()[k])
        torch.testing.assert_close(ranks[0].mechanisms.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)

    # The noise: once per step (not once per rank), sigma C / B after the all-reduce; each rank
    # clipped its own half of every Poisson batch. Tolerances as in tests/privacy/test_noise.py.
    noise = [json.loads((tmp_path / f"noise-{r}.json").read_text()) for r in (0, 1)]
    sigma, clip, b = 1.3, 0.7, 16
    for mode in ("vmap", "hooks", "ghost"):
        u0, u1 = (np.asarray(noise[r][mode]["updates"]) for r in (0, 1))
        np.testing.assert_array_equal(u0, u1)  # every rank took the same update
        expected = (sigma * clip / b) ** 2
        assert abs(u0.var() / expected - 1) < 0.04, mode  # sqrt(2) too much if both ranks added noise
        assert abs(u0.mean()) < 6 * math.sqrt(expected / u0.size)
        for s0, s1 in zip(noise[0][mode]["shares"], noise[1][mode]["shares"]):
            assert not set(s0) & set(s1) and abs(len(s0) - len(s1)) <= 1  # disjoint halves of one batch
        assert noise[0][mode]["history"] == [[sigma, 0.25, 20]]
    assert done.stdout.count("refused: Privacy(secure_mode=True) under torchrun is not supported") == 2


SPAWN_SCRIPT = textwrap.dedent("""
    import os, socket, sys, warnings
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    import medcausal as mc
    from medcausal.privacy import Privacy

    def work(rank, folder, port):
        torch.set_num_threads(1)
        warnings.simplefilter("ignore")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        sim = mc.synthetic.scm("chain")
        bounds = {"x1": (-5, 5), "x2": (-2, 15), "x3": (-15, 15)}
        for name, privacy in (("pinned", Privacy(noise_multiplier=1.0, noise_seed=5, public_bounds=bounds)),
                              ("fresh", Privacy(epsilon=4.0, public_bounds=bounds))):
            model = mc.CausalModel(sim.graph).fit(sim.sample(600, seed=0), seed=0, privacy=privacy, max_epochs=3,
                                                  batch_size=64, verbose=False, device=torch.device("cpu"))
            model.save(os.path.join(folder, f"{name}-{rank}.mcm"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # no torchrun: the group is the caller's alone
            os.environ.pop(key, None)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(work, args=(sys.argv[1], port), nprocs=2)
""")


@pytest.mark.slow  # torchrun, 20-55 s; the default run keeps the DP-over-two-ranks test
def test_private_training_in_a_process_group_the_caller_made(tmp_path):
    """mp.spawn and init_process_group without torchrun's WORLD_SIZE: the plan and the session count
    the same ranks (before, the plan saw one process: each rank drew its own Poisson batches and
    kept its share of them, so a record could enter a step twice), and fit takes a torch.device."""
    script = tmp_path / "spawn.py"
    script.write_text(SPAWN_SCRIPT)
    done = _run([sys.executable, str(script), str(tmp_path)], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("pinned", "fresh"):
        models = [mc.CausalModel.load(tmp_path / f"{name}-{r}.mcm") for r in (0, 1)]
        weights = [m.mechanisms.state_dict() for m in models]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), name
        assert models[0].privacy == models[1].privacy
        assert models[0].codecs == models[1].codecs, name  # one set of noisy statistics (rank 0's seed)
    _assert_takes_the_steps_of_one_process(mc.CausalModel.load(tmp_path / "pinned-0.mcm"))


@pytest.mark.slow  # torchrun, 20-55 s; the default run keeps the DP-over-two-ranks test
def test_cli_fit_under_torchrun_with_privacy_writes_the_run_once(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [*TORCHRUN, "-m", "medcausal.cli", "fit", str(root / "cohorts" / "triangle.toml"), "--out",
               str(tmp_path / "run"), "--max-epochs", "1", "--quiet", "--privacy", str(root / "privacy" / "eps8.toml"),
               "--privacy", str(root / "cohorts" / "triangle.public.toml")]
    done = _run(command, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fitted 'triangle'") == 1  # rank 0 wrote and said it; rank 1 neither
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no second run, no temporary folder left
    ledger = mc.CausalModel.load(tmp_path / "run" / "model.mcm").privacy
    assert ledger is not None and ledger["epsilon"] <= 8.0 + 1e-6 and ledger["n_records"] == 5000
