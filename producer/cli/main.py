"""``arcface-producer``: enqueue jobs, wait for results, read status, run bulk verifications, from the shell.

Exit codes: 0 done (or enqueued, without --wait), 1 the job (or a bulk pair) failed, 2 bad usage, input or
configuration (an ``ARCFACE_*`` setting), or no such job, 3 timeout, 4 Redis unreachable, 130 interrupted
(Ctrl-C: the job ids and how to fetch them are printed). Every error is one line on stderr (with ``--json``,
also a JSON object on stdout); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
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
    fail,
    job_id_argument,
    print_error,
    print_verify,
    threshold_argument,
    version,
)
from producer.contract.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from producer.client.face_client import FaceClient
    from producer.contract.results import AnyResult
    from producer.settings import ProducerSettings


def build_parser() -> argparse.ArgumentParser:
    from producer.cli import bulk as bulk_cli
    from producer.cli import gallery as gallery_cli

    p = Parser(
        prog=PROG,
        description="Enqueue ArcFace jobs and read their results. Settings: ARCFACE_* environment "
        "variables or .env (see docs/configuration.md).",
        epilog="exit codes: 0 done or enqueued, 1 job failed, 2 bad usage/input/config or no such job, 3 timeout, "
        "4 Redis unreachable, 130 interrupted",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_embed_verify(sub)
    _add_result_status(sub)
    bulk_cli.register(sub)
    gallery_cli.register(sub)  # enroll | identify | forget | gallery
    return p


def _job_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--ref", type=bounded_text, default=None, help="client reference (up to 1024 characters), echoed in the result"
    )
    add_image_options(
        sp,
        path_help="send the image as a path relative to the shared root (ARCFACE_SHARED_ROOT) instead of its bytes",
        detect_help="find and align the face first (default: the worker's ARCFACE_DETECT)",
    )


# Each job command's line in the command list, and the description atop its own --help.
_ABOUT = {
    "embed": ("embed one image", "Enqueue an embed job; prints its id (or, with --wait, its result)."),
    "verify": ("verify a pair of images", "Enqueue a verify job for two images."),
    "result": ("wait for a job's result", "Wait for a job's result and print it."),
    "status": ("a job's rq status (and error code)", "Print a job's status; a failed job's error code too."),
}


def _add_embed_verify(sub: Any) -> None:
    e = add_command(sub, "embed", _ABOUT)
    e.add_argument("image", help="image file (JPEG, PNG, WebP, BMP, GIF)")
    add_json(e)
    add_wait(e)
    e.add_argument(
        "--out",
        default=None,
        metavar="FILE.npy",
        help="wait and write the embedding to this .npy file (float32 vector; with --all-faces a faces x dim matrix)",
    )
    e.add_argument(
        "--all-faces", action="store_true", help="with detection: embed every face of the image, largest first"
    )
    _job_options(e)
    v = add_command(sub, "verify", _ABOUT)
    v.add_argument("a", help="first image file")
    v.add_argument("b", help="second image file")
    v.add_argument(
        "--threshold",
        type=threshold_argument,
        default=None,
        help="similar when the cosine distance is <= this, 0..2 (default: the worker's ARCFACE_THRESHOLD)",
    )
    add_json(v)
    add_wait(v)
    _job_options(v)


def _add_result_status(sub: Any) -> None:
    r = add_command(sub, "result", _ABOUT)
    r.add_argument("job_id", type=job_id_argument, help="the id printed when the job was enqueued")
    add_json(r)
    add_wait(r, flag=False)
    r.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)  # accepted for old scripts: result waits
    r.add_argument("--out", default=None, metavar="FILE.npy", help="write an embed job's embedding to this .npy file")
    s = add_command(sub, "status", _ABOUT)
    s.add_argument("job_id", type=job_id_argument, help="the id printed when the job was enqueued")
    add_json(s)


def _print_result(job_id: str, result: Any, as_json: bool, out: str | None) -> None:
    from producer.contract.results import EmbedResult

    if out is not None:
        import numpy as np

        rows = [f.embedding for f in result.faces] if getattr(result, "faces", None) else [result.embedding]
        np.save(
            out, np.stack(rows).astype(np.float32) if getattr(result, "faces", None) else rows[0].astype(np.float32)
        )
    if as_json:
        body = result.model_dump(mode="json")
        if isinstance(result, EmbedResult):
            body["embedding"] = [float(x) for x in result.embedding]
            for face, model in zip(body.get("faces") or [], result.faces or [], strict=True):
                face["embedding"] = [float(x) for x in model.embedding]
        print(json.dumps({"job_id": job_id, "status": "finished", "result": body, **({"out": out} if out else {})}))
    elif isinstance(result, EmbedResult):
        head = ", ".join(f"{x:.4f}" for x in result.embedding[:4])
        print(
            f"job {job_id} finished: {result.dim}-d embedding from {result.model} [{head}, ...] "
            f"(batch {result.timing.batch_size}, inference {result.timing.inference_ms:.1f} ms)"
            + (f"; written to {out}" if out else "; --out FILE.npy or --json for all values")
        )
        for k, face in enumerate(result.faces or []):
            print(f"  face {k}: box {[round(v) for v in face.box]}, score {face.score:.2f}")
    else:
        print_verify(job_id, result)


class _State:
    """What the command got to, for the Ctrl-C message."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.enqueued = False
        self.waiting = False


