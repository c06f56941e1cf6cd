"""Yes/no settings as a bundle command line hands them over, read one way everywhere (training, tracking, inference).

Free of the network and training code, so that inference from a ``model.ts`` (and the MONAI Deploy app) can use it.
"""

from __future__ import annotations

from typing import Any

from .errors import UsageError

__all__ = ["as_bool"]

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


def as_bool(value: Any, name: str = "value") -> bool:
    """A yes/no setting that may come from the command line as text.

    ``python -m monai.bundle run --restart false`` hands the config the string ``"false"``, which Python would
    take as true; only ``False`` (capitalised) arrives as a boolean.

    Raises:
        ValueError: the value is neither a boolean nor one of true/false, yes/no, on/off, 1/0.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"{name} must be true or false, got {value!r}.")
