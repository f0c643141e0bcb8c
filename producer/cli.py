"""``arcface-producer``: enqueue jobs, wait for results, read status, from the shell.

Exit codes: 0 done (or enqueued, without --wait), 1 the job failed, 2 bad usage or input, 3 timeout,
4 Redis unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from producer.jobs import EmbedResult, VerifyResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_REDIS = 0, 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arcface-producer", description="Enqueue ArcFace jobs and read their results.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, waits: bool = True) -> None:
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        if waits:
            sp.add_argument("--wait", action="store_true", help="wait for the result")
            sp.add_argument("--timeout", type=float, default=None, help="seconds to wait (default from settings)")

    e = sub.add_parser("embed", help="embed one image")
    e.add_argument("image")
    common(e)
    v = sub.add_parser("verify", help="verify a pair of images")
    v.add_argument("a")
    v.add_argument("b")
    v.add_argument("--threshold", type=float, default=None)
    common(v)
    for sp in (e, v):
        sp.add_argument("--ref", default=None, help="client reference echoed in the result")
        sp.add_argument("--model", default=None)
        sp.add_argument("--path", action="store_true", help="send paths relative to the shared root instead of bytes")
        sp.add_argument("--detect", choices=["none", "blazeface"], default=None, help="face detection (default: the worker's setting)")
    r = sub.add_parser("result", help="wait for a job's result")
    r.add_argument("job_id")
    common(r)
    bk = sub.add_parser("bulk", help="verify every pair of a pair file (CSV a,b[,label] / JSONL / LFW pairs.txt)")
    bk.add_argument("pairs", help="the pair file")
    bk.add_argument("--out", required=True, help="results CSV (rerun with the same --out to resume)")
    bk.add_argument("--root", default=None, help="directory the image paths are relative to")
    bk.add_argument("--shared-root", action="store_true", help="send paths; workers read them under their ARCFACE_SHARED_ROOT")
    bk.add_argument("--format", choices=["csv", "jsonl", "lfw"], default=None, help="default: detected")
    bk.add_argument("--threshold", type=float, default=0.68)
    bk.add_argument("--window", type=int, default=256, help="embed jobs in flight")
    bk.add_argument("--detect", choices=["none", "blazeface"], default=None, help="face detection (default: the workers' setting)")
    bk.add_argument("--plot", default=None, help="write ROC + distance histograms to this PNG (needs matplotlib)")
    bk.add_argument("--quiet", action="store_true")
    bk.add_argument("--json", action="store_true")
    s = sub.add_parser("status", help="a job's rq status")
    s.add_argument("job_id")
    common(s, waits=False)
    return p


def _print_result(job_id: str, result: EmbedResult | VerifyResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"job_id": job_id, "status": "finished", "result": result.model_dump(mode="json")}))
    elif isinstance(result, EmbedResult):
        head = ", ".join(f"{x:.4f}" for x in result.embedding[:4])
        print(f"job {job_id} finished: {result.dim}-d embedding from {result.model} [{head}, ...] "
              f"(batch {result.timing.batch_size}, inference {result.timing.inference_ms:.1f} ms)")
    else:
        verdict = "same person" if result.similar else "different people"
        op = "<=" if result.similar else ">"
        print(f"job {job_id} finished: {verdict}: distance {result.distance:.4f} {op} threshold {result.threshold:.2f} ({result.model})")


def _fail(message: str, exit_code: int, as_json: bool, **extra: Any) -> int:
    if as_json:
        print(json.dumps({"error": message, **extra}))
    else:
        print(f"arcface-producer: {message}", file=sys.stderr)
    return exit_code


def _bulk(client: Any, args: argparse.Namespace) -> int:
    from pathlib import Path

    from producer.bulk import BulkOptions, plot, run_bulk
    from producer.pairs import PairsFormatError

    options = BulkOptions(root=Path(args.root) if args.root else None, shared_root=args.shared_root, threshold=args.threshold,
                          window=args.window, detect=args.detect)
    try:
        stats, summary = run_bulk(client, Path(args.pairs), Path(args.out), options, fmt=args.format, quiet=args.quiet)
    except PairsFormatError as exc:
        return _fail(str(exc), EXIT_USAGE, args.json)
    body = {"summary": summary.as_dict(), "run": {"new_pairs": stats.pairs, "skipped": stats.skipped, "images_embedded": stats.images_embedded,
                                                "images_reused": stats.images_reused, "seconds": round(stats.seconds, 2),
                                                "images_per_s": round(stats.images_embedded / stats.seconds, 2) if stats.seconds else None}}
    if args.plot:
        plot(Path(args.plot), Path(args.out), args.threshold)
    if args.json:
        print(json.dumps(body))
    else:
        sm = summary
        print(f"pairs {sm.pairs}, failed {sm.failed}; this run: {stats.pairs} new, {stats.skipped} already done, "
              f"{stats.images_embedded} images embedded ({body['run']['images_per_s']} img/s), {stats.images_reused} reused")
        if sm.accuracy is not None:
            print(f"accuracy at threshold {sm.threshold}: {sm.accuracy:.4f}; best threshold {sm.best_threshold:.4f} -> {sm.best_accuracy:.4f}; "
                  f"ROC AUC {sm.roc_auc:.4f}")
            for name, v in (("TAR@FAR=1e-3", sm.tar_at_far_1e3), ("TAR@FAR=1e-2", sm.tar_at_far_1e2)):
                if v is not None:
                    print(f"{name}: {v:.4f}")
            if sm.ten_fold_accuracy_mean is not None:
                print(f"10-fold accuracy: {sm.ten_fold_accuracy_mean:.4f} +- {sm.ten_fold_accuracy_std:.4f}")
    return EXIT_FAILED if summary.failed else EXIT_OK


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    from producer.client import FaceClient, InputError, JobFailed, JobNotFound, ResultTimeout
    from producer.redisconn import RedisUnavailable
    from producer.settings import ProducerSettings, configure_logging

    import redis

    settings = ProducerSettings()
    configure_logging(settings)
    as_json = args.json
    try:
        client = FaceClient(settings)
        if args.command == "status":
            status = client.status(args.job_id)
            print(json.dumps({"job_id": args.job_id, "status": status}) if as_json else status)
            return EXIT_OK
        if args.command == "bulk":
            return _bulk(client, args)
        if args.command == "embed":
            job_id = client.embed(args.image, ref=args.ref, model=args.model, as_path=args.path, detect=args.detect)
        elif args.command == "verify":
            job_id = client.verify(args.a, args.b, threshold=args.threshold, ref=args.ref, model=args.model, as_path=args.path, detect=args.detect)
        else:
            job_id, args.wait = args.job_id, True
        if not args.wait:
            print(json.dumps({"job_id": job_id, "status": "queued"}) if as_json else job_id)
            return EXIT_OK
        _print_result(job_id, client.result(job_id, args.timeout), as_json)
        return EXIT_OK
    except InputError as exc:
        return _fail(str(exc), EXIT_USAGE, as_json, code=exc.code.value)
    except JobNotFound as exc:
        return _fail(str(exc), EXIT_USAGE, as_json)
    except JobFailed as exc:
        return _fail(str(exc), EXIT_FAILED, as_json, job_id=exc.job_id, code=exc.error.code.value)
    except ResultTimeout as exc:
        return _fail(str(exc), EXIT_TIMEOUT, as_json)
    except (RedisUnavailable, redis.ConnectionError, redis.TimeoutError) as exc:
        from producer.settings import redact

        return _fail(redact(str(exc)), EXIT_REDIS, as_json)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
