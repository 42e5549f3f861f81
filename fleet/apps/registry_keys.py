"""``flywheel-registry``: the registry's key ceremonies, run where the offline root keys are (docs/security.md).

    flywheel-registry init   --dir runs/fleet/registry --root-key r1.pem --root-key r2.pem --root-key r3.pem --threshold 2 --online-key online.pem [--release-key release.pem]
    flywheel-registry rotate --dir runs/fleet/registry --root-key r1.pem --root-key r2.pem --online-key new-online.pem
    flywheel-registry rotate --dir runs/fleet/registry --root-key r1.pem --root-key r2.pem --release-key release.pem
    flywheel-registry rotate --dir runs/fleet/registry --root-key r1.pem --root-key r2.pem --new-root-key n1.pem --new-root-key n2.pem --threshold 2
    flywheel-registry show   --dir runs/fleet/registry
    flywheel-registry refresh --dir runs/fleet/registry --online-key online.pem [--release-key release.pem] [--expiry-s timestamp=3600]   # static hosting: re-sign, then upload <dir>/tuf
    flywheel-registry rollback --server URL --to N --reason TEXT   # the whole fleet back to version N's weights (fleet/apps/registry_rollback.py)
    flywheel-registry restored --dir runs/fleet/registry --online-key online.pem [--release-key release.pem] --past-version N   # after a restore from a backup (fleet/apps/registry_restored.py)

Key files that do not exist are made (Ed25519 PEM, with a ``.pub`` beside each). ``init`` writes
root v1; ``rotate`` writes the next root version, signed by the current root threshold and, for
new root keys, by them too; with ``--online-key`` it then re-signs, with the new key, what that key
signs (snapshot, timestamp, and targets where no release key signs them: printed as ``resigned``),
so robots follow the new root on their next update with no refusal. Then restart the servers with
the online key the root names (one still on the old key serves these files and signs nothing).
``--release-key`` names a key of its own for targets, the release key (docs/security.md, "The
release key"): only a process holding it can release; the servers then need only the online key.

``refresh`` does what the server does on each ``timestamp.json`` request, for a registry served
as static files (docs/security.md): it re-signs, with the online key, whatever is past half its
life or no longer verifies under the current root, and prints what it did. Run it well within the
timestamp's life (1 day by default), e.g. hourly, then upload ``<dir>/tuf`` again. It signs with the
role lifetimes recorded in the registry (``<dir>/tuf/expiry_s.json``: the last setting a signer
recorded, a server's ``fleet.registry.expiry_s`` or ``--expiry-s`` here; the defaults where none is),
as every signer of the registry does; ``--expiry-s ROLE=SECONDS`` records a new setting first.

``rollback`` is the on-call operator's, not a ceremony: it returns the fleet to a known-good version through a fleet
server (``--server``, a publisher token) or where the registry and its release key are (``--dir``); see
``flywheel-registry rollback --help`` and docs/security.md, "Rolling the fleet back". ``restored`` brings a registry
restored from a backup past the versions robots ran and trust (``flywheel-registry restored --help``; docs/security.md,
"Backing up and restoring the registry").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fleet.apps import registry_restored, registry_rollback
from fleet.registry.signing import load_signer
from fleet.registry.store import PolicyRegistry
from fleet.registry.tuf_repo import (
    ONLINE_ROLES, TufRepository, check_expiry_s, check_rotation, check_uninitialised, init_root, resign_rotated, rotate_keys,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel-registry", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("init", "rotate", "show", "refresh"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--dir", required=True, help="the registry directory (its TUF repository is <dir>/tuf)")
        if name in ("show", "refresh"):
            if name == "refresh":
                cmd.add_argument("--online-key", required=True, help="the online key (private PEM) the root names")
                cmd.add_argument("--release-key", help="the release key (private PEM), where the root names one: re-signs targets too")
                cmd.add_argument(
                    "--expiry-s", action="append", default=[], metavar="ROLE=SECONDS",
                    help="record the registry's role lifetimes, for every signer of it (roles not given: the defaults); repeat",
                )  # fmt: skip
            continue
        cmd.add_argument("--root-key", action="append", default=[], help="a current root key (private PEM); repeat")
        cmd.add_argument("--online-key", help="the online key (private PEM) for snapshot and timestamp, and targets without a release key")
        cmd.add_argument("--release-key", help="a key of its own (private PEM) for targets: only its holder releases")
        cmd.add_argument("--threshold", type=int, help="root keys that must sign a root version")
        if name == "rotate":
            cmd.add_argument("--new-root-key", action="append", default=[], help="a key of the new root key set (private PEM); repeat")
    registry_rollback.add_parser(sub)
    registry_restored.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("rollback", "restored"):
        return {"rollback": registry_rollback, "restored": registry_restored}[args.command].run(args)
    tuf_dir = f"{args.dir.rstrip('/')}/tuf"  # a directory or s3://bucket/prefix (a Path would turn s3:// into s3:/)
    resigned = []  # online roles a rotation re-signed with the new online key
    try:
        if args.command == "init":
            if not args.root_key or not args.online_key:
                parser.error("init needs --root-key (one or more) and --online-key")
            threshold = args.threshold if args.threshold is not None else min(2, len(args.root_key))
            _check_key_files(args.root_key, args.online_key, threshold, args.release_key)
            check_uninitialised(TufRepository(tuf_dir, {}))  # before any key file is made
            root = init_root(
                tuf_dir, [load_signer(k, create=True) for k in args.root_key], threshold, load_signer(args.online_key, create=True).public_key,
                release_key=_public(args.release_key),
            )  # fmt: skip
        elif args.command == "rotate":
            if not args.root_key or not (args.online_key or args.release_key or args.new_root_key or args.threshold is not None):
                parser.error("rotate needs --root-key (the current threshold of them) and --online-key, --release-key, --new-root-key or --threshold")
            _check_rotate_files([*args.root_key, *args.new_root_key], args.online_key, args.release_key)  # before any key file is made
            root_signers = [load_signer(k) for k in args.root_key]  # these exist: never made
            check_rotation(TufRepository(tuf_dir, {}).require_root(), root_signers, new_root_keys=len(args.new_root_key), threshold=args.threshold)
            root = rotate_keys(
                tuf_dir,
                root_signers,
                online_key=_public(args.online_key),
                release_key=_public(args.release_key),
                new_root_signers=[load_signer(k, create=True) for k in args.new_root_key],
                threshold=args.threshold,
            )
            if args.online_key:  # the new online key is held here: what it signs is re-signed at once, leaving robots no window
                resigned = _resign_rotated(tuf_dir, root.version, args.online_key, args.release_key)
        elif args.command == "refresh":
            before = _online_versions(TufRepository(tuf_dir, {}))
            release = load_signer(args.release_key) if args.release_key else None
            expiry_s = _expiry_s(args.expiry_s)
            registry = PolicyRegistry(args.dir, load_signer(args.online_key), release=release, expiry_s=expiry_s)  # checks the keys; re-signs what they no longer verify
            registry.refresh()  # and what is past half its life
            after = _online_versions(registry.repo)
            timestamp = registry.repo.open("timestamp").signed
            resigned = [role for role in ONLINE_ROLES if after[role] != before.get(role)]
            print(json.dumps({"resigned": resigned, "versions": after, "timestamp_expires": timestamp.expires.isoformat(), "expiry_s": registry.repo.expiry_s}))
            return 0
        else:
            root = TufRepository(tuf_dir, {}).require_root()
    except Exception as exc:  # a ceremony's every failure is the operator's to read, not a traceback
        print(f"flywheel-registry {args.command}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    roles = {role: {"keyids": [k[:16] for k in root.roles[role].keyids], "threshold": root.roles[role].threshold} for role in ("root", *ONLINE_ROLES)}
    try:
        shown = {"root_version": root.version, "expires": root.expires.isoformat(), "roles": roles}
        print(json.dumps({**shown, "resigned": resigned} if args.command == "rotate" else shown, indent=1), flush=True)
    except BrokenPipeError:  # `flywheel-registry show | head`: the reader left, which is no fault
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if resigned is not None else 1


def _resign_rotated(tuf_dir: str, root_version: int, online_key: str, release_key: str | None) -> list[str] | None:
    """After ``rotate --online-key``: re-sign with the new key (and a new release key) what root ``root_version`` no longer
    verifies (tuf_repo.resign_rotated); the roles re-signed, or None (said) where that failed: the root stands."""
    try:
        return resign_rotated(tuf_dir, load_signer(online_key), load_signer(release_key) if release_key else None)
    except Exception as exc:  # the root is published: say what is left to do
        print(
            f"flywheel-registry rotate: root v{root_version} is published, but re-signing with the new online key failed "
            f"({exc.__class__.__name__}: {exc}): robots refuse the metadata (signature) until `flywheel-registry refresh "
            f"--online-key {online_key}` runs or a server restarts with that key",
            file=sys.stderr,
        )  # fmt: skip
        return None


def _public(path: str | None):
    """The public key of the private key file at ``path`` (made if missing); None for no path."""
    return None if path is None else load_signer(path, create=True).public_key


def _check_rotate_files(root_keys: list[str], online_key: str | None, release_key: str | None) -> None:
    """What rotate refuses by its files alone (the online or release key also a root key, or each other), said before
    any missing key file is made (rotate_keys checks the keys themselves too)."""
    roots = {str(Path(k).resolve()) for k in root_keys}
    for flag, path in (("--online-key", online_key), ("--release-key", release_key)):
        if path is not None and str(Path(path).resolve()) in roots:
            raise ValueError(f"{flag} {path} is also a root key: give it its own key file")
    if online_key is not None and release_key is not None and Path(online_key).resolve() == Path(release_key).resolve():
        raise ValueError(f"--release-key {release_key} is the --online-key: give the release key its own key file")


def _check_key_files(root_keys: list[str], online_key: str, threshold: int, release_key: str | None = None) -> None:
    """What init refuses, said before any key file is made (init_root checks the keys themselves too)."""
    paths = [str(Path(k).resolve()) for k in root_keys]
    if release_key is not None and str(Path(release_key).resolve()) in [*paths, str(Path(online_key).resolve())]:
        raise ValueError(f"--release-key {release_key} is also a --root-key or the --online-key: give the release key its own key file")
    if len(set(paths)) < len(paths):
        raise ValueError(f"--root-key {next(k for k, p in zip(root_keys, paths) if paths.count(p) > 1)} is given twice: give {len(paths)} different key files, or fewer")
    if str(Path(online_key).resolve()) in paths:
        raise ValueError(f"--online-key {online_key} is also a --root-key: the server holds the online key, so give it its own key file")
    if not 1 <= threshold <= len(paths):
        raise ValueError(f"--threshold {threshold}: it must be 1..{len(paths)}, the number of --root-key files given")


def _expiry_s(pairs: list[str]) -> dict[str, float]:
    """``--expiry-s ROLE=SECONDS`` pairs as a checked map (ValueError naming the pair that is not)."""
    bad = next((pair for pair in pairs if "=" not in pair), None)
    if bad is not None:
        raise ValueError(f"--expiry-s {bad!r}: give ROLE=SECONDS, e.g. --expiry-s timestamp=3600")
    return check_expiry_s(dict(pair.split("=", 1) for pair in pairs), "--expiry-s")


def _online_versions(repo: TufRepository) -> dict[str, int]:
    return {role: repo.open(role).signed.version for role in ONLINE_ROLES}


if __name__ == "__main__":
    sys.exit(main())
