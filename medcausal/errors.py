"""One exception hierarchy, so callers can ``except medcausal.MedCausalError``.

Every class subclasses :class:`ValueError` as well, so code written against
plain ``ValueError`` keeps working.
"""


class MedCausalError(ValueError):
    """Base class of every error medcausal raises on bad input."""


class GraphError(MedCausalError):
    """The causal graph is invalid (cycle, unknown variable, self-loop, duplicate)."""


class DataError(MedCausalError):
    """Data do not fit the graph (missing column, NaN, wrong type, unseen category)."""


class InterventionError(MedCausalError):
    """A ``do=`` specification names an unknown variable or an impossible value."""


class ModelFileError(MedCausalError):
    """A model file is missing, corrupt, or not a medcausal model."""


class RecipeError(MedCausalError):
    """A cohort recipe (TOML) is invalid; the message names the key."""


class NotFittedError(MedCausalError):
    """A query was asked of a model that has not been fitted."""


class CapabilityError(MedCausalError):
    """A mechanism cannot answer the query asked (e.g. exact log-likelihood)."""


class OutOfSupportWarning(UserWarning):
    """An intervention value lies outside the range seen at fit."""
