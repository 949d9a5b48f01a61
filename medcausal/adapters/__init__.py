"""Adapters at the edges: tables, images (MONAI) and single cells (AnnData) to tensors and back."""

from . import images, singlecell, tabular  # noqa: F401
from .images import build_transforms, image_transform_spec, load_images, write_images  # noqa: F401
from .singlecell import (FCRModel, anndata_to_cohort, cohort_to_anndata, read_h5ad,  # noqa: F401
                         setup_anndata, write_h5ad)
