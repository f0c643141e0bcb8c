"""Bulk runs: pair-file readers, metrics checked by hand, and end-to-end library runs through a real worker (the
CLI's runs are in test_bulk_cli.py)."""

from __future__ import annotations

import numpy as np
import pytest

from producer.bulk.evaluation import accuracy, best_threshold, roc_auc, summarise, tar_at_far, ten_fold
from producer.bulk.pairs import PairFile, PairsFormatError, read_pairs
from tests.bulk_fixtures import write_face_pairs
from tests.conftest import FACES, face_paths
from tests.patience import patience

pytest_plugins = ["tests.bulk_fixtures"]  # fixtures: bulk_env (a real worker for this module), bulk_client


# --- readers -----------------------------------------------------------------------------------------
def test_csv_with_every_label_spelling(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text(
        "a,b,label\nx.jpg,y.jpg,yes\nx.jpg,z.jpg,No\np,q,1\np,r,0\ns,t,TRUE\ns,u,false\nv,w,same\nv,x,different\nm,n,\n"
    )
    pairs = read_pairs(f)
    assert [p.label for p in pairs] == [True, False, True, False, True, False, True, False, None]
    assert (pairs[0].a, pairs[0].b) == ("x.jpg", "y.jpg")
    g = tmp_path / "nolabel.csv"
    g.write_text("a,b\n1.png,2.png\n")
    assert read_pairs(g)[0].label is None


def test_csv_from_excel_with_a_bom_and_a_quoted_multi_line_field(tmp_path):
    # Excel writes a UTF-8 BOM; a quoted field may hold a newline: neither shifts or drops a pair.
    f = tmp_path / "excel.csv"
    f.write_bytes(
        '\ufeffa,b,label\r\n"dir one/x.jpg",y.jpg,1\r\n"two\nlines.jpg",z.jpg,0\r\nlast.jpg,y.jpg,1\r\n'.encode()
    )
    pairs = read_pairs(f)
    assert [(p.a, p.b, p.label) for p in pairs] == [
        ("dir one/x.jpg", "y.jpg", True),
        ("two\nlines.jpg", "z.jpg", False),
        ("last.jpg", "y.jpg", True),
    ]


def test_jsonl_pairs(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"a": "1.png", "b": "2.png", "label": true}\n\n'
        '{"a": "1.png", "b": "3.png", "label": "different"}\n{"a": "4", "b": "5"}\n'
    )
    assert [(p.a, p.b, p.label) for p in read_pairs(f)] == [
        ("1.png", "2.png", True),
        ("1.png", "3.png", False),
        ("4", "5", None),
    ]


