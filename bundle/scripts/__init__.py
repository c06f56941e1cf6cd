"""The bundle's Python package: what its configs cannot say themselves.

MONAI bundle configs reach this package as ``scripts`` (``$import scripts``), with the bundle root on sys.path.
"""

from . import datasets, engines, evaluation, handlers, loaders, losses, metrics, networks, stages

__all__ = ["datasets", "engines", "evaluation", "handlers", "loaders", "losses", "metrics", "networks", "stages"]
