"""`flywheel export` and `flywheel import`: argparse in, one JSON summary line out (docs/interop.md).

    flywheel export --format lerobot|minari|mcap --store PATH [--snapshot ID] --out DIR
                    [--robot-id ID ...] [--source S ...] [--robot-model M] [--stream NAME]
    flywheel import --format lerobot|mcap|rosbag INPUT [INPUT ...]
                    (--store PATH | --server URL [--token-env NAME] [--spool DIR])
                    [--robot-id ID --robot-model M --source real ...] [--observation-topic ...]

Exit status 0 on success, 2 with a one-line error that says what to do otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from fleet.agent.config import check_server_url
from fleet.json_command import json_command
from fleet.interop.common import ExportStopped, ImportOptions, InteropError, pinned, select, stop_signals_unwind, upload, write_to_store
from sim.episode import SOURCES

EXPORT_FORMATS = ("lerobot", "minari", "mcap")
IMPORT_FORMATS = ("lerobot", "mcap", "rosbag")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="flywheel", description="Move episodes between the fleet store and LeRobot, Minari, MCAP and ROS 2 bags.")
    sub = top.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("export", help="export a store snapshot (pinned while the export reads it)")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    exp.add_argument("--store", required=True, help="episode store folder (e.g. runs/fleet/store)")
    exp.add_argument("--snapshot", default=None, help="snapshot id to export (default: the store's tip; the one used is printed)")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--robot-id", action="append", help="only these robots (repeatable)")
    exp.add_argument("--source", action="append", choices=SOURCES, help="only these sources (repeatable)")
    exp.add_argument("--robot-model", help="only this robot model")
    exp.add_argument("--stream", help="only this store stream (one array layout)")
    exp.add_argument("--dataset-id", help="minari: dataset id (default flywheel-<robot_model>-v0)")

    imp = sub.add_parser("import", help="turn recordings into schema-v1 episodes, into a store or onto a server")
    imp.add_argument("--format", required=True, choices=IMPORT_FORMATS)
    imp.add_argument("inputs", nargs="+", help="lerobot: dataset folder; mcap: .mcap file; rosbag: bag folder, .db3 or .mcap (one episode per bag)")
    where = imp.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="append to this episode store (created if absent)")
    where.add_argument("--server", help="upload to this fleet server (e.g. http://127.0.0.1:8700) as a robot")
    imp.add_argument("--token-env", default="FLYWHEEL_ROBOT_TOKEN", help="environment variable holding the robot token (--server)")
    imp.add_argument("--spool", help="keep upload files here (refused ones stay in <spool>/rejected/); default: a temporary folder")
    imp.add_argument("--robot-id", help="robot id for recordings without flywheel provenance; with --server also: only this robot's episodes of a flywheel export")
    imp.add_argument("--robot-model", help="robot model for recordings without flywheel provenance")
    imp.add_argument("--source", default="real", choices=SOURCES, help="source for recordings without flywheel provenance (default real)")
    imp.add_argument("--policy-version", default="none")
    imp.add_argument("--hardware", help="JSON text stored as the episodes' hardware metadata")
    imp.add_argument("--calibration", help="JSON text stored as the episodes' calibration metadata")
    imp.add_argument("--observation-topic", help="rosbag: sensor_msgs/JointState topic (default: /joint_states or the only one)")
    imp.add_argument("--action-topic", help="rosbag: command topic (default: the only Float64MultiArray/Float32MultiArray/JointState/Twist topic)")
    imp.add_argument("--reward-topic", help="rosbag: std_msgs/Float64 or Float32 topic (default: none, reward 0)")
    return top


def run_export(args: argparse.Namespace) -> dict:
    selection = select(args.store, args.snapshot, robot_id=args.robot_id, source=args.source, robot_model=args.robot_model, stream=args.stream)
    with pinned(selection):  # maintenance keeps the snapshot until the export has read it
        if args.format == "lerobot":
            from fleet.interop.lerobot import export_lerobot

            path = export_lerobot(selection, args.out)
        elif args.format == "minari":
            from fleet.interop.minari_export import export_minari

            path = export_minari(selection, args.out, args.dataset_id)
        else:
            from fleet.interop.mcap_io import export_mcap

            path = export_mcap(selection, args.out)
    return {"command": "export", "format": args.format, "snapshot_id": selection.snapshot_id, "episodes": len(selection), "path": str(path)}


def read_inputs(args: argparse.Namespace) -> list:
    options = ImportOptions(args.robot_id, args.robot_model, args.source, args.policy_version, _json_text(args.hardware, "--hardware"), _json_text(args.calibration, "--calibration"))
    episodes = []
    for path in args.inputs:
        try:
            episodes += _read_input(args, path, options)
        except InteropError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:  # the input's own content: no traceback
            raise InteropError(f"{path} is not a readable {args.format} input ({exc.__class__.__name__}: {str(exc)[:300]}); check the file, or the --format") from None
    own = sorted({ep.robot_id for ep in episodes} - {args.robot_id}) if args.robot_id else []
    if own and not args.server:  # flywheel exports carry their robots: --robot-id names only recordings without provenance (it was ignored silently)
        print(f"flywheel import: note: --robot-id {args.robot_id} applies to recordings without flywheel provenance; "
              f"episodes of a flywheel export keep their own robot ids ({_some(own)})", file=sys.stderr)  # fmt: skip
    return episodes


def _of_robot(args: argparse.Namespace, episodes: list) -> list:
    """With --server and --robot-id: only that robot's episodes (a robot token uploads only its own robot's), the others
    of a flywheel export left out with a note."""
    chosen = [ep for ep in episodes if ep.robot_id == args.robot_id]
    others = sorted({ep.robot_id for ep in episodes} - {args.robot_id})
    if not chosen:
        raise InteropError(f"the inputs hold no episodes of robot {args.robot_id} (their robots: {_some(others)}); pass the --robot-id of the token's robot")
    if others:
        print(f"flywheel import: note: uploading robot {args.robot_id}'s {len(chosen)} episodes (--robot-id with --server); "
              f"left out {len(episodes) - len(chosen)} episodes of other robots ({_some(others)}), each needs its own robot's token", file=sys.stderr)  # fmt: skip
    return chosen


def _some(names: list[str]) -> str:
    return f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"


def _read_input(args: argparse.Namespace, path, options: ImportOptions) -> list:
    """The episodes of one input of ``args.format``."""
    if args.format == "lerobot":
        from fleet.interop.lerobot import import_lerobot

        return import_lerobot(path, options)
    if args.format == "mcap":
        from fleet.interop.mcap_io import import_mcap

        return import_mcap(path)
    from fleet.interop.rosbag import import_rosbag

    return import_rosbag(path, options, observation_topic=args.observation_topic, action_topic=args.action_topic, reward_topic=args.reward_topic)


def run_import(args: argparse.Namespace) -> dict:
    token = None
    if args.server:  # what is wrong with the destination is said before the inputs are read
        try:
            check_server_url(args.server, "--server")
        except ValueError as exc:
            raise InteropError(str(exc)) from None
        token = os.environ.get(args.token_env)
        if not token:
            raise InteropError(f"--server needs a robot token in ${args.token_env}; issue one with `python -m fleet.server.auth --tokens ... add --role robot --robot-id ...`")
    episodes, left_out = read_inputs(args), {}
    if args.store:
        result = write_to_store(episodes, args.store)
    else:
        if args.robot_id:
            chosen = _of_robot(args, episodes)
            episodes, left_out = chosen, {"left_out": len(episodes) - len(chosen)}
        result = upload(episodes, args.server, token, spool_dir=args.spool)
    return {"command": "import", "format": args.format, "episodes": len(episodes), "episode_ids": [ep.episode_id for ep in episodes], **left_out, **result}


def _json_text(text: str | None, flag: str) -> str | None:
    if text is None:
        return None
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise InteropError(f"{flag} must be JSON text: {exc}") from None
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "import":
        return json_command("flywheel import", lambda: run_import(args), (InteropError, OSError), _say)
    try:
        with stop_signals_unwind():  # a stopped export lets its pin go and removes its partial folder
            from fleet.store.backend import StoreCorruptionError, StoreUnreachableError, UnknownSnapshotError  # exports only

            # OSError: a path that is a file, exists, or cannot be written; the store's own: a snapshot maintenance expired
            # while it was read unpinned, damage, storage that did not answer (each says what to do)
            faults = (InteropError, OSError, UnknownSnapshotError, StoreCorruptionError, StoreUnreachableError)
            return json_command("flywheel export", lambda: run_export(args), faults, _say)
    except ExportStopped as stop:
        print(f"flywheel export: stopped by {signal.Signals(stop.signum).name} (an export is published whole or not at all: see --out; its partial "
              f"folder removed, its pin let go: `flywheel store pins --store {args.store}` lists any left)", file=sys.stderr)  # fmt: skip
        return 128 + stop.signum  # the shell's status for a process ended by that signal


def _say(exc: BaseException) -> object:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc.__class__.__name__}: {exc.filename}; check the paths given (--out, --store, the inputs): each must be somewhere this user can read or write"
    return exc


if __name__ == "__main__":
    from fleet.json_command import exit_process

    exit_process(main())
