"""The ``dicomnode`` command: wiring only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dicomnode import __version__
from dicomnode.config import DEFAULT_CONFIG_PATH, Settings, load_settings
from dicomnode.errors import ConfigError, DicomNodeError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help="configuration file (default: ./config.toml)",
    )
    return common


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of every subcommand.

    The training commands' own options come from the training recipes, which import
    OpenCV and highdicom; they are built only when ``argv`` names a training command,
    so that ``serve`` and its receiving processes do not carry those libraries.
    """
    common = _common()
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="DICOM AI node for chest X-ray and chest CT.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "serve",
        parents=[common],
        help="receive studies and run workers (foreground; stop with SIGTERM)",
    )
    sub.add_parser(
        "worker",
        parents=[common],
        help="run workers only (more hosts sharing one PostgreSQL database and storage)",
    )
    requeue = sub.add_parser(
        "requeue",
        aliases=["reprocess"],
        parents=[common],
        help="queue a study (or every failed study) again: it runs with the current models",
    )
    target = requeue.add_mutually_exclusive_group(required=True)
    target.add_argument("study_instance_uid", nargs="?", metavar="STUDY_UID")
    target.add_argument("--failed", action="store_true", help="every study whose analysis failed")

    status = sub.add_parser("status", parents=[common], help="recent studies and their state")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--limit", type=int, default=50, help="how many studies (default 50)")

    send = sub.add_parser(
        "send",
        parents=[common],
        help="C-STORE DICOM files or folders, as they are, to the node (or --to a peer)",
    )
    send.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    send.add_argument(
        "--to", metavar="HOST:PORT", help="the peer (default: this node, from the config)"
    )
    send.add_argument("--aec", metavar="AE", help="called AE title (default: node.ae_title)")
    send.add_argument(
        "--aet", metavar="AE", default="STORESCU", help="calling AE title (default: STORESCU)"
    )

    echo = sub.add_parser("echo", parents=[common], help="C-ECHO a destination")
    echo.add_argument("name", metavar="NAME", help="a [[destinations]] name")

    config = sub.add_parser("config", parents=[common], help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        parents=[common],
        help="validate the configuration (and the models, TLS files and data folder it names)",
    )
    check.add_argument(
        "--connect", action="store_true", help="also C-ECHO every [[destinations]] entry"
    )

    validate = sub.add_parser(
        "validate",
        parents=[common],
        help="site acceptance test: run the node's CXR pipeline on labelled images",
        description="Run the configured CXR pipeline on the DICOM/PNG/JPEG files listed in a "
        "CSV (path,label; paths relative to --images); write predictions.csv and report.md "
        "(ROC, reliability, sensitivity/specificity at the operating points, confusion table).",
    )
    validate.add_argument("--images", type=Path, required=True, metavar="DIR")
    validate.add_argument("--labels", type=Path, required=True, metavar="CSV")
    validate.add_argument("--out", type=Path, required=True, metavar="DIR")
    validate.add_argument("--no-progress", action="store_true", help="no progress bar")
    db = sub.add_parser("db", parents=[common], help="database tools")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", parents=[common], help="apply database migrations")
    words = sys.argv[1:] if argv is None else argv
    if any(word in TRAINING_COMMANDS for word in words):
        _add_training_commands(sub)
    else:
        for name, text in _TRAINING_HELP.items():
            sub.add_parser(name, help=text)
    return parser


#: Commands that need no node configuration (they work on models and data only).
TRAINING_COMMANDS = ("train", "evaluate", "prune")


_TRAINING_HELP = {
    "train": "train a model from data (resumable; see docs/training.md)",
    "evaluate": "re-measure a trained model on its held-out split; rewrite its MODEL_CARD.md",
    "prune": "APoZ iterative pruning of a CXR ensemble member (see docs/training.md)",
}


def _add_training_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from dicomnode.training import DEFAULT_DATA_DIR, add_common_arguments, targets

    train = sub.add_parser("train", help=_TRAINING_HELP["train"])
    train_sub = train.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, target in sorted(targets().items()):
        parser = train_sub.add_parser(name, help=target.summary, description=target.summary)
        add_common_arguments(parser, target.default_out or f"models/{name}")
        if target.add_arguments is not None:
            target.add_arguments(parser)
    evaluate = sub.add_parser("evaluate", help=_TRAINING_HELP["evaluate"])
    evaluate.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="e.g. models/NAME")
    evaluate.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"data root (default: {DEFAULT_DATA_DIR})",
    )
    from dicomnode.training.recipes.cxr import add_prune_arguments

    prune = sub.add_parser("prune", help=_TRAINING_HELP["prune"])
    add_prune_arguments(prune)


