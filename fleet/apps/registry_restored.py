"""``flywheel-registry restored``: bring a registry restored from a backup past what the fleet ran (docs/security.md,
"Backing up and restoring the registry").

    flywheel-registry restored --dir runs/fleet/registry --online-key online.pem --release-key release.pem --past-version 4

Run it once after the restore, where the keys are, before the next release. ``--past-version N``: the highest policy
version any robot ran (the largest ``trusted_version`` in the robots' status, or in the operator's records of releases);
the next release is numbered N+1 or above, recorded in the registry's history (a restart, another replica, a later
restore of a backup taken after this keep it). Targets, snapshot and timestamp are re-signed ``--metadata-margin``
versions on (1,000,000 by default: years of re-signing), past what was signed since the backup, which robots trust. Each
run jumps again. Prints the floor, the next version, the metadata versions before and after and the root version in
force as JSON; any refusal is one line on stderr and exit 1, with nothing written but what any server's start re-signs
(metadata past half its life). Put back the newest root files (a key rotation after the backup) before running it: the
jump is signed with the keys the root in force names.
"""

from __future__ import annotations

import argparse
import json
import sys

from fleet.registry.store import METADATA_MARGIN


def add_parser(sub) -> None:
    """The ``restored`` command of ``flywheel-registry``."""
    cmd = sub.add_parser("restored", help="after a restore from a backup: the next release past what robots ran", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("--dir", required=True, help="the registry directory or s3://bucket/prefix, as restored")
    cmd.add_argument("--online-key", required=True, help="the online key (private PEM) the registry's root names")
    cmd.add_argument("--release-key", help="the release key (private PEM), where the root names one")
    cmd.add_argument("--past-version", type=int, required=True, help="the highest policy version any robot ran: the next release is above it")
    cmd.add_argument("--metadata-margin", type=int, default=METADATA_MARGIN, help=f"versions the TUF metadata moves on (default {METADATA_MARGIN:,})")


def run(args: argparse.Namespace) -> int:
    """0 with the outcome printed as JSON, 1 with one line on stderr."""
    from fleet.registry.files import open_files
    from fleet.registry.signing import load_signer
    from fleet.registry.store import PolicyRegistry, check_past_version

    try:
        check_past_version(args.past_version)  # asked before the registry is opened (opening re-signs stale metadata)
        if args.metadata_margin < 1:
            raise ValueError(f"metadata margin {args.metadata_margin}: an integer from 1 to what the metadata names leave room for")
        files = open_files(args.dir)
        if "1.root.json" not in files.list("tuf/metadata"):  # asked first: opening a registry makes its folders
            raise FileNotFoundError(f"{files.location}/tuf/metadata has no root metadata: give --dir the registry as restored (the folder that holds tuf/)")
        release = load_signer(args.release_key) if args.release_key else None
        registry = PolicyRegistry(args.dir, load_signer(args.online_key), release=release)
        done = registry.restored(args.past_version, args.metadata_margin)
    except Exception as exc:  # a refusal or a key that does not fit: the operator's to read, not a traceback
        print(f"flywheel-registry restored: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(done, indent=1))
    return 0
