"""``arcface-producer bulk``: verify every pair of a pair file through the workers (:mod:`producer.bulk`).

:func:`register` adds the subcommand to the main parser; :func:`handle` runs it (errors are raised as the
producer library's exceptions, which ``producer.cli`` turns into its exit codes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.cli.common import add_json, positive_int_argument, print_error, seconds_argument, threshold_argument
from producer.contract.defaults import DEFAULT_BULK_WINDOW
from producer.contract.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from producer.bulk.evaluation import Summary
    from producer.bulk.run import BulkStats
    from producer.client.face_client import FaceClient
    from producer.settings import ProducerSettings


def register(sub: Any) -> None:
    """Add ``bulk`` to ``arcface-producer``'s subparsers."""
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
        type=threshold_argument,
        default=None,
        help="similar when distance <= this, 0..2 (default: the threshold the workers publish for their model)",
    )
    _add_run_options(bk)


def _add_run_options(bk: argparse.ArgumentParser) -> None:
    """How the run sends and waits for its images, and what it prints."""
    bk.add_argument(
        "--window",
        type=positive_int_argument,
        default=DEFAULT_BULK_WINDOW,
        help=f"images in flight at most (default {DEFAULT_BULK_WINDOW})",
    )
    bk.add_argument(
        "--images-per-job",
        type=positive_int_argument,
        default=64,
        help="images per embed_batch job (default 64; 1 = one embed job per image)",
    )
    bk.add_argument(
        "--detect", choices=["none", "blazeface"], default=None, help="face detection (default: the workers' setting)"
    )
    bk.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="write ROC + distance histograms to this file, in the format its suffix names: .png, .pdf, .svg, ... "
        "(needs matplotlib; checked before anything is enqueued)",
    )
    bk.add_argument(
        "--timeout",
        type=seconds_argument,
        default=600.0,
        metavar="S",
        help="seconds to wait for one image's embedding (default 600)",
    )
    bk.add_argument("--quiet", action="store_true", help="no progress line")
    add_json(bk)


def _check(settings: ProducerSettings, args: argparse.Namespace) -> None:
    """Everything that can be refused is refused here, before one job is enqueued."""
    from producer.bulk.output import BulkError, check_output_path, check_plot_file
    from producer.bulk.pairs import PairFile

    check_output_path(Path(args.out), "--out")
    if args.plot:
        check_output_path(Path(args.plot), "--plot")
        check_plot_file(Path(args.plot))
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
    PairFile(args.pairs, args.format).validate()  # a broken line is reported first, before any other word


def handle(client: FaceClient, settings: ProducerSettings, args: argparse.Namespace) -> int:
    """Run ``bulk``: exit 0 when every pair was verified, 1 when some failed, 2 when only the plot failed."""
    from producer.bulk.output import plot
    from producer.bulk.run import BulkOptions, resolve_threshold, run_bulk

    _check(settings, args)
    threshold, source = resolve_threshold(client, args.threshold)
    if args.threshold is None and not args.json and not args.quiet:
        print_error(f"threshold {threshold:g} from {source} (--threshold to choose)")
    options = BulkOptions(
        root=Path(args.root) if args.root else None,
        shared_root=args.shared_root,
        threshold=threshold,
        window=args.window,
        images_per_job=args.images_per_job,
        detect=args.detect,
        job_timeout_s=args.timeout,
    )
    stats, summary = run_bulk(
        client, Path(args.pairs), Path(args.out), options, fmt=args.format, quiet=args.quiet or args.json
    )
    plot_error = None
    if args.plot:
        try:
            plot(Path(args.plot), Path(args.out), threshold)
        except Exception as exc:  # the summary is printed all the same
            plot_error = f"--plot {args.plot}: {type(exc).__name__}: {exc}"
    _print_summary(args, stats, summary, (threshold, source), plot_error)
    if plot_error:
        print_error(plot_error)
        return EXIT_USAGE
    return EXIT_FAILED if summary.failed else EXIT_OK


def _images_per_s(stats: BulkStats) -> float | None:
    return round(stats.images_embedded / stats.seconds, 2) if stats.seconds and stats.images_embedded else None


def _print_summary(
    args: argparse.Namespace, stats: BulkStats, summary: Summary, chosen: tuple[float, str], plot_error: str | None
) -> None:
    threshold, source = chosen
    rate = _images_per_s(stats)
    if args.json:
        run = {name: getattr(stats, name) for name in _RUN_FIELDS}
        body = {
            "summary": summary.as_dict(),
            "threshold": {"value": threshold, "source": source},
            "run": {**run, "seconds": round(stats.seconds, 2), "images_per_s": rate},
        }
        print(json.dumps({**body, **({"plot_error": plot_error} if plot_error else {})}))
        return
    sm = summary
    print(
        f"pairs {sm.pairs}, failed {sm.failed} (see the error and message columns of {args.out}); this run: "
        f"{stats.rows_cached} rows from earlier runs, {stats.images_embedded} images embedded"
        f"{'' if rate is None else f' ({rate} img/s)'}, "
        f"{stats.jobs_resumed} results of interrupted jobs reused, {stats.images_reused} embeddings reused"
    )
    if sm.accuracy is None:
        return
    print(
        f"accuracy at threshold {sm.threshold:g} ({source}): {sm.accuracy:.4f}; "
        f"best threshold {sm.best_threshold:.4f} -> {sm.best_accuracy:.4f}; ROC AUC {sm.roc_auc:.4f}"
    )
    for name, value in (("TAR@FAR=1e-3", sm.tar_at_far_1e3), ("TAR@FAR=1e-2", sm.tar_at_far_1e2)):
        if value is not None:
            print(f"{name}: {value:.4f}")
    if sm.ten_fold_accuracy_mean is not None:
        print(f"10-fold accuracy: {sm.ten_fold_accuracy_mean:.4f} +- {sm.ten_fold_accuracy_std:.4f}")


_RUN_FIELDS = ("rows", "rows_cached", "images_embedded", "images_reused", "jobs_resumed", "images_failed")
