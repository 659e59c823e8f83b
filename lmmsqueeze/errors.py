"""Exceptions that the CLI turns into one-line messages.

Every error a user can cause (a bad pipeline, a model that cannot run a plan, a missing file)
derives from :class:`LmmsqueezeError`; its ``str`` is a single line naming the bad part and,
where there is one, the fix.
"""

from __future__ import annotations


class LmmsqueezeError(Exception):
    """Base class of every user-facing error in lmmsqueeze."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class PipelineError(LmmsqueezeError, ValueError):
    """A pipeline string or file that cannot be parsed or is refused by the validator."""


class ModelError(LmmsqueezeError):
    """A model that cannot be loaded, or cannot execute a given plan."""


class RegistryError(LmmsqueezeError, ValueError):
    """A reducer registration that clashes with another or is malformed."""