def _interrupted(args: argparse.Namespace, state: _State, exc: BaseException) -> int:
    from producer.bulk.run import BulkInterrupted

    as_json = getattr(args, "json", False)
    if isinstance(exc, BulkInterrupted):
        st, ids = exc.stats, exc.pending_job_ids
        print_error(
            f"interrupted: {st.rows} rows written to {args.out}; {len(ids)} embed jobs are still queued (their ids "
            f"are in {exc.sidecar}); rerun the same command to resume: their results are reused, nothing done is "
            "recomputed"
        )
        if as_json:
            body = {
                "status": "interrupted",
                "rows_written": st.rows,
                "pending_job_ids": ids,
                "sidecar": str(exc.sidecar),
            }
            print(json.dumps(body))
        return EXIT_INTERRUPTED
    jid = state.job_id
    if jid is None:
        print_error("interrupted")
    elif state.enqueued:
        print_error(
            f"interrupted; job {jid} is queued and still runs: fetch its result with `{PROG} result {jid}` "
            f"(status: `{PROG} status {jid}`)"
        )
    else:
        print_error(f"interrupted while enqueueing job {jid}; it may or may not be queued: `{PROG} status {jid}`")
    if as_json:
        fetch = {"fetch": f"{PROG} result {jid}"} if jid else {}
        print(
            json.dumps({"status": "interrupted", "job_id": jid, "enqueued": state.enqueued if jid else False, **fetch})
        )
    return EXIT_INTERRUPTED


def _status(client: FaceClient, args: argparse.Namespace) -> int:
    status = client.status(args.job_id)
    error = client.error(args.job_id) if status == "failed" else None
    if args.json:
        coded = {"error": error.model_dump(mode="json")} if error else {}
        print(json.dumps({"job_id": args.job_id, "status": status, **coded}))
    else:
        print(f"{status} [{error.code.value}]: {error.message}" if error else status)
    return EXIT_OK


def _enqueue(client: FaceClient, args: argparse.Namespace, state: _State) -> str:
    """Enqueue the embed or verify job (``result``: the given id); ``state`` knows its id before it is sent."""
    if args.command == "result":
        state.job_id, state.enqueued = args.job_id, True
        return str(args.job_id)
    job_id = state.job_id = uuid.uuid4().hex  # known before enqueueing, so Ctrl-C can always name it
    options: dict[str, Any] = dict(ref=args.ref, model=args.model, as_path=args.path, detect=args.detect, job_id=job_id)
    if args.command == "embed":
        client.embed(args.image, faces="all" if args.all_faces else "one", **options)
    else:
        client.verify(args.a, args.b, threshold=args.threshold, **options)
    state.enqueued = True
    return job_id


def _settings_for(args: argparse.Namespace, wait: bool, out: str | None) -> ProducerSettings:
    from producer.bulk.output import check_output_path
    from producer.contract.errors import ConfigError
    from producer.settings import ProducerSettings, configure_logging, load_settings

    settings = load_settings(ProducerSettings)
    configure_logging(settings)
    if args.command in ("embed", "verify") and wait and settings.result_ttl == 0:
        raise ConfigError(
            "ARCFACE_RESULT_TTL",
            "ARCFACE_RESULT_TTL=0 keeps no result, so there is nothing to wait for: "
            "set it above 0, or enqueue without --wait/--out",
        )
    if out is not None:
        check_output_path(Path(out), "--out")
    return settings


def _command(args: argparse.Namespace, state: _State) -> int:
    from producer.cli import bulk as bulk_cli
    from producer.cli import gallery as gallery_cli
    from producer.client.face_client import FaceClient

    out = getattr(args, "out", None) if args.command in ("embed", "result") else None
    wait = args.command == "result" or bool(getattr(args, "wait", False)) or out is not None
    settings = _settings_for(args, wait, out)
    client = FaceClient(settings)
    if args.command == "status":
        return _status(client, args)
    if args.command == "bulk":
        return bulk_cli.handle(client, settings, args)
    if args.command in gallery_cli.COMMANDS:
        return gallery_cli.handle(args, client, state)
    job_id = _enqueue(client, args, state)
    if not wait:
        print(json.dumps({"job_id": job_id, "status": "queued"}) if args.json else job_id)
        return EXIT_OK
    state.waiting = True
    result: AnyResult = client.result(job_id, args.timeout)
    if out is not None and getattr(result, "kind", None) != "embed":
        message = f"--out writes an embedding; job {job_id} is a {result.kind} job"
        return fail(message, EXIT_USAGE, args.json, job_id=job_id)
    _print_result(job_id, result, args.json, out)
    return EXIT_OK


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (usage errors exit 2 from argparse)."""
    args = build_parser().parse_args(argv)
    state = _State()
    as_json = getattr(args, "json", False)
    try:
        from producer.cli.common import report
        from producer.contract.errors import ArcFaceError

        try:
            return _command(args, state)
        except ArcFaceError as exc:
            return report(exc, as_json)
        except BrokenPipeError:  # `arcface-producer ... | head`
            sys.stderr.close()
            return EXIT_OK
        except OSError as exc:  # e.g. --out on a full disk
            return fail(f"{exc.filename or ''}: {exc.strerror or exc}", EXIT_USAGE, as_json)
    except KeyboardInterrupt as exc:
        return _interrupted(args, state, exc)


def main() -> None:
    """The ``arcface-producer`` entry point."""
    try:
        code = run()
    except KeyboardInterrupt:  # during argument parsing or imports
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


__all__ = [
    "main",
    "run",
]


if __name__ == "__main__":
    main()
