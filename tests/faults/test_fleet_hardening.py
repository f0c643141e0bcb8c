"""Issue 11, attacked from Redis: hostile job hashes, ids, dependents sets, queue entries and memory bombs are
written raw into a queue that one long-running worker serves, interleaved with good jobs.

After every test (``fleet.check``): every good job finished exactly once with the right embedding (one result
entry, one ``batch_jobs`` appearance in the worker's log), no registry holds a stale entry (started registry,
queue and intermediate list empty; the failed registry holds exactly the hostile jobs with valid ids, the
finished registry exactly the good ones), the worker is alive and logged no loop error, each hostile job
failed alone with a clear code (read from the raw hash's meta and the raw result stream, and through the
client when its id is a valid one), and rq's own tools still work (``FailedJobRegistry.get_job_ids``,
``StartedJobRegistry.cleanup``, ``Job.fetch`` of every failed hostile job, ``rq info`` exits 0).

Classes (issue 11 numbering): 1 unparseable hash fields, 2 ids rq refuses, 3 hand-written dependents sets,
8 memory bombs (peak RSS bounded), 14 ``instance`` not null, 15 stale and duplicate queue entries.

One worker process serves the whole module (each start loads TensorFlow); tests may run alone (``-k``).
"""

from __future__ import annotations

import io
import json
import time
import uuid
import zlib
from pathlib import Path

import pytest
from PIL import Image

from producer.client.face_client import FaceClient
from producer.contract.keys import EMBED_BATCH_FUNC, EMBED_FUNC
from producer.contract.rqjob import JSONSerializer, SafeJob
from producer.settings import ProducerSettings
from tests.conftest import face_paths
from tests.faults.fleet_support import (
    MAX_BATCH,
    MAX_JOB_BYTES,
    MAX_PIXELS,
    PREPROCESS_THREADS,
    RSS_BOUND,
    Fleet,
    b64,
    embed_data,
)
from tests.patience import patience
from tests.redis_server import RedisServer
from tests.workers import WorkerProcess, queue_env


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, arcface_h5, engine):
    tmp = tmp_path_factory.mktemp("fleet")
    # its own Redis: the rq tools' checks (one worker registered) see only this module's worker, whatever ran
    # before in this test process
    redis_server = RedisServer(tmp / "redis").start()
    env = queue_env(
        redis_server.url,
        "hard",
        ARCFACE_MODEL_PATH=str(arcface_h5),
        ARCFACE_ALLOWED_BATCH_SIZES="1,4,16",
        ARCFACE_MAX_BATCH_SIZE=str(MAX_BATCH),
        ARCFACE_DATA_DIR=str(tmp / "data"),
        ARCFACE_PREPROCESS_THREADS=str(PREPROCESS_THREADS),
        ARCFACE_PREPROCESS_PROCESSES=str(PREPROCESS_THREADS),
        ARCFACE_MAX_IMAGE_PIXELS=str(MAX_PIXELS),
        ARCFACE_MAX_JOB_BYTES=str(MAX_JOB_BYTES),
        ARCFACE_BATCH_TIMEOUT_MS="20",
    )
    queue = env["ARCFACE_QUEUE"]
    worker = WorkerProcess(env, tmp / "worker.log")
    faces = [face_paths()[(i * 5) % 40] for i in range(8)]
    direct = dict(zip(faces, engine.embed_images([p.read_bytes() for p in faces]), strict=True))
    try:
        worker.wait_ready(300)
        client = FaceClient(ProducerSettings(redis_url=redis_server.url, queue=queue))
        yield Fleet(redis_server.url, queue, redis_server.client(), client, worker, direct)
    finally:
        worker.stop()
        redis_server.stop()


