"""Typed errors a user can act on. Every user-facing path raises one of these, never a deep traceback."""


class NimbleLMError(Exception):
    """Base class: the message is one clear line meant for the user."""


class ModelNotFoundError(NimbleLMError):
    """An unknown alias or a path that does not exist."""


class ModelFormatError(NimbleLMError):
    """A file or folder that exists but cannot be read as a model (truncated, not GGUF, missing parts)."""


class UnsupportedModelError(NimbleLMError):
    """A well-formed model whose architecture or feature nimblelm does not implement."""


class InvalidRequestError(NimbleLMError, ValueError):
    """A request or option that can never be served: bad sampling values, empty or too-long prompt."""
