"""Causal representation learning: identifiable latent-variable models and their baselines.

>>> from medcausal.crl import IVAE, VAE
>>> IVAE(latent_dim=3)
IVAE(latent_dim=3, hidden=(64, 64); not fitted)
"""

from .ivae import IVAE, VAE, nonlinear_ica_data

__all__ = ["IVAE", "VAE", "nonlinear_ica_data"]
