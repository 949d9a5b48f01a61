"""Differential privacy: DP-SGD over the whole causal model (Opacus), a ledger, and an audit.

>>> import medcausal as mc
>>> from medcausal.privacy import Privacy
>>> sim = mc.synthetic.scm("chain")
>>> bounds = {"x1": (-5, 5), "x2": (-5, 15), "x3": (-15, 15)}
>>> model = mc.CausalModel(sim.graph).fit(sim.sample(200, seed=0), max_epochs=1, batch_size=100,
...     verbose=False, privacy=Privacy(noise_multiplier=1.0, delta=1e-4, public_bounds=bounds))
>>> model.privacy["steps"], round(model.privacy["epsilon"], 2), model.privacy["privacy_unit"]
(2, 4.62, 'row')

See ``privacy/PRIVACY.md`` for the threat model, the guarantee and the audit procedure.
"""

from .audit import AuditResult, audit, dcr_attack, loss_attack
from .config import Privacy, PrivacyError, PrivacyWarning, load_profile
from .ledger import format_ledger

__all__ = ["Privacy", "PrivacyError", "PrivacyWarning", "load_profile", "format_ledger", "audit",
           "AuditResult", "loss_attack", "dcr_attack"]
