"""``arcface-producer``: enqueue jobs, wait for results, read status, run bulk verifications, from the shell.

Exit codes: 0 done (or enqueued, without --wait), 1 the job (or a bulk pair) failed, 2 bad usage, input or
configuration (an ``ARCFACE_*`` setting), or no such job, 3 timeout, 4 Redis unreachable, 130 interrupted
(Ctrl-C: the job ids and how to fetch them are printed). Every error is one line on stderr (with ``--json``,
also a JSON object on stdout); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import uuid
from pathlib import Path
from typing import Any, NoReturn, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_REDIS, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
PROG = "arcface-producer"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed package's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("arcface-service")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _threshold(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..2 (a cosine distance: 0 identical, 2 opposite)")
    return value


def _seconds(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give seconds >= 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _ref(text: str) -> str:
    if len(text) > 1024:
        raise argparse.ArgumentTypeError(f"{len(text)} characters, over the 1024-character limit")
    return text


def _job_id(text: str) -> str:
    from producer.client import JOB_ID

    if not JOB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a job id (1-128 letters, digits, '_' or '-')")
    return text


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Enqueue ArcFace jobs and read their results. Settings: ARCFACE_* environment "
        "variables or .env (see the README's Configuration table).",
        epilog="exit codes: 0 done or enqueued, 1 job failed, 2 bad usage/input/config or no such job, 3 timeout, "
        "4 Redis unreachable, 130 interrupted",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def output(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout (errors too)")

    def waiting(sp: argparse.ArgumentParser, flag: bool = True) -> None:
        if flag:
            sp.add_argument("--wait", action="store_true", help="wait for the result and print it")
        sp.add_argument(
            "--timeout",
            type=_seconds,
            default=None,
            metavar="S",
            help="seconds to wait for the result (default: ARCFACE_WAIT_TIMEOUT, 60)",
        )

    def job_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--ref", type=_ref, default=None, help="client reference (up to 1024 characters), echoed in the result"
        )
        sp.add_argument(
            "--model",
            default=None,
            help="the model the job needs; a worker serving another model fails it with unknown_model",
        )
        sp.add_argument(
            "--path",
            action="store_true",
            help="send the image as a path relative to the shared root (ARCFACE_SHARED_ROOT) instead of its bytes",
        )
        sp.add_argument(
            "--detect",
            choices=["none", "blazeface"],
            default=None,
            help="find and align the face first (default: the worker's ARCFACE_DETECT)",
        )

    e = sub.add_parser(
        "embed",
        help="embed one image",
        description="Enqueue an embed job; prints its id (or, with --wait, its result).",
    )
    e.add_argument("image", help="image file (JPEG, PNG, WebP, BMP, GIF)")
    output(e)
    waiting(e)
    e.add_argument(
        "--out",
        default=None,
        metavar="FILE.npy",
        help="wait and write the embedding to this .npy file (float32 vector; with --all-faces a faces x dim matrix)",
    )
    e.add_argument(
        "--all-faces", action="store_true", help="with detection: embed every face of the image, largest first"
    )
    job_options(e)

    v = sub.add_parser("verify", help="verify a pair of images", description="Enqueue a verify job for two images.")
    v.add_argument("a", help="first image file")
    v.add_argument("b", help="second image file")
    v.add_argument(
        "--threshold",
        type=_threshold,
        default=None,
        help="similar when the cosine distance is <= this, 0..2 (default: the worker's ARCFACE_THRESHOLD)",
    )
    output(v)
    waiting(v)
    job_options(v)

    r = sub.add_parser("result", help="wait for a job's result", description="Wait for a job's result and print it.")
    r.add_argument("job_id", type=_job_id, help="the id printed when the job was enqueued")
    output(r)
    waiting(r, flag=False)
    r.add_argument(
        "--wait", action="store_true", help=argparse.SUPPRESS
    )  # accepted for old scripts: result always waits
    r.add_argument("--out", default=None, metavar="FILE.npy", help="write an embed job's embedding to this .npy file")

    s = sub.add_parser(
        "status",
        help="a job's rq status (and error code)",
        description="Print a job's status; a failed job's error code too.",
    )
    s.add_argument("job_id", type=_job_id, help="the id printed when the job was enqueued")
    output(s)

    bk = sub.add_parser(
        "bulk",
        help="verify every pair of a pair file (CSV a,b[,label] / JSONL / LFW pairs.txt)",
        description="Verify every pair of a pair file through the workers; rerun with the same --out to resume.",
    )
    bk.add_argument("pairs", help="the pair file: CSV with header a,b[,label], JSONL {a, b, label}, or LFW pairs.txt")
    bk.add_argument(
        "--out",
        required=True,
        help="results CSV (rerun with the same --out to resume; its sidecar keeps the embeddings)",
    )
    bk.add_argument(
        "--root", default=None, help="directory the image paths are relative to (default: the current directory)"
    )
    bk.add_argument(
        "--shared-root",
        action="store_true",
        help="send paths; workers read them under their ARCFACE_SHARED_ROOT (needs ARCFACE_SHARED_ROOT here too)",
    )
    bk.add_argument(
        "--format", choices=["csv", "jsonl", "lfw"], default=None, help="pair-file format (default: detected)"
    )
    bk.add_argument(
        "--threshold",
        type=_threshold,
        default=None,
        help="similar when distance <= this, 0..2 (default: the threshold the workers publish for their model)",
    )
    bk.add_argument("--window", type=_positive_int, default=256, help="embed jobs in flight at most (default 256)")
    bk.add_argument(
        "--detect", choices=["none", "blazeface"], default=None, help="face detection (default: the workers' setting)"
    )
    bk.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="write ROC + distance histograms to this PNG (needs matplotlib)",
    )
    bk.add_argument(
        "--timeout",
        type=_seconds,
        default=600.0,
        metavar="S",
        help="seconds to wait for one image's embedding (default 600)",
    )
    bk.add_argument("--quiet", action="store_true", help="no progress line")
    output(bk)
    from producer import gallery_cli

    gallery_cli.register(sub)  # enroll | identify | forget | gallery
    return p


def _err(message: str) -> None:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)


def _fail(message: str, exit_code: int, as_json: bool, **extra: Any) -> int:
    _err(message)
    if as_json:
        print(json.dumps({"error": message, "exit_code": exit_code, **extra}))
    return exit_code


def _print_result(job_id: str, result: Any, as_json: bool, out: str | None) -> None:
    from producer.jobs import EmbedResult

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
            for face, model in zip(body.get("faces") or [], result.faces or []):
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
        verdict = "same person" if result.similar else "different people"
        op = "<=" if result.similar else ">"
        print(
            f"job {job_id} finished: {verdict}: distance {result.distance:.4f} {op} threshold {result.threshold:.2f} ({result.model})"
        )


class _State:
    """What the command got to, for the Ctrl-C message."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.enqueued = False
        self.waiting = False


