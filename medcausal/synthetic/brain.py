r"""A synthetic brain-MRI cohort whose counterfactual scans are known exactly.

Each patient's scan is *rendered* from the patient's variables and exogenous
noise by deterministic operators on the MNI ICBM152 2009 template (T1 mask
plus grey/white-matter probability maps) that ships inside the ``nilearn``
wheel; nothing is downloaded. So ``render(variables, noise)`` gives the scan,
and the true counterfactual scan of a patient under ``do(...)`` is
``render(variables after the intervention, the same noise)``.

>>> sim = BrainMRI(shape=(32, 32))
>>> cohort = sim.sample(4, seed=0)
>>> cohort.arrays["mri"].shape, cohort.table["id"].tolist()[:2]
((4, 1, 32, 32), ['brain:0:0', 'brain:0:1'])
>>> cf = sim.counterfactual(cohort, do={"age": lambda a: a + 20})
>>> bool((cf.table["sex"] == cohort.table["sex"]).all())   # not a descendant of age
True
>>> bool((cf.table["ventricle_volume"] > cohort.table["ventricle_volume"]).all())
True

Structural causal model
-----------------------
Every exogenous noise ``u_v`` is an independent standard normal, ``Phi`` the
normal CDF, ``s`` the logistic function. Volumes are in mL, age in years.

==================  ===============================================================
age                 ``45 + 40 Phi(u)``: uniform on [45, 85] years, about the age
                    range of the UK Biobank imaging cohort (Miller et al., Nat
                    Neurosci 2016).
sex                 ``1[u > 0]``; 1 = male, 0 = female.
scanner             ``"A"``, ``"B"`` or ``"C"`` with probabilities 0.40/0.35/0.25
                    (``Phi(u)`` cut at 0.40 and 0.75).
disease             ``1[Phi(u) < s(-1.5 + 0.08 (age - 65))]``: a neurodegenerative
                    / small-vessel phenotype whose prevalence rises with age
                    (4 % at 45, 18 % at 65, 52 % at 85).
icv                 ``(1320 + 160 sex) exp(0.08 u)``: intracranial volume; men's
                    about 12 % larger (Ruigrok et al., Neurosci Biobehav Rev
                    2014), within-sex CV about 8 %.
brain_volume        ``icv * (0.85 f(age) (1 - 0.04 disease) + 0.025 tanh(u / 2))``
                    with ``f(a) = 1 - 0.002 (a - 45) - 3.75e-5 (a - 45)^2``: the
                    brain parenchymal fraction (grey + white matter / ICV) is
                    about 0.85 in mid-life and falls ever faster, 0.2 %/yr at 45
                    to 0.5 %/yr at 85 (Scahill et al., Arch Neurol 2003; Fotenos
                    et al., Neurology 2005; review: Vagberg et al., PLoS ONE
                    2017); disease removes a further 4 % (Fotenos 2005).
ventricle_volume    ``18 (icv / 1450) exp(0.025 (age - 45) + 0.3 disease + 0.25 u)``:
                    lateral ventricles, about 18 mL at 45, growing 2.5 %/yr
                    (about 50 mL at 85), 35 % larger with disease (Nestor et al.,
                    Brain 2008; Apostolova et al., Alzheimer Dis Assoc Disord 2012).
lesion_load         ``60 tanh(L / 60)``, ``L = 1.5 exp(0.06 (age - 45) + 1.2 disease
                    + 0.8 u)``: white-matter hyperintensity volume, log-normal,
                    median 1.5 mL at 45 and 16 mL at 85, about 3x with disease
                    (Habes et al., Brain 2016; STRIVE, Wardlaw et al., Lancet
                    Neurol 2013); ``tanh`` caps it smoothly below 60 mL.
mri                 ``render(icv, brain_volume, ventricle_volume, lesion_load,
                    scanner; u_mri)`` (below).
==================  ===============================================================

Edges: age -> disease; sex -> icv; age, disease, icv -> brain_volume and
ventricle_volume; age, disease -> lesion_load; icv, brain_volume,
ventricle_volume, lesion_load, scanner -> mri. Age, sex and disease reach the
scan only through the volumes. The effect sizes are rounded from the sources
above to give a plausible, learnable cohort; they are not a fitted model of
any population.

Rendering (``u_mri``: pose, bias field, lesion sites, acquisition noise)
-----------------------------------------------------------------------
A FLAIR-like contrast (CSF dark, grey matter slightly brighter than white
matter, lesions bright), in the spirit of BrainWeb's fuzzy-tissue phantoms
(Kwan et al., IEEE TMI 1999). Per patient, in this order:

1. *Ventricles*: a smooth radial warp around the lateral ventricles' centre,
   in their own Mahalanobis metric, scales them by ``m`` and compresses (or
   stretches) the tissue around them over a blend zone, identity beyond it
   (a C1 diffeomorphism for every ``m`` used); ``m`` comes from a lookup table
   of the warped template's ventricle volume, so their volume matches
   ``ventricle_volume``.
2. *Head size*: isotropic scaling by ``(icv / ICV_template)^(1/3)``.
3. *Pose*: a small rigid motion (rotations ~ N(0, 3 deg), shifts ~ N(0, 2 mm)).
4. *Atrophy*: the outer ``delta`` mm of the tissue map ``T = GM + WM`` fade,
   ``T' = T e((D - delta) / w) / e(D / w)`` with ``D`` the template's depth below
   the tissue surface (sulci included) and ``e`` a smooth step of width
   ``w = 1`` mm: gyri thin and sulci widen, deeper tissue keeps its value, and
   the 3 mm around the ventricles is spared. ``delta`` is solved per patient
   (regula falsi) so that grey + white matter equals ``brain_volume``; the lost
   tissue becomes CSF, and a negative ``delta`` grows the surface for the rare
   young-looking brain.
5. *Lesions*: 32 (2D) or 64 (3D) candidate sites drawn in the template's white
   matter, denser next to the ventricles, each a smooth blob of radius 4-12 mm;
   one threshold, solved per patient, grows them until their volume equals
   ``lesion_load``.
6. *Scanner*: tissue intensities and gain of the scanner, a multiplicative
   quadratic bias field (amplitude by scanner), and Rician noise (Gudbjartsson &
   Patz, MRM 1995) whose level depends on the scanner.

2D scans are axial slices at MNI ``z = 20`` mm (the lateral ventricles' bodies),
in a 192 mm field of view. A slice cannot hold a volume, so it shows each
volume ``V`` as an area ``A_ref (V / V_ref)^(2/3)``, with ``A_ref`` and ``V_ref``
the template's slice area and volume (what isotropic scaling of the brain
would do to the slice), and the lesion load as a share of the slice's brain
tissue equal to 2x its share of brain volume (white-matter lesions gather
around the ventricles). :meth:`BrainMRI.measure` inverts these rules. In 3D
the volumes are the volumes.

Orientation: a 2D scan ``[H, W]`` has rows running anterior -> posterior and
columns left -> right (MNI x increasing; neurological convention); a 3D scan
``[D, H, W]`` adds slices running inferior -> superior. ``BrainMRI.affine``
maps array indices to MNI millimetres.

Every operator uses only correctly rounded arithmetic per voxel (no
transcendental functions on voxel arrays; per-patient constants come from the
``math`` module), so a patient's scan is bit-identical however the cohort is
batched, sliced or threaded. Targets the template cannot reach (e.g. ages far
beyond 85 under ``do``) are rendered at the nearest attainable value with an
:class:`~medcausal.errors.OutOfSupportWarning`.

Units and their noise
---------------------
``sample`` names each patient ``"brain:<seed>:<row>"`` (the ``id`` column) and
the noise of patient ``(seed, row)`` is a fixed function of those two numbers
(the counter-based hash of :mod:`medcausal.synthetic.tabular`). So
:meth:`BrainMRI.noise`, :meth:`BrainMRI.render` and
:meth:`BrainMRI.counterfactual` work on any slice, reordering or CSV round
trip of a sampled cohort, as long as the ``id`` column travels with it.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.special import ndtri

from ..cohort import Cohort
from ..errors import DataError, InterventionError, MedCausalError, OutOfSupportWarning, warn
from ..graph import Binary, Categorical, CausalGraph, Continuous, Image
from ..interventions import Intervention, parse_do
from .tabular import _HAS_NP_STRINGS, TabularSCM, _hash_uniform, _parse_ids

__all__ = ["BrainMRI", "SCANNERS", "VARIABLES"]

_TAG = "brain"
VARIABLES = ("age", "sex", "scanner", "disease", "icv", "brain_volume", "ventricle_volume",
             "lesion_load")
SCANNERS = ("A", "B", "C")
_CONTINUOUS = ("age", "icv", "brain_volume", "ventricle_volume", "lesion_load")
_MRI_PARENTS = ("icv", "brain_volume", "ventricle_volume", "lesion_load", "scanner")
_EDGES = [("age", "disease"), ("sex", "icv"),
          ("age", "brain_volume"), ("disease", "brain_volume"), ("icv", "brain_volume"),
          ("age", "ventricle_volume"), ("disease", "ventricle_volume"), ("icv", "ventricle_volume"),
          ("age", "lesion_load"), ("disease", "lesion_load")] + [(p, "mri") for p in _MRI_PARENTS]

EQUATIONS = {
    "age": "age = 45 + 40 Phi(u)",
    "sex": "sex = 1[u > 0]  (1 = male)",
    "scanner": "scanner = A if Phi(u) < 0.40, B if Phi(u) < 0.75, else C",
    "disease": "disease = 1[Phi(u) < s(-1.5 + 0.08 (age - 65))]",
    "icv": "icv = (1320 + 160 sex) exp(0.08 u)",
    "brain_volume": ("brain_volume = icv (0.85 f(age) (1 - 0.04 disease) + 0.025 tanh(u/2)), "
                     "f(a) = 1 - 0.002 (a - 45) - 3.75e-5 (a - 45)^2"),
    "ventricle_volume": ("ventricle_volume = 18 (icv / 1450) exp(0.025 (age - 45) + 0.3 disease"
                         " + 0.25 u)"),
    "lesion_load": "lesion_load = 60 tanh(L / 60), L = 1.5 exp(0.06 (age - 45) + 1.2 disease + 0.8 u)",
    "mri": "mri = render(icv, brain_volume, ventricle_volume, lesion_load, scanner; u_mri)",
}

# --------------------------------------------------------------------------- #
# noise layout: patient (seed, row), counter j  ->  one uniform in (0, 1)
# --------------------------------------------------------------------------- #
_ROW_SHIFT = np.uint64(32)  # counter = row << 32 | j
_J_SCALAR = 0              # 8 scalar noises, one per variable of VARIABLES
_J_MRI = 256               # pose, bias and lesion parameters of the scan
_J_PIXEL = 1 << 20         # acquisition noise: 2 normals per voxel (Rician)


def _uniforms(seeds: np.ndarray, rows: np.ndarray, start: int, count: int) -> np.ndarray:
    """``[n, count]`` uniforms of patients ``(seeds[i], rows[i])``, counters ``start...``."""
    counters = ((np.asarray(rows, dtype=np.uint64)[:, None] << _ROW_SHIFT)
                + np.arange(start, start + count, dtype=np.uint64)[None, :])
    return _hash_uniform(np.asarray(seeds, dtype=np.uint64)[:, None], counters)


# Per-row scalar maths with the ``math`` module: results do not depend on how
# many rows share a call (SIMD kernels may round tails differently), so a
# patient's variables are bit-identical however the cohort was batched.
def _rowwise(fn, *arrays) -> np.ndarray:
    cols = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    return np.array([fn(*vals) for vals in zip(*cols)], dtype=np.float64)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------- #
# scanners: FLAIR-like tissue intensities, gain, bias amplitude, noise level
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ScannerProfile:
    """Intensities (CSF, GM, WM, lesion), gain, bias-field amplitude and Rician noise sigma."""

    csf: float
    gm: float
    wm: float
    lesion: float
    gain: float
    bias: float
    noise: float


SCANNER_PROFILES = {
    "A": ScannerProfile(csf=0.06, gm=0.62, wm=0.52, lesion=0.92, gain=1.00, bias=0.06, noise=0.015),
    "B": ScannerProfile(csf=0.10, gm=0.58, wm=0.50, lesion=0.85, gain=0.90, bias=0.12, noise=0.030),
    "C": ScannerProfile(csf=0.04, gm=0.66, wm=0.55, lesion=0.95, gain=0.95, bias=0.09, noise=0.022),
}

# rendering constants
_SLICE_Z = 20.0                  # mm, MNI; axial level of the lateral ventricles' bodies
_CENTER = (0.0, -17.0, 5.0)      # mm, MNI; centre of the field of view (x, y, z)
_FOV = 192.0                     # mm
_ROT_SD = 3.0                    # degrees
_SHIFT_SD = 2.0                  # mm
_TAU_MAX = 25.0                  # mm: deepest erosion of the tissue's surface (atrophy)
_TAU_MIN = -6.0                  # mm: most growth of it
_EDGE_W = 1.0                    # mm: width of the eroded edge's profile
_M_RANGE = (0.55, 3.0)           # ventricle magnifications covered
_WARP_K = 2.0                    # ventricle edge at r = 1: two SDs of the ventricles
_WARP_BLEND = 1.2                # width of the warp's blend zone (whitened units)
_LESION_RAMP = 0.2               # soft edge of lesion blobs
_SLICE_LESION_FACTOR = 2.0       # 2D: lesion share of slice tissue vs share of brain volume
_BATCH = 128
# measurement: levels relative to the scan's median tissue intensity
_WM_LEVEL = 1.0
_LESION_LEVEL = 1.65
_LESION_SEED = 1.3
_VENT_RIM = 6.0  # mm of partial-volume rim counted around the ventricles


# --------------------------------------------------------------------------- #
# the template
# --------------------------------------------------------------------------- #
_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}


def _template_paths() -> dict[str, Path]:
    """The template files inside the installed nilearn package (never downloaded)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise MedCausalError("BrainMRI needs the 'nilearn' package (pip install nilearn): its wheel "
                             "ships the MNI152 template the scans are rendered on")
    base = Path(spec.origin).parent / "datasets" / "data"
    paths = {k: base / name for k, name in _FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise MedCausalError(f"the MNI152 template files {missing} are not in the installed nilearn "
                             f"package; BrainMRI was written for nilearn >= 0.10")
    return paths


@lru_cache(maxsize=1)
def _mni152() -> dict:
    """1 mm template maps (float32, [x, y, z]) and derived masks; loaded once per process."""
    import nibabel as nib

    paths = _template_paths()
    imgs = {k: nib.load(str(p)) for k, p in paths.items()}
    affine = imgs["t1"].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise MedCausalError(f"unexpected MNI152 template affine {affine.tolist()}")
    raw = {k: np.asarray(im.dataobj) for k, im in imgs.items()}
    gm = raw["gm"].astype(np.float32) / np.float32(raw["gm"].max())
    wm = raw["wm"].astype(np.float32) / np.float32(raw["wm"].max())
    # intracranial mask: the skull-stripped T1's mask misses sulcal CSF, so close it
    # (6 mm, on a 2 mm grid) and fill it; the brain tissue always lies inside
    brain = raw["t1"] > 0
    coarse = _block_mean(brain.astype(np.float32)) > 0.5
    grown = ndi.distance_transform_edt(~coarse) * 2.0 <= 6.0
    closed = ndi.binary_fill_holes(ndi.distance_transform_edt(grown) * 2.0 > 6.0)
    closed = np.repeat(np.repeat(np.repeat(closed, 2, 0), 2, 1), 2, 2)
    closed = closed[tuple(slice(0, n) for n in brain.shape)]
    ic = np.maximum((brain | closed).astype(np.float32), np.minimum(gm + wm, 1.0))
    csf = np.clip(ic - gm - wm, 0.0, 1.0)
    origin = affine[:3, 3].astype(np.float64)
    # lateral ventricles: the largest internal CSF component (>= 10 mm inside the
    # intracranial mask) that lies wholly inside a central box; 1 mm, kept with a
    # 2-voxel rim for partial volume
    dist = ndi.distance_transform_edt(_block_mean(ic) > 0.5) * 2.0  # mm, on a 2 mm grid
    lo = np.round(np.array([-45.0, -75.0, -25.0]) - origin).astype(int)
    hi = np.round(np.array([45.0, 45.0, 55.0]) - origin).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    inner = dist[np.ix_(*[np.arange(a, b) // 2 for a, b in zip(lo, hi)])] > 10.0
    cand = (csf[box] > 0.5) & inner
    lab, nl = ndi.label(cand)
    border = np.unique(np.concatenate([np.take(lab, [0, -1], axis=ax).ravel() for ax in range(3)]))
    sizes = ndi.sum_labels(cand, lab, np.arange(1, nl + 1))
    sizes[border[border > 0] - 1] = 0
    if nl == 0 or sizes.max() < 3000:
        raise MedCausalError("could not find the ventricles in the MNI152 template")
    vmask = np.zeros(csf.shape, dtype=bool)
    vmask[box] = ndi.binary_dilation(lab == int(np.argmax(sizes)) + 1, iterations=2)
    vp = csf * vmask
    return {"gm": gm, "wm": wm, "ic": ic, "vp": vp.astype(np.float32), "vmask": vmask,
            "origin": origin,
            "V_brain": float((gm + wm).sum(dtype=np.float64)) / 1000.0,
            "V_icv": float(ic.sum(dtype=np.float64)) / 1000.0,
            "V_vent": float(vp.sum(dtype=np.float64)) / 1000.0}


def _block_mean(a: np.ndarray, f: int = 2) -> np.ndarray:
    pad = [(0, (-s) % f) for s in a.shape]
    a = np.pad(a, pad)
    s = a.shape
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def _bump(q: torch.Tensor) -> torch.Tensor:
    """``(1 - q)^3`` for ``q < 1``, else 0: a C2 bump in the squared radius (no transcendentals)."""
    t = torch.clamp(1.0 - q, min=0.0)
    return t * t * t


@dataclass
class _Template:
    """Template maps and constants for one output geometry (cached per shape)."""

    d: int
    shape: tuple
    spacing: float
    maps: torch.Tensor          # [1, 5, *tpl] GM, WM, IC, ventricle rim, depth (torch axis order)
    tpl_origin: np.ndarray      # mm of template index 0 along x, y(, z)
    tpl_spacing: float
    tpl_size: np.ndarray        # voxels along x, y(, z)
    center: np.ndarray          # FOV centre, mm, (x, y(, z))
    v_center: np.ndarray        # ventricle centre, mm
    v_whiten: np.ndarray        # [d, d]: r^2 = |W (x - c)|^2, r = 1 at the bump's edge
    lesion_cdf: np.ndarray      # cumulative lesion-site weights over template voxels
    lesion_index: np.ndarray    # template voxel index (x, y(, z)) for each cdf entry
    lut_m: np.ndarray           # ventricle magnification grid
    lut_measure: np.ndarray     # ventricle measure of the warped template (mm^d) for lut_m
    ref_volume: dict            # template volumes (mL): brain, icv, ventricles
    ref_measure: dict           # template measures in the output's dimension (mm^d)
    out_coords: torch.Tensor    # [P, d] output voxel centres (mm), in output memory order

    @property
    def n_lesions(self) -> int:
        return 32 if self.d == 2 else 64

    @property
    def n_bias(self) -> int:
        return self.d + self.d * (self.d + 1) // 2

    @property
    def n_params(self) -> int:
        n_rot = 1 if self.d == 2 else 3
        return n_rot + self.d + self.n_bias + self.n_lesions * (3 + self.d)

    def to_volume(self, measure: np.ndarray, name: str) -> np.ndarray:
        """A measure of the output's dimension (mm^d) as a volume (mL), by the slice rule."""
        m = np.asarray(measure, dtype=np.float64)
        if self.d == 3:
            return m / 1000.0
        ratio = np.maximum(m, 0.0) / self.ref_measure[name]
        return self.ref_volume[name] * ratio ** 1.5

    def to_measure(self, volume: np.ndarray, name: str) -> np.ndarray:
        """A volume (mL) as the measure the scan shows (mm^d); per row, batch-independent."""
        v = np.asarray(volume, dtype=np.float64)
        if self.d == 3:
            return v * 1000.0
        ref_m, ref_v = self.ref_measure[name], self.ref_volume[name]
        return _rowwise(lambda x: ref_m * (max(x, 0.0) / ref_v) ** (2.0 / 3.0), v)


def _ventricle_warp(x: torch.Tensor, center, whiten, m: torch.Tensor) -> torch.Tensor:
    """Inverse ventricle warp (output -> template mm) for ``x [B, P, d]``, magnification ``m [B]``.

    In whitened radius ``r = |W (x - c)|`` (the ventricles' edge near ``r = 1``)
    the template radius is ``h(r) = r / m`` for ``r <= m``, ``r`` beyond
    ``m + w``, and a C1 cubic-Hermite blend in between: the ventricles scale by
    ``m`` and the tissue around them is compressed (``m > 1``) or stretched.
    ``h`` is increasing for ``m >= 0.55``, so the warp is a diffeomorphism.
    """
    d = x.shape[-1]
    rel = [x[..., i] - float(center[i]) for i in range(d)]
    q = torch.zeros_like(rel[0])
    for i in range(d):
        w = rel[0] * float(whiten[i, 0])
        for j in range(1, d):
            w = w + rel[j] * float(whiten[i, j])
        q = q + w * w
    r = torch.sqrt(q)
    mm = m[:, None]
    t = torch.clamp((r - mm) / _WARP_BLEND, 0.0, 1.0)
    t2 = t * t
    c = _WARP_BLEND / mm
    P = (2.0 * t2 * t - 3.0 * t2 + 1.0) + c * (t2 * t - 2.0 * t2 + t)
    outer = (r - (mm - 1.0) * P) / torch.clamp(r, min=1e-6)
    factor = torch.where(r <= mm, 1.0 / mm, outer)
    return torch.stack([float(center[i]) + rel[i] * factor for i in range(d)], dim=-1)


def _radial(r: np.ndarray, m: float) -> tuple[np.ndarray, np.ndarray]:
    """``h(r)`` and ``h'(r)`` of :func:`_ventricle_warp` in float64 (template radius of output radius)."""
    t = np.clip((r - m) / _WARP_BLEND, 0.0, 1.0)
    c = _WARP_BLEND / m
    P = (2 * t ** 3 - 3 * t ** 2 + 1) + c * (t ** 3 - 2 * t ** 2 + t)
    dP = (6 * t ** 2 - 6 * t) + c * (3 * t ** 2 - 4 * t + 1)
    h = np.where(r <= m, r / m, r - (m - 1) * P)
    dh = np.where(r <= m, 1 / m, np.where(t >= 1, 1.0, 1 - (m - 1) * dP / _WARP_BLEND))
    return h, dh


def _warp_jacobian(rho: np.ndarray, m: float, d: int) -> np.ndarray:
    """Volume factor of the forward ventricle warp at template whitened radius ``rho``."""
    lo = np.minimum(rho, m * rho)
    hi = np.maximum(rho, m * rho) + _WARP_BLEND
    for _ in range(60):                       # invert h by bisection: r with h(r) = rho
        mid = 0.5 * (lo + hi)
        below = _radial(mid, m)[0] < rho
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    r = 0.5 * (lo + hi)
    dh = _radial(r, m)[1]
    ratio = np.where(rho > 1e-9, r / np.maximum(rho, 1e-12), m)
    return ratio ** (d - 1) / dh


def _to_grid(x: torch.Tensor, tpl: _Template) -> torch.Tensor:
    """Template mm -> grid_sample's normalized coordinates (align_corners=True)."""
    d = x.shape[-1]
    cols = []
    for i in range(d):
        scale = 2.0 / (tpl.tpl_spacing * (float(tpl.tpl_size[i]) - 1.0))
        cols.append((x[..., i] - float(tpl.tpl_origin[i])) * scale - 1.0)
    return torch.stack(cols, dim=-1)


def _sample_maps(maps: torch.Tensor, grid_pts: torch.Tensor, d: int) -> torch.Tensor:
    """Sample ``maps [1, C, *tpl]`` at ``grid_pts [B, P, d]`` -> ``[B, C, P]``."""
    B, P, _ = grid_pts.shape
    if d == 2:
        g = grid_pts.reshape(1, B * P, 1, 2)
    else:
        g = grid_pts.reshape(1, B * P, 1, 1, 3)
    out = F.grid_sample(maps, g, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(maps.shape[1], B, P).permute(1, 0, 2)


@lru_cache(maxsize=8)
def _template(shape: tuple) -> _Template:
    mni = _mni152()
    d = len(shape)
    spacing = _FOV / max(shape)
    origin = mni["origin"]
    if d == 2:
        k = int(round(_SLICE_Z - origin[2]))
        sl = slice(k - 1, k + 2)  # a 3 mm slab
        maps_xyz = [mni[n][:, :, sl].mean(axis=2) for n in ("gm", "wm", "ic", "vp")]
        tpl_spacing, tpl_origin = 1.0, origin[:2].copy()
        vmask = mni["vmask"][:, :, k]
    else:
        maps_xyz = [_block_mean(mni[n]) for n in ("gm", "wm", "ic", "vp")]
        tpl_spacing, tpl_origin = 2.0, origin + 0.5  # centre of each 2x2x2 block
        vmask = _block_mean(mni["vmask"].astype(np.float32)) > 0.5
    gm, wm, ic, vp = maps_xyz
    # the ventricles' rim (3 mm) keeps its grey matter: atrophy acts elsewhere
    vzone = ndi.binary_dilation(vmask, iterations=max(1, int(round(3.0 / tpl_spacing))))
    vzone = ndi.gaussian_filter(vzone.astype(np.float32), 1.0)
    # depth below the tissue's surface (mm; negative outside), ventricles filled in
    solid = ndi.binary_fill_holes((gm + wm > 0.5) | vmask)
    depth = (ndi.distance_transform_edt(solid) - ndi.distance_transform_edt(~solid)) * tpl_spacing
    # anti-aliasing before resampling to a coarser output grid
    sigma = 0.45 * spacing / tpl_spacing if spacing > 1.2 * tpl_spacing else 0.0
    smooth = (lambda a: ndi.gaussian_filter(a, sigma, mode="constant")) if sigma else (lambda a: a)
    maps_np = np.stack([smooth(a) for a in (gm, wm, ic, vzone, depth)]).astype(np.float32)
    # torch wants [C, (z,) y, x]: reverse the spatial axes
    maps = torch.from_numpy(np.ascontiguousarray(maps_np.transpose(0, *range(d, 0, -1))))[None]
    tpl_size = np.array(gm.shape, dtype=np.float64)
    voxel = tpl_spacing ** d
    # ventricle centre and shape
    idx = np.indices(vp.shape).reshape(d, -1).T.astype(np.float64)
    pos = tpl_origin + idx * tpl_spacing
    w = vp.reshape(-1).astype(np.float64)
    v_center = (pos * w[:, None]).sum(0) / w.sum()
    cov = ((pos - v_center) * w[:, None]).T @ (pos - v_center) / w.sum()
    v_whiten = np.linalg.inv(np.linalg.cholesky(cov)) / _WARP_K
    # lesion sites: white matter, denser next to the ventricles
    dist = ndi.distance_transform_edt(~vmask) * tpl_spacing
    site_w = np.clip(wm - 0.5, 0.0, None) * (0.2 + np.exp(-dist / 8.0))
    site_w = site_w.reshape(-1)
    nz = np.flatnonzero(site_w > 0)
    lesion_cdf = np.cumsum(site_w[nz])
    lesion_cdf /= lesion_cdf[-1]
    lesion_index = np.stack(np.unravel_index(nz, vp.shape), axis=1)
    # ventricle measure of the warped template as a function of the magnification:
    # the integral of VP over the warped image, by change of variables over VP's voxels
    m_grid = np.geomspace(_M_RANGE[0], _M_RANGE[1], 64)
    inside = np.flatnonzero(w > 0)
    rho = np.linalg.norm((pos[inside] - v_center) @ v_whiten.T, axis=1)
    lut = np.array([(w[inside] * _warp_jacobian(rho, m, d)).sum() * voxel for m in m_grid])
    tmp = _Template(d, shape, spacing, maps, tpl_origin, tpl_spacing, tpl_size, np.zeros(d),
                    v_center, v_whiten, lesion_cdf, lesion_index, m_grid, np.zeros(0), {}, {},
                    torch.zeros(0))
    if np.any(np.diff(lut) <= 0):
        raise MedCausalError("internal error: ventricle volume is not increasing in the warp")
    ref_volume = {"brain": mni["V_brain"], "icv": mni["V_icv"], "ventricles": mni["V_vent"]}
    ref_measure = {"brain": float((gm + wm).sum(dtype=np.float64)) * voxel,
                   "icv": float(ic.sum(dtype=np.float64)) * voxel,
                   "ventricles": float(np.interp(1.0, m_grid, lut))}
    # output voxel centres, in output memory order ([H, W] or [D, H, W])
    center = np.array(_CENTER[:d])
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    if d == 2:
        rows, cols = grids
        xs = center[0] + (cols - (shape[1] - 1) / 2) * spacing
        ys = center[1] - (rows - (shape[0] - 1) / 2) * spacing
        coords = np.stack([xs, ys], -1)
    else:
        dep, rows, cols = grids
        xs = center[0] + (cols - (shape[2] - 1) / 2) * spacing
        ys = center[1] - (rows - (shape[1] - 1) / 2) * spacing
        zs = center[2] + (dep - (shape[0] - 1) / 2) * spacing
        coords = np.stack([xs, ys, zs], -1)
    tmp.center = center
    tmp.lut_measure = lut
    tmp.ref_volume, tmp.ref_measure = ref_volume, ref_measure
    tmp.out_coords = torch.from_numpy(coords.reshape(-1, d)).float()
    return tmp


# --------------------------------------------------------------------------- #
# the simulator
# --------------------------------------------------------------------------- #
class BrainMRI:
    """Synthetic brain-MRI cohort with exact counterfactual scans (see the module docstring).

    ``shape`` is ``(H, W)`` for axial slices (default ``(64, 64)``) or ``(D, H, W)``
    for volumes; ``graph`` is the SCM's :class:`~medcausal.graph.CausalGraph`, with
    the scan as ``mri: Image((1, *shape))``; ``batch_size`` rows are rendered at a time.

    >>> sim = BrainMRI(shape=(32, 32))
    >>> sim.graph.parents("mri")
    ('scanner', 'icv', 'brain_volume', 'ventricle_volume', 'lesion_load')
    >>> sim.graph.variables["mri"]
    Image(shape=(1, 32, 32))
    """

    def __init__(self, shape: tuple = (64, 64), batch_size: int = _BATCH, progress: bool | None = None):
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if isinstance(shape, (str, bytes)) or np.ndim(shape) != 1 or not all(is_int(s) for s in shape):
            raise MedCausalError(f"shape must be (H, W) or (D, H, W) integers, got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3) or min(shape) < 8 or max(shape) > 512:
            raise MedCausalError(f"shape must be (H, W) or (D, H, W) with sides in [8, 512], got {shape}")
        if not is_int(batch_size) or batch_size < 1:
            raise MedCausalError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.shape = shape
        self.batch_size = int(batch_size)
        self.progress = progress
        variables = {"age": Continuous(), "sex": Binary(), "scanner": Categorical(SCANNERS),
                     "disease": Binary(), "icv": Continuous(), "brain_volume": Continuous(),
                     "ventricle_volume": Continuous(), "lesion_load": Continuous(),
                     "mri": Image((1, *shape))}
        self.graph = CausalGraph(variables, edges=_EDGES)
        self.equations = dict(EQUATIONS)
        self.variables = VARIABLES

    def __repr__(self) -> str:
        return f"BrainMRI(shape={self.shape})"

    # ----------------------------------------------------------------- geometry
    @property
    def spacing(self) -> float:
        """Voxel size in mm (isotropic; the field of view is 192 mm along the longest side)."""
        return _FOV / max(self.shape)

    @property
    def affine(self) -> np.ndarray:
        """4x4 map from array indices (``[H, W]`` or ``[D, H, W]`` order) to MNI mm.

        >>> BrainMRI(shape=(32, 32)).affine[:3, 3].tolist()   # centre of voxel [0, 0]
        [-93.0, 76.0, 20.0]
        """
        sp, d = self.spacing, len(self.shape)
        c = _CENTER
        A = np.zeros((4, 4))
        A[3, 3] = 1.0
        if d == 2:
            H, W = self.shape
            A[0, 1], A[1, 0] = sp, -sp
            A[0, 3] = c[0] - (W - 1) / 2 * sp
            A[1, 3] = c[1] + (H - 1) / 2 * sp
            A[2, 2], A[2, 3] = sp, _SLICE_Z
        else:
            D, H, W = self.shape
            A[0, 2], A[1, 1], A[2, 0] = sp, -sp, sp
            A[0, 3] = c[0] - (W - 1) / 2 * sp
            A[1, 3] = c[1] + (H - 1) / 2 * sp
            A[2, 3] = c[2] - (D - 1) / 2 * sp
        return A

    # ------------------------------------------------------------------ public
    def sample(self, n: int, seed: int | None = 0, do: Mapping[str, Any] | None = None) -> Cohort:
        """Draw ``n`` patients (observational, or interventional under ``do``) with their scans.

        Returns a :class:`~medcausal.Cohort`: table ``id`` + the variables, and
        ``arrays["mri"]`` float32 ``[n, 1, *shape]``. ``do`` maps variables to a
        value, a per-row array, or a callable on the value the variable would have
        taken. ``seed=None`` draws a random seed (recorded in the ids).

        >>> sim = BrainMRI(shape=(32, 32))
        >>> c = sim.sample(3, seed=1, do={"disease": 1})
        >>> c.table["disease"].tolist(), c.table["id"].tolist()
        ([1, 1, 1], ['brain:1:0', 'brain:1:1', 'brain:1:2'])
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise MedCausalError(f"n must be a non-negative integer, got {n!r}")
        n = int(n)
        seed = TabularSCM._check_seed(seed)
        ivs = self._parse_do(do)
        seeds = np.full(n, seed, dtype=np.uint64)
        rows = np.arange(n, dtype=np.uint64)
        U = _uniforms(seeds, rows, _J_SCALAR, len(VARIABLES))
        vals: dict[str, np.ndarray] = {}
        for j, v in enumerate(VARIABLES):
            iv = ivs.get(v)
            if iv is not None and not iv.needs_current:
                vals[v] = self._apply(iv, None, n)
                continue
            x = self._equation(v, vals, U[:, j])
            vals[v] = x if iv is None else self._apply(iv, x, n)
        self._check_values(vals, self._ids(seed, n), where=" under do=" if ivs else "")
        table = pd.DataFrame({"id": self._ids(seed, n), **vals})
        images = self._render(table, seeds, rows)
        return Cohort(table, {"mri": images}, id_column="id")

    def counterfactual(self, cohort: Cohort | pd.DataFrame, do: Mapping[str, Any] | None) -> Cohort:
        """The true counterfactual of these patients under ``do``: same ids, same noise.

        Abduction (the patients' own noise, from their ids), action (``do``),
        prediction (the structural equations and the renderer). Variables that are
        not descendants of an intervened variable keep their values; a scan whose
        parents did not change in a row is copied from ``cohort``. Same rows, ids
        and columns as ``cohort``.

        ``cohort`` is read as observed in the unintervened world: the descendants of
        ``do`` follow the structural equations. For patients drawn with
        ``sample(n, do=earlier)``, give that intervention again
        (``do={**earlier, "age": ...}``), or a variable it fixed may change.

        >>> sim = BrainMRI(shape=(32, 32))
        >>> c = sim.sample(3, seed=0)
        >>> cf = sim.counterfactual(c, do={"scanner": "B"})
        >>> cf.table["scanner"].tolist(), bool((cf.table["age"] == c.table["age"]).all())
        (['B', 'B', 'B'], True)
        """
        cohort = self._as_cohort(cohort)
        table = self._check_table(cohort.table, cohort.id_column)
        ivs = self._parse_do(do, index=cohort.table.index)
        n = len(table)
        ids = table[cohort.id_column].to_numpy(dtype=object)
        seeds, rows = self._parse(ids)
        U = _uniforms(seeds, rows, _J_SCALAR, len(VARIABLES))
        affected = set(ivs)
        for v in ivs:
            affected |= self.graph.descendants(v)
        fact = {v: table[v].to_numpy() for v in VARIABLES}
        cf = dict(fact)
        for j, v in enumerate(VARIABLES):
            if v not in affected:
                continue
            iv = ivs.get(v)
            if iv is not None and not iv.needs_current:
                cf[v] = self._apply(iv, None, n)
                continue
            parents = self.graph.parents(v)
            if parents:
                same = self._same(cf, fact, parents)
                x = np.where(same, fact[v], self._equation(v, cf, U[:, j]))
                x = x.astype(np.int64 if v in ("sex", "disease") else np.float64)
            else:
                x = fact[v]
            cf[v] = self._apply(iv, x, n) if iv is not None else x
        self._check_values(cf, ids, where=" in the counterfactual world")
        out_table = cohort.table.copy()
        for v in VARIABLES:
            if v in affected:
                out_table[v] = cf[v]
        arrays = {k: a.copy() for k, a in cohort.arrays.items()}
        old = cohort.arrays.get("mri")
        if old is not None and tuple(old.shape[1:]) != (1, *self.shape):
            raise DataError(f"cohort array 'mri' has scans of shape {tuple(old.shape[1:])}; this "
                            f"simulator renders {(1, *self.shape)}")
        if old is None:
            redo = np.ones(n, dtype=bool)
            images = np.zeros((n, 1, *self.shape), dtype=np.float32)
        else:
            redo = ~self._same(cf, fact, _MRI_PARENTS)
            images = np.array(old, dtype=np.float32, copy=True)
        if redo.any():
            sub = pd.DataFrame({v: cf[v][redo] for v in VARIABLES})
            images[redo] = self._render(sub, seeds[redo], rows[redo])
        arrays["mri"] = images
        return Cohort(out_table, arrays, id_column=cohort.id_column)

    def render(self, cohort: Cohort | pd.DataFrame) -> np.ndarray:
        """Render the scans of these patients from their table values and their own noise.

        ``render(sample(...))`` reproduces the sampled scans exactly; edit the
        table first to render what-ifs by hand.

        >>> sim = BrainMRI(shape=(32, 32))
        >>> c = sim.sample(2, seed=0)
        >>> bool(np.array_equal(sim.render(c), c.arrays["mri"]))
        True
        """
        cohort = self._as_cohort(cohort)
        table = self._check_table(cohort.table, cohort.id_column)
        ids = table[cohort.id_column].to_numpy(dtype=object)
        vals = {v: table[v].to_numpy() for v in VARIABLES}
        self._check_values(vals, ids, where="")
        seeds, rows = self._parse(ids)
        return self._render(pd.DataFrame(vals), seeds, rows)

    def noise(self, cohort: Cohort | pd.DataFrame | Any) -> Cohort:
        """The exogenous noise of these patients, recovered from their ids.

        Table: ``id`` and one standard-normal column per scalar variable. Arrays:
        ``"mri_params"`` ``[n, P]`` (pose, bias field and lesion-site uniforms) and
        ``"mri_acquisition"`` ``[n, 2, *shape]`` (the Rician noise normals).

        >>> sim = BrainMRI(shape=(32, 32))
        >>> u = sim.noise(sim.sample(2, seed=0))
        >>> list(u.table.columns)[:3], u.arrays["mri_acquisition"].shape
        (['id', 'age', 'sex'], (2, 2, 32, 32))
        """
        if isinstance(cohort, Cohort):
            ids = cohort.ids
        elif isinstance(cohort, pd.DataFrame):
            if "id" not in cohort.columns:
                raise DataError(f"the table has no 'id' column; columns: {list(cohort.columns)}")
            ids = cohort["id"].to_numpy()
        else:
            ids = np.asarray(list(cohort), dtype=object)
        ids = np.asarray(ids, dtype=object)
        seeds, rows = self._parse(ids)
        tpl = _template(self.shape)
        table = pd.DataFrame(ndtri(_uniforms(seeds, rows, _J_SCALAR, len(VARIABLES))),
                             columns=list(VARIABLES))
        table.insert(0, "id", ids)
        params = self._scan_params(seeds, rows, tpl.n_params).astype(np.float32)
        npx = int(np.prod(self.shape))
        acq = ndtri(_uniforms(seeds, rows, _J_PIXEL, 2 * npx)).astype(np.float32)
        return Cohort(table, {"mri_params": params,
                              "mri_acquisition": acq.reshape(len(ids), 2, *self.shape)})

    def measure(self, images: Cohort | np.ndarray) -> pd.DataFrame:
        """Read volumes back from scans by intensity segmentation (no knowledge of the truth).

        Returns ``brain_volume``, ``ventricle_volume``, ``lesion_load`` and ``icv``
        (mL; for 2D slices through the slice rule of the module docstring). Steps:
        bias correction by normalized convolution over tissue, a partial-volume
        tissue fraction between the CSF and tissue levels, the filled head mask
        (ICV), dark components near its centre (ventricles), and voxels brighter
        than grey matter (lesions). Pearson r with the true values over 2000
        patients of 64x64 (``benchmarks/brain_cohort.py``): about 0.997 for the
        three volumes, 0.96 for ICV; it is lower at 32x32 (about 0.95 for brain and ventricles,
        0.99 for lesions, over 1000 patients), and in
        3D (48^3, 4 mm voxels) the ventricles reach only r ~ 0.83, as the
        basal cisterns sometimes join them.

        >>> sim = BrainMRI(shape=(32, 32))
        >>> m = sim.measure(sim.sample(2, seed=0))
        >>> list(m.columns)
        ['brain_volume', 'ventricle_volume', 'lesion_load', 'icv']
        """
        arr = images.arrays.get("mri") if isinstance(images, Cohort) else images
        if arr is None:
            raise DataError("the cohort has no 'mri' array to measure")
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim == len(self.shape) + 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != len(self.shape) + 1 or tuple(arr.shape[1:]) != self.shape:
            raise DataError(f"measure() expects scans of shape [n, 1, {', '.join(map(str, self.shape))}]"
                            f" or [n, {', '.join(map(str, self.shape))}], got {list(arr.shape)}")
        tpl = _template(self.shape)
        out = [self._measure_one(img, tpl) for img in arr]
        df = pd.DataFrame(out, columns=["brain", "ventricles", "lesions", "icv"])
        brain = tpl.to_volume(df["brain"], "brain")
        if tpl.d == 3:
            lesions = df["lesions"].to_numpy() / 1000.0
        else:
            share = df["lesions"].to_numpy() / np.maximum(df["brain"].to_numpy(), 1e-9)
            lesions = share / _SLICE_LESION_FACTOR * brain
        return pd.DataFrame({"brain_volume": brain,
                             "ventricle_volume": tpl.to_volume(df["ventricles"], "ventricles"),
                             "lesion_load": lesions,
                             "icv": tpl.to_volume(df["icv"], "icv")})

    # ----------------------------------------------------------------- equations
    @staticmethod
    def _equation(v: str, vals: Mapping[str, np.ndarray], u: np.ndarray) -> np.ndarray:
        """Structural equation of scalar variable ``v`` from its uniform noise ``u``."""
        z = ndtri(u)
        if v == "age":
            return 45.0 + 40.0 * u
        if v == "sex":
            return (z > 0).astype(np.int64)
        if v == "scanner":
            return np.where(u < 0.40, "A", np.where(u < 0.75, "B", "C")).astype(object)
        if v == "disease":
            p = _rowwise(lambda a: _sigmoid(-1.5 + 0.08 * (a - 65.0)), vals["age"])
            return (u < p).astype(np.int64)
        if v == "icv":
            return _rowwise(lambda s, zz: (1320.0 + 160.0 * s) * math.exp(0.08 * zz), vals["sex"], z)
        if v == "brain_volume":
            def bv(icv, a, dis, zz):
                t = a - 45.0
                f = 1.0 - 0.002 * t - 3.75e-5 * t * t
                return icv * (0.85 * f * (1.0 - 0.04 * dis) + 0.025 * math.tanh(zz / 2.0))
            return _rowwise(bv, vals["icv"], vals["age"], vals["disease"], z)
        if v == "ventricle_volume":
            return _rowwise(lambda icv, a, dis, zz: 18.0 * icv / 1450.0 * math.exp(
                0.025 * (a - 45.0) + 0.3 * dis + 0.25 * zz), vals["icv"], vals["age"], vals["disease"], z)
        if v == "lesion_load":
            return _rowwise(lambda a, dis, zz: 60.0 * math.tanh(1.5 * math.exp(
                0.06 * (a - 45.0) + 1.2 * dis + 0.8 * zz) / 60.0), vals["age"], vals["disease"], z)
        raise MedCausalError(f"internal error: no equation for {v!r}")  # pragma: no cover

    # ----------------------------------------------------------------- rendering
    @property
    def n_pose_params(self) -> int:
        """How many leading columns of the scan's parameters (``noise()``'s ``"mri_params"``)
        set its pose: the rotation angles, then the shifts."""
        d = len(self.shape)
        return (1 if d == 2 else 3) + d

    def _scan_params(self, seeds: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
        """The uniforms of each scan's pose, bias field and lesion sites (the one place they
        are drawn, so a study can substitute some of them; see ``brain_collapsed_ceiling.py``)."""
        return _uniforms(seeds, rows, _J_MRI, n)

    def _render(self, table: pd.DataFrame, seeds: np.ndarray, rows: np.ndarray) -> np.ndarray:
        n = len(table)
        out = np.empty((n, 1, *self.shape), dtype=np.float32)
        if n == 0:
            return out
        tpl = _template(self.shape)
        from tqdm.auto import tqdm

        starts = range(0, n, self.batch_size)
        show = self.progress if self.progress is not None else n > 4 * self.batch_size
        clipped: dict[str, int] = {}
        with torch.no_grad():
            # disable=None: tqdm stays quiet when stderr is not a terminal
            for s in tqdm(starts, desc="rendering scans", unit="batch", leave=False,
                          disable=None if show else True):
                e = min(n, s + self.batch_size)
                out[s:e, 0] = self._render_batch(tpl, table.iloc[s:e], seeds[s:e], rows[s:e], clipped)
        for name, count in clipped.items():
            warn(f"{count} scan(s) could not reach the requested {name} (out of what the "
                 f"template can render); they were rendered at the nearest attainable value",
                 OutOfSupportWarning)
        return out

    def _render_batch(self, tpl: _Template, table: pd.DataFrame, seeds, rows, clipped) -> np.ndarray:
        d, B = tpl.d, len(table)
        npx = int(np.prod(self.shape))
        icv = table["icv"].to_numpy(dtype=np.float64)
        bv = table["brain_volume"].to_numpy(dtype=np.float64)
        vv = table["ventricle_volume"].to_numpy(dtype=np.float64)
        ll = table["lesion_load"].to_numpy(dtype=np.float64)
        scanner = table["scanner"].to_numpy(dtype=object)
        prm = self._scan_params(seeds, rows, tpl.n_params)
        # --- per-row geometry (math module: independent of the batch) --------
        scale = _rowwise(lambda v: (v / tpl.ref_volume["icv"]) ** (1.0 / 3.0), icv)
        v_target = tpl.to_measure(vv, "ventricles") / _rowwise(lambda x: x ** d, scale)  # unscaled
        m = np.interp(v_target, tpl.lut_measure, tpl.lut_m)
        low, high = v_target < tpl.lut_measure[0], v_target > tpl.lut_measure[-1]
        if (low | high).any():
            clipped["ventricle_volume"] = clipped.get("ventricle_volume", 0) + int((low | high).sum())
        m_t = torch.from_numpy(m).float()
        k = 0
        z_rot = ndtri(prm[:, k:k + (1 if d == 2 else 3)]) * _ROT_SD
        k += 1 if d == 2 else 3
        shift = ndtri(prm[:, k:k + d]) * _SHIFT_SD
        k += d
        bias_z = ndtri(prm[:, k:k + tpl.n_bias])
        k += tpl.n_bias
        les = prm[:, k:].reshape(B, tpl.n_lesions, 3 + d)
        lin = np.zeros((B, d, d))
        for i in range(B):
            R = _rotation(z_rot[i], d)
            lin[i] = R.T / scale[i]
        # x_anat = c0 + lin (x_out - c0 - t)
        c0 = tpl.center
        offs = np.array([c0 - lin[i] @ (c0 + shift[i]) for i in range(B)])  # per row, no batching
        X = tpl.out_coords  # [P, d]
        lin_t = torch.from_numpy(lin).float()
        offs_t = torch.from_numpy(offs).float()
        cols = []
        for i in range(d):
            acc = offs_t[:, i:i + 1] + lin_t[:, i, 0:1] * X[None, :, 0]
            for j in range(1, d):
                acc = acc + lin_t[:, i, j:j + 1] * X[None, :, j]
            cols.append(acc)
        x_anat = torch.stack(cols, dim=-1)                                      # [B, P, d]
        x_tpl = _ventricle_warp(x_anat, tpl.v_center, tpl.v_whiten, m_t)   # [B, P, d]
        maps = _sample_maps(tpl.maps, _to_grid(x_tpl, tpl), d)                 # [B, 5, P]
        gm, wm, ic, vz, depth = (maps[:, i].numpy() for i in range(5))
        voxel = tpl.spacing ** d
        # --- atrophy: solve tau so that GM' + WM matches brain_volume --------
        target_b = tpl.to_measure(bv, "brain") / voxel
        tis = np.minimum(gm + wm, ic)

        def tissue(tau):
            return _atrophy(tis, ic, vz, depth, tau).astype(np.float64).sum(1)

        tau, hit = _solve(tissue, target_b, _TAU_MIN, _TAU_MAX, decreasing=True)
        if hit.any():
            clipped["brain_volume"] = clipped.get("brain_volume", 0) + int(hit.sum())
        tis = _atrophy(tis, ic, vz, depth, tau)
        wm = np.minimum(wm, tis)       # white matter only erodes where no grey matter is left
        gm = tis - wm
        # --- lesions: blobs at template sites, one threshold per patient -----
        site = np.searchsorted(tpl.lesion_cdf, les[:, :, 0]).clip(0, len(tpl.lesion_cdf) - 1)
        vox = tpl.lesion_index[site]                                            # [B, K, d]
        centres = tpl.tpl_origin + (vox + les[:, :, 1:1 + d] - 0.5) * tpl.tpl_spacing
        radius = 4.0 + 8.0 * les[:, :, 1 + d]
        weight = 0.25 + 0.75 * les[:, :, 2 + d]
        # the field is only needed where some row of the batch has white matter;
        # elsewhere it multiplies zero (each row's values do not depend on the batch)
        cols = torch.from_numpy(np.flatnonzero((wm > 0).any(axis=0)))
        xs = x_tpl[:, cols]
        sub = torch.zeros(B, len(cols))
        c_t = torch.from_numpy(centres).float()
        inv_r2 = torch.from_numpy(1.0 / radius ** 2).float()
        w_t = torch.from_numpy(weight).float()
        for kk in range(tpl.n_lesions):
            diff = xs[..., 0] - c_t[:, kk, 0:1]
            q = diff * diff
            for i in range(1, d):
                diff = xs[..., i] - c_t[:, kk, i:i + 1]
                q = q + diff * diff
            sub = torch.maximum(sub, w_t[:, kk:kk + 1] * _bump(q * inv_r2[:, kk:kk + 1]))
        field = np.zeros((B, x_tpl.shape[1]), dtype=np.float32)
        field[:, cols.numpy()] = sub.numpy()
        if d == 3:
            target_l = ll * 1000.0 / voxel
        else:
            target_l = _SLICE_LESION_FACTOR * ll / bv * target_b
        ramp = np.float32(_LESION_RAMP)

        def lesion(theta):
            t = theta[:, None].astype(np.float32)
            return (wm * np.clip((field - t) / ramp, 0.0, 1.0)).astype(np.float64).sum(1)

        theta, too_big = _solve(lesion, target_l, 0.0, 1.0, decreasing=True)
        if too_big.any():
            clipped["lesion_load"] = clipped.get("lesion_load", 0) + int(too_big.sum())
        t32 = theta[:, None].astype(np.float32)
        lesion_map = wm * np.clip((field - t32) / ramp, 0.0, 1.0)
        lesion_map[ll <= 0] = 0.0
        csf = np.clip(ic - gm - wm, 0.0, 1.0)
        # --- scanner: intensities, bias field, Rician noise -----------------
        prof = [SCANNER_PROFILES[str(s)] for s in scanner]
        col = lambda f: np.array([getattr(p, f) for p in prof], dtype=np.float32)[:, None]  # noqa: E731
        img = (col("csf") * csf + col("gm") * gm + col("wm") * (wm - lesion_map)
               + col("lesion") * lesion_map) * col("gain")
        xn = ((X.numpy() - c0[None, :]) / (_FOV / 2)).astype(np.float32)        # [P, d] in [-1, 1]
        terms = [xn[:, i] for i in range(d)]
        terms += [xn[:, i] * xn[:, j] for i in range(d) for j in range(i, d)]
        amp = col("bias")[:, 0] / np.float32(math.sqrt(tpl.n_bias))
        coef = (bias_z * amp[:, None]).astype(np.float32)                       # [B, n_bias]
        bias = np.ones((B, npx), dtype=np.float32)
        for j, t in enumerate(terms):
            bias = bias + coef[:, j:j + 1] * t[None, :]
        img = img * np.maximum(bias, np.float32(0.5))
        noise = ndtri(_uniforms(seeds, rows, _J_PIXEL, 2 * npx)).astype(np.float32)
        sig = col("noise")
        re = img + sig * noise[:, :npx]
        im = sig * noise[:, npx:]
        img = np.sqrt(re * re + im * im)
        return img.reshape(B, *self.shape)

    # ----------------------------------------------------------------- measuring
    def _measure_one(self, img: np.ndarray, tpl: _Template) -> tuple:
        d = tpl.d
        voxel = tpl.spacing ** d
        # typical tissue intensity: the upper quartile of the head's voxels (robust
        # to lesions filling up to a quarter of the head)
        head0 = img > 0.25 * np.percentile(img, 90)
        if not head0.any():
            return 0.0, 0.0, 0.0, 0.0
        top = np.percentile(img[head0], 70)
        if not np.isfinite(top) or top <= 0:
            return 0.0, 0.0, 0.0, 0.0
        # bias field: normalized convolution of the tissue voxels (25 mm Gaussian)
        tissue = (img > 0.8 * top) & (img < 1.3 * top)   # nearly pure tissue
        sigma = 25.0 / tpl.spacing
        num = ndi.gaussian_filter(np.where(tissue, img, 0.0), sigma, mode="constant")
        den = ndi.gaussian_filter(tissue.astype(np.float64), sigma, mode="constant")
        bias = np.where(den > 0.05, num / np.maximum(den, 1e-9), top)
        norm = img / np.maximum(bias, 1e-9)
        norm = norm / (np.median(norm[tissue]) if tissue.any() else 1.0)   # tissue level -> 1
        smooth = ndi.gaussian_filter(norm, 3.0 / tpl.spacing)
        # head (intracranial) mask: above halfway between background and CSF
        edge = np.ones(img.shape, dtype=bool)
        edge[(slice(2, -2),) * d] = False
        bg = float(np.median(smooth[edge]))
        inside = ndi.binary_fill_holes(ndi.binary_closing(smooth > 0.5, iterations=2))
        dark = inside & (smooth < 0.4)
        c_level = float(np.median(norm[dark])) if dark.sum() > 3 else 0.1
        head = ndi.binary_fill_holes(smooth > bg + 0.5 * (max(c_level, bg) - bg) + 0.05)
        lab, nl = ndi.label(head)
        if nl == 0:
            return 0.0, 0.0, 0.0, 0.0
        head = lab == int(np.argmax(ndi.sum_labels(head, lab, np.arange(1, nl + 1)))) + 1
        # partial-volume tissue fraction between the CSF and tissue levels
        frac = np.clip((norm - c_level) / (1.0 - c_level), 0.0, 1.0)
        brain = float(frac[head].sum()) * voxel
        icv = float(head.sum()) * voxel
        # ventricles: CSF components at least 10 mm deep whose centre lies near the
        # head's centre (per-axis, relative to its extent), with a voxel's rim
        frac_s = (smooth - c_level) / (1.0 - c_level)
        csf = inside & (frac_s < 0.6)
        depth = ndi.distance_transform_edt(inside) * tpl.spacing
        lab, nl = ndi.label(csf & (depth > 10.0))
        vent = 0.0
        if nl:
            idx = np.arange(1, nl + 1)
            pts = np.argwhere(inside)
            hc, extent = pts.mean(0), pts.std(0) + 1e-9
            coms = np.array(ndi.center_of_mass(csf, lab, idx)).reshape(nl, d)
            sizes = ndi.sum_labels(csf, lab, idx) * voxel
            near = np.sqrt((((coms - hc) / extent) ** 2).sum(1)) < 0.8
            ok = near & (sizes >= 20.0 * tpl.spacing ** (d - 1))
            if d == 3:
                # in a volume, the lateral ventricles lie above the head's centre and
                # spread left and right (unlike the basal cisterns and the fissure)
                xs = np.array(ndi.standard_deviation(np.indices(csf.shape)[2], lab, idx)).reshape(nl)
                prior = ok & (coms[:, 0] > hc[0]) & (xs * tpl.spacing > 4.0)
                ok = prior if prior.any() else ok   # merged with the cisterns: keep all
            # the lateral ventricles: the largest such component, and any other at
            # least a third its size (the two horns may be apart in a slice)
            keep = idx[ok & (sizes >= sizes[ok].max() / 3.0)] if ok.any() else idx[:0]
            if len(keep):
                rim = max(1, int(round(_VENT_RIM / tpl.spacing)))
                mask = ndi.binary_dilation(np.isin(lab, keep), iterations=rim) & inside & (frac_s < 0.95)
                vent = float(np.clip(1.0 - frac[mask], 0.0, None).sum()) * voxel
        # lesions: voxels brighter than grey matter, with a voxel's rim; each counts its
        # excess over white matter (partial volume included) relative to the lesion contrast
        seeds = head & (norm > _LESION_SEED)
        lesions = 0.0
        if seeds.any():
            region = ndi.binary_dilation(seeds) & head
            excess = (norm[region] - _WM_LEVEL) / (_LESION_LEVEL - _WM_LEVEL)
            lesions = float(np.clip(excess, 0.0, 1.0).sum()) * voxel
        return brain, vent, lesions, icv

    # ----------------------------------------------------------------- helpers
    def _ids(self, seed: int, n: int) -> np.ndarray:
        prefix = f"{_TAG}:{seed}:"
        if _HAS_NP_STRINGS:
            return np.strings.add(prefix, np.arange(n).astype(str)).astype(object)
        return np.array([f"{prefix}{i}" for i in range(n)], dtype=object)  # pragma: no cover

    @staticmethod
    def _parse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seeds, rows, bad = _parse_ids(np.asarray(ids, dtype=object), _TAG)
        if bad.any():
            first = np.asarray(ids, dtype=object)[np.flatnonzero(bad)[0]]
            raise DataError(f"patient id {first!r} was not produced by BrainMRI ({int(bad.sum())} of "
                            f"{len(bad)} ids are foreign); its ids are named '{_TAG}:<seed>:<row>'. "
                            "Keep the 'id' column when slicing or saving the cohort.")
        return seeds, rows

    @staticmethod
    def _as_cohort(data) -> Cohort:
        if isinstance(data, Cohort):
            return data
        if isinstance(data, pd.DataFrame):
            return Cohort(data if "id" in data.columns else data.reset_index(), id_column="id")
        raise DataError(f"expected a medcausal Cohort (or its table) from BrainMRI.sample, "
                        f"got {type(data).__name__}")

    @staticmethod
    def _check_table(table: pd.DataFrame, id_column: str) -> pd.DataFrame:
        missing = [v for v in VARIABLES if v not in table.columns]
        if missing:
            raise DataError(f"the cohort lacks column(s) {missing}; columns given: {list(table.columns)}")
        if id_column not in table.columns:
            raise DataError(f"the cohort lacks its id column {id_column!r}")
        for v in VARIABLES:
            col = table[v]
            if col.isna().any():
                raise DataError(f"column {v!r} has {int(col.isna().sum())} missing value(s)")
            if v == "scanner":
                bad = ~col.astype(str).isin(SCANNERS)
                if bad.any():
                    raise DataError(f"column 'scanner' has value(s) {col[bad].unique()[:3].tolist()} "
                                    f"outside {list(SCANNERS)}")
            elif not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
                raise DataError(f"column {v!r} must be numeric, got dtype {col.dtype}")
            elif v in ("sex", "disease") and not col.isin([0, 1]).all():
                raise DataError(f"column {v!r} is binary; it has value(s) "
                                f"{pd.unique(col[~col.isin([0, 1])])[:3].tolist()} outside 0/1")
        return table

    def _parse_do(self, do, index=None) -> dict[str, Intervention]:
        ivs = parse_do(do, known=list(self.graph.variables), index=index)
        if "mri" in ivs:
            raise InterventionError("do['mri']: the scan is rendered from its parents; intervene on "
                                    f"{list(_MRI_PARENTS)} instead")
        return ivs

    @staticmethod
    def _apply(iv: Intervention, current: np.ndarray | None, n: int) -> np.ndarray:
        out = np.asarray(iv.apply(current, n))
        if out.shape == (n, 1):
            out = out[:, 0]
        if out.shape != (n,):
            raise InterventionError(f"{iv.describe()}: expected {n} scalar values, got shape {out.shape}")
        name = iv.name
        if name == "scanner":
            vals = np.array([str(v) for v in out], dtype=object)
            bad = ~np.isin(vals, SCANNERS)
            if bad.any():
                raise InterventionError(f"{iv.describe()}: scanner must be one of {list(SCANNERS)}, got "
                                        f"{pd.unique(vals[bad])[:3].tolist()}")
            return vals
        try:
            num = out.astype(np.float64)
        except (TypeError, ValueError):
            raise InterventionError(
                f"{iv.describe()}: values must be numbers for variable {name!r}") from None
        if not np.all(np.isfinite(num)):
            raise InterventionError(f"{iv.describe()}: values must be finite")
        if name in ("sex", "disease"):
            if not np.isin(num, [0.0, 1.0]).all():
                raise InterventionError(f"{iv.describe()}: {name!r} is binary; values must be 0 or 1")
            return num.astype(np.int64)
        return num

    @staticmethod
    def _check_values(vals: Mapping[str, np.ndarray], ids, where: str) -> None:
        """Physical constraints; the message names the variable and the first offending ids."""
        ids = np.asarray(ids, dtype=object)

        def fail(mask, text):
            if mask.any():
                raise InterventionError(f"{text}{where} for {int(mask.sum())} patient(s), e.g. "
                                        f"{ids[np.flatnonzero(mask)[:3]].tolist()}")

        f = {v: np.asarray(vals[v], dtype=np.float64) for v in _CONTINUOUS}
        for v in _CONTINUOUS:
            fail(~np.isfinite(f[v]), f"{v} is not finite")
        fail((f["age"] < 0) | (f["age"] > 120), "age must lie in [0, 120] years")
        for v in ("icv", "brain_volume", "ventricle_volume"):
            fail(f[v] <= 0, f"{v} must be positive")
        fail(f["lesion_load"] < 0, "lesion_load must be >= 0")
        fail(f["brain_volume"] + f["ventricle_volume"] >= f["icv"],
             "brain_volume + ventricle_volume must be smaller than icv")
        fail(f["lesion_load"] >= f["brain_volume"], "lesion_load must be smaller than brain_volume")

    @staticmethod
    def _same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], names) -> np.ndarray:
        same = None
        for v in names:
            if v == "scanner":
                eq = np.asarray(a[v]).astype(str) == np.asarray(b[v]).astype(str)
            else:
                eq = np.asarray(a[v], dtype=np.float64) == np.asarray(b[v], dtype=np.float64)
            same = eq if same is None else same & eq
        return same


def _rotation(angles_deg: np.ndarray, d: int) -> np.ndarray:
    """Rotation matrix from degrees (one angle in 2D; z-y-x angles in 3D), per row via math."""
    if d == 2:
        t = math.radians(float(angles_deg[0]))
        c, s = math.cos(t), math.sin(t)
        return np.array([[c, -s], [s, c]])
    ax, ay, az = (math.radians(float(a)) for a in angles_deg)
    cx, sx, cy, sy = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay)
    cz, sz = math.cos(az), math.sin(az)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def _edge(u: np.ndarray) -> np.ndarray:
    """A smooth step from 0 to 1, ``(1 + u / sqrt(1 + u^2)) / 2`` (algebraic: no exp)."""
    return np.float32(0.5) + np.float32(0.5) * u / np.sqrt(np.float32(1.0) + u * u)


def _atrophy(tis: np.ndarray, ic: np.ndarray, vz: np.ndarray, depth: np.ndarray,
             delta: np.ndarray) -> np.ndarray:
    """Brain tissue (GM + WM) after eroding ``delta`` mm (one per row) off its surface.

    ``T' = T e((D - delta) / w) / e(D / w)`` with ``D`` the template depth below
    the tissue's surface and ``e`` a smooth step: the outer ``delta`` mm of the
    cortex fade, so gyri thin and sulci widen, while deeper tissue keeps its
    value; the ventricles' rim ``vz`` is spared. ``delta < 0`` grows the surface
    outwards, filling the CSF up to ``-delta`` mm outside it (within the intracranial
    mask). Decreasing in ``delta``; 0 is identity.
    """
    w = np.float32(_EDGE_W)
    t = delta[:, None].astype(np.float32)
    e0 = _edge(depth / w)
    et = _edge((depth - t) / w)
    thin = tis * (et / np.maximum(e0, np.float32(1e-6)))
    # growth: fill the CSF up to -delta mm outside the surface, towards the skull
    room = np.maximum(ic, tis) - tis
    fill = np.clip((et - e0) / np.maximum(np.float32(1.0) - e0, np.float32(1e-6)), 0.0, 1.0)
    new = np.where(t >= 0, thin, tis + room * fill)
    return vz * tis + (np.float32(1.0) - vz) * new


def _solve(fn, target: np.ndarray, lo: float, hi: float, decreasing: bool,
           iters: int = 14, rtol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per-row root of ``fn(x) = target`` on ``[lo, hi]`` (``fn`` monotone in each row).

    Regula falsi with the Illinois modification (superlinear for smooth monotone
    ``fn``; each row is solved on its own, so results do not depend on the batch).
    Rows whose target lies outside ``[fn(lo), fn(hi)]`` get the nearer end; the
    second value flags those that miss the target by more than ``rtol``.
    """
    n = len(target)
    sign = -1.0 if decreasing else 1.0
    a = np.full(n, lo, dtype=np.float64)
    b = np.full(n, hi, dtype=np.float64)
    fa = sign * (fn(a) - target)      # g = sign (fn - target) is increasing: g(a) < 0 < g(b)
    fb = sign * (fn(b) - target)
    below, above = fa >= 0, fb <= 0   # the target is out of reach at one end
    x = np.where(below, a, np.where(above, b, 0.5 * (a + b)))
    active = ~(below | above)
    side = np.zeros(n, dtype=np.int8)
    for _ in range(iters):
        if not active.any():
            break
        den = fb - fa
        step = np.where(den != 0, b - fb * (b - a) / np.where(den != 0, den, 1.0), 0.5 * (a + b))
        xi = np.where(active, np.clip(step, np.minimum(a, b), np.maximum(a, b)), x)
        gx = sign * (fn(xi) - target)
        go_left = active & (gx < 0)        # root lies right of xi: move a
        go_right = active & (gx > 0)
        fb = np.where(go_left & (side == -1), fb / 2, fb)     # Illinois: halve the stale end
        fa = np.where(go_right & (side == 1), fa / 2, fa)
        a, fa = np.where(go_left, xi, a), np.where(go_left, gx, fa)
        b, fb = np.where(go_right, xi, b), np.where(go_right, gx, fb)
        side = np.where(go_left, -1, np.where(go_right, 1, side)).astype(np.int8)
        x = np.where(active, xi, x)
        active &= gx != 0
    miss = (below & (fa > np.abs(target) * rtol)) | (above & (-fb > np.abs(target) * rtol))
    return x, miss
