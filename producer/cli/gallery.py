"""The gallery subcommands of ``arcface-producer``: ``enroll``, ``identify``, ``forget``, ``gallery``.

:func:`register` adds them to the main parser's subparsers; :func:`handle` runs one (errors are raised as the
producer library's exceptions, which ``producer.cli`` turns into its exit codes). :func:`run` is a standalone
entry point with the same exit codes (``python -m producer.cli.gallery ...``)::

    arcface-producer enroll alice alice.jpg --gallery staff --wait     # one image (or several: one enroll_batch job)
    arcface-producer enroll --folder photos/ --out enrolled.csv --gallery staff   # photos/<subject>/<image>, resumable
    arcface-producer identify someone.jpg --gallery staff --top-k 3 --wait
    arcface-producer forget alice --gallery staff [--id ENROLLMENT_ID] --wait
    arcface-producer gallery [staff] [--json]             # galleries, or one gallery's subjects, with counts
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.cli.common import (
    PROG,
    Parser,
    add_command,
    add_image_options,
    add_json,
    add_wait,
    bounded_text,
    positive_int_argument,
    print_verify,
    report,
    threshold_argument,
)
from producer.contract.errors import EXIT_FAILED, EXIT_OK

if TYPE_CHECKING:
    from producer.client.face_client import FaceClient

# Each gallery command's line in the command list, and the description atop its own --help.
COMMANDS = {
    "enroll": (
        "enroll a subject's image(s), or a folder root/<subject>/<image>",
        "Store face embeddings under a subject in a gallery (idempotent per image and subject).",
    ),
    "identify": (
        "find the enrolled subjects closest to a face (1:N)",
        "Search a gallery for the subjects closest to the face in an image.",
    ),
    "forget": (
        "delete a subject (or one enrollment) from a gallery",
        "Delete a subject's enrollments from Redis and from every worker's memory within a second.",
    ),
    "gallery": (
        "list galleries, or one gallery's subjects, with counts",
        "Without NAME: every gallery with its model and counts. With NAME: its subjects and their enrollments.",
    ),
}


def register(sub: Any) -> None:
    """Add the gallery subcommands to ``arcface-producer``'s subparsers."""
    _add_enroll(sub)
    i = add_command(sub, "identify", COMMANDS)
    i.add_argument("image", help="image file")
    i.add_argument(
        "--top-k", type=positive_int_argument, default=5, help="subjects to return at most (default 5, at most 100)"
    )
    i.add_argument(
        "--threshold",
        type=threshold_argument,
        default=None,
        help="keep subjects within this distance (default: the worker's)",
    )
    _common(i)
    _image_options(i)
    f = add_command(sub, "forget", COMMANDS)
    f.add_argument("subject", help="the subject id whose enrollments are deleted")
    f.add_argument("--id", dest="enrollment_id", default=None, help="delete only this enrollment")
    _common(f)
    g = add_command(sub, "gallery", COMMANDS)
    g.add_argument("name", nargs="?", help="a gallery")
    g.add_argument("--limit", type=positive_int_argument, default=None, help="list at most this many subjects")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _common(sp: argparse.ArgumentParser) -> None:
    add_json(sp)
    sp.add_argument("--gallery", default="default", help="gallery name (default: default)")
    add_wait(sp)
    sp.add_argument("--ref", type=bounded_text, default=None, help="client reference, echoed in the result")


def _image_options(sp: argparse.ArgumentParser) -> None:
    add_image_options(
        sp,
        path_help="send images as paths relative to ARCFACE_SHARED_ROOT instead of bytes",
        detect_help="find the face first (default: the worker's setting)",
    )


def _add_enroll(sub: Any) -> None:
    e = add_command(sub, "enroll", COMMANDS)
    e.add_argument("subject", nargs="?", help="the subject id (a user id, an e-mail, ...)")
    e.add_argument("images", nargs="*", help="image files; several go in one enroll_batch job")
    e.add_argument(
        "--id",
        dest="enrollment_id",
        default=None,
        help="enrollment id (one image only; default: derived from subject and image)",
    )
    e.add_argument("--meta", default=None, help="JSON object stored with the enrollment (one image only)")
    e.add_argument(
        "--folder",
        default=None,
        help="enroll every root/<subject>/<image> (needs --out; rerun with the same --out to resume)",
    )
    e.add_argument("--out", default=None, help="with --folder: a CSV of one row per image")
    e.add_argument(
        "--per-job",
        type=positive_int_argument,
        default=32,
        help="with --folder: images per enroll_batch job (default 32; 1 = enroll jobs)",
    )
    e.add_argument("--window", type=positive_int_argument, default=8, help="with --folder: jobs in flight (default 8)")
    e.add_argument(
        "--shared-root",
        action="store_true",
        help="with --folder: send paths relative to ARCFACE_SHARED_ROOT (the folder lies under it)",
    )
    e.add_argument("--quiet", action="store_true", help="with --folder: no progress line")
    _common(e)
    _image_options(e)