def _interrupted(args: argparse.Namespace, state: _State, exc: BaseException) -> int:
    from producer.bulk import BulkInterrupted

    as_json = getattr(args, "json", False)
    if isinstance(exc, BulkInterrupted):
        st, ids = exc.stats, exc.pending_job_ids
        _err(
            f"interrupted: {st.rows} rows written to {args.out}; {len(ids)} embed jobs are still queued (their ids are in "
            f"{exc.sidecar}); rerun the same command to resume: their results are reused, nothing done is recomputed"
        )
        if as_json:
            print(
                json.dumps(
                    {
                        "status": "interrupted",
                        "rows_written": st.rows,
                        "pending_job_ids": ids,
                        "sidecar": str(exc.sidecar),
                    }
                )
            )
        return EXIT_INTERRUPTED
    jid = state.job_id
    if jid is None:
        _err("interrupted")
    elif state.enqueued:
        _err(
            f"interrupted; job {jid} is queued and still runs: fetch its result with `{PROG} result {jid}` "
            f"(status: `{PROG} status {jid}`)"
        )
    else:
        _err(f"interrupted while enqueueing job {jid}; it may or may not be queued: `{PROG} status {jid}`")
    if as_json:
        print(
            json.dumps(
                {
                    "status": "interrupted",
                    "job_id": jid,
                    "enqueued": state.enqueued if jid else False,
                    **({"fetch": f"{PROG} result {jid}"} if jid else {}),
                }
            )
        )
    return EXIT_INTERRUPTED


