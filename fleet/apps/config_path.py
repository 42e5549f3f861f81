"""Where the Hydra config root lives (the repository's conf/), as an absolute path for @hydra.main."""

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
