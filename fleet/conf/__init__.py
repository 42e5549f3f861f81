"""The Hydra config tree of the `flywheel`, `flywheel-server` and `flywheel-robot` apps: the YAML
files in this package (shipped in the wheel) and their schemas (``schema_*.py``).

Importing ``fleet.conf.schema_flywheel`` (or ``schema_fleet`` for the server and robot configs)
registers the schemas in Hydra's ConfigStore; the YAML's ``defaults`` name them (``base_flywheel``,
...), so compose after that import::

    import fleet.conf.schema_flywheel
    from hydra import compose, initialize_config_module
    with initialize_config_module("fleet.conf", version_base="1.3"):
        cfg = compose("flywheel", overrides=["loop.iterations=1"])
"""

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent)