def _bulk(client: Any, settings: Any, args: argparse.Namespace) -> int:
    from producer.bulk import (
        BulkError,
        BulkOptions,
        check_output_path,
        check_plot_available,
        plot,
        resolve_threshold,
        run_bulk,
    )

    # Everything that can be refused is refused here, before one job is enqueued.
    check_output_path(Path(args.out), "--out")
    if args.plot:
        check_plot_available()
        check_output_path(Path(args.plot), "--plot")
    if args.root and not Path(args.root).is_dir():
        raise BulkError(f"--root {args.root}: not a directory")
    if args.shared_root:
        if settings.shared_root is None:
            raise BulkError(
                "--shared-root needs ARCFACE_SHARED_ROOT set for the producer too (the same directory the workers "
                "read, as mounted here): every image is checked under it before it is sent"
            )
        if not Path(settings.shared_root).is_dir():
            raise BulkError(f"ARCFACE_SHARED_ROOT={settings.shared_root}: not a directory")
    from producer.pairs import PairFile

    PairFile(args.pairs, args.format).validate()  # a broken line is reported first, before any other word
    threshold, source = resolve_threshold(client, args.threshold)
    if args.threshold is None and not args.json and not args.quiet:
        _err(f"threshold {threshold:g} from {source} (--threshold to choose)")
    options = BulkOptions(
        root=Path(args.root) if args.root else None,
        shared_root=args.shared_root,
        threshold=threshold,
        window=args.window,
        detect=args.detect,
        job_timeout_s=args.timeout,
    )
    stats, summary = run_bulk(
        client, Path(args.pairs), Path(args.out), options, fmt=args.format, quiet=args.quiet or args.json
    )
    rate = round(stats.images_embedded / stats.seconds, 2) if stats.seconds and stats.images_embedded else None
    body = {
        "summary": summary.as_dict(),
        "threshold": {"value": threshold, "source": source},
        "run": {
            "rows": stats.rows,
            "rows_cached": stats.rows_cached,
            "images_embedded": stats.images_embedded,
            "images_reused": stats.images_reused,
            "jobs_resumed": stats.jobs_resumed,
            "images_failed": stats.images_failed,
            "seconds": round(stats.seconds, 2),
            "images_per_s": rate,
        },
    }
    plot_error = None
    if args.plot:
        try:
            plot(Path(args.plot), Path(args.out), threshold)
        except Exception as exc:  # the summary is printed all the same
            plot_error = f"--plot {args.plot}: {type(exc).__name__}: {exc}"
    if args.json:
        print(json.dumps({**body, **({"plot_error": plot_error} if plot_error else {})}))
    else:
        sm = summary
        print(
            f"pairs {sm.pairs}, failed {sm.failed} (see the error and message columns of {args.out}); this run: "
            f"{stats.rows_cached} rows from earlier runs, {stats.images_embedded} images embedded ({rate} img/s), "
            f"{stats.jobs_resumed} results of interrupted jobs reused, {stats.images_reused} embeddings reused"
        )
        if sm.accuracy is not None:
            print(
                f"accuracy at threshold {sm.threshold:g} ({source}): {sm.accuracy:.4f}; best threshold {sm.best_threshold:.4f} -> "
                f"{sm.best_accuracy:.4f}; ROC AUC {sm.roc_auc:.4f}"
            )
            for name, value in (("TAR@FAR=1e-3", sm.tar_at_far_1e3), ("TAR@FAR=1e-2", sm.tar_at_far_1e2)):
                if value is not None:
                    print(f"{name}: {value:.4f}")
            if sm.ten_fold_accuracy_mean is not None:
                print(f"10-fold accuracy: {sm.ten_fold_accuracy_mean:.4f} +- {sm.ten_fold_accuracy_std:.4f}")
    if plot_error:
        _err(plot_error)
        return EXIT_USAGE
    return EXIT_FAILED if summary.failed else EXIT_OK


