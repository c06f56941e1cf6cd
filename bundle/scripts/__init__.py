"""The bundle's Python package: what its configs cannot say themselves.

MONAI bundle configs reach this package as ``scripts`` (``$import scripts``), with the bundle root on sys.path.
Submodules load on first use (``scripts.stages`` in a config imports ``stages`` then), so that a data-preparation
run does not pay for importing the training stack.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import report_user_errors

__all__ = ["brats_metrics", "data", "datasets", "engines", "errors", "evaluation", "files", "flags", "handlers",
           "inference", "loaders", "losses", "metrics", "networks", "report", "stage_checkpoints", "stages",
           "tracking"]  # fmt: skip


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Whatever runs the bundle (monai.bundle, prepare_data.py, the Deploy app), a mistake of the user's is reported as
# one message with its fix, not a traceback.
report_user_errors()
