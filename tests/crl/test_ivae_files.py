"""iVAE model files: every corrupt, foreign or damaged file gives a ModelFileError naming the file,
loading never runs code (weights_only), and writes are atomic (no partial file left behind).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medcausal.crl import IVAE, nonlinear_ica_data
from medcausal.errors import ModelFileError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.set_num_threads(1)
    x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=40, n_sources=2, seed=0)
    model = IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, refine_steps=5, verbose=False)
    path = model.save(tmp_path_factory.mktemp("files") / "ivae.pt")
    return model, path, x, u


def _rewrite(path, out, edit_spec=None, edit_state=None):
    """Copy a saved file to ``out`` after editing its JSON spec and/or its state dict."""
    payload = torch.load(path, weights_only=True)
    spec = json.loads(payload["medcausal"])
    if edit_spec is not None:
        edit_spec(spec)
    state = dict(payload["state_dict"])
    if edit_state is not None:
        edit_state(state)
    torch.save({"medcausal": json.dumps(spec), "state_dict": state}, out)
    return out


def test_save_is_atomic_and_payload_is_plain_data(saved):
    model, path, x, u = saved
    assert [p.name for p in path.parent.iterdir()] == ["ivae.pt"]  # no leftover temporary file
    payload = torch.load(path, weights_only=True)  # tensors, str: loadable without running code
    assert set(payload) == {"medcausal", "state_dict"}
    spec = json.loads(payload["medcausal"])
    assert spec["format"] == "medcausal-crl" and spec["class"] == "IVAE"
    assert np.array_equal(IVAE.load(path).encode(x, u), model.encode(x, u))


def test_save_failure_leaves_the_old_file_intact(saved, tmp_path, monkeypatch):
    model, path, x, u = saved
    target = tmp_path / "keep.pt"
    model.save(target)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save(target)
    assert target.read_bytes() == before  # unchanged
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]  # temporary file removed


def test_foreign_and_truncated_files(saved, tmp_path):
    _, path, _, _ = saved
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match=r"foreign\.pt.*torch file but not a medcausal representation"):
        IVAE.load(tmp_path / "foreign.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFileError, match=r"cut\.pt.*not a readable"):
        IVAE.load(tmp_path / "cut.pt")
    torch.save({"medcausal": "{not json", "state_dict": {}}, tmp_path / "json.pt")
    with pytest.raises(ModelFileError, match=r"json\.pt.*damaged.*JSON"):
        IVAE.load(tmp_path / "json.pt")


def test_wrong_format_newer_version_and_damaged_contents(saved, tmp_path):
    _, path, _, _ = saved

    def other_format(spec):
        spec["format"] = "medcausal-model"

    def newer(spec):
        spec["format_version"] = 99

    def no_config(spec):
        del spec["config"]

    def wrong_shape(state):
        key = next(k for k in state if k.startswith("encoder") and k.endswith("weight"))
        state[key] = torch.zeros(1, 1)

    with pytest.raises(ModelFileError, match=r"format 'medcausal-model', not 'medcausal-crl'"):
        IVAE.load(_rewrite(path, tmp_path / "a.pt", edit_spec=other_format))
    with pytest.raises(ModelFileError, match=r"b\.pt.*newer"):
        IVAE.load(_rewrite(path, tmp_path / "b.pt", edit_spec=newer))
    with pytest.raises(ModelFileError, match=r"c\.pt.*damaged.*KeyError"):
        IVAE.load(_rewrite(path, tmp_path / "c.pt", edit_spec=no_config))
    with pytest.raises(ModelFileError, match=r"d\.pt.*damaged.*RuntimeError"):
        IVAE.load(_rewrite(path, tmp_path / "d.pt", edit_state=wrong_shape))
