"""Where the Hydra config root lives (the package fleet/conf/, shipped in the wheel; the repository's
conf/ links to it), as an absolute path for @hydra.main."""

from fleet.conf import CONF_DIR

__all__ = ["CONF_DIR"]
