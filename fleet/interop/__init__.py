"""Episodes in and out of the fleet through other tools' formats (docs/interop.md).

Export a pinned store snapshot:

* :func:`fleet.interop.lerobot.export_lerobot` - LeRobot dataset v3.0 (parquet + meta/)
* :func:`fleet.interop.minari_export.export_minari` - a Minari 0.5 dataset (arrow storage)
* :func:`fleet.interop.mcap_io.export_mcap` - one MCAP file, a JSON channel per array

Import into schema-v1 :class:`sim.episode.Episode` records:

* :func:`fleet.interop.lerobot.import_lerobot` - a LeRobot v3.0 dataset folder
* :func:`fleet.interop.mcap_io.import_mcap` - an MCAP file written by the export above
* :func:`fleet.interop.rosbag.import_rosbag` - a ROS 2 bag (folder, .db3 or .mcap)

:mod:`fleet.interop.common` holds what they share (selection, ids, delivery to a store or a
server); :mod:`fleet.interop.cli` is the ``flywheel export`` / ``flywheel import`` command.
Each format module imports its library (pyarrow, minari, mcap, rosbags) when it is used.
"""