def test_class1_unparseable_hash_fields_fail_alone_and_become_readable_failed_jobs(fleet):
    # Each hash is a good embed job but for one field rq cannot parse: it fails invalid_payload naming the field,
    # and its hash is rewritten into a failed job every rq tool reads.
    broken = {
        "created_at": "2026-11-29T16:00:00+00:00",  # ISO 8601 with an offset: not rq's format
        "enqueued_at": "2026-11-29T16:00:00.123456789Z",  # Go's RFC3339Nano
        "timeout": "180.0",
        "result_ttl": "forever",
        "failure_ttl": "1.5",
        "retries_left": "x",
        "retry_intervals": "not json",
        "started_at": "yesterday",
        "origin": b"\xff\xfe" + b"q",  # not UTF-8
        "description": b"\xc3\x28",
        "status": b"\xffqueued",
    }
    image = face_paths()[0].read_bytes()
    ids = {}
    for name, value in broken.items():
        jid = f"bad-{name}-{uuid.uuid4().hex[:8]}"
        fleet.hash(jid, embed_data(image), {name: value})
        ids[jid] = name
    both = f"bad-two-{uuid.uuid4().hex[:8]}"  # two bad fields: no single one to blame
    fleet.hash(both, embed_data(image), {"timeout": "abc", "created_at": "2026-11-29 16:00"})
    no_data = f"bad-nodata-{uuid.uuid4().hex[:8]}"
    fleet.hash(no_data, None)
    hostile = [*ids, both, no_data]
    goods = fleet.interleave(hostile)
    fleet.wait_results(goods)
    fleet.wait_failed(hostile)
    for jid in hostile:
        fleet.hostile[jid] = "invalid_payload"
    for jid, name in ids.items():
        _, _, entries = fleet.raw_outcome(jid)
        assert f"field '{name}'" in entries[0], entries[0]
    assert "job data is not the JSON job array" in fleet.raw_outcome(no_data)[2][0]
    for jid in hostile:  # rewritten: origin is the queue (rq info lists it there), data no longer the bad job's
        job = SafeJob.fetch(jid, connection=fleet.conn, serializer=JSONSerializer)
        failed = job.latest_result()
        assert job.origin == fleet.queue and failed is not None and "[invalid_payload]" in (failed.exc_string or "")
    fleet.check()


def test_class1_a_hash_of_20000_fields_costs_no_more_than_a_small_one(fleet):
    # Two unparseable fields among 20,000 junk ones: finding "the" bad field by restoring the hash once per field
    # is quadratic (minutes here), and the good jobs taken with it would wait that long.
    many = f"bad-many-{uuid.uuid4().hex[:8]}"
    fleet.conn.hset(f"rq:job:{many}", mapping={f"junk{i}": "x" for i in range(20_000)})
    fleet.hash(
        many, embed_data(face_paths()[0].read_bytes()), {"created_at": "2026-11-29T16:00:00+00:00", "timeout": "abc"}
    )
    started = time.monotonic()
    goods = fleet.interleave([many])
    fleet.wait_results(goods)
    fleet.wait_failed([many])
    took = time.monotonic() - started
    print(f"\n20,000-field hash and {len(goods)} good jobs: {took:.1f}s")
    assert took < 30, f"the good jobs taken with a 20,000-field hash took {took:.0f}s"
    fleet.hostile[many] = "invalid_payload"
    fleet.check()


def test_class1_garbage_that_rq_tolerates_runs_normally(fleet):
    # meta that is not JSON (rq keeps it as {"unserialized": ...}), meta that is a JSON list, a callback naming
    # os.system: the job runs, no callback is ever called, the result is the right embedding.
    tolerated = []
    for i, extra in enumerate(
        [
            {"meta": b"\x00\xffgarbage"},
            {"meta": "[1,2]"},
            {"success_callback_name": "os.system", "failure_callback_name": "os.system"},
        ]
    ):
        jid = f"odd-{i}-{uuid.uuid4().hex[:8]}"
        path = face_paths()[(i * 5) % 40]
        fleet.hash(jid, embed_data(path.read_bytes()), extra)
        fleet.good[jid] = path
        tolerated.append(jid)
    goods = fleet.interleave(tolerated)
    fleet.wait_results([*goods, *tolerated])
    fleet.check()