def _invalid(message: str) -> Exception:
    from producer.contract.codes import ErrorCode
    from producer.contract.errors import InputError

    return InputError(ErrorCode.INVALID_PAYLOAD, message)


def _meta(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.meta is None:
        return None
    try:
        meta = json.loads(args.meta)
    except ValueError as exc:
        raise _invalid(f"--meta is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise _invalid("--meta must be a JSON object")
    return meta


def _enroll(client: FaceClient, args: argparse.Namespace, options: dict[str, Any]) -> None:
    from producer.client import gallery as gc

    if not args.subject or not args.images:
        raise _invalid("enroll needs SUBJECT and at least one IMAGE (or --folder ROOT --out CSV)")
    meta = _meta(args)
    if len(args.images) == 1:
        gc.enroll(
            client, args.subject, args.images[0], args.gallery, enrollment_id=args.enrollment_id, meta=meta, **options
        )
        return
    if args.enrollment_id or meta is not None:
        raise _invalid("--id and --meta apply to one image; enroll several without them")
    gc.enroll_many(client, [(args.subject, im) for im in args.images], args.gallery, **options)


def _enqueue(client: FaceClient, args: argparse.Namespace, job_id: str) -> None:
    """Enqueue the enroll, identify or forget job under ``job_id``."""
    from producer.client import gallery as gc

    if args.command == "forget":
        gc.forget(client, args.subject, args.gallery, enrollment_id=args.enrollment_id, ref=args.ref, job_id=job_id)
        return
    options = dict(model=args.model, detect=args.detect, as_path=args.path, ref=args.ref, job_id=job_id)
    if args.command == "enroll":
        _enroll(client, args, options)
    elif args.command == "identify":
        gc.identify(client, args.image, args.gallery, args.top_k, threshold=args.threshold, **options)
    else:
        from producer.contract.codes import ErrorCode
        from producer.contract.errors import InputError

        raise InputError(ErrorCode.UNSUPPORTED_JOB, f"{args.command!r} is not a gallery command")


def handle(args: argparse.Namespace, client: FaceClient, state: Any = None) -> int:
    """Run one gallery subcommand with ``client``; ``state`` (``producer.cli``'s) learns the job id for Ctrl-C."""
    from producer.client import gallery as gc

    if args.command == "gallery":
        return _list(client, args)
    if args.command == "enroll" and args.folder is not None:
        return _folder(client, args)
    job_id = uuid.uuid4().hex
    if state is not None:
        state.job_id = job_id
    _enqueue(client, args, job_id)
    if state is not None:
        state.enqueued = True
    if not args.wait:
        print(json.dumps({"job_id": job_id, "status": "queued"}) if args.json else job_id)
        return EXIT_OK
    print_result(job_id, gc.result(client, job_id, args.timeout), args.json)
    return EXIT_OK


# --- printing results ------------------------------------------------------------------------------------
def _print_enroll(job_id: str, result: Any) -> None:
    how = "new" if result.created else "already enrolled, nothing changed"
    print(
        f"job {job_id} finished: {result.subject} enrolled in gallery {result.gallery} ({how}; "
        f"enrollment {result.enrollment_id}, {result.subject_enrollments} enrollment(s) for the subject)"
    )


def _print_enroll_batch(job_id: str, result: Any) -> None:
    stored = [r for r in result.results if r is not None]
    new = sum(r.created for r in stored)
    print(
        f"job {job_id} finished: {len(stored)} of {result.count} images enrolled in gallery {result.gallery} "
        f"({new} new, {len(stored) - new} already enrolled, {len(result.errors)} failed)"
    )
    for err in result.errors:
        print(f"  image {err.index}: [{err.code.value}] {err.message}")


def _print_identify(job_id: str, result: Any) -> None:
    searched = f"({result.searched} enrollments searched)"
    if not result.matches:
        where = f"gallery {result.gallery} within distance {result.threshold:g}"
        print(f"job {job_id} finished: no subject of {where} {searched}")
        return
    print(
        f"job {job_id} finished: {len(result.matches)} subject(s) of gallery {result.gallery} "
        f"within {result.threshold:g} {searched}:"
    )
    for rank, m in enumerate(result.matches, 1):
        print(f"  {rank}. {m.subject}  distance {m.distance:.4f}  (enrollment {m.enrollment_id})")


def _print_forget(job_id: str, result: Any) -> None:
    what = f"enrollment {result.enrollment_id} of {result.subject}" if result.enrollment_id else result.subject
    print(
        f"job {job_id} finished: forgot {what} in gallery {result.gallery}: "
        f"{result.removed} enrollment(s) removed, {result.subject_enrollments} left"
    )


def _print_verify(job_id: str, result: Any) -> None:

    whom = (
        f" as {result.subject} (gallery {result.gallery}, closest of {result.enrollments})"
        if hasattr(result, "subject")
        else ""
    )
    print_verify(job_id, result, whom)


_PRINTERS: dict[str, Callable[[str, Any], None]] = {
    "enroll": _print_enroll,
    "enroll_batch": _print_enroll_batch,
    "identify": _print_identify,
    "forget": _print_forget,
    "verify": _print_verify,
}


def print_result(job_id: str, result: Any, as_json: bool) -> None:
    """One result of a gallery job (or a verify against a subject), as a line or as JSON."""
    if as_json:
        print(json.dumps({"job_id": job_id, "status": "finished", "result": result.model_dump(mode="json")}))
        return
    printer = _PRINTERS.get(result.kind)
    if printer is None:
        print(f"job {job_id} finished: {result.model_dump_json()}")
    else:
        printer(job_id, result)


# --- listing and folders -----------------------------------------------------------------------------------
def _list(client: FaceClient, args: argparse.Namespace) -> int:
    from producer.client import gallery as gc

    if args.name is None:
        galleries = gc.list_galleries(client)
        if args.json:
            print(json.dumps({"galleries": [g.model_dump(mode="json") for g in galleries]}))
        elif not galleries:
            print("no galleries yet (arcface-producer enroll SUBJECT IMAGE --gallery NAME creates one)")
        else:
            for g in galleries:
                print(f"{g.name}: {g.subjects} subjects, {g.enrollments} enrollments, model {g.model} ({g.dim}-d)")
        return EXIT_OK
    subjects = gc.list_subjects(client, args.name, args.limit)
    if args.json:
        print(json.dumps({"gallery": args.name, "subjects": [s.model_dump(mode="json") for s in subjects]}))
    else:
        for s in subjects:
            print(f"{s.subject}: {s.enrollments} enrollment(s)")
    return EXIT_OK


def _folder(client: FaceClient, args: argparse.Namespace) -> int:
    from producer.bulk import enroll as bulk

    if args.out is None:
        raise _invalid("enroll --folder needs --out CSV (one row per image; rerun with it to resume)")
    if args.subject or args.images:
        raise _invalid("enroll --folder takes the subjects from the folder names: give no SUBJECT or IMAGE")
    options = bulk.BulkEnrollOptions(
        gallery=args.gallery, per_job=args.per_job, window=args.window, shared_root=args.shared_root, detect=args.detect
    )
    total = len(bulk.scan_folder(Path(args.folder)))
    progress = None if (args.quiet or args.json) else bulk.progress_printer(total)
    stats = bulk.bulk_enroll(client, Path(args.folder), Path(args.out), options, on_progress=progress)
    if progress is not None:
        print(file=sys.stderr)
    names = ("images", "skipped", "enrolled", "already", "failed")
    body = {**{n: getattr(stats, n) for n in names}, "seconds": round(stats.seconds, 2)}
    if args.json:
        print(json.dumps({**body, "gallery": args.gallery, "out": args.out}))
    else:
        print(
            f"{stats.images} images under {args.folder}: {stats.skipped} enrolled by earlier runs, "
            f"{stats.enrolled} enrolled now, {stats.already} already enrolled, {stats.failed} failed "
            f"(see {args.out}) in {stats.seconds:.1f}s; gallery {args.gallery}"
        )
    return EXIT_FAILED if stats.failed else EXIT_OK


def run(argv: Sequence[str] | None = None) -> int:
    """Parse and run one gallery subcommand; returns the exit code (as ``arcface-producer``)."""
    parser = Parser(prog=PROG, description="Gallery commands of arcface-producer.")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser))
    args = parser.parse_args(argv)
    from producer.client.face_client import FaceClient
    from producer.contract.errors import ArcFaceError
    from producer.settings import ProducerSettings, configure_logging, load_settings

    try:
        settings = load_settings(ProducerSettings)
        configure_logging(settings)
        return handle(args, FaceClient(settings))
    except ArcFaceError as exc:
        return report(exc, getattr(args, "json", False))


if __name__ == "__main__":
    sys.exit(run())
