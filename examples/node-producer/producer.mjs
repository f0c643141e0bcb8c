#!/usr/bin/env node
// An ArcFace producer in Node.js, following the README's "Wire format" section and nothing else:
// it writes rq job hashes with plain Redis commands and waits on the job's result stream.
//
//   node producer.mjs embed face.png
//   node producer.mjs verify a.png b.png [--threshold 0.6]
//   node producer.mjs embed face.png --minimal     (only the required fields: data, the queue push)
//
// Settings, as arcface-producer reads them: ARCFACE_REDIS_URL (redis://, rediss:// or unix://; unset = the
// embedded Redis that arcface-producer / arcface-worker start on this machine, at
// ARCFACE_DATA_DIR/redis/redis.sock; this script only connects to it, it never starts it),
// ARCFACE_EMBEDDED_REDIS=false (then ARCFACE_REDIS_URL is required), ARCFACE_DATA_DIR, ARCFACE_QUEUE
// (default arcface), ARCFACE_WAIT_TIMEOUT seconds (default 60). Prints one JSON line:
// {"job_id", "status", "result" | "error"}.
// Exit codes as arcface-producer: 0 finished, 1 the job failed, 2 bad usage or an unreadable image,
// 3 timeout, 4 Redis unreachable or refusing us (wrong password, no answer within 5 s).
import { readFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { homedir } from 'node:os';
import { isAbsolute, join } from 'node:path';
import { createClient } from 'redis';

const EXIT = { ok: 0, failed: 1, usage: 2, timeout: 3, redis: 4 };
const CONNECT_TIMEOUT_MS = 5000; // arcface-producer's socket connect timeout
const PROG = 'arcface-node-producer';

const FUNCS = { embed: 'worker.jobs.embed', verify: 'worker.jobs.verify' };
const RESULT_TYPES = { 1: 'successful', 2: 'failed', 3: 'stopped', 4: 'retried', 5: 'max_retries_exceeded' };

// rq's timestamp format: %Y-%m-%dT%H:%M:%S.%fZ, UTC (toISOString's milliseconds are accepted as %f).
const rqTimestamp = (date = new Date()) => date.toISOString();

function fail(message, code) {
  process.stderr.write(`${PROG}: ${message}\n`);
  process.exit(code);
}

const usage = (message) => fail(message, EXIT.usage);

// Hide the password in a Redis URL (arcface-producer's redact): scheme://user:***@host.
const redact = (text) => String(text).replace(/\b(rediss?|unix):\/\/([^:@/\s]*):([^@\s]+)@/g, '$1://$2:***@');

// The environment as pydantic-settings reads it: an empty variable is unset.
const env = (name) => (process.env[name] ?? '').trim() || undefined;

// platformdirs' user_data_dir("arcface-service"), where arcface-producer keeps the embedded Redis.
function defaultDataDir() {
  const xdg = env('XDG_DATA_HOME');
  if (xdg && isAbsolute(xdg)) return join(xdg, 'arcface-service');
  if (process.platform === 'darwin') return join(homedir(), 'Library', 'Application Support', 'arcface-service');
  return join(homedir(), '.local', 'share', 'arcface-service');
}

// Where Redis is: { options for createClient, where (for messages, password hidden) }.
function redisTarget() {
  const url = env('ARCFACE_REDIS_URL');
  if (url === undefined) {
    if (/^(false|0|no|off|f|n)$/i.test(env('ARCFACE_EMBEDDED_REDIS') ?? '')) {
      usage('ARCFACE_REDIS_URL is required when ARCFACE_EMBEDDED_REDIS=false');
    }
    const path = join(env('ARCFACE_DATA_DIR') ?? defaultDataDir(), 'redis', 'redis.sock');
    return { options: { socket: { path } }, where: `the embedded Redis at ${path}`, embedded: true };
  }
  if (url.startsWith('unix://')) {
    const parsed = new URL(url);
    const db = Number(parsed.searchParams.get('db') ?? 0);
    return { options: { socket: { path: decodeURIComponent(parsed.pathname) }, database: db }, where: redact(url) };
  }
  if (!/^rediss?:\/\//.test(url)) {
    usage(`ARCFACE_REDIS_URL=${redact(url)}: must be a redis://host:port/db, rediss://host:port/db or unix:///path.sock URL`);
  }
  return { options: { url }, where: redact(url) };
}

// One connected client, or exit 4 with the reason: refused, unreachable, wrong password, or no answer in time.
async function connectOrExit(target) {
  const client = createClient({
    ...target.options,
    socket: { ...target.options.socket, connectTimeout: CONNECT_TIMEOUT_MS, reconnectStrategy: false },
  });
  client.on('error', () => {}); // every failure is reported where it is awaited
  let timer;
  const noAnswer = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${CONNECT_TIMEOUT_MS / 1000}s`)), CONNECT_TIMEOUT_MS);
  });
  try {
    await Promise.race([(async () => { await client.connect(); await client.ping(); })(), noAnswer]);
  } catch (err) {
    let reason = redact(err.message || err.code || err);
    if (target.embedded && err.code === 'ENOENT') {
      reason = 'it is not running (no socket there); arcface-producer or arcface-worker start it on this machine, or set ARCFACE_REDIS_URL';
    }
    fail(`cannot reach Redis at ${target.where}: ${reason}`, EXIT.redis);
  } finally {
    clearTimeout(timer);
  }
  return client;
}

const FILE_ERRORS = { ENOENT: 'No such file or directory', EACCES: 'Permission denied', EISDIR: 'Is a directory' };

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

// An image is inline: base64 of the encoded file's bytes (one base64 layer, nothing else). An unreadable file is
// a usage error, named as arcface-producer names it.
function inlineImage(file, label) {
  try {
    return { data_b64: readFileSync(file).toString('base64') };
  } catch (err) {
    return usage(`${label}${file}: ${FILE_ERRORS[err.code] ?? err.message}`);
  }
}

function request(kind, files, opts) {
  if (kind === 'embed') return { kind: 'embed', image: inlineImage(files[0], '') };
  const req = { kind: 'verify', a: inlineImage(files[0], 'image a: '), b: inlineImage(files[1], 'image b: ') };
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
  const target = redisTarget();
  const queue = env('ARCFACE_QUEUE') ?? 'arcface';
  const timeoutS = Number(env('ARCFACE_WAIT_TIMEOUT') ?? 60);
  if (!(timeoutS > 0 && Number.isFinite(timeoutS))) usage('ARCFACE_WAIT_TIMEOUT must be a number of seconds above 0');
  const client = await connectOrExit(target);
  const payload = request(kind, files, opts);
  const blocking = client.duplicate(); // XREAD BLOCK holds its connection: give it its own
  blocking.on('error', () => {});
  let outcome, jobId;
  try {
    await blocking.connect();
    jobId = await enqueue(client, queue, kind, payload, opts.minimal);
    outcome = await waitResult(blocking, jobId, timeoutS);
  } catch (err) {
    fail(`Redis unreachable or refused the command at ${target.where}: ${redact(err.message || err)}`, EXIT.redis);
  }
  process.stdout.write(JSON.stringify({ job_id: jobId, ...outcome }) + '\n');
  process.exitCode = outcome.status === 'finished' ? EXIT.ok : outcome.status === 'failed' ? EXIT.failed : EXIT.timeout;
  await Promise.allSettled([blocking.quit(), client.quit()]);
}

main().catch((err) => fail(err.stack || err.message, EXIT.failed));
