"""Image adapters on MONAI: formats, preprocessing spec, round trips, and bad input named."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

import medcausal.adapters.images as images_mod
from medcausal import Cohort
from medcausal.adapters.images import (ImageLoadWarning, build_transforms, image_transform_spec,
                                       load_images, write_images)
from medcausal.errors import DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def _cohort(n=3, shape=(1, 12, 10), seed=0, ids=None):
    rng = np.random.default_rng(seed)
    ids = ids or [f"p{i}" for i in range(n)]
    table = pd.DataFrame({"id": ids, "age": rng.uniform(40, 80, n), "sex": rng.integers(0, 2, n)})
    return Cohort(table, {"mri": rng.random((n, *shape), dtype=np.float32)})


def _quiet_load(*args, **kwargs):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c = load_images(*args, **kwargs)
    return c, [x for x in w if issubclass(x.category, ImageLoadWarning)]


# --------------------------------------------------------------------------- round trips
def test_nifti_round_trip_2d_keeps_values_ids_and_affine(tmp_path):
    c = _cohort(ids=["b:0:2", "b:0:0", "b:0:1"])
    A = np.array([[0, 3.0, 0, -90], [-3.0, 0, 0, 80], [0, 0, 3.0, 20], [0, 0, 0, 1]])
    csv = write_images(c, tmp_path, format="nifti", affine=A)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b_0_0.nii.gz", "b_0_1.nii.gz", "b_0_2.nii.gz",
                                                          "cohort.csv"]
    back = load_images(tmp_path, table=csv, shape=(1, 12, 10), intensity=None)
    assert back.table["id"].tolist() == ["b:0:2", "b:0:0", "b:0:1"]     # the table's order
    np.testing.assert_allclose(back.table["age"], c.table["age"])
    np.testing.assert_array_equal(back.arrays["mri"], c.arrays["mri"])
    got = np.array(json.loads(back.table["mri_affine"].iloc[0]))
    np.testing.assert_allclose(got, A, atol=1e-6)
    # written again from the loaded cohort, the affine travels through the table column
    csv2 = write_images(back, tmp_path / "again", format="nifti")
    np.testing.assert_allclose(nib.load(tmp_path / "again" / "b_0_1.nii.gz").affine, A, atol=1e-6)
    assert csv2.name == "cohort.csv"


def test_nifti_round_trip_3d(tmp_path):
    c = _cohort(n=2, shape=(1, 6, 7, 8))
    write_images(c, tmp_path, format="nifti")
    back = load_images(tmp_path, table=tmp_path / "cohort.csv", shape=(1, 6, 7, 8), intensity=None)
    np.testing.assert_array_equal(back.arrays["mri"], c.arrays["mri"])


def test_png_round_trip_within_16_bit_tolerance(tmp_path):
    c = _cohort()
    write_images(c, tmp_path, format="png")
    back = load_images(tmp_path, table=tmp_path / "cohort.csv", shape=(1, 12, 10), intensity=None)
    scale = float(c.arrays["mri"].max()) / 65535
    np.testing.assert_allclose(back.arrays["mri"], c.arrays["mri"], atol=0.51 * scale + 1e-7)
    assert back.table["id"].tolist() == ["p0", "p1", "p2"]


def test_brain_cohort_round_trip(tmp_path):
    from medcausal.synthetic.brain import BrainMRI

    sim = BrainMRI(shape=(16, 16))
    c = sim.sample(3, seed=0)
    write_images(c, tmp_path, format="nifti", affine=sim.affine)
    back = load_images(tmp_path, table=tmp_path / "cohort.csv", shape=(1, 16, 16), intensity=None)
    np.testing.assert_array_equal(back.arrays["mri"], c.arrays["mri"])
    pd.testing.assert_frame_equal(back.table[c.table.columns], c.table, check_dtype=False)
    # the simulator still recognises its patients after the trip
    assert np.array_equal(sim.render(back), c.arrays["mri"])


def test_table_column_of_paths(tmp_path):
    c = _cohort()
    write_images(c, tmp_path, format="nifti")
    table = pd.read_csv(tmp_path / "cohort.csv")
    assert table["mri_path"].tolist() == ["p0.nii.gz", "p1.nii.gz", "p2.nii.gz"]
    table.to_csv(tmp_path / "other.csv", index=False)
    back = load_images(None, table=tmp_path / "other.csv", image_column="mri_path", shape=(1, 12, 10),
                       intensity=None)
    np.testing.assert_array_equal(back.arrays["mri"], c.arrays["mri"])


# --------------------------------------------------------------------------- preprocessing
def test_spec_is_json_and_reproduces_the_pipeline(tmp_path):
    img = (np.arange(40 * 30, dtype=np.float64).reshape(40, 30) % 251).astype(np.uint8)
    PILImage.fromarray(img).save(tmp_path / "a.png")
    spec = image_transform_spec((1, 16, 16), intensity="percentile")
    stored = json.loads(json.dumps(spec))
    c1 = load_images(tmp_path, shape=(1, 16, 16), intensity="percentile")
    c2 = load_images(tmp_path, spec=stored)
    assert c1.meta["image_specs"]["mri"] == stored
    np.testing.assert_array_equal(c1.arrays["mri"], c2.arrays["mri"])
    assert c1.arrays["mri"].shape == (1, 1, 16, 16)
    assert 0.0 <= c1.arrays["mri"].min() and c1.arrays["mri"].max() <= 1.0
    # aspect kept: a 40 x 30 image padded left and right, not stretched
    assert np.all(c1.arrays["mri"][0, 0, :, 0] == 0) and c1.arrays["mri"][0, 0, :, 8].max() > 0
    with pytest.raises(DataError, match="allowed"):
        build_transforms({**stored, "transforms": [{"name": "Lambdad", "kwargs": {}}]})
    with pytest.raises(DataError, match="not an image transform spec"):
        build_transforms({"transforms": []})


def test_png_rgb_and_orientation(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, :, 0] = 255            # top row red
    PILImage.fromarray(rgb).save(tmp_path / "x.png")
    c = load_images(tmp_path, shape=(1, 8, 8), intensity=None)
    row0 = c.arrays["mri"][0, 0, 0]
    np.testing.assert_allclose(row0, 85.0)                       # mean of (255, 0, 0)
    assert np.all(c.arrays["mri"][0, 0, 1:] == 0)                # rows stay rows


def test_resize_none_requires_matching_shape(tmp_path):
    PILImage.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(DataError, match=r"s\.png.*\(1, 16, 16\)"):
        load_images(tmp_path, shape=(1, 16, 16), resize="none")


# --------------------------------------------------------------------------- other formats
def test_dicom_file_and_series(tmp_path):
    src = get_testdata_file("MR_small.dcm", download=False)
    ds = pydicom.dcmread(src)
    c = load_images([src], shape=(1, 64, 64), intensity=None)
    np.testing.assert_allclose(c.arrays["mri"][0, 0], ds.pixel_array.astype(np.float32))
    assert c.table["id"].tolist() == ["MR_small"]
    series = tmp_path / "series"
    series.mkdir()
    base = ds.pixel_array.astype(np.int16)
    for k in range(4):
        d = pydicom.dcmread(src)
        d.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 2.0 * k]
        d.SliceLocation = 6.6406 + 2.0 * k
        d.InstanceNumber = k + 1
        d.SOPInstanceUID = pydicom.uid.generate_uid()
        d.PixelData = (base // 4 * (k + 1)).astype(np.int16).tobytes()
        d.save_as(tmp_path / "series" / f"slice{3 - k}.dcm")   # file order opposite to position
    v = load_images([series], shape=(1, 64, 64, 4), orientation=None, intensity=None)
    assert v.table["id"].tolist() == ["series"]
    means = v.arrays["mri"][0, 0].mean(axis=(0, 1))
    assert np.all(np.diff(means) > 0)          # slices sorted by position, not by file name


def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "toymnist.npz", train_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
             train_labels=np.arange(5).reshape(5, 1), test_images=np.zeros((3, 28, 28), np.uint8),
             test_labels=np.zeros((3, 1), int))
    c = load_images(tmp_path / "toymnist.npz", shape=(1, 28, 28), intensity=None)
    assert len(c) == 8 and c.table["split"].tolist() == ["train"] * 5 + ["test"] * 3
    assert c.table["label"].tolist()[:5] == [0, 1, 2, 3, 4]
    assert c.table["id"].iloc[0] == "toymnist:train:0"
    raw = np.load(tmp_path / "toymnist.npz")["train_images"][2].astype(np.float32)
    np.testing.assert_array_equal(c.arrays["mri"][2, 0], raw)


# --------------------------------------------------------------------------- bad input
def test_corrupt_file_named_or_skipped_and_reported(tmp_path):
    c = _cohort()
    write_images(c, tmp_path, format="nifti")
    (tmp_path / "p1.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=r"p1\.nii\.gz"):
        load_images(tmp_path, table=tmp_path / "cohort.csv", shape=(1, 12, 10))
    back, w = _quiet_load(tmp_path, table=tmp_path / "cohort.csv", shape=(1, 12, 10), on_error="skip",
                          intensity=None)
    assert back.table["id"].tolist() == ["p0", "p2"]
    np.testing.assert_array_equal(back.arrays["mri"], c.arrays["mri"][[0, 2]])
    assert [s["id"] for s in back.meta["skipped"]] == ["p1"] and "p1.nii.gz" in back.meta["skipped"][0]["path"]
    assert len(w) == 1 and "p1.nii.gz" in str(w[0].message)


def test_ids_missing_on_either_side_are_named(tmp_path):
    c = _cohort(n=4)
    write_images(c, tmp_path, format="nifti")
    table = c.table.copy()
    table.loc[3, "id"] = "p9"                       # p3 has no row, p9 has no scan
    with pytest.raises(DataError, match=r"no row in the table \(ids \['p3'\]\).*no scan \(ids \['p9'\]\)"):
        load_images(tmp_path, table=table, shape=(1, 12, 10))
    back, w = _quiet_load(tmp_path, table=table, shape=(1, 12, 10), on_error="skip")
    assert back.table["id"].tolist() == ["p0", "p1", "p2"]
    assert {s["id"] for s in back.meta["skipped"]} == {"p3", "p9"} and "p9" in str(w[0].message)


def test_wrong_dimensionality_empty_folder_unknown_and_missing(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(DataError, match=r"vol\.nii\.gz.*3 spatial dimension.*needs 2"):
        load_images(tmp_path, shape=(1, 16, 16))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scans here")
    with pytest.raises(DataError, match="holds no image files"):
        load_images(empty)
    with pytest.raises(DataError, match="unsupported file type"):
        load_images([empty / "notes.txt"], shape=(1, 16, 16))
    with pytest.raises(DataError, match=r"ghost\.png.*does not exist"):
        load_images([tmp_path / "ghost.png", tmp_path / "vol.nii.gz"], shape=(1, 5, 6, 7))
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "nowhere")
    with pytest.raises(DataError, match="id column 'pid'"):
        load_images(tmp_path, table=pd.DataFrame({"id": ["vol"]}), id_column="pid", shape=(1, 5, 6, 7))


def test_write_images_checks(tmp_path):
    with pytest.raises(DataError, match="single-channel"):
        write_images(_cohort(shape=(2, 4, 4)), tmp_path, format="nifti")
    neg = _cohort()
    neg.arrays["mri"] -= 1.0
    with pytest.raises(DataError, match="negative"):
        write_images(neg, tmp_path, format="png")
    with pytest.raises(DataError, match="same file name"):
        write_images(_cohort(n=2, ids=["a:1", "a/1"]), tmp_path)
    with pytest.raises(DataError, match="format"):
        write_images(_cohort(), tmp_path, format="jpeg2000")
    assert not any(p.name.endswith(".part") for p in tmp_path.rglob("*"))


# --------------------------------------------------------------------------- spec kept by the model
def test_fitted_model_keeps_the_preprocessing_for_later_scans(tmp_path):
    """A model fitted on an adapter-loaded cohort saves the transform spec; new scans loaded
    with it are preprocessed exactly as the training scans (same pixels for the same file)."""
    import medcausal as mc
    from medcausal.graph import Image

    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(8)]
    for i in ids:
        PILImage.fromarray(rng.integers(0, 255, (20, 14), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    pd.DataFrame({"id": ids, "age": rng.uniform(40, 80, 8)}).to_csv(tmp_path / "t.csv", index=False)
    cohort = load_images(tmp_path, table=tmp_path / "t.csv", shape=(1, 8, 8), intensity="percentile",
                         resize="resize_pad")
    assert cohort[2:5].meta["image_specs"]["mri"] == cohort.meta["image_specs"]["mri"]  # slicing keeps it
    graph = mc.CausalGraph({"age": "continuous", "mri": Image((1, 8, 8))}, edges=[("age", "mri")])
    model = mc.CausalModel(graph, mechanisms={"mri": {"name": "cvae", "channels": [4, 4], "z_dim": 2, "hidden": 8}})
    model.fit(cohort, max_steps=1, batch_size=8, verbose=False).save(tmp_path / "m.mcm")
    spec = mc.CausalModel.load(tmp_path / "m.mcm").image_specs["mri"]
    assert spec == json.loads(json.dumps(cohort.meta["image_specs"]["mri"]))
    later = load_images([tmp_path / "p3.png"], spec=spec)
    np.testing.assert_array_equal(later.arrays["mri"][0], cohort.arrays["mri"][ids.index("p3")])


def test_recipe_with_scans_fits_from_the_command_line(tmp_path, capsys):
    """A recipe names a table and a folder of scans; `medcausal fit` trains on them and the
    run keeps the preprocessing. Missing scans are named, as load_images names them."""
    import medcausal as mc
    from medcausal.cli import main
    from medcausal.errors import RecipeError
    from medcausal.recipe import load_recipe

    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(6)]
    (tmp_path / "scans").mkdir()
    for i in ids:
        PILImage.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(tmp_path / "scans" / f"{i}.png")
    pd.DataFrame({"subject": ids, "age": rng.uniform(40, 80, 6)}).to_csv(tmp_path / "t.csv", index=False)
    recipe = tmp_path / "r.toml"
    recipe.write_text('edges = [["age", "mri"]]\n[data]\npath = "t.csv"\nimages = "scans"\nid_column = "subject"\n'
                      'image_options = { intensity = "percentile" }\n[variables]\nage = "continuous"\n'
                      'mri = { type = "image", shape = [1, 8, 8] }\n'
                      '[mechanisms]\nmri = { name = "cvae", channels = [4, 4], z_dim = 2, hidden = 8 }\n')
    cohort = load_recipe(recipe).load_data()
    assert cohort.arrays["mri"].shape == (6, 1, 8, 8) and cohort.id_column == "subject"
    assert main(["fit", str(recipe), "--out", str(tmp_path / "run"), "--max-epochs", "1", "--quiet"]) == 0
    assert mc.CausalModel.load(tmp_path / "run" / "model.mcm").image_specs["mri"]["shape"] == [1, 8, 8]
    (tmp_path / "scans" / "s4.png").unlink()
    with pytest.raises(DataError, match="s4"):
        load_recipe(recipe).load_data()
    bad = tmp_path / "bad.toml"
    bad.write_text(recipe.read_text().replace('path = "t.csv"\n', 'synthetic = "chain"\n'))
    with pytest.raises(RecipeError, match="data.path"):
        load_recipe(bad)


# --------------------------------------------------------------------------- PNG scale, RGB channels, resize_pad, DICOM folders, string ids, all-or-nothing writes

def _cohort_with_ids(ids=("p1", "p2"), shape=(1, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((len(ids), *shape)).astype(np.float32) * 0.5 + 0.25
    return Cohort(pd.DataFrame({"id": list(ids), "age": [60.0 + i for i in range(len(ids))]}), {"mri": x})


def _write_dcm(path, arr):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.InstanceNumber = "MR", "x", 1
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 0]
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom


# --------------------------------------------------------------------------- the PNG scale

def test_png_scale_applied_before_intensity_and_not_carried_to_nifti(tmp_path):
    c = _cohort_with_ids()
    t = write_images(c, tmp_path / "png", format="png")
    # default min-max scaling: every scan spans [0, 1] (the scale used to be multiplied in after it)
    mm = load_images(tmp_path / "png", table=t, shape=(1, 16, 16)).arrays["mri"]
    np.testing.assert_allclose(mm.max(axis=(1, 2, 3)), 1.0, atol=1e-6)
    np.testing.assert_allclose(mm.min(axis=(1, 2, 3)), 0.0, atol=1e-6)
    raw = load_images(tmp_path / "png", table=t, shape=(1, 16, 16), intensity=None)
    step = float(c.arrays["mri"].max()) / 65535
    np.testing.assert_allclose(raw.arrays["mri"], c.arrays["mri"], atol=0.51 * step + 1e-7)
    # written again as NIfTI, the PNG factor must not be applied a second time
    t2 = write_images(raw, tmp_path / "nii", format="nifti")
    assert "mri_scale" not in pd.read_csv(t2).columns
    back = load_images(tmp_path / "nii", table=t2, shape=(1, 16, 16), intensity=None)
    np.testing.assert_array_equal(back.arrays["mri"], raw.arrays["mri"])


# --------------------------------------------------------------------------- RGB kept and written right

def test_rgb_png_and_npz_keep_their_channels_when_the_shape_has_three(tmp_path):
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    PILImage.fromarray(red).save(tmp_path / "red.png")
    c = load_images([tmp_path / "red.png"], shape=(3, 16, 16), intensity=None)
    np.testing.assert_allclose(c.arrays["mri"][0].mean(axis=(1, 2)), [255.0, 0.0, 0.0])
    grey = load_images([tmp_path / "red.png"], shape=(1, 16, 16), intensity=None)
    np.testing.assert_allclose(grey.arrays["mri"], 85.0)          # channels="mean" when shape[0] is 1
    np.savez(tmp_path / "rgbmnist.npz", images=np.stack([red, red[..., ::-1]]))
    n = load_images(tmp_path / "rgbmnist.npz", shape=(3, 16, 16), intensity=None)
    np.testing.assert_allclose(n.arrays["mri"].mean(axis=(2, 3)), [[255, 0, 0], [0, 0, 255]])


def test_rgb_png_round_trip_within_8_bit_step(tmp_path):
    x = np.random.default_rng(1).random((2, 3, 16, 16)).astype(np.float32)
    c = Cohort(pd.DataFrame({"id": ["a", "b"]}), {"mri": x})
    t = write_images(c, tmp_path, format="png")
    back = load_images(tmp_path, table=t, shape=(3, 16, 16), intensity=None)
    step = float(x.max()) / 255
    np.testing.assert_allclose(back.arrays["mri"], x, atol=0.51 * step + 1e-6)


# --------------------------------------------------------------------------- resize_pad fits, never crops

def test_resize_pad_fits_a_non_square_target_without_cropping(tmp_path):
    PILImage.fromarray(np.full((20, 20), 200, np.uint8)).save(tmp_path / "sq.png")
    a = load_images(tmp_path, shape=(1, 8, 16), intensity=None).arrays["mri"][0, 0]
    # a 20 x 20 square shrinks to 8 x 8 (aspect kept) and is padded to 8 x 16: nothing cropped
    assert np.count_nonzero(a) == 8 * 8
    # (MONAI's anti-aliasing smooths with zero padding, so the content's border rows dim a little)
    np.testing.assert_allclose(a[1:-1, 5:11], 200.0, atol=0.01)   # float32 smoothing weights
    assert np.all(a[:, :4] == 0) and np.all(a[:, 12:] == 0)
    # 3D: a 6 x 6 x 6 cube into (1, 4, 8, 8) -> 4 x 4 x 4, padded in the last two axes
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6), np.float32), np.eye(4)), tmp_path / "cube.nii.gz")
    v = load_images([tmp_path / "cube.nii.gz"], shape=(1, 4, 8, 8), intensity=None).arrays["mri"][0, 0]
    assert np.count_nonzero(v) == 4 * 4 * 4


# --------------------------------------------------------------------------- top-level DICOM files

def test_top_level_dicom_files_are_one_scan_each(tmp_path):
    rng = np.random.default_rng(0)
    pix = {p: rng.integers(0, 1000, (16, 16)) for p in ("p1", "p2", "p3")}
    for p, arr in pix.items():
        _write_dcm(tmp_path / f"{p}.dcm", arr)
    c = load_images(tmp_path, shape=(1, 16, 16), intensity=None)
    assert c.table["id"].tolist() == ["p1", "p2", "p3"]
    np.testing.assert_array_equal(c.arrays["mri"][:, 0], np.stack(list(pix.values())).astype(np.float32))
    # three patients are never stacked into one volume
    with pytest.raises(DataError, match=r"p1\.dcm.*2 spatial dimension.*images=\[folder\]"):
        load_images(tmp_path, shape=(1, 3, 16, 16), resize="resize")
    # a series folder inside the folder (or passed in a list) is still one scan
    (tmp_path / "sub").mkdir()
    (tmp_path / "p3.dcm").rename(tmp_path / "sub" / "p3.dcm")
    assert load_images(tmp_path, shape=(1, 16, 16)).table["id"].tolist() == ["p1", "p2", "sub"]


# --------------------------------------------------------------------------- ids survive the CSV

def test_ids_with_leading_zeros_survive_the_csv_round_trip(tmp_path):
    c = _cohort_with_ids(ids=("001", "002"))
    t = write_images(c, tmp_path, format="nifti")
    back = load_images(tmp_path, table=t, shape=(1, 16, 16), intensity=None)
    assert back.table["id"].tolist() == ["001", "002"]
    by_col = load_images(None, table=t, image_column="mri_path", shape=(1, 16, 16), intensity=None)
    assert by_col.table["id"].tolist() == ["001", "002"]
    np.testing.assert_array_equal(by_col.arrays["mri"], c.arrays["mri"])


# --------------------------------------------------------------------------- failed writes

def test_bad_affine_is_named_before_any_file_is_written(tmp_path):
    old = _cohort_with_ids(ids=("p1", "p2", "p3"), seed=0)
    write_images(old, tmp_path, format="nifti")
    new = _cohort_with_ids(ids=("p1", "p2", "p3"), seed=1)
    new.table["mri_affine"] = [json.dumps(np.eye(4).tolist()), "[[1, 0], [0, 1]]", None]
    with pytest.raises(DataError, match=r"'p2'.*4x4"):
        write_images(new, tmp_path, format="nifti")
    back = load_images(tmp_path, table=tmp_path / "cohort.csv", shape=(1, 16, 16), intensity=None)
    np.testing.assert_array_equal(back.arrays["mri"], old.arrays["mri"])   # nothing was overwritten
    new.table["mri_affine"] = "not json"
    with pytest.raises(DataError, match=r"'p1'.*affine"):
        write_images(new, tmp_path, format="nifti")


def test_a_write_that_fails_midway_leaves_no_table(tmp_path, monkeypatch):
    write_images(_cohort_with_ids(ids=("p1", "p2", "p3"), seed=0), tmp_path, format="nifti")
    real, calls = images_mod._save_nifti, []

    def flaky(img, tmp):
        calls.append(tmp)
        if len(calls) == 2:
            raise OSError("disk full")
        real(img, tmp)

    monkeypatch.setattr(images_mod, "_save_nifti", flaky)
    with pytest.raises(OSError):
        write_images(_cohort_with_ids(ids=("p1", "p2", "p3"), seed=1), tmp_path, format="nifti")
    # p1 is new, p2 and p3 old: no table may describe this folder as one cohort
    assert not (tmp_path / "cohort.csv").exists()
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- smaller ones

def test_empty_png_write_and_trailing_singleton_nifti_axis(tmp_path):
    empty = Cohort(pd.DataFrame({"id": pd.Series([], dtype=str)}), {"mri": np.zeros((0, 1, 4, 4), np.float32)})
    t = write_images(empty, tmp_path / "e", format="png")
    assert len(pd.read_csv(t)) == 0
    vol = np.random.default_rng(2).random((5, 6, 7, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = load_images([tmp_path / "v.nii.gz"], shape=(1, 5, 6, 7), orientation=None, intensity=None)
    np.testing.assert_array_equal(c.arrays["mri"][0, 0], vol[..., 0])


def test_reading_scans_logs_nothing_about_the_absent_gpu_dicom_decoder(tmp_path, caplog):
    import logging

    for i in range(3):
        PILImage.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"s{i}.png")
    plugin = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    before = plugin.level
    with caplog.at_level(logging.INFO):
        cohort = load_images(tmp_path, shape=(1, 8, 8))
    assert len(cohort) == 3
    assert not [r for r in caplog.records if "nvImageCodec" in r.getMessage()]  # MONAI's line per scan
    assert plugin.level == before  # the logger's level is restored


def test_palette_and_grey_alpha_pngs_load_as_the_pixels_shown(tmp_path):
    arr = np.zeros((16, 16), np.uint8)
    arr[:, :8] = 255
    grey = PILImage.fromarray(arr)
    grey.convert("P").save(tmp_path / "a_palette.png")  # palette indices are not intensities
    grey.convert("LA").save(tmp_path / "b_alpha.png")
    out = load_images(tmp_path, shape=(1, 16, 16), intensity=None, resize="none").arrays["mri"]
    for img in out:
        assert img[0, :, :8].min() == 255.0 and img[0, :, 8:].max() == 0.0


def test_a_multichannel_nifti_stores_channels_last(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.random((8, 8, 8, 2)).astype(np.float32)  # (X, Y, Z, C): two contrasts
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "s.nii.gz"))
    out = load_images(tmp_path, shape=(2, 8, 8, 8), intensity=None, resize="none", orientation=None)
    np.testing.assert_allclose(out.arrays["mri"][0], np.moveaxis(vol, -1, 0), rtol=1e-6)


@pytest.mark.parametrize("resize", ["resize", "resize_pad"])
def test_shrinking_keeps_a_constant_scan_constant_to_its_border(tmp_path, resize):
    # MONAI's Gaussian anti-aliasing pads with zeros: the border came out ~20% darker
    PILImage.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / "c.png")
    PILImage.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(tmp_path / "d.png")
    out = load_images(tmp_path, shape=(1, 16, 16), intensity=None, resize=resize).arrays["mri"]
    np.testing.assert_allclose(out[0], 100.0, rtol=1e-5)
    # area averaging of a ramp: each output pixel is the mean of its 4 input columns
    np.testing.assert_allclose(out[1][0, 0], np.arange(64).reshape(16, 4).mean(1) * 4, rtol=1e-5)