def test_class2_ids_rq_refuses_fail_alone_in_no_registry_and_undecodable_ids_are_dropped(fleet):
    image = face_paths()[5].read_bytes()
    refused = ["order.42", f"a:{uuid.uuid4().hex[:6]}", f"x.y:z-{uuid.uuid4().hex[:6]}", "v" * 600]
    for jid in refused:
        fleet.hash(jid, embed_data(image))
    undecodable = b"\xff\xfe-" + uuid.uuid4().hex.encode()  # not UTF-8: cannot even be named in a result
    fleet.hash(undecodable, embed_data(image))
    goods = fleet.interleave([*refused, undecodable])
    fleet.wait_results(goods)
    fleet.wait_failed(refused)
    for jid in refused:
        fleet.refused_ids[jid] = "invalid_payload"
        assert "not a valid rq id" in fleet.raw_outcome(jid)[2][0]
        for registry in ("wip", "finished", "failed"):  # rq's registry code cannot parse such ids
            assert fleet.conn.zscore(f"rq:{registry}:{fleet.queue}", jid) is None
    assert fleet.raw_outcome(undecodable) == ("queued", None, [])  # untouched, and gone from the queue
    fleet.check()


def test_class3_hand_written_dependents_never_stop_the_worker_nor_rerun_a_finished_job(fleet):
    # A job that once ran as someone's dependent (it has dependency_ids) and finished...
    earlier = fleet.interleave([])
    fleet.wait_results(earlier)
    finished = fleet.good_job(0)
    fleet.conn.hset(f"rq:job:{finished}", "dependency_ids", json.dumps([earlier[0]]))
    fleet.push(finished)
    fleet.wait_results([finished])
    # ...is named in the dependents set of a new job: rq's own enqueue_dependents would queue it again. Never re-run.
    parent_a = fleet.good_job(1)
    fleet.conn.sadd(f"rq:job:{parent_a}:dependents", finished)
    # A dependents set naming an id rq refuses, a missing job and bytes that are not UTF-8, beside a real deferred
    # dependent (as rq's depends_on writes it): the odd members are dropped, the real one still runs, once.
    parent_b = fleet.good_job(2)
    deferred = f"dep-{uuid.uuid4().hex}"
    fleet.hash(
        deferred,
        embed_data(face_paths()[15].read_bytes()),
        {"status": "deferred", "dependency_ids": json.dumps([parent_b])},
    )
    fleet.conn.sadd(f"rq:job:{deferred}:dependencies", parent_b)
    fleet.conn.sadd(f"rq:job:{parent_b}:dependents", "order.43", f"missing-{uuid.uuid4().hex}", b"\xff\xfe", deferred)
    fleet.good[deferred] = face_paths()[15]
    # A queue entry naming a key that is not a hash (a job's dependents set): never a WRONGTYPE that fails the batch
    other = fleet.good_job(3)
    fleet.conn.sadd(f"rq:job:{other}:dependents", f"missing-{uuid.uuid4().hex}")
    goods = fleet.interleave([parent_a, parent_b, f"{other}:dependents", other])
    fleet.wait_results([*goods, parent_a, parent_b, other, deferred], timeout=patience(60))
    time.sleep(2)  # a wrongly re-queued job would be taken and run by now
    assert fleet.conn.hget(f"rq:job:{finished}", "status") == b"finished"
    for parent in (parent_a, parent_b):
        assert fleet.conn.smembers(f"rq:job:{parent}:dependents") == set()
    fleet.check()


def test_class14_instance_not_null_is_unsupported_job(fleet):
    image = face_paths()[10].read_bytes()
    ids = []
    for instance in ("os", {"cls": "worker.jobs"}, 0, ""):
        jid = f"inst-{uuid.uuid4().hex[:8]}"
        fleet.hash(jid, embed_data(image, instance=instance))
        ids.append(jid)
    goods = fleet.interleave(ids)
    fleet.wait_results(goods)
    fleet.wait_failed(ids)
    for jid in ids:
        fleet.hostile[jid] = "unsupported_job"
    fleet.check()