def test_lfw_ten_fold_and_plain_forms(tmp_path):
    tenfold = tmp_path / "pairs.txt"  # 2 folds x (1 same + 1 different)
    tenfold.write_text(
        "2\t1\nAbel_Pacheco\t1\t4\nAkhmed_Zakayev\t3\tBob_Hope\t2\nAmber_Tamblyn\t1\t2\nAnn_Veneman\t3\tBill_Gates\t12\n"
    )
    assert [(p.a, p.b, p.label, p.fold) for p in read_pairs(tenfold)] == [
        ("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg", True, 0),
        ("Akhmed_Zakayev/Akhmed_Zakayev_0003.jpg", "Bob_Hope/Bob_Hope_0002.jpg", False, 0),
        ("Amber_Tamblyn/Amber_Tamblyn_0001.jpg", "Amber_Tamblyn/Amber_Tamblyn_0002.jpg", True, 1),
        ("Ann_Veneman/Ann_Veneman_0003.jpg", "Bill_Gates/Bill_Gates_0012.jpg", False, 1),
    ]
    plain = tmp_path / "plain.txt"
    plain.write_text("Abel_Pacheco 1 4\nAnn_Veneman 3 Bill_Gates 12\n")
    assert [(p.b, p.label, p.fold) for p in read_pairs(plain)] == [
        ("Abel_Pacheco/Abel_Pacheco_0004.jpg", True, None),
        ("Bill_Gates/Bill_Gates_0012.jpg", False, None),
    ]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("bad.csv", "a,b,label\nx,y,yes\nx,y,maybe\n", r"bad.csv:3: label 'maybe'"),
        ("bad2.csv", "a,b,label\nx,y,yes\nonly-one-column\n", r"bad2.csv:3: expected 3"),
        ("hdr.csv", "left,right\nx,y\n", r"hdr.csv:1: CSV header"),
        ("bad.jsonl", '{"a": "x", "b": "y"}\n{"a": "x"\n', r"bad.jsonl:2: not JSON"),
        ("bad.txt", "Abel_Pacheco 1 4\nAbel_Pacheco 1\n", r"bad.txt:2: LFW lines"),
        ("count.txt", "10 300\nAbel_Pacheco 1 4\n", r"count.txt:1: header promises 10 folds"),
        ("what.txt", "hello\n", r"what.txt:1: unknown pair-file format"),
    ],
)
def test_broken_pair_files_name_the_line(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(PairsFormatError, match=message):
        PairFile(f).validate()


# --- metrics by hand ---------------------------------------------------------------------------------
def test_metrics_against_hand_computed_values():
    d = np.array([0.1, 0.2, 0.35, 0.3, 0.5, 0.6])
    y = np.array([True, True, True, False, False, False])
    # impostor/genuine orderings: genuine 0.35 > impostor 0.3 is the only inversion of 9 pairs
    assert roc_auc(d, y) == pytest.approx(8 / 9)
    assert accuracy(d, y, 0.32) == pytest.approx(4 / 6)  # 0.35 (same) rejected, 0.3 (different) accepted
    assert accuracy(d, y, 0.25) == pytest.approx(5 / 6)
    t, acc = best_threshold(d, y)
    assert acc == pytest.approx(5 / 6) and t == pytest.approx(0.2)  # smallest threshold reaching 5/6
    ties = np.array([0.2, 0.2])
    assert roc_auc(ties, np.array([True, False])) == 0.5
    assert tar_at_far(d, y, 1e-2) is None  # 3 impostors cannot measure 1 %


def test_tar_at_far_and_ten_fold_protocol():
    rng = np.random.default_rng(0)
    genuine, impostor = rng.uniform(0, 0.5, 200), np.concatenate([rng.uniform(0.45, 1.0, 999), [0.01]])
    d = np.concatenate([genuine, impostor])
    y = np.concatenate([np.ones(200, bool), np.zeros(1000, bool)])
    # FAR 1e-3 allows one accepted impostor of 1000: the 0.01 one; threshold sits just below the 2nd smallest
    second = np.sort(impostor)[1]
    assert tar_at_far(d, y, 1e-3) == pytest.approx(np.mean(genuine < second))
    folds = np.array([0, 0, 1, 1, 2, 2])
    dd = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3])
    yy = np.array([True, False, True, False, True, False])
    mean, std, accs = ten_fold(dd, yy, folds)
    # by hand: fold 0 tested at 0.2 (best on folds 1+2) -> 1.0; fold 1 at 0.1 -> 0.5; fold 2 at 0.2 -> 0.5
    assert accs == [1.0, 0.5, 0.5]
    assert mean == pytest.approx(2 / 3) and std == pytest.approx((1 / 18) ** 0.5)
    s = summarise(list(dd), list(yy), list(folds), 0.5, 6, 0)
    assert s.ten_fold_accuracy_mean == pytest.approx(mean) and s.labelled == 6


# --- end to end through a real worker (fixtures in tests/bulk_fixtures.py; the CLI's runs in test_bulk_cli.py) ---
@pytest.mark.parametrize("images_per_job", [3, 1])  # embed_batch jobs of 3 images, or one embed job per image
def test_bulk_csv_over_real_faces_equals_the_engine(bulk_client, engine, tmp_path, images_per_job):
    from producer.bulk.output import read_results
    from producer.bulk.run import BulkOptions, run_bulk

    rows = write_face_pairs(tmp_path / "pairs.csv")
    unique = {x for a, b, _ in rows for x in (a, b)}
    out = tmp_path / "results.csv"
    options = BulkOptions(root=FACES, window=8, chunk=4, images_per_job=images_per_job)
    stats, summary = run_bulk(bulk_client, tmp_path / "pairs.csv", out, options, quiet=True)
    assert stats.images_embedded == len(unique) < 2 * len(rows)  # each unique image embedded once
    direct = dict(zip(unique, engine.embed_images([(FACES / k).read_bytes() for k in unique]), strict=True))
    written = list(read_results(out))
    assert [(r["a"], r["b"]) for r in written] == [(a, b) for a, b, _ in rows]
    for r in written:
        assert float(r["distance"]) == pytest.approx(1 - float(direct[r["a"]] @ direct[r["b"]]), abs=1e-5)
        assert r["similar"] == ("1" if float(r["distance"]) <= 0.68 else "0") and r["error"] == ""
    assert summary.pairs == 60 and summary.failed == 0 and summary.labelled == 60 and 0.0 <= summary.roc_auc <= 1.0


