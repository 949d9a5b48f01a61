"""Adapters at the edges: tables (and later images, single cells) to tensors and back."""
