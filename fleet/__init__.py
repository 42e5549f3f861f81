"""Fleet floor: episode store (Zarr v3 on Icechunk), ingestion server, robot agent.

Import-light on purpose: robots import :mod:`fleet.agent` without torch or Ray, so this
package imports nothing heavy. Subpackages:

* :mod:`fleet.store`  - the one module set that makes zarr/icechunk calls (docs/store.md)
* :mod:`fleet.server` - ``flywheel-server``: FastAPI ingestion with group commit (docs/protocol.md)
* :mod:`fleet.agent`  - robot side: recorder, crash-safe spool, background uploader
* :mod:`fleet.apps`   - thin Hydra entry points
"""
