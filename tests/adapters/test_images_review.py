"""Review fixes of the image adapters: PNG scale, RGB channels, resize_pad, DICOM folders,
string ids, Cohort indexing and all-or-nothing writes."""

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
from medcausal.adapters.images import load_images, write_images
from medcausal.errors import DataError


def _cohort(ids=("p1", "p2"), shape=(1, 16, 16), seed=0):
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


# ----------------------------------------------------------------- 1: the PNG scale
def test_png_scale_applied_before_intensity_and_not_carried_to_nifti(tmp_path):
    c = _cohort()
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


# ----------------------------------------------------------------- 2, 3: RGB kept and written right
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


# ----------------------------------------------------------------- 4: resize_pad fits, never crops
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


# ----------------------------------------------------------------- 5: top-level DICOM files
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


# ----------------------------------------------------------------- 6: ids survive the CSV
def test_ids_with_leading_zeros_survive_the_csv_round_trip(tmp_path):
    c = _cohort(ids=("001", "002"))
    t = write_images(c, tmp_path, format="nifti")
    back = load_images(tmp_path, table=t, shape=(1, 16, 16), intensity=None)
    assert back.table["id"].tolist() == ["001", "002"]
    by_col = load_images(None, table=t, image_column="mri_path", shape=(1, 16, 16), intensity=None)
    assert by_col.table["id"].tolist() == ["001", "002"]
    np.testing.assert_array_equal(by_col.arrays["mri"], c.arrays["mri"])


# ----------------------------------------------------------------- 7: Cohort ids and indexing
def test_cohort_keeps_an_id_index_and_indexes_by_integer():
    x = np.zeros((3, 1, 4, 4), np.float32)
    df = pd.DataFrame({"id": ["p1", "p2", "p3"], "age": [1.0, 2.0, 3.0]})
    assert Cohort(df.set_index("id"), {"mri": x}).ids.tolist() == ["p1", "p2", "p3"]
    c = Cohort(df, {"mri": x})
    one = c[1]
    assert isinstance(one, Cohort) and one.ids.tolist() == ["p2"] and one.arrays["mri"].shape == (1, 1, 4, 4)
    assert len(c[[]]) == 0 and c[[]].arrays["mri"].shape == (0, 1, 4, 4)
    with pytest.raises(DataError, match="row"):
        c[["p1"]]


# ----------------------------------------------------------------- 8: failed writes
def test_bad_affine_is_named_before_any_file_is_written(tmp_path):
    old = _cohort(ids=("p1", "p2", "p3"), seed=0)
    write_images(old, tmp_path, format="nifti")
    new = _cohort(ids=("p1", "p2", "p3"), seed=1)
    new.table["mri_affine"] = [json.dumps(np.eye(4).tolist()), "[[1, 0], [0, 1]]", None]
    with pytest.raises(DataError, match=r"'p2'.*4x4"):
        write_images(new, tmp_path, format="nifti")
    back = load_images(tmp_path, table=tmp_path / "cohort.csv", shape=(1, 16, 16), intensity=None)
    np.testing.assert_array_equal(back.arrays["mri"], old.arrays["mri"])   # nothing was overwritten
    new.table["mri_affine"] = "not json"
    with pytest.raises(DataError, match=r"'p1'.*affine"):
        write_images(new, tmp_path, format="nifti")


def test_a_write_that_fails_midway_leaves_no_table(tmp_path, monkeypatch):
    write_images(_cohort(ids=("p1", "p2", "p3"), seed=0), tmp_path, format="nifti")
    real, calls = images_mod._save_nifti, []

    def flaky(img, tmp):
        calls.append(tmp)
        if len(calls) == 2:
            raise OSError("disk full")
        real(img, tmp)

    monkeypatch.setattr(images_mod, "_save_nifti", flaky)
    with pytest.raises(OSError):
        write_images(_cohort(ids=("p1", "p2", "p3"), seed=1), tmp_path, format="nifti")
    # p1 is new, p2 and p3 old: no table may describe this folder as one cohort
    assert not (tmp_path / "cohort.csv").exists()
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


# ----------------------------------------------------------------- smaller ones
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


# ----------------------------------------------------------------- review, session 15
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
