"""Scans in, a :class:`~medcausal.Cohort` out (and back): MONAI readers and dictionary transforms.

``load_images`` reads NIfTI (``.nii``, ``.nii.gz``), DICOM (single files and
series folders), PNG/JPEG/TIFF and MedMNIST-style ``.npz`` files, preprocesses
each scan with MONAI dictionary transforms (channel-first, orientation,
optional resampling, intensity scaling, resize and crop/pad to the declared
``Image`` shape), and aligns the scans with a table of patient variables by id.

The preprocessing is a JSON-serializable *spec* (:func:`image_transform_spec`):
store it with a model and rebuild the same MONAI pipeline with
:func:`build_transforms`, so queries are preprocessed exactly like the
training scans.

>>> import tempfile, numpy as np, pandas as pd
>>> import medcausal as mc
>>> folder = tempfile.mkdtemp()
>>> c = mc.Cohort(pd.DataFrame({"id": ["p1", "p2"], "age": [61.0, 74.0]}),
...               {"mri": np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)})
>>> _ = write_images(c, folder, format="nifti")
>>> back = load_images(folder, table=f"{folder}/cohort.csv", shape=(1, 16, 16), intensity=None)
>>> back.table["id"].tolist(), bool(np.allclose(back.arrays["mri"], c.arrays["mri"]))
(['p1', 'p2'], True)

Bad input never disappears silently: an unreadable file raises a
:class:`~medcausal.errors.DataError` naming it (``on_error="raise"``, the
default) or is skipped and reported (``on_error="skip"``: an
:class:`ImageLoadWarning` names every skipped file, and the returned cohort
lists them in ``cohort.meta["skipped"]``). Scans without a table row and rows without
a scan are named by id the same way.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..cohort import Cohort
from ..errors import DataError
from ..io import atomic_write, read_table, write_table

__all__ = ["ImageLoadWarning", "build_transforms", "image_transform_spec", "load_images",
           "write_images", "IMAGE_SUFFIXES"]

SPEC_FORMAT = "medcausal-image-transforms"
SPEC_VERSION = 3       # 2: "resize_pad" fits the whole scan inside the shape (ResizeToFitd)
#                        3: shrinking averages areas (ShrinkAreaResized, anti_aliasing="area")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".dicom")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPZ_SUFFIXES = (".npz",)
IMAGE_SUFFIXES = NIFTI_SUFFIXES + DICOM_SUFFIXES + PIL_SUFFIXES + NPZ_SUFFIXES

# MONAI dictionary transforms a spec may name (nothing else is ever instantiated)
_ALLOWED = ("EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityd",
            "ScaleIntensityRangePercentilesd", "Resized", "ResizeWithPadOrCropd", "EnsureTyped",
            "ResizeToFitd", "ShrinkAreaResized")
_KEY = "image"


class ImageLoadWarning(UserWarning):
    """Some image files (or table rows) were skipped by ``load_images(on_error="skip")``."""


# --------------------------------------------------------------------------- #
# the preprocessing spec
# --------------------------------------------------------------------------- #
def image_transform_spec(shape: Sequence[int] = (1, 64, 64), *, orientation: str | None = "RAS",
                         spacing: Sequence[float] | float | None = None,
                         intensity: str | None = "minmax", percentiles: tuple = (0.5, 99.5),
                         resize: str = "resize_pad", channels: str = "mean") -> dict:
    """The preprocessing of a scan to ``Image(shape)``, as JSON-serializable data.

    ``shape`` is ``(C, H, W)`` (rows, columns) for 2D scans, ``(C, X, Y, Z)`` for volumes
    in MONAI's voxel order (after ``orientation``; DICOM series: rows, columns, slices),
    so slices come last.

    - ``orientation``: axis codes for ``Orientationd`` (3D volumes only; ``None`` keeps
      the file's voxel order);
    - ``spacing``: resample to this voxel size (mm) with ``Spacingd`` first, or ``None``;
    - ``intensity``: ``"minmax"`` (``ScaleIntensityd`` to [0, 1]), ``"percentile"``
      (``ScaleIntensityRangePercentilesd`` of ``percentiles`` to [0, 1], clipped) or
      ``None`` (raw values);
    - ``resize``: ``"resize"`` (``ShrinkAreaResized`` to the shape, aspect not kept),
      ``"resize_pad"`` (scaled to fit inside the shape with ``ResizeToFitd``, then padded
      with ``ResizeWithPadOrCropd``: aspect kept, nothing cropped), ``"pad_crop"``
      (``ResizeWithPadOrCropd`` only) or ``"none"`` (must match);
    - ``channels``: how a scan with another channel count becomes ``shape[0]``:
      ``"mean"`` (e.g. RGB to grey) or ``"first"``.

    Resizing averages the pixels an output pixel covers on axes that shrink (MONAI
    ``Resize`` with ``mode="area"``: anti-aliased, and no dark frame, which MONAI's
    Gaussian anti-aliasing leaves where content reaches the border) and interpolates
    (bilinear/trilinear) on axes that grow. Specs of version 2 keep MONAI's anti-aliasing.

    >>> spec = image_transform_spec((1, 32, 32), intensity="percentile")
    >>> [t["name"] for t in spec["transforms"]]
    ['EnsureChannelFirstd', 'ScaleIntensityRangePercentilesd', 'ResizeToFitd', 'ResizeWithPadOrCropd']
    """
    shape = _check_shape(shape)
    nd = len(shape) - 1
    if intensity not in ("minmax", "percentile", None, "none"):
        raise DataError(f"intensity must be 'minmax', 'percentile' or None, got {intensity!r}")
    if resize not in ("resize", "resize_pad", "pad_crop", "none"):
        raise DataError(f"resize must be 'resize', 'resize_pad', 'pad_crop' or 'none', got {resize!r}")
    if channels not in ("mean", "first"):
        raise DataError(f"channels must be 'mean' or 'first', got {channels!r}")
    size = list(shape[1:])
    mode = "bilinear" if nd == 2 else "trilinear"
    ts: list[dict] = [{"name": "EnsureChannelFirstd", "kwargs": {"channel_dim": None}}]
    if orientation and nd == 3:
        ts.append({"name": "Orientationd", "kwargs": {
            "axcodes": str(orientation), "labels": [["L", "R"], ["P", "A"], ["I", "S"]]}})
    if spacing is not None:
        pix = [float(spacing)] * nd if np.ndim(spacing) == 0 else [float(s) for s in spacing]
        if len(pix) != nd or min(pix) <= 0:
            raise DataError(f"spacing must be a positive number or {nd} numbers, got {spacing!r}")
        ts.append({"name": "Spacingd", "kwargs": {"pixdim": pix, "mode": mode}})
    if intensity == "minmax":
        ts.append({"name": "ScaleIntensityd", "kwargs": {"minv": 0.0, "maxv": 1.0}})
    elif intensity == "percentile":
        lo, hi = (float(p) for p in percentiles)
        ts.append({"name": "ScaleIntensityRangePercentilesd",
                   "kwargs": {"lower": lo, "upper": hi, "b_min": 0.0, "b_max": 1.0, "clip": True}})
    if resize == "resize":
        ts.append({"name": "ShrinkAreaResized", "kwargs": {"spatial_size": size, "mode": mode}})
    elif resize == "resize_pad":
        ts.append({"name": "ResizeToFitd", "kwargs": {"spatial_size": size, "mode": mode,
                                                      "anti_aliasing": "area"}})
        ts.append({"name": "ResizeWithPadOrCropd", "kwargs": {"spatial_size": size}})
    elif resize == "pad_crop":
        ts.append({"name": "ResizeWithPadOrCropd", "kwargs": {"spatial_size": size}})
    return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "shape": list(shape),
            "channels": channels, "transforms": ts}


def build_transforms(spec: Mapping):
    """Rebuild the MONAI ``Compose`` of dictionary transforms (key ``"image"``) from a spec.

    Only the MONAI transforms named in the spec's allowlist are instantiated, so a
    stored spec never runs code.

    >>> t = build_transforms(image_transform_spec((1, 8, 8), intensity=None))
    >>> type(t).__name__, len(t.transforms)
    ('Compose', 3)
    """
    import monai.transforms as mt

    spec = _check_spec(spec)
    out = []
    for i, t in enumerate(spec["transforms"]):
        name = t.get("name") if isinstance(t, Mapping) else None
        if name not in _ALLOWED:
            raise DataError(f"image spec transform #{i} is {name!r}; allowed: {list(_ALLOWED)}")
        kwargs = dict(t.get("kwargs", {}))
        try:
            cls = {"ResizeToFitd": ResizeToFitd, "ShrinkAreaResized": ShrinkAreaResized}.get(name) or getattr(mt, name)
            out.append(cls(keys=[_KEY], **kwargs))
        except TypeError as e:
            raise DataError(f"image spec transform #{i} ({name}): bad arguments {kwargs}: {e}") from None
    return mt.Compose(out)


class ResizeToFitd:
    """Scale a channel-first scan to fit inside ``spatial_size`` keeping its aspect (MONAI ``Resize``).

    Every axis is scaled by ``min(target / size)``, so a later pad reaches the shape
    without cropping.
    """

    def __init__(self, keys, spatial_size, mode="bilinear", anti_aliasing=True):
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.spatial_size = [int(s) for s in spatial_size]
        self.mode, self.anti_aliasing = mode, anti_aliasing

    def __call__(self, data):
        d = dict(data)
        for k in self.keys:
            size = d[k].shape[1:]
            if len(size) != len(self.spatial_size):
                raise ValueError(f"{type(self).__name__}: scan has spatial shape {tuple(size)}, "
                                 f"target {self.spatial_size}")
            d[k] = _resize(d[k], self._target(size), self.mode, self.anti_aliasing)
        return d

    def _target(self, size) -> list[int]:
        f = min(t / s for t, s in zip(self.spatial_size, size))
        return [min(t, max(1, round(s * f))) for t, s in zip(self.spatial_size, size)]


class ShrinkAreaResized(ResizeToFitd):
    """Resize a channel-first scan to ``spatial_size`` (aspect not kept): axes that shrink by
    area averaging, axes that grow by ``mode`` (MONAI ``Resize`` for both)."""

    def __init__(self, keys, spatial_size, mode="bilinear"):
        super().__init__(keys, spatial_size, mode, anti_aliasing="area")

    def _target(self, size) -> list[int]:
        return list(self.spatial_size)


def _resize(img, size, mode: str, anti_aliasing):
    """MONAI ``Resize`` to ``size``. ``anti_aliasing="area"``: the shrinking axes first, by area
    averaging (``nearest`` modes, e.g. for label maps, never average); else MONAI's own flag."""
    from monai.transforms import Resize

    size = [int(t) for t in size]
    if anti_aliasing != "area":
        return Resize(size, mode=mode, anti_aliasing=bool(anti_aliasing))(img)
    if str(mode).startswith("nearest"):
        return Resize(size, mode=mode)(img)
    shrunk = [min(s, t) for s, t in zip(img.shape[1:], size)]
    if shrunk != list(img.shape[1:]):
        img = Resize(shrunk, mode="area")(img)
    return img if shrunk == size else Resize(size, mode=mode)(img)


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise DataError(f"shape must be (C, H, W) or (C, X, Y, Z), got {shape!r}") from None
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise DataError(f"shape must be (C, H, W) or (C, X, Y, Z), got {shape}")
    return shape


def _check_spec(spec: Mapping) -> dict:
    if not isinstance(spec, Mapping) or spec.get("format") != SPEC_FORMAT:
        raise DataError(f"not an image transform spec (format {SPEC_FORMAT!r} expected): {spec!r}")
    if int(spec.get("version", 0)) > SPEC_VERSION:
        raise DataError(f"image spec version {spec.get('version')} is newer than this medcausal "
                        f"supports ({SPEC_VERSION})")
    _check_shape(spec.get("shape", ()))
    return dict(spec)


# --------------------------------------------------------------------------- #
# finding the scans
# --------------------------------------------------------------------------- #
def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir():
        return "dicom" if _dicom_files(path) else None
    for kind, suffixes in (("nifti", NIFTI_SUFFIXES), ("dicom", DICOM_SUFFIXES),
                           ("pil", PIL_SUFFIXES), ("npz", NPZ_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(DICOM_SUFFIXES))


def _stem(path: Path) -> str:
    name = path.name
    for suf in IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _scan_folder(folder: Path) -> list[Path]:
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if _dicom_files(p):
                found.append(p)          # a DICOM series
        elif _kind(p) is not None:
            found.append(p)
    if not found:
        raise DataError(f"folder {str(folder)!r} holds no image files (supported: "
                        f"{', '.join(IMAGE_SUFFIXES)}, or DICOM series folders)")
    return found


# --------------------------------------------------------------------------- #
# reading one scan
# --------------------------------------------------------------------------- #
def _read(path: Path, kind: str):
    """One scan as a MONAI MetaTensor via the MONAI reader for its kind: no channel axis, or
    channel-first RGB (``meta["original_channel_dim"] == 0``)."""
    from monai.data import NibabelReader, PILReader, PydicomReader
    from monai.transforms import LoadImage

    # MONAI notes, by a warning and a log line per scan read, that an optional GPU DICOM decoder
    # (nvImageCodec) is absent: not news to the user, so both are silenced while reading.
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            if kind == "nifti":
                reader = NibabelReader()
            elif kind == "dicom":
                reader = PydicomReader(swap_ij=False)     # pixel_array (row, column) order
            else:
                reader = PILReader(converter=_pil_pixels, reverse_indexing=False)  # numpy (row, column) order
            img = LoadImage(reader=reader, image_only=True)(str(path))
    finally:
        plugin_log.setLevel(level)
    if kind == "pil" and img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3].permute(2, 0, 1).float()      # RGB(A) -> channel-first RGB
        img.meta["original_channel_dim"] = 0
    else:
        img.meta["original_channel_dim"] = "no_channel"
    return img


def _pil_pixels(im):
    """The intensities a viewer shows: a palette image (P, PA) and other colour models as RGB,
    grey with alpha (LA) as grey; a palette's raw indices are not intensities."""
    if im.mode in ("LA", "La"):
        return im.convert("L")
    if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    return im


def _preprocess(img, transforms, spec: dict, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply the spec's transforms; returns ``(array [C, *spatial], affine or None)``."""
    shape = tuple(spec["shape"])
    nd = len(shape) - 1
    arr = img
    has_c = arr.meta.get("original_channel_dim") == 0
    if has_c and arr.shape[0] != shape[0]:     # e.g. RGB into one channel: the spec's rule
        arr = arr.float().mean(0) if spec.get("channels", "mean") == "mean" else arr[0]
        has_c = False
    # a 2D image stored as a single-slice volume, a volume with a trailing axis of 1
    if not has_c and arr.ndim == nd + 1 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    # channels last, as NIfTI stores a multi-contrast volume (X, Y, Z, C): moved first
    if not has_c and arr.ndim == nd + 1 and arr.shape[-1] == shape[0] > 1:
        arr = arr.movedim(-1, 0)
        has_c = True
    if arr.ndim - has_c != nd:
        hint = (" (a DICOM series is a folder of files: pass it in a list, images=[folder])"
                if nd == 3 and str(arr.meta.get("filename_or_obj", "")).lower().endswith(DICOM_SUFFIXES)
                else "")
        raise DataError(f"{where}: has {arr.ndim - has_c} spatial dimension(s) (shape "
                        f"{tuple(arr.shape)}); the declared Image shape {shape} needs {nd}{hint}")
    arr.meta["original_channel_dim"] = 0 if has_c else "no_channel"
    try:
        out = transforms({_KEY: arr})[_KEY]
    except Exception as e:  # a MONAI transform failed on this scan: name it
        raise DataError(f"{where}: preprocessing failed ({type(e).__name__}: {e})") from e
    affine = getattr(out, "affine", None)
    affine = None if affine is None else np.asarray(affine, dtype=np.float64)
    a = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32)
    if a.shape[0] != shape[0]:
        a = a.mean(0, keepdims=True) if spec.get("channels", "mean") == "mean" else a[:1]
        if shape[0] != 1:
            a = np.repeat(a, shape[0], axis=0)
    if tuple(a.shape) != shape:
        raise DataError(f"{where}: preprocessed to shape {tuple(a.shape)}, expected {shape} "
                        "(choose resize='resize' or 'pad_crop' in the image spec)")
    if not np.isfinite(a).all():
        raise DataError(f"{where}: has {int((~np.isfinite(a)).sum())} non-finite voxel value(s)")
    return a, affine


def _npz_items(path: Path, spec: dict, allow_pickle: bool = False):
    """MedMNIST-style arrays: ``<split>_images`` (+ ``<split>_labels``) or ``images``/``labels``."""
    from monai.data import MetaTensor

    try:
        data = np.load(path, allow_pickle=allow_pickle)
        keys = list(data.keys())
    except Exception as e:
        raise DataError(f"cannot read {str(path)!r} as a .npz archive: {type(e).__name__}: {e}") from None
    splits = [k[: -len("_images")] for k in keys if k.endswith("_images")]
    if "images" in keys:
        splits = [""] + splits
    if not splits:
        raise DataError(f"{str(path)!r} holds no images array (keys {keys}; expected 'images' or "
                        "'<split>_images', MedMNIST style)")
    for split in splits:
        prefix = f"{split}_" if split else ""
        images = np.asarray(data[prefix + "images"])
        labels = data[prefix + "labels"] if prefix + "labels" in keys else None
        nd = len(spec["shape"]) - 1
        rgb = images.ndim == nd + 2 and images.shape[-1] in (3, 4)
        for i in range(images.shape[0]):
            row = {"split": split or None}
            if labels is not None:
                lab = np.asarray(labels[i]).reshape(-1)
                if lab.size == 1:
                    row["label"] = lab[0].item()
                else:
                    row.update({f"label[{j}]": v.item() for j, v in enumerate(lab)})
            img = MetaTensor(images[i].astype(np.float32))
            if rgb:
                img = img[..., :3].permute(-1, *range(nd))     # channel-first RGB
            img.meta["original_channel_dim"] = 0 if rgb else "no_channel"
            yield f"{path.stem}:{split or 'all'}:{i}", img, row


# --------------------------------------------------------------------------- #
# the entry point
# --------------------------------------------------------------------------- #
def load_images(images: Any = None, table: pd.DataFrame | str | Path | None = None,
                id_column: str = "id", shape: Sequence[int] = (1, 64, 64), *,
                image_column: str | None = None, name: str = "mri", spec: Mapping | None = None,
                on_error: str = "raise", orientation: str | None = "RAS",
                spacing: Sequence[float] | float | None = None, intensity: str | None = "minmax",
                resize: str = "resize_pad", progress: bool | None = None) -> Cohort:
    """Load scans and their patients' variables into a :class:`~medcausal.Cohort`.

    ``images`` is a folder (every image file in it, each ``.dcm`` file one scan, and
    every subfolder of DICOM files as one series), a list of paths (files or DICOM
    series folders), a ``.npz`` file (MedMNIST style), or
    ``None`` with ``image_column`` naming a column of file paths in ``table``
    (relative paths are relative to the table file's folder). ``table`` is a
    DataFrame or a CSV/Parquet path with an ``id_column``; a scan's id is its file
    name without the suffix (or its series folder's name). Without a table the
    cohort holds the ids only.

    Preprocessing follows ``spec`` (from :func:`image_transform_spec`), or one built
    from ``shape`` and the keyword settings; it is returned in
    ``cohort.meta["image_specs"][name]``, and a model fitted on the cohort keeps it
    (``model.image_specs``): pass it back as ``spec=`` to preprocess new scans identically.
    The table gains ``<name>_path`` (source) and, when the reader gives one,
    ``<name>_affine`` (the voxel-to-mm affine after preprocessing, as JSON) columns.

    ``on_error="raise"`` stops at the first unreadable or ill-shaped scan, or at ids
    that do not match the table, naming them; ``"skip"`` drops them, warns with an
    :class:`ImageLoadWarning` and lists them in ``cohort.meta["skipped"]``.

    >>> import tempfile, pathlib, numpy as np, PIL.Image
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> PIL.Image.fromarray(np.full((20, 30), 200, np.uint8)).save(d / "a.png")
    >>> _ = (d / "b.png").write_bytes(b"not a png")
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     c = load_images(d, shape=(1, 16, 16), on_error="skip")
    >>> c.arrays["mri"].shape, [s["path"].endswith("b.png") for s in c.meta["skipped"]]
    ((1, 1, 16, 16), [True])
    """
    from tqdm.auto import tqdm

    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if spec is None:
        spec = image_transform_spec(shape, orientation=orientation, spacing=spacing,
                                    intensity=intensity, resize=resize)
    spec = _check_spec(spec)
    transforms = build_transforms(spec)
    tab, base = _read_table(table, [id_column, image_column, f"{name}_path"])
    if tab is not None and id_column not in tab.columns:
        raise DataError(f"the table has no id column {id_column!r}; columns: {list(tab.columns)}")
    if tab is not None and tab[id_column].duplicated().any():
        dup = tab.loc[tab[id_column].duplicated(), id_column].astype(str).unique()[:5].tolist()
        raise DataError(f"the table's id column {id_column!r} has duplicate ids, e.g. {dup}")

    # what to read: (id, path or None, kind, preloaded array or None, extra columns)
    items: list[tuple[str, Path | None, str, Any, dict]] = []
    if images is None:
        if tab is None or image_column is None:
            raise DataError("give images= (a folder, paths or a .npz file), or a table with "
                            "image_column= naming its column of file paths")
        if image_column not in tab.columns:
            raise DataError(f"the table has no image column {image_column!r}; columns: {list(tab.columns)}")
        for uid, p in zip(tab[id_column].astype(str), tab[image_column]):
            if pd.isna(p):
                items.append((uid, None, "missing", None, {}))
                continue
            path = Path(str(p))
            path = path if path.is_absolute() else base / path
            items.append((uid, path, _kind(path) or "unknown", None, {}))
    else:
        paths: list[Path]
        if isinstance(images, (str, Path)):
            root = Path(images)
            if not root.exists():
                raise DataError(f"image path {str(root)!r} does not exist")
            paths = _scan_folder(root) if root.is_dir() else [root]
        elif isinstance(images, Iterable):
            paths = [Path(str(p)) for p in images]
            if not paths:
                raise DataError("the list of image paths is empty")
        else:
            raise DataError("images= must be a folder, a path or a list of paths, got "
                            f"{type(images).__name__}")
        for path in paths:
            kind = _kind(path) if path.exists() else "missing"
            if kind == "npz":
                for uid, arr, extra in _npz_items(path, spec):
                    items.append((uid, path, "array", arr, extra))
            else:
                items.append((_stem(path), path, kind or "unknown", None, {}))

    if tab is not None and images is not None:
        # a scan's id is its file name without suffix; files written by write_images
        # carry ids with unsafe characters replaced, and their names in <name>_path
        alias: dict[str, str] = {}
        path_col = f"{name}_path"
        for j, uid in enumerate(tab[id_column].astype(str)):
            alias.setdefault(_safe_name(uid), uid)
            if path_col in tab.columns and isinstance(tab[path_col].iloc[j], str):
                alias[_stem(Path(tab[path_col].iloc[j]))] = uid
            alias[uid] = uid
        items = [(alias.get(it[0], it[0]), *it[1:]) for it in items]
    scales = _png_scales(tab, id_column, name)
    dup = pd.Series([i[0] for i in items])
    if dup.duplicated().any():
        raise DataError(f"two scans share an id, e.g. {dup[dup.duplicated()].unique()[:5].tolist()}; "
                        "ids are file names without their suffix")
    # match scans and table rows by id
    skipped: list[dict] = []
    if tab is not None and images is not None:
        ids_tab = set(tab[id_column].astype(str))
        no_row = [it[0] for it in items if it[0] not in ids_tab]
        ids_img = {it[0] for it in items}
        no_scan = [u for u in tab[id_column].astype(str) if u not in ids_img]
        if (no_row or no_scan) and on_error == "raise":
            parts = []
            if no_row:
                parts.append(f"{len(no_row)} scan(s) have no row in the table (ids {no_row[:5]})")
            if no_scan:
                parts.append(f"{len(no_scan)} table row(s) have no scan (ids {no_scan[:5]})")
            raise DataError("; ".join(parts) + f"; the table's id column is {id_column!r}. "
                            "Pass on_error='skip' to drop them.")
        skipped += [{"id": u, "path": None, "reason": "no scan for this table row"} for u in no_scan]
        skipped += [{"id": it[0], "path": str(it[1]), "reason": "no table row for this scan"}
                    for it in items if it[0] in set(no_row)]
        items = [it for it in items if it[0] not in set(no_row)]

    arrays, rows = [], []
    show = progress if progress is not None else len(items) > 200
    for uid, path, kind, pre, extra in tqdm(items, desc="loading scans", unit="scan", leave=False,
                                            disable=None if show else True):
        where = f"image {str(path)!r} (id {uid!r})" if path is not None else f"id {uid!r}"
        try:
            if kind == "missing":
                raise DataError(f"{where}: file does not exist")
            if kind == "unknown":
                raise DataError(f"{where}: unsupported file type (supported: {', '.join(IMAGE_SUFFIXES)})")
            if pre is not None:
                img = pre
            else:
                try:
                    img = _read(path, kind)
                except Exception as e:
                    raise DataError(f"cannot read {where}: {type(e).__name__}: {e}") from None
                s, file = scales.get(uid, (None, None))
                if kind == "pil" and s is not None and file in (None, path.name):
                    img = img.float() * s     # integers of a PNG written by write_images
            arr, affine = _preprocess(img, transforms, spec, where)
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append({"id": uid, "path": None if path is None else str(path), "reason": str(e)})
            continue
        row = {id_column: uid, f"{name}_path": None if path is None else str(path), **extra}
        if affine is not None and pre is None:
            row[f"{name}_affine"] = json.dumps(np.round(affine, 6).tolist())
        rows.append(row)
        arrays.append(arr)
    if not arrays:
        raise DataError(f"no scan could be loaded ({len(skipped)} skipped): "
                        + "; ".join(s["reason"] for s in skipped[:3]))
    info = pd.DataFrame(rows)
    if tab is not None:
        fresh = [c for c in info.columns if c != id_column and c in tab.columns]
        keep = tab.drop(columns=fresh).assign(**{id_column: tab[id_column].astype(str)})
        merged = keep.merge(info, on=id_column, how="inner", validate="one_to_one")  # table order
        order = {u: i for i, u in enumerate(info[id_column])}
        stack = np.stack(arrays)[[order[u] for u in merged[id_column]]]
        table_out = merged
    else:
        table_out, stack = info, np.stack(arrays)
    cohort = Cohort(table_out, {name: stack.astype(np.float32)}, id_column=id_column,
                    meta={"image_specs": {name: spec}, "skipped": skipped})
    if skipped:
        listing = "; ".join(f"{s['path'] or s['id']}: {s['reason']}" for s in skipped[:10])
        more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
        warnings.warn(f"load_images skipped {len(skipped)} item(s): {listing}{more}",
                      ImageLoadWarning, stacklevel=2)
    return cohort


def _png_scales(tab, id_column: str, name: str) -> dict[str, tuple[float, str | None]]:
    """id -> (the ``<name>_scale`` of its PNG written by :func:`write_images`, that file's name)."""
    scale_col, path_col = f"{name}_scale", f"{name}_path"
    if tab is None or scale_col not in tab.columns:
        return {}
    files = tab[path_col] if path_col in tab.columns else pd.Series([None] * len(tab))
    out = {}
    for uid, s, f in zip(tab[id_column].astype(str), tab[scale_col], files):
        if pd.notna(s):
            out[uid] = (float(s), Path(f).name if isinstance(f, str) else None)
    return out


def _read_table(table, str_columns) -> tuple[pd.DataFrame | None, Path]:
    if table is None:
        return None, Path(".")
    if isinstance(table, pd.DataFrame):
        return table.reset_index(drop=True), Path(".")
    if isinstance(table, (str, Path)):
        return read_table(table, [c for c in str_columns if c]), Path(table).parent
    raise DataError(f"table= must be a DataFrame or a CSV/Parquet path, got {type(table).__name__}")


# --------------------------------------------------------------------------- #
# writing a cohort
# --------------------------------------------------------------------------- #
def _safe_name(uid: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(uid)).strip(".") or "scan"


def write_images(cohort: Cohort, folder: str | Path, format: str = "nifti", *, name: str = "mri",
                 affine: np.ndarray | None = None, table_name: str = "cohort.csv") -> Path:
    """Write a cohort's scans (one file per row) and its table (CSV/Parquet) into ``folder``.

    NIfTI keeps float32 values and the affine: ``affine=`` if given, else the
    ``<name>_affine`` column (written by :func:`load_images`), else the identity.
    PNG holds 16-bit integers (8-bit for RGB): values are scaled by the cohort's maximum,
    and the factor is kept in the ``<name>_scale`` column, which :func:`load_images`
    applies; NIfTI output drops that column. All rows are checked before any file is
    written, and the old table is removed first, so a failed write leaves no table.
    File names are the ids (characters outside ``[A-Za-z0-9._-]`` become ``_``);
    ``<name>_path`` holds them. Every file is written atomically. Returns the table path.

    >>> import tempfile, numpy as np, pandas as pd
    >>> c = Cohort(pd.DataFrame({"id": ["a:1"]}), {"mri": np.ones((1, 1, 4, 4), np.float32)})
    >>> sorted(p.name for p in write_images(c, tempfile.mkdtemp(), format="png").parent.iterdir())
    ['a_1.png', 'cohort.csv']
    """
    import nibabel as nib
    from PIL import Image as PILImage

    if not isinstance(cohort, Cohort):
        raise DataError(f"write_images needs a medcausal Cohort, got {type(cohort).__name__}")
    if name not in cohort.arrays:
        raise DataError(f"the cohort has no array {name!r}; arrays: {list(cohort.arrays)}")
    fmt = str(format).lower()
    if fmt not in ("nifti", "png"):
        raise DataError(f"format must be 'nifti' or 'png', got {format!r}")
    arr = np.asarray(cohort.arrays[name], dtype=np.float32)
    if arr.ndim not in (4, 5):
        raise DataError(f"array {name!r} must be [n, C, H, W] or [n, C, X, Y, Z], got {arr.shape}")
    C = arr.shape[1]
    if fmt == "png" and (arr.ndim != 4 or C not in (1, 3)):
        raise DataError(f"PNG holds 2D scans with 1 or 3 channels; array {name!r} is {arr.shape[1:]}")
    if fmt == "nifti" and C != 1:
        raise DataError(f"NIfTI output holds single-channel scans; array {name!r} has {C} channels")
    if not np.isfinite(arr).all():
        raise DataError(f"array {name!r} has non-finite values")
    folder = Path(folder)
    table = cohort.table.copy()
    names = [_safe_name(u) for u in cohort.ids]
    if len(set(names)) != len(names):
        raise DataError("two ids map to the same file name after replacing characters outside "
                        "[A-Za-z0-9._-]; make the ids distinct")
    # check every row before touching the folder, so a bad row never leaves it half rewritten
    aff_col, scale_col = f"{name}_affine", f"{name}_scale"
    if fmt == "png":
        lo = float(arr.min()) if arr.size else 0.0
        if lo < 0:
            raise DataError(f"PNG cannot hold negative values (array {name!r} has min {lo}); use NIfTI")
        top = 65535 if C == 1 else 255      # 16-bit grey, 8-bit RGB
        scale = (float(arr.max()) / top if arr.size else 0.0) or 1.0
        table[scale_col] = scale
    else:
        table = table.drop(columns=[scale_col], errors="ignore")   # NIfTI keeps the values
        affines = [_row_affine(affine, table, aff_col, i, uid) for i, uid in enumerate(cohort.ids)]
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / table_name
    # a table describes its files: drop the old one first, so a write that fails midway
    # leaves no table claiming a mix of old and new files as one cohort
    out.unlink(missing_ok=True)
    files = []
    for i, stem in enumerate(names):
        if fmt == "nifti":
            fname = f"{stem}.nii.gz"
            with atomic_write(folder / fname) as tmp:
                _save_nifti(nib.Nifti1Image(arr[i, 0], affines[i]), tmp)
        else:
            fname = f"{stem}.png"
            q = np.clip(np.rint(arr[i] / scale), 0, top)
            pil = (PILImage.fromarray(q[0].astype(np.uint16)) if C == 1
                   else PILImage.fromarray(q.transpose(1, 2, 0).astype(np.uint8), mode="RGB"))
            with atomic_write(folder / fname) as tmp:
                pil.save(tmp, format="PNG")
        files.append(fname)
    table[f"{name}_path"] = files
    if fmt == "nifti" and affine is not None:
        table[aff_col] = json.dumps(np.asarray(affine, dtype=float).round(6).tolist())
    write_table(table, out)
    return out


def _row_affine(affine, table: pd.DataFrame, aff_col: str, i: int, uid) -> np.ndarray:
    """The 4x4 affine of row ``i``: ``affine=``, else its ``<name>_affine`` JSON, else the identity."""
    where = "the affine= argument" if affine is not None else f"{aff_col!r} of id {str(uid)!r}"
    try:
        if affine is not None:
            A = np.asarray(affine, dtype=np.float64)
        elif aff_col in table.columns and isinstance(table[aff_col].iloc[i], str):
            A = np.asarray(json.loads(table[aff_col].iloc[i]), dtype=np.float64)
        else:
            return np.eye(4)
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: not a 4x4 affine ({type(e).__name__}: {e})") from None
    if A.shape != (4, 4) or not np.isfinite(A).all():
        raise DataError(f"{where}: affine must be a finite 4x4 matrix, got shape {A.shape}")
    return A


def _save_nifti(img, tmp: str) -> None:
    """nibabel picks compression from the suffix: write ``tmp.nii.gz``, then move it onto ``tmp``."""
    import contextlib
    import os

    import nibabel as nib

    gz = tmp + ".nii.gz"
    try:
        nib.save(img, gz)
        os.replace(gz, tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(gz)
