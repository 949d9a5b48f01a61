"""One exception hierarchy, so callers can ``except medcausal.MedCausalError``.

Every class subclasses :class:`ValueError` as well, so code written against
plain ``ValueError`` keeps working. :func:`warn` issues medcausal's warnings so that they
point at the user's line, not at medcausal's own code.
"""

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside medcausal (however deep the
    call that warns), so the warning names the user's line and ``-W error`` filters by it."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


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


class LowAcceptanceError(MedCausalError):
    """A subgroup (``where=``) that almost no simulated patient falls into: below ``min_acceptance``."""


class OutOfSupportWarning(UserWarning):
    """An intervention value lies outside the range seen at fit."""
