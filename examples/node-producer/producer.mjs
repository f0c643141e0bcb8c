#!/usr/bin/env node
// An ArcFace producer in Node.js, following the README's "Wire format" section and nothing else:
// it writes rq job hashes with plain Redis commands and waits on the job's result stream.
//
//   node producer.mjs embed face.png
//   node producer.mjs verify a.png b.png [--threshold 0.6]
//   node producer.mjs embed face.png --minimal     (only the required fields: data, the queue push)
//
// Settings: ARCFACE_REDIS_URL (default redis://127.0.0.1:6379/0), ARCFACE_QUEUE (default arcface),
// ARCFACE_WAIT_TIMEOUT seconds (default 60). Prints one JSON line: {"job_id", "status", "result" | "error"}.
// Exit codes as arcface-producer: 0 finished, 1 the job failed, 2 bad usage, 3 timeout, 4 Redis unreachable.
import { readFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { createClient } from 'redis';

const FUNCS = { embed: 'worker.jobs.embed', verify: 'worker.jobs.verify' };
const RESULT_TYPES = { 1: 'successful', 2: 'failed', 3: 'stopped', 4: 'retried', 5: 'max_retries_exceeded' };

// rq's timestamp format: %Y-%m-%dT%H:%M:%S.%fZ, UTC (toISOString's milliseconds are accepted as %f).
const rqTimestamp = (date = new Date()) => date.toISOString();

function usage(message) {
  process.stderr.write(`arcface-node-producer: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const [kind, ...rest] = argv;
  if (!FUNCS[kind]) usage('usage: producer.mjs embed IMAGE | verify A B [--threshold T] [--minimal]');
  const files = [];
  const opts = { minimal: false, threshold: undefined };
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--minimal') opts.minimal = true;
    else if (rest[i] === '--threshold') opts.threshold = Number(rest[++i]);
    else files.push(rest[i]);
  }
  if (files.length !== (kind === 'embed' ? 1 : 2)) usage(`${kind} takes ${kind === 'embed' ? 'one image' : 'two images'}`);
  if (opts.threshold !== undefined && !(opts.threshold >= 0 && opts.threshold <= 2)) usage('--threshold must be a number from 0 to 2');
  return { kind, files, opts };
}

// An image is inline: base64 of the encoded file's bytes (one base64 layer, nothing else).
const inlineImage = (file) => ({ data_b64: readFileSync(file).toString('base64') });

function request(kind, files, opts) {
  if (kind === 'embed') return { kind: 'embed', image: inlineImage(files[0]) };
  const req = { kind: 'verify', a: inlineImage(files[0]), b: inlineImage(files[1]) };
  if (opts.threshold !== undefined) req.threshold = opts.threshold; // a JSON number, never a string
  return req;
}

async function enqueue(client, queue, kind, payload, minimal) {
  const jobId = randomUUID(); // letters, digits, '-' and '_' only
  // data: the UTF-8 JSON array [function, null, [request], {}], written as is (zlib is optional).
  const fields = { data: JSON.stringify([FUNCS[kind], null, [payload], {}]) };
  if (!minimal) {
    const now = rqTimestamp();
    Object.assign(fields, {
      status: 'queued', origin: queue, created_at: now, enqueued_at: now,
      timeout: '180', result_ttl: '3600', failure_ttl: '86400', description: `${kind} from node`,
    });
  }
  await client.multi()
    .hSet(`rq:job:${jobId}`, fields)
    .rPush(`rq:queue:${queue}`, jobId)
    .sAdd('rq:queues', `rq:queue:${queue}`)
    .exec();
  return jobId;
}

async function waitResult(client, jobId, timeoutS) {
  // The result stream rq:results:<id>: one entry per outcome; block on it (no polling).
  const key = `rq:results:${jobId}`;
  const deadline = Date.now() + timeoutS * 1000;
  let last = '0-0';
  while (Date.now() < deadline) {
    const block = Math.max(1, Math.min(2000, deadline - Date.now()));
    const reply = await client.xRead({ key, id: last }, { BLOCK: block, COUNT: 10 });
    if (!reply) continue;
    for (const { id, message } of reply[0].messages) {
      last = id;
      const type = RESULT_TYPES[Number(message.type)];
      if (type === 'successful') {
        // return_value: base64 of the result's UTF-8 JSON (rq's layer), then the JSON itself.
        return { status: 'finished', result: JSON.parse(Buffer.from(message.return_value, 'base64').toString('utf8')) };
      }
      if (type === 'retried') continue; // requeued after its worker died: keep waiting
      // failed: the typed error is the entry's `error` field (JSON {"code", "message"}) when an ArcFace worker
      // wrote it, else the job hash's meta field (plain JSON): {"error": {"code", "message"}}.
      if (message.error) {
        try {
          return { status: 'failed', error: JSON.parse(message.error) };
        } catch {} // not ours after all: fall back to the meta
      }
      const meta = await client.hGet(`rq:job:${jobId}`, 'meta');
      const error = meta ? JSON.parse(meta).error : { code: 'internal_error', message: type };
      return { status: 'failed', error };
    }
  }
  return { status: 'timeout' };
}

async function main() {
  const { kind, files, opts } = parseArgs(process.argv.slice(2));
  const url = process.env.ARCFACE_REDIS_URL || 'redis://127.0.0.1:6379/0';
  const queue = process.env.ARCFACE_QUEUE || 'arcface';
  const timeoutS = Number(process.env.ARCFACE_WAIT_TIMEOUT || 60);
  const client = createClient({ url });
  client.on('error', () => {});
  try {
    await client.connect();
  } catch (err) {
    process.stderr.write(`arcface-node-producer: cannot reach Redis: ${err.message}\n`);
    process.exit(4);
  }
  const blocking = client.duplicate(); // XREAD BLOCK holds its connection: give it its own
  blocking.on('error', () => {});
  await blocking.connect();
  try {
    const jobId = await enqueue(client, queue, kind, request(kind, files, opts), opts.minimal);
    const outcome = await waitResult(blocking, jobId, timeoutS);
    process.stdout.write(JSON.stringify({ job_id: jobId, ...outcome }) + '\n');
    process.exitCode = outcome.status === 'finished' ? 0 : outcome.status === 'failed' ? 1 : 3;
  } finally {
    await blocking.quit();
    await client.quit();
  }
}

main().catch((err) => {
  process.stderr.write(`arcface-node-producer: ${err.message}\n`);
  process.exit(1);
});