def _cmd_training(args: argparse.Namespace) -> int:
    import logging

    from dicomnode.training import get_target
    from dicomnode.training.evaluate import evaluate_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "train":
        out = get_target(args.target).train(args)
        print(f"model written to {out}")
        return EXIT_OK
    if args.command == "prune":
        from dicomnode.training.recipes.cxr import prune_member

        print(f"model written to {prune_member(args)}")
        return EXIT_OK
    metrics = evaluate_model(args.model_dir, args.data)
    print(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return EXIT_OK


def _cmd_config_check(settings: Settings, connect: bool) -> int:
    from dicomnode.ops import preflight

    # What serve checks at start (models, checksums, TLS files, data folder), and the
    # pipeline's models even when this host runs no workers (`dicomnode worker` would).
    preflight.check(settings, workers=True)
    print(f"{settings.source}: OK")
    print(f"  node {settings.node.ae_title} on {settings.node.bind}:{settings.node.port}")
    print(f"  data in {settings.node.data_dir}")
    print(f"  database {settings.database.url.split('://', 1)[0]}")
    callers = ", ".join(
        c.ae_title + (f"@{c.host}" if c.host else "") for c in settings.receive.callers
    )
    print(
        f"  callers: {callers or 'none'}"
        + ("; unknown callers allowed" if settings.receive.allow_unknown_callers else "")
    )
    print(f"  pipeline {settings.worker.pipeline}, {settings.worker.processes} worker process(es)")
    if settings.http.enabled:
        print(f"  http on {settings.http.bind}:{settings.http.port}")
    code = EXIT_OK
    for d in settings.destinations:
        line = f"  destination {d.name}: {d.ae_title}@{d.host}:{d.port}"
        if connect:
            from dicomnode.send import echo

            outcome = echo(d, settings.node.ae_title, timeout_s=10)
            line += f": C-ECHO {outcome}"
            if outcome != "success":
                code = EXIT_ERROR
        print(line)
    return code


def _cmd_status(settings: Settings, as_json: bool, limit: int) -> int:
    from dicomnode.db import Database
    from dicomnode.index import recent_studies
    from dicomnode.queue import queue_status

    db = Database(settings.database.url)
    db.require_current_schema()
    studies = recent_studies(db, limit=limit)
    from dicomnode.ops.overview import findings

    found = findings(db, [s.study_instance_uid for s in studies])
    queue = queue_status(db, limit=limit)
    if as_json:
        rows = [{**s.as_json(), "findings": found.get(s.study_instance_uid, [])} for s in studies]
        json.dump({"studies": rows, **queue}, sys.stdout, indent=2)
        print()
        return EXIT_OK
    jobs = queue["jobs"]
    print(
        "jobs: "
        + ", ".join(f"{n} {status}" for status, n in jobs.items())
        + " | deliveries: "
        + ", ".join(f"{n} {status}" for status, n in queue["deliveries"].items())
    )
    for job in queue["running"]:
        print(
            f"  running  {job['study_instance_uid']} on {job['worker']} since {job['started_at']}"
        )
    for job in queue["failed"]:
        print(
            f"  failed   {job['study_instance_uid']} after {job['attempts']} attempt(s): "
            f"{job['reason']}"
        )
    for item in queue["undelivered"]:
        print(
            f"  {item['status']:<8} {item['sop_instance_uid']} -> {item['destination']} "
            f"(attempts {item['attempts']}, last status {_dicom_status(item['last_status'])}, "
            f"{item['last_error'] or 'no error yet'})"
        )
    print()
    if not studies:
        print("no studies received yet")
        return EXIT_OK
    print(f"{'STATE':<10} {'INST':>5} {'MOD':<8} {'LAST RECEIVED (UTC)':<20} STUDY INSTANCE UID")
    for s in studies:
        print(
            f"{s.state:<10} {s.instances:>5} {','.join(s.modalities):<8} "
            f"{s.last_received_at:%Y-%m-%d %H:%M:%S}  {s.study_instance_uid}"
            + (f"  ({s.reason})" if s.reason else "")
        )
        for line in found.get(s.study_instance_uid, []):
            print(f"{'':<10} {line}")
    return EXIT_OK


def _cmd_send(args: argparse.Namespace, settings: Settings | None) -> int:
    from dicomnode.ops.store_files import parse_address, send_files

    if args.to is not None:
        try:
            host, port = parse_address(args.to)
        except ValueError as exc:
            print(f"dicomnode: --to: {exc}", file=sys.stderr)
            return EXIT_ERROR
    else:
        assert settings is not None
        bind = settings.node.bind
        host = "127.0.0.1" if bind in ("", "0.0.0.0", "::", "localhost") else bind
        port = settings.node.port
    called = args.aec or (settings.node.ae_title if settings is not None else "DICOMNODE")

    def skipped(path: Path, why: str) -> None:
        print(f"skipped {path}: {why}")

    report = send_files(args.paths, host, port, called, args.aet, on_skip=skipped)
    for path, why in report.failed:
        print(f"failed  {path}: {why}", file=sys.stderr)
    total = report.stored + len(report.failed)
    print(
        f"{report.stored} of {total} DICOM file(s) stored by {called}@{host}:{port}"
        + (f", {len(report.skipped)} other file(s) skipped" if report.skipped else "")
    )
    if total == 0:
        print("dicomnode: no DICOM files to send", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_ERROR


def _dicom_status(status: int | None) -> str:
    """A C-STORE status as DICOM writes it (0xA700), or 'none yet' before the first answer."""
    return "none yet" if status is None else f"{status:#06x}"


def _cmd_echo(settings: Settings, name: str) -> int:
    from dicomnode.send import echo

    known = {d.name: d for d in settings.destinations}
    if name not in known:
        print(
            f"dicomnode: no destination named {name!r}; known: {', '.join(known) or 'none'}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    d = known[name]
    outcome = echo(d, settings.node.ae_title)
    print(f"{name} ({d.ae_title}@{d.host}:{d.port}): {outcome}")
    return EXIT_OK if outcome == "success" else EXIT_ERROR


def _cmd_requeue(settings: Settings, study_uid: str | None, failed: bool) -> int:
    from dicomnode.db import Database
    from dicomnode.queue import requeue

    db = Database(settings.database.url)
    db.require_current_schema()
    queued = requeue(db, settings.queue, study_instance_uid=study_uid, failed=failed)
    for uid in queued:
        print(f"queued {uid}")
    if not queued:
        what = study_uid or "failed studies"
        print(f"nothing queued: no {what} that is complete and not already queued or running")
        return EXIT_ERROR
    return EXIT_OK


def _cmd_validate(settings: Settings, args: argparse.Namespace) -> int:
    from dicomnode.training.validate import validate

    result = validate(settings, args.images, args.labels, args.out, progress=not args.no_progress)
    print(
        f"{len(result.rows)} images analysed, {len(result.problems)} not usable; "
        f"report: {args.out / 'report.md'}"
    )
    for problem in result.problems:
        print(f"  {problem.path}: {problem.reason}", file=sys.stderr)
    return EXIT_OK if result.rows else EXIT_ERROR


def _config_invalid(path: Path, exc: ConfigError) -> int:
    """Print every problem with its key path; the exit code of an invalid configuration."""
    print(f"dicomnode: {path}: configuration is invalid:", file=sys.stderr)
    for key, message in exc.problems:
        print(f"  {key}: {message}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``dicomnode`` command and return its exit code."""
    args = build_parser(argv).parse_args(argv)
    if args.command in TRAINING_COMMANDS:
        try:
            return _cmd_training(args)
        except DicomNodeError as exc:
            print(f"dicomnode: {exc}", file=sys.stderr)
            return EXIT_ERROR
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        if args.command == "send" and args.to and args.aec:
            return _cmd_send(args, None)  # a peer named in full needs no configuration
        return _config_invalid(args.config, exc)
    try:
        if args.command == "config":
            return _cmd_config_check(settings, args.connect)
        if args.command == "status":
            return _cmd_status(settings, args.json, args.limit)
        if args.command == "db":
            from dicomnode.db import Database

            Database(settings.database.url).migrate()
            print("database is at the newest schema")
            return EXIT_OK
        if args.command == "echo":
            return _cmd_echo(settings, args.name)
        if args.command == "validate":
            return _cmd_validate(settings, args)
        if args.command == "send":
            return _cmd_send(args, settings)
        if args.command in ("requeue", "reprocess"):
            return _cmd_requeue(settings, args.study_instance_uid, args.failed)
        if args.command == "serve":
            from dicomnode.serve import serve

            return serve(settings)
        if args.command == "worker":
            from dicomnode.serve import work

            return work(settings)
    except ConfigError as exc:  # found at start: models, TLS files, data dir
        return _config_invalid(args.config, exc)
    except DicomNodeError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT_ERROR
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
