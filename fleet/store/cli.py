"""`flywheel store ...`: a store's maintenance and pins from the shell (docs/store.md, Maintenance); one JSON line out.

    flywheel store maintain --store PATH [--keep-history-s S] [--gc-grace-s S]
    flywheel store pin --store PATH --snapshot ID --name NAME
    flywheel store unpin --store PATH --name NAME
    flywheel store pins --store PATH
    flywheel store backup --store PATH --to NEW_FOLDER
    flywheel store withdraw --store PATH (--robot-id R [--since T] [--until T] | --episode-id ID ...) --reason TEXT [--force]
    flywheel store withdrawals --store PATH
    flywheel store restore --store PATH --rule ID

Exit status 0 on success, 2 with a one-line error that says what to do otherwise.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fleet.json_command import json_command


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="flywheel store", description="Keep an episode store's size bounded (maintenance, pinned snapshots, backups); withdraw episodes from training."
    )
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("maintain", help="expire the history older than --keep-history-s and delete what nothing reaches any more")
    run.add_argument("--store", required=True, help="the store's folder or s3://bucket/prefix (fleet.store.path)")
    run.add_argument("--keep-history-s", type=float, default=None, help="expire snapshots older than this (default: StoreConfig's, 3600); pinned ones stay")
    run.add_argument("--gc-grace-s", type=float, default=None, help="never delete objects younger than this (default: StoreConfig's, 900)")
    pin = sub.add_parser("pin", help="keep a snapshot readable through every maintenance")
    pin.add_argument("--store", required=True)
    pin.add_argument("--snapshot", required=True, help="the snapshot id (e.g. an export's snapshot_id)")
    pin.add_argument("--name", required=True, help="the pin's name: letters, digits, '_', '-', '.'")
    unpin = sub.add_parser("unpin", help="let maintenance expire what a pin kept (its name cannot pin again)")
    unpin.add_argument("--store", required=True)
    unpin.add_argument("--name", required=True)
    pins = sub.add_parser("pins", help="list the pinned snapshots")
    pins.add_argument("--store", required=True)
    copy = sub.add_parser("backup", help="copy a local store, while servers write it, into a new folder that opens (a cp -a of a live store may not)")
    copy.add_argument("--store", required=True)
    copy.add_argument("--to", required=True, help="the backup's folder: a new one (a backup is never written over)")
    out = sub.add_parser("withdraw", help="keep episodes out of training (the store keeps them; docs/store.md, Withdrawing episodes)")
    out.add_argument("--store", required=True)
    which = out.add_mutually_exclusive_group(required=True)
    which.add_argument("--robot-id", help="withdraw this robot's episodes (uploaded in [--since, --until), either open)")
    which.add_argument("--episode-id", action="extend", nargs="+", help="withdraw these episodes (repeatable)")
    out.add_argument("--since", help="upload time (the server's clock): ISO 8601 (UTC unless it names a zone) or unix seconds")
    out.add_argument("--until", help="upload time, excluded; none: the rule covers the robot's later uploads too, until it is lifted")
    out.add_argument("--reason", required=True, help="why (kept with the rule, for the audit)")
    out.add_argument("--force", action="store_true", help="make a rule that names no episode now (a robot before its first upload)")
    listing = sub.add_parser("withdrawals", help="list the withdrawal rules, with the episodes each keeps out of training now")
    listing.add_argument("--store", required=True)
    back = sub.add_parser("restore", help="lift a withdrawal rule: its episodes train again")
    back.add_argument("--store", required=True)
    back.add_argument("--rule", required=True, help="the rule's id (`flywheel store withdrawals` lists them)")
    return top


def run(args: argparse.Namespace) -> dict:
    from fleet.store import EpisodeStore, StoreConfig
    from fleet.store.backup import backup
    from fleet.store.location import WHERE_STORES_ARE
    from fleet.store.maintenance import MaintenanceBusy

    if args.command == "backup":  # before the store is opened here: an open migrates an older schema, and a backup only reads
        return {"command": "backup", **backup(args.store, args.to)}
    settings = {k: v for k, v in (("keep_history_s", getattr(args, "keep_history_s", None)), ("gc_grace_s", getattr(args, "gc_grace_s", None))) if v is not None}
    try:
        store = EpisodeStore.open(StoreConfig(path=args.store, **settings))
    except FileNotFoundError:  # the library's words say how to create one; an operator pointed at the wrong folder
        raise FileNotFoundError(f"no flywheel episode store at {args.store}; pass --store with the folder of one ({WHERE_STORES_ARE})") from None
    if args.command == "maintain":
        try:
            return {"command": "maintain", "store": args.store, **store.maintain().to_dict()}
        except MaintenanceBusy as exc:  # a replica's scheduled run: it does the work (exit 0, as for a run that found nothing)
            return {"command": "maintain", "store": args.store, "skipped": str(exc)}
    if args.command == "pin":
        store.pin(args.snapshot, args.name)
        return {"command": "pin", "store": args.store, "name": args.name, "snapshot_id": args.snapshot}
    if args.command == "unpin":
        store.unpin(args.name)
        return {"command": "unpin", "store": args.store, "name": args.name}
    if args.command in ("withdraw", "withdrawals", "restore"):
        return withdrawals(store, args)
    return {"command": "pins", "store": args.store, "pins": store.pins()}


def withdrawals(store, args: argparse.Namespace) -> dict:
    """``withdraw``, ``withdrawals`` and ``restore``: each rule with ``episodes`` (those it names in the store's tip) and
    ``withdrawn`` (those and the scenario and world-model episodes made from them)."""
    from fleet.store.withdrawal import parse_time

    if args.command == "withdraw":
        if args.episode_id and (args.since or args.until):
            raise ValueError("--since/--until select a robot's episodes (--robot-id); episodes named by id are withdrawn whenever they were uploaded")
        since, until = (None if t is None else parse_time(t) for t in (args.since, args.until))
        rule, _ = store.withdraw(args.reason, robot_id=args.robot_id, episode_ids=args.episode_id or (), since=since, until=until, force=args.force)
        return {"command": "withdraw", "store": args.store, "rule": _counted(store.snapshot(), rule)}
    if args.command == "restore":
        rule = store.restore(args.rule)
        return {"command": "restore", "store": args.store, "rule": _counted(store.snapshot(), rule)}
    tip = store.snapshot()
    return {"command": "withdrawals", "store": args.store, "rules": [_counted(tip, r) for r in tip.withdrawals()], "withdrawn": len(tip.withdrawn())}


def _counted(snapshot, rule) -> dict:
    return {**rule.to_dict(), "episodes": sum(rule.covers(e) for e in snapshot.catalog()), "withdrawn": len(snapshot.withdrawn([rule]))}


def main(argv: Sequence[str] | None = None) -> int:
    from fleet.store.backend import StoreCorruptionError, StoreUnreachableError
    from fleet.store.location import StoreLocationError

    args = parser().parse_args(argv)  # FileNotFoundError (an OSError): no store there
    return json_command(f"flywheel store {args.command}", lambda: run(args), (ValueError, LookupError, OSError, StoreLocationError, StoreUnreachableError, StoreCorruptionError))


if __name__ == "__main__":
    from fleet.json_command import exit_process

    exit_process(main())
