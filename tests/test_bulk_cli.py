"""``arcface bulk`` (python -m producer.cli bulk) end to end through a real worker: shared-root paths, a failed
image and the plot, Ctrl-C and resume, the progress line on a terminal."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.bulk_fixtures import write_face_pairs
from tests.conftest import FACES, REPO, face_paths
from tests.patience import patience

pytest_plugins = ["tests.bulk_fixtures"]  # fixtures: bulk_env (a real worker for this module), bulk_client


def bulk_command(*args: str) -> list[str]:
    """The command line of ``arcface bulk ARGS`` run from this checkout."""
    return [sys.executable, "-m", "producer.cli", "bulk", *args]


def run_bulk_cli(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``arcface bulk ARGS`` to its end with ``env`` added to this environment; output captured as text."""
    return subprocess.run(
        bulk_command(*args),
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_jsonl_pairs(path: Path) -> None:
    """Four labelled pairs: same person, different people, a missing image b, a white image a."""
    lines = [
        {"a": "amy/amy1.png", "b": "amy/amy2.png", "label": 1},
        {"a": "amy/amy1.png", "b": "raj/raj1.png", "label": 0},
        {"a": "amy/amy1.png", "b": "nobody/missing.png", "label": 0},
        {"a": "white.png", "b": "raj/raj2.png", "label": 0},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_cli_bulk_with_shared_root_paths_failed_image_and_plot(bulk_env, tmp_path):
    bad = FACES / "white.png"  # a real image, decodes fine; the failing one is a missing path
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl_pairs(pairs)
    assert bad.exists()
    out = tmp_path / "r.csv"
    plot = ["--plot", str(tmp_path / "roc.png")]
    proc = run_bulk_cli(
        bulk_env, str(pairs), "--out", str(out), "--shared-root", "--json", *plot, timeout=patience(300)
    )
    assert proc.returncode == 1, proc.stderr  # one pair failed
    body = json.loads(proc.stdout)
    assert body["summary"]["pairs"] == 4 and body["summary"]["failed"] == 1
    rows = list(csv.DictReader(out.open()))
    assert rows[2]["error"] == "path_not_allowed" and rows[2]["distance"] == ""
    assert "image b nobody/missing.png" in rows[2]["message"]
    assert body["threshold"] == {"value": 0.61, "source": "the workers' model arcface"}  # published by the worker
    assert [r["similar"] for r in rows if not r["error"]] == [
        "1" if float(r["distance"]) <= 0.61 else "0" for r in rows if not r["error"]
    ]
    assert all(r["error"] == "" for i, r in enumerate(rows) if i != 2)
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    broken = tmp_path / "broken.csv"
    broken.write_text("a,b,label\nx,y,perhaps\n")
    bad_run = run_bulk_cli(bulk_env, str(broken), "--out", str(tmp_path / "o.csv"), timeout=patience(120))
    assert bad_run.returncode == 2 and "broken.csv:2" in bad_run.stderr
    assert not (tmp_path / "o.csv").exists()


def wait_until_enqueued(side: Path, count: int, timeout: float = patience(60)) -> None:
    """Until the sidecar ``side`` records ``count`` job ids (or ``timeout`` s pass)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (not side.exists() or side.read_text().count('"job_id"') < count):
        time.sleep(0.05)


def test_interrupted_bulk_run_is_resumed_reusing_its_queued_jobs(bulk_env, bulk_client, tmp_path):
    """Ctrl-C (SIGINT) while the embed jobs wait behind other work: exit 130 with how to resume; the rerun
    waits for those same jobs instead of enqueueing the images again."""
    import signal

    from producer.bulk.output import read_results
    from producer.bulk.run import BulkOptions, run_bulk

    filler = bulk_client.embed_many(
        [face_paths()[i % 40] for i in range(96)]
    )  # keeps the worker busy for several seconds (on a loaded machine the run must still be waiting at the SIGINT)
    rows = write_face_pairs(tmp_path / "pairs.csv", 30)
    unique = {x for a, b, _ in rows for x in (a, b)}
    out = tmp_path / "r.csv"
    side = tmp_path / "r.csv.embeddings.jsonl"
    proc = subprocess.Popen(
        bulk_command(str(tmp_path / "pairs.csv"), "--out", str(out), "--root", str(FACES), "--json", "--window", "512"),
        env={**os.environ, **bulk_env},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_enqueued(side, len(unique))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=patience(30))
    assert proc.returncode == 130, (stdout, stderr)
    assert "rerun the same command" in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    body = json.loads(stdout)
    assert body["status"] == "interrupted" and len(body["pending_job_ids"]) > 0
    stats, summary = run_bulk(bulk_client, tmp_path / "pairs.csv", out, BulkOptions(root=FACES), quiet=True)
    assert stats.jobs_resumed >= len(body["pending_job_ids"]) - stats.images_embedded
    assert stats.jobs_resumed > 0
    enqueued = [json.loads(line)["image"] for line in side.read_text().splitlines() if '"job_id"' in line]
    assert sorted(enqueued) == sorted(unique)  # every image enqueued exactly once over both runs
    assert summary.pairs == 30 and summary.failed == 0 and len(list(read_results(out))) == 30
    for jid in filler:
        bulk_client.result(jid, timeout=patience(120))


def read_terminal(master: int) -> bytes:
    """Everything written to a pseudo-terminal until its child closes it (or ``patience(120)`` s pass without
    output)."""
    import select

    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], patience(120))
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    return seen


def test_progress_on_a_terminal_counts_rows_as_they_are_written(bulk_env, tmp_path):
    """The CLI on a pseudo-terminal: the progress line is redrawn per written row, and its count rises."""
    import pty
    import re

    rows = write_face_pairs(tmp_path / "pairs.csv", 60)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        bulk_command(
            str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "r.csv"), "--root", str(FACES), "--window", "4"
        ),
        env={**os.environ, **bulk_env},
        cwd=REPO,
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    seen = read_terminal(master)
    proc.wait(patience(60))
    os.close(master)
    text = seen.decode(errors="replace")
    counts = [int(m) for m in re.findall(r"(\d+)/60 rows", text)]
    assert proc.returncode == 0, text[-2000:]
    assert counts == sorted(counts) and len({c for c in counts if 0 < c < 60}) >= 2 and counts[-1] == 60, counts
    assert re.search(r"\d+ images embedded, 0 failed, [\d.]+ rows/s, ETA \w+", text), text[-500:]
    assert "accuracy at threshold 0.61" in text and len(rows) == 60


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_anything_is_enqueued(worker_env, tmp_path):
    import redis

    write_face_pairs(tmp_path / "pairs.csv", 4)
    out = tmp_path / "r.csv"
    for name, why in (
        ("roc.txt", "matplotlib cannot write a .txt file; give a name ending in one of .avif, .eps"),
        ("roc", "matplotlib cannot write a file without a suffix; give a name ending in one of"),
    ):
        plot = tmp_path / name
        args = (str(tmp_path / "pairs.csv"), "--out", str(out), "--root", str(FACES), "--plot", str(plot))
        proc = run_bulk_cli(worker_env, *args, timeout=patience(120))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"arcface-producer: --plot {plot}: {why}") and proc.stderr.count("\n") == 1
        assert not out.exists() and not plot.exists()
    assert redis.Redis.from_url(worker_env["ARCFACE_REDIS_URL"]).llen(f"rq:queue:{worker_env['ARCFACE_QUEUE']}") == 0


def test_a_wrong_root_stops_the_run_after_the_first_20_images_fail_for_one_reason(worker_env, tmp_path):
    """--root at the wrong folder: the run stops once its first 20 images have all failed alike, naming the
    reason, instead of failing every row one by one; a smaller run fails its rows and prints no rate."""
    import redis

    write_face_pairs(tmp_path / "pairs.csv", 60)  # 40 distinct images, none under tmp_path
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    proc = run_bulk_cli(
        worker_env,
        str(tmp_path / "pairs.csv"),
        "--out",
        str(tmp_path / "r.csv"),
        "--root",
        str(wrong),
        "--threshold",
        "0.6",
        timeout=patience(120),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "arcface-producer: stopped early: the first 20 images all failed with invalid_payload for the same reason, "
        f"e.g. {wrong}/amy/amy1.png: No such file or directory. Check --root (images are read relative to it) or, "
        "with --shared-root, the workers' ARCFACE_SHARED_ROOT, and the paths of the pair file; then rerun\n"
    )
    assert redis.Redis.from_url(worker_env["ARCFACE_REDIS_URL"]).llen(f"rq:queue:{worker_env['ARCFACE_QUEUE']}") == 0

    write_face_pairs(tmp_path / "few.csv", 3)  # fewer images than 20: every row fails, the run ends as usual
    few = run_bulk_cli(
        worker_env,
        str(tmp_path / "few.csv"),
        "--out",
        str(tmp_path / "f.csv"),
        "--root",
        str(wrong),
        "--threshold",
        "0.6",
        timeout=patience(120),
    )
    assert few.returncode == 1, few.stderr
    assert few.stdout.startswith("pairs 3, failed 3 (see the error and message columns of ")
    assert "0 images embedded, 0 results of interrupted jobs reused" in few.stdout and "None" not in few.stdout


def test_a_run_whose_embeddings_come_from_two_models_is_stopped_naming_both(worker_env, tmp_path):
    """The queue's worker is replaced by one of another model (same 512-d): the rerun with more pairs and the same
    --out would mix the two models' embeddings; it stops, naming both, and writes no metric."""
    from tests.workers import OTHER_MODEL_ENV, ready_worker

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,label\namy/amy1.png,amy/amy2.png,1\namy/amy1.png,raj/raj1.png,0\n")
    args = (str(pairs), "--out", str(tmp_path / "r.csv"), "--root", str(FACES), "--json")
    with ready_worker(worker_env, tmp_path / "a.log"):
        first = run_bulk_cli(worker_env, *args, timeout=patience(300))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["run"]["images_embedded"] == 3

    with pairs.open("a") as f:
        f.write("raj/raj1.png,raj/raj2.png,1\n")  # one image more, embedded by the other model
    with ready_worker({**worker_env, **OTHER_MODEL_ENV}, tmp_path / "b.log"):
        second = run_bulk_cli(worker_env, *args, timeout=patience(300))
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith(
        "arcface-producer: stopped: two models answered this run's embed jobs: arcface (512-d) (e.g. amy/amy1.png) "
        "and arcface-b (512-d) (e.g. raj/raj2.png); distances between their embeddings mean nothing."
    ), second.stderr
    body = json.loads(second.stdout)  # --json: the error, no summary
    assert body["exit_code"] == 2 and "summary" not in body and body["error"].startswith("stopped: two models")
