"""Adapters at the edges: tables (and later images, single cells) to tensors and back."""

from .images import build_transforms, image_transform_spec, load_images, write_images  # noqa: E402,F401