def _command(args: argparse.Namespace, state: _State) -> int:
    from producer.bulk import check_output_path
    from producer.client import FaceClient
    from producer.errors import ConfigError
    from producer.settings import ProducerSettings, configure_logging, load_settings

    settings = load_settings(ProducerSettings)
    configure_logging(settings)
    as_json = args.json
    out = getattr(args, "out", None) if args.command in ("embed", "result") else None
    wait = args.command == "result" or bool(getattr(args, "wait", False)) or out is not None
    if args.command in ("embed", "verify") and wait and settings.result_ttl == 0:
        raise ConfigError(
            "ARCFACE_RESULT_TTL",
            "ARCFACE_RESULT_TTL=0 keeps no result, so there is nothing to wait for: "
            "set it above 0, or enqueue without --wait/--out",
        )
    if out is not None:
        check_output_path(Path(out), "--out")
    client = FaceClient(settings)
    if args.command == "status":
        status = client.status(args.job_id)
        error = client.error(args.job_id) if status == "failed" else None
        if as_json:
            print(
                json.dumps(
                    {
                        "job_id": args.job_id,
                        "status": status,
                        **({"error": error.model_dump(mode="json")} if error else {}),
                    }
                )
            )
        else:
            print(f"{status} [{error.code.value}]: {error.message}" if error else status)
        return EXIT_OK
    if args.command == "bulk":
        return _bulk(client, settings, args)
    from producer import gallery_cli

    if args.command in gallery_cli.COMMANDS:
        return gallery_cli.handle(args, client, state)
    if args.command == "result":
        state.job_id, state.enqueued = args.job_id, True
    else:
        state.job_id = uuid.uuid4().hex  # known before enqueueing, so Ctrl-C can always name it
        if args.command == "embed":
            client.embed(
                args.image,
                ref=args.ref,
                model=args.model,
                as_path=args.path,
                detect=args.detect,
                job_id=state.job_id,
                faces="all" if args.all_faces else "one",
            )
        else:
            client.verify(
                args.a,
                args.b,
                threshold=args.threshold,
                ref=args.ref,
                model=args.model,
                as_path=args.path,
                detect=args.detect,
                job_id=state.job_id,
            )
        state.enqueued = True
    job_id = state.job_id
    if not wait:
        print(json.dumps({"job_id": job_id, "status": "queued"}) if as_json else job_id)
        return EXIT_OK
    state.waiting = True
    result = client.result(job_id, args.timeout)
    if out is not None and getattr(result, "kind", None) != "embed":
        return _fail(
            f"--out writes an embedding; job {job_id} is a {result.kind} job", EXIT_USAGE, as_json, job_id=job_id
        )
    _print_result(job_id, result, as_json, out)
    return EXIT_OK


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (usage errors exit 2 from argparse)."""
    args = _parser().parse_args(argv)
    state = _State()
    as_json = getattr(args, "json", False)
    try:
        from producer.errors import ArcFaceError, JobFailed, JobNotFound, ResultTimeout

        try:
            return _command(args, state)
        except JobFailed as exc:
            return _fail(str(exc), exc.exit_code, as_json, job_id=exc.job_id, code=exc.code.value)
        except (JobNotFound, ResultTimeout) as exc:
            return _fail(exc.message, exc.exit_code, as_json, job_id=exc.job_id)
        except ArcFaceError as exc:
            return _fail(
                exc.message, exc.exit_code, as_json, **({"code": exc.code.value} if hasattr(exc, "code") else {})
            )
        except BrokenPipeError:  # `arcface-producer ... | head`
            sys.stderr.close()
            return EXIT_OK
        except OSError as exc:  # e.g. --out on a full disk
            return _fail(f"{exc.filename or ''}: {exc.strerror or exc}", EXIT_USAGE, as_json)
    except KeyboardInterrupt as exc:
        return _interrupted(args, state, exc)


def main() -> None:
    try:
        code = run()
    except KeyboardInterrupt:  # during argument parsing or imports
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
