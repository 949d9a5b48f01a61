"""Every tutorial notebook runs top to bottom at toy size (MEDCAUSAL_TOY=1), without errors."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_tutorials():
    names = [p.name for p in NOTEBOOKS]
    assert {"01_counterfactual_patients.ipynb", "02_augment_scarce_subgroup.ipynb",
            "03_private_augmentation.ipynb", "04_perturbation_counterfactuals.ipynb"} <= set(names)


# The first tutorial runs by default; the others (15-40 s each) are marked slow.
CASES = [pytest.param(p, id=p.stem, marks=() if i == 0 else pytest.mark.slow) for i, p in enumerate(NOTEBOOKS)]


@pytest.mark.parametrize("path", CASES)
def test_notebook_runs_at_toy_size(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("MEDCAUSAL_TOY", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} is not executed"
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