def test_class8_a_hash_far_over_the_payload_bound_is_never_read_whole(fleet):
    # 2 x ARCFACE_MAX_JOB_BYTES of description: the worker must not pull it over the wire or hold it; the job fails
    # alone and its hash is replaced by a small failed job rq can read.
    big = f"big-{uuid.uuid4().hex[:8]}"
    fleet.hash(big, embed_data(face_paths()[3].read_bytes()), {"description": "x" * (2 * MAX_JOB_BYTES)})
    goods = fleet.interleave([big])
    fleet.wait_results(goods)
    fleet.wait_failed([big])
    status, code, entries = fleet.raw_outcome(big)
    assert code == "invalid_payload" and "ARCFACE_MAX_JOB_BYTES" in entries[-1]
    assert fleet.conn.memory_usage(f"rq:job:{big}") < 64 * 1024
    fleet.hostile[big] = "invalid_payload"
    fleet.check()


def test_class15_stale_and_duplicate_queue_entries_never_rerun_a_job(fleet):
    done = fleet.interleave([])
    fleet.wait_results(done)
    finished = done[0]
    # A queue entry '<finished id>:x' (with and without a hash under that name), duplicates of a finished job,
    # and a new job pushed twice in one RPUSH behind a full batch, so both copies are taken together.
    with_hash = f"{done[1]}:x"
    fleet.hash(with_hash, embed_data(face_paths()[0].read_bytes()))
    twice = fleet.good_job(3)
    busy = [fleet.good_job(i) for i in range(MAX_BATCH)]
    fleet.push(*busy[:2], f"{finished}:x", twice, twice, finished, with_hash, finished, *busy[2:], twice)
    fleet.wait_results([*busy, twice])
    fleet.wait_failed([with_hash])
    fleet.refused_ids[with_hash] = "invalid_payload"
    time.sleep(2)
    fleet.check()