def test_resume_after_interruption_writes_no_duplicates_and_recomputes_nothing(bulk_client, tmp_path):
    from producer.bulk.output import read_results
    from producer.bulk.run import BulkOptions, run_bulk

    rows = write_face_pairs(tmp_path / "pairs.csv", 40)
    out = tmp_path / "results.csv"
    run_bulk(bulk_client, tmp_path / "pairs.csv", out, BulkOptions(root=FACES), quiet=True)
    full = out.read_text().splitlines()
    # as if killed mid-write: 25 rows and half of the 26th
    out.write_text("\n".join(full[:26]) + "\n" + full[26][:10])
    jobs_before = len(bulk_client.queue.finished_job_registry)
    stats, summary = run_bulk(bulk_client, tmp_path / "pairs.csv", out, BulkOptions(root=FACES), quiet=True)
    assert stats.rows == 40 and stats.rows_cached == 40  # every row rewritten from the sidecar
    assert stats.images_embedded == 0 and stats.images_reused > 0
    assert len(bulk_client.queue.finished_job_registry) == jobs_before  # no job enqueued at all
    assert out.read_text().splitlines() == full
    assert summary.pairs == 40 and len(list(read_results(out))) == len(rows)


def test_rerun_retries_failed_rows_and_rewrites_similar_for_the_new_threshold(bulk_client, tmp_path):
    from producer.bulk.output import read_results
    from producer.bulk.run import BulkOptions, run_bulk

    root = tmp_path / "imgs"
    root.mkdir()
    for p in face_paths()[:3]:
        (root / p.name).write_bytes(p.read_bytes())
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,label\namy1.png,amy2.png,1\namy1.png,late.png,0\namy2.png,amy3.png,1\n")
    out = tmp_path / "r.csv"
    stats, summary = run_bulk(bulk_client, pairs, out, BulkOptions(root=root, threshold=0.3), quiet=True)
    rows = list(read_results(out))
    assert summary.failed == stats.failed == 1 and rows[1]["error"] == "invalid_payload"
    assert (
        "image b late.png" in rows[1]["message"] and "No such file" in rows[1]["message"]
    )  # the reason, not only a code
    (root / "late.png").write_bytes(face_paths()[5].read_bytes())  # the missing image appears
    stats, summary = run_bulk(bulk_client, pairs, out, BulkOptions(root=root, threshold=1.5), quiet=True)
    rows = list(read_results(out))
    assert (
        summary.failed == 0 and stats.images_embedded == 1 and stats.rows_cached == 2
    )  # only the failed row's image ran
    assert summary.threshold == 1.5 and all(r["similar"] == ("1" if float(r["distance"]) <= 1.5 else "0") for r in rows)
    # the summary's accuracy is exactly what the CSV's similar column says against the labels
    assert summary.accuracy == pytest.approx(np.mean([(r["similar"] == "1") == (r["label"] == "1") for r in rows]))


# --- the client under load and with results not kept, through the same worker -------------------------------
def test_one_client_shared_by_150_threads(bulk_client):
    """150 threads share one FaceClient: every job is enqueued and its result read; nothing but the library's
    own exceptions could escape (none does), and the waiters block concurrently (a blocking pool, not errors)."""
    from concurrent.futures import ThreadPoolExecutor

    from producer.contract.errors import ArcFaceError

    paths = face_paths()

    def one(i: int) -> np.ndarray:
        jid = bulk_client.embed(paths[i % 40])
        return bulk_client.result_embed(jid, timeout=patience(240)).embedding

    with ThreadPoolExecutor(150) as pool:
        futures = [pool.submit(one, i) for i in range(150)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except ArcFaceError as exc:  # documented, but not expected here
                outcomes.append(exc)
    assert all(isinstance(o, np.ndarray) for o in outcomes), [o for o in outcomes if not isinstance(o, np.ndarray)][:3]
    for i, vec in enumerate(outcomes):  # each thread got its own image's embedding
        np.testing.assert_allclose(vec, outcomes[i % 40], atol=1e-4)


def test_waiting_on_a_job_that_keeps_no_result_is_refused_at_once(bulk_client, tmp_path):
    import time

    from producer.client.face_client import FaceClient
    from producer.contract.errors import ResultNotKept

    no_result = FaceClient(bulk_client.settings.model_copy(update={"result_ttl": 0}), bulk_client.connection)
    jid = no_result.embed(face_paths()[0])
    start = time.monotonic()
    with pytest.raises(ResultNotKept, match="ARCFACE_RESULT_TTL=0"):
        no_result.result(jid, timeout=patience(60))
    assert time.monotonic() - start < 1
    no_failure = FaceClient(bulk_client.settings.model_copy(update={"failure_ttl": 0}), bulk_client.connection)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    jid = no_failure.embed(bad)
    start = time.monotonic()
    with pytest.raises(ResultNotKept, match="ARCFACE_FAILURE_TTL=0"):
        no_failure.result(jid, timeout=patience(120))
    assert time.monotonic() - start < patience(60)  # said when the job ended, not after the whole timeout
