-- Outcomes of jobs, each applied atomically and at most once (worker/batching/rqfence.py: Fence.apply).
-- KEYS: the queue's started, finished, failed and scheduled registries, its liveness set.
-- ARGV: now (unix seconds), worker key, worker name, then per outcome a fixed group of 9 fields:
--   guard   "own": completion by the worker that holds the job: its started and liveness entries are removed, and
--           the outcome applied only if the job still runs under that entry (status started, its hash naming the
--           member as 'arcface_execution'). A job re-queued, failed, cancelled or deleted behind the worker's back
--           (rq's registry cleanup, a dashboard, a recovering worker) is not ours any more: if it was re-queued, the
--           copy on the queue runs instead, and whichever execution registered last is the one whose outcome counts
--           "expired": apply only if the member's liveness entry (or, for an entry registered before the liveness
--           set existed, its started entry) is there with a score <= now (recovery), and the job still runs under
--           that entry: an entry left behind by an execution the job has since outlived (the same id queued again
--           and run by another worker, or already ended) is dropped, the job untouched
--           "popped": apply only if LREM of the id from the intermediate list (the last field) removes it and no
--           other worker has taken the same id meanwhile (a job failed before registration: never twice)
--           "none": no condition (the scheduler's moves; its ZREM already decided)
--   kind    "finished" | "failed" | "requeue" | "schedule" | "invalid" (failed, in no registry: an id rq refuses)
--   job id, started member, ttl (result/failure ttl; -1 = forever, 0 = delete), hash fields (JSON object of
--   field -> string), stream entry (JSON object, "" = none), extra (requeue: queue key; schedule: score),
--   intermediate list key (guard "popped" only)
-- Returns, per outcome, 0 (skipped: not ours any more) or 1 (applied) or 2 (applied, job has dependents).
-- TAKEN (statuses of a job some worker already took: rqfence.TAKEN_STATUSES) is defined by the line rqfence.py
-- puts before this script.
local now = tonumber(ARGV[1])
local out = {}
local n = (#ARGV - 3) / 9
for i = 0, n - 1 do
  local b = 3 + i * 9
  local guard, kind, id, member = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local ttl = tonumber(ARGV[b + 5])
  local jkey = 'rq:job:' .. id
  local ok = true
  if guard == 'own' then
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', KEYS[5], member)
    ok = redis.call('HGET', jkey, 'status') == 'started' and redis.call('HGET', jkey, 'arcface_execution') == member
  elseif guard == 'expired' then
    local score = redis.call('ZSCORE', KEYS[5], member)
    if not score then score = redis.call('ZSCORE', KEYS[1], member) end
    ok = score ~= false and tonumber(score) <= now
    if ok then
      redis.call('ZREM', KEYS[1], member)
      redis.call('ZREM', KEYS[5], member)
      local owner = redis.call('HGET', jkey, 'arcface_execution')
      ok = redis.call('HGET', jkey, 'status') == 'started' and (not owner or owner == member)
    end
  elseif guard == 'popped' then
    ok = redis.call('LREM', ARGV[b + 9], 1, id) == 1 and not TAKEN[redis.call('HGET', jkey, 'status')]
  end
  if ok then
    local fields = cjson.decode(ARGV[b + 6])
    if fields['__replace__'] then redis.call('DEL', jkey); fields['__replace__'] = nil end
    local flat = {}
    for k, v in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = v end
    if #flat > 0 then redis.call('HSET', jkey, unpack(flat)) end
    if ARGV[b + 7] ~= '' then
      local entry = cjson.decode(ARGV[b + 7])
      local ef = {}
      for k, v in pairs(entry) do ef[#ef + 1] = k; ef[#ef + 1] = tostring(v) end
      local rkey = 'rq:results:' .. id
      redis.call('XADD', rkey, 'MAXLEN', '~', '10', '*', unpack(ef))
      if ttl > 0 then redis.call('EXPIRE', rkey, ttl) elseif ttl == 0 then redis.call('DEL', rkey) end
    end
    local registry = nil
    if kind == 'finished' then registry = KEYS[2] elseif kind == 'failed' then registry = KEYS[3] end
    if registry then
      if ttl > 0 then
        redis.call('EXPIRE', jkey, ttl)
        redis.call('ZADD', registry, now + ttl, id)
      elseif ttl < 0 then
        redis.call('PERSIST', jkey)
        redis.call('ZADD', registry, '+inf', id)
      else
        redis.call('DEL', jkey)
      end
      if redis.call('EXISTS', jkey .. ':dependents') == 1 then ok = 2 end
    elseif kind == 'requeue' then
      redis.call('RPUSH', ARGV[b + 8], id)
    elseif kind == 'schedule' then
      redis.call('ZADD', KEYS[4], tonumber(ARGV[b + 8]), id)
    elseif ttl > 0 then
      redis.call('EXPIRE', jkey, ttl)
    end
  end
  if ok == true then out[#out + 1] = 1 elseif not ok then out[#out + 1] = 0 else out[#out + 1] = ok end
end
return out