def vm_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def zlib_bomb(total: int = 500_000_000) -> bytes:
    """~0.5 MB of zlib inflating to ``total`` bytes of what looks like the start of an embed job's JSON."""
    z = zlib.compressobj(9)
    head = ('["' + EMBED_FUNC + '",null,[{"kind":"embed","image":{"data_b64":"').encode()
    out = [z.compress(head)]
    chunk = b"A" * (1 << 20)
    for _ in range((total - len(head)) // len(chunk)):
        out.append(z.compress(chunk))
    out.append(z.flush())
    return b"".join(out)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (the worker's preprocessing processes)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError):
            pass
    return [pid, *children]


def peak_growth(pid: int, run) -> tuple[int, int, bool]:
    """(bytes the peak RSS of the worker and its preprocessing processes rose, summed over them, above their RSS
    before ``run()``; the worker's RSS before; whether the peaks could be reset)."""
    tree = process_tree(pid)
    assert len(tree) == 1 + PREPROCESS_THREADS, tree  # the decoding happens in processes we measure
    try:
        for p in tree:
            Path(f"/proc/{p}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    # without a reset the rise is measured from the peak so far: a lower bound of the cost, still failing when
    # the bombs cost more than the bound over everything before
    base = {p: vm_kib(p, "VmRSS") if reset else vm_kib(p, "VmHWM") for p in tree}
    run()
    assert process_tree(pid) == tree, "a preprocessing process was replaced: the peak of the dead one is lost"
    grown = [(vm_kib(p, "VmHWM") - base[p]) // 1024 for p in tree]
    print(f"\npeak rise by process (MiB; the worker first): {grown}")
    return sum(vm_kib(p, "VmHWM") - base[p] for p in tree) * 1024, base[pid] * 1024, reset


def wait_ended(fleet: Fleet, ids: list[str], timeout: float = patience(180)) -> None:
    """Each job ended once, finished (recorded as good, no reference embedding) or failed (hostile, its code)."""
    for jid in ids:
        deadline = time.monotonic() + timeout
        while fleet.raw_outcome(jid)[0] not in ("finished", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
        status, code, entries = fleet.raw_outcome(jid)
        assert status in ("finished", "failed") and len(entries) == 1, (jid, status, entries)
        if status == "failed":
            fleet.hostile[jid] = code
        else:
            fleet.good[jid] = None  # type: ignore[assignment]


def write_40mp_jobs(fleet: Fleet) -> tuple[list[str], str]:
    """Four single-image jobs of 40 MP black PNGs (grey and colour) and one multi-image job of 8 of them."""
    black = io.BytesIO()
    Image.new("RGB", (8000, 5000)).save(black, "PNG", compress_level=9)  # 40 MP, exactly the pixel limit
    grey = io.BytesIO()
    Image.new("L", (8000, 5000)).save(grey, "PNG", compress_level=9)  # the 39 KB one
    big = []
    for data in (grey.getvalue(), black.getvalue(), grey.getvalue(), black.getvalue()):
        jid = f"black40mp-{uuid.uuid4().hex[:8]}"
        fleet.hash(jid, embed_data(data))
        big.append(jid)
    many = f"black40mp-x8-{uuid.uuid4().hex[:8]}"  # one multi-image job: 8 of them
    images = [{"data_b64": b64(black.getvalue())} for _ in range(8)]
    fleet.hash(many, json.dumps([EMBED_BATCH_FUNC, None, [{"kind": "embed_batch", "images": images}], {}]).encode())
    return big, many


def test_class8_memory_bombs_stay_within_the_documented_bound(fleet):
    pid = fleet.worker.proc.pid
    # steady state: a full batch of good jobs has run (the model's batch-16 working memory is in)
    warm = [fleet.good_job(i) for i in range(MAX_BATCH)]
    fleet.push(*warm)
    fleet.wait_results(warm)
    mib = 2**20

    bomb = zlib_bomb()
    assert len(bomb) < 600_000
    bomb_id = f"zbomb-{uuid.uuid4().hex[:8]}"
    fleet.hash(bomb_id, bomb)

    def zlib_round() -> None:
        fleet.wait_results(fleet.interleave([bomb_id]))
        fleet.wait_failed([bomb_id])

    zlib_grown, base, reset = peak_growth(pid, zlib_round)
    fleet.hostile[bomb_id] = "invalid_payload"
    assert "ARCFACE_MAX_JOB_BYTES" in fleet.raw_outcome(bomb_id)[2][0]

    big, many = write_40mp_jobs(fleet)

    def pixels_round() -> None:
        fleet.wait_results(fleet.interleave([*big, many]))
        wait_ended(fleet, [*big, many])

    pixels_grown, _, _ = peak_growth(pid, pixels_round)
    outcomes = [fleet.raw_outcome(j)[:2] for j in [*big, many]]
    print(
        f"\nmemory bombs: RSS {base / mib:.0f} MiB before; peak rise: zlib bomb +{zlib_grown / mib:.0f} MiB, "
        f"40 MP PNGs (4 jobs + one of 8 images) +{pixels_grown / mib:.0f} MiB; bound {RSS_BOUND / mib:.0f} MiB "
        f"(peak reset: {reset}); 40 MP outcomes {outcomes}"
    )
    assert zlib_grown <= RSS_BOUND, (
        f"the zlib bomb raised the peak RSS {zlib_grown / mib:.0f} MiB, over {RSS_BOUND / mib:.0f}"
    )
    assert pixels_grown <= RSS_BOUND, (
        f"40 MP images raised the peak RSS {pixels_grown / mib:.0f} MiB, over {RSS_BOUND / mib:.0f}"
    )
    fleet.check()
