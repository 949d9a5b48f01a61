"""Benchmark scripts are not a package: their tests load them by path."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(stem: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # a script may import its sibling scripts
    spec = importlib.util.spec_from_file_location(f"{stem}_benchmark", BENCHMARKS / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("tabular_scm")`` -> the module of ``benchmarks/tabular_scm.py``."""
    return _load


@pytest.fixture
def saved_chain_fits(tmp_path, load_benchmark):
    """Barely trained ``flow`` and ``diffusion`` fits of the additive chain, saved as
    ``tabular_scm.py --save-models`` saves them (the re-answering scripts only need saved models).
    Returns the models folder, the SCM and the protocol's ``(train, qs, factual, truth)``."""
    import medcausal as mc

    bench = load_benchmark("tabular_scm")
    sim = mc.synthetic.scm("chain", additive=True)
    data = bench.protocol_data(sim)
    for method in ("flow", "diffusion"):
        model = mc.CausalModel(sim.graph, mechanisms=method)
        model.fit(data[0].iloc[:500], seed=0, max_epochs=1, verbose=False)
        model.save(bench.model_path(tmp_path / "models", "chain", "additive", method, 0))
    bench.save_protocol(tmp_path / "models", 5000, 200, 5)
    return tmp_path / "models", sim, data
