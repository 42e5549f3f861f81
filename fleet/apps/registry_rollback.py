"""``flywheel-registry rollback``: return the whole fleet to a known-good policy (docs/security.md, "Rolling the fleet back").

    flywheel-registry rollback --server https://fleet:8080 --to 3 --reason "v5 drops the pole on robot-2"     # token: $FLYWHEEL_PUBLISHER_TOKEN
    flywheel-registry rollback --server https://fleet:8080 --token-file publisher.tok --reason "canary regressed"  # end the canary
    flywheel-registry rollback --dir runs/fleet/registry --online-key online.pem --release-key release.pem --to 3 --reason "..."

With ``--to N`` version N's weights and manifest fields go out again as a new, higher stable version for every robot
(robots never accept a lower version); the stable version, and any canary, are recorded ``rolled_back``. N must be
listed in the registry's signed targets metadata (the newest 8 versions, and the stable and canary ones): an older
version's files are no longer verifiable, and it is refused. Without ``--to``, the canary running ends and the stable
weights go out again. ``--version V`` names the version you judged bad (the canary where one runs, with ``--to`` too;
else the stable one): another publisher's release made since is then never withdrawn untried. ``--server`` asks a
fleet server (``POST /v1/rollout/rollback`` with a publisher token); ``--dir`` signs where the registry and its keys
are, for a fleet whose servers do not hold the release key (they answer 403 ``no_release_key``). Prints the new
version and the rollout as JSON; any refusal, or a server that does not answer, is one line on stderr and exit 1 (a
server that took the request and gave no answer may have rolled back: the line says to look at ``GET /v1/rollout``).
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from fleet.agent.config import read_token

TOKEN_ENV = "FLYWHEEL_PUBLISHER_TOKEN"
TIMEOUT_S = 120.0  # a rollback signs and stores a release: the weights are read, checked and written again
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)  # failures before the request went out


class RollbackFailed(RuntimeError):
    """What stopped a rollback, in one line for the operator."""


def add_parser(sub) -> None:
    """The ``rollback`` command of ``flywheel-registry``."""
    cmd = sub.add_parser("rollback", help="return the fleet to a known-good policy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = cmd.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="the fleet server's URL (POST /v1/rollout/rollback with a publisher token)")
    where.add_argument("--dir", help="the registry directory or s3://bucket/prefix, signed here with --online-key (and --release-key)")
    cmd.add_argument("--to", type=int, help="the version whose weights the whole fleet returns to (without it: end the canary)")
    cmd.add_argument("--version", type=int, help="the version you judged bad: the canary where one runs (with --to too), else the stable version")
    cmd.add_argument("--reason", required=True, help="why (printable text, at most 1,024 characters): it goes into every robot's manifest")
    cmd.add_argument("--token-env", default=TOKEN_ENV, help=f"environment variable holding the publisher token (--server; default {TOKEN_ENV})")
    cmd.add_argument("--token-file", help="a file holding the publisher token (--server), instead of --token-env")
    cmd.add_argument("--online-key", help="the online key (private PEM) the registry's root names (--dir)")
    cmd.add_argument("--release-key", help="the release key (private PEM), where the root names one (--dir)")


def run(args: argparse.Namespace) -> int:
    """Roll back as ``args`` say; 0 with the outcome printed as JSON, 1 with one line on stderr."""
    from fleet.registry.routes import MAX_REASON

    try:
        for flag in ("to", "version"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise RollbackFailed(f"--{flag} {getattr(args, flag)}: a version is an integer >= 1")
        if len(args.reason) > MAX_REASON or not args.reason.isprintable():
            raise RollbackFailed(f"--reason: printable text of at most {MAX_REASON} characters (it goes into every robot's manifest)")
        answer = _over_http(args) if args.server else _in_place(args)
    except RollbackFailed as exc:
        print(f"flywheel-registry rollback: {exc}", file=sys.stderr)
        return 1
    manifest = answer["manifest"]
    print(json.dumps({"version": manifest["version"], "note": manifest["note"], **{k: answer[k] for k in ("stable", "canary", "cohort")}}, indent=1))
    return 0


def _over_http(args: argparse.Namespace) -> dict:
    """``POST /v1/rollout/rollback`` on ``args.server``; its answer, or :class:`RollbackFailed` with the server's reason."""
    token = _token(args)
    body = {"reason": args.reason, **({"to": args.to} if args.to is not None else {}), **({"version": args.version} if args.version is not None else {})}
    url = f"{args.server.rstrip('/')}/v1/rollout/rollback"
    try:
        response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT_S)
    except httpx.InvalidURL as exc:
        raise RollbackFailed(f"--server {args.server}: not a URL ({exc}); give the fleet server's, e.g. https://fleet:8080") from None
    except NOT_SENT as exc:
        raise RollbackFailed(f"{url} did not answer ({exc.__class__.__name__}: {exc}): is the server up, and is that its URL? Nothing was rolled back") from None
    except httpx.HTTPError as exc:  # sent, no answer: the server may have rolled back all the same
        rollout = f"{args.server.rstrip('/')}/v1/rollout"
        raise RollbackFailed(
            f"{url} took the request but gave no answer ({exc.__class__.__name__}: {exc}): whether the fleet was rolled back is unknown. "
            f"Check GET {rollout} (the stable version, and the history's rolled_back events) before anything else; the same "
            "command again signs nothing where it was done (a 409 says so)"
        ) from None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise RollbackFailed(f"{url} answered {response.status_code} with no JSON ({response.text[:200]!r}): is that a fleet server?")
    if response.status_code != 200:
        advice = ""
        if answer.get("error") == "no_release_key":  # the server holds only the online key: sign where the release key is
            advice = " (or roll back where the release key is kept: flywheel-registry rollback --dir REGISTRY --online-key ONLINE.pem --release-key RELEASE.pem ...)"
        raise RollbackFailed(f"{response.status_code} {answer.get('error')}: {answer.get('reason')}{advice}")
    return answer


def _token(args: argparse.Namespace) -> str:
    """The publisher token from ``--token-file``, else from the ``--token-env`` variable; :class:`RollbackFailed` without one."""
    try:
        return read_token(
            args.token_file, args.token_env, "publisher token", "--token-file",
            "issue one with `python -m fleet.server.auth --tokens TOKENS.json add --role publisher`",
        )  # fmt: skip
    except ValueError as exc:
        raise RollbackFailed(str(exc)) from None


def _in_place(args: argparse.Namespace) -> dict:
    """The rollback signed here, on the registry at ``args.dir`` with its keys; the new manifest and the rollout."""
    from fleet.registry.signing import load_signer
    from fleet.registry.store import PolicyRegistry

    if not args.online_key:
        raise RollbackFailed("--dir needs --online-key (and --release-key where the registry's root names one)")
    try:
        release = load_signer(args.release_key) if args.release_key else None
        registry = PolicyRegistry(args.dir, load_signer(args.online_key), release=release)
        manifest = registry.rollback(args.reason, args.version, to=args.to)
        return {"manifest": manifest, **registry.rollout()}
    except Exception as exc:  # a refusal or a key that does not fit: the operator's to read, not a traceback
        raise RollbackFailed(f"{exc.__class__.__name__}: {exc}") from None
