-- Registration of popped jobs (worker/batching/rqfence.py: Fence.register).
-- KEYS: the queue's intermediate list, its started registry, its liveness set. ARGV: the liveness entries' expiry,
-- then per job its id, its started member and its hash fields (JSON; they name the member as 'arcface_execution').
-- The started entry is scored +inf (rq's "never expires"): rq's cleanup, which `rq info` and dashboards run on every
-- count, never re-queues it; the worker's heartbeat keeps the member's expiry in the liveness set instead.
-- A job is registered only while the worker's pop of it is still in the intermediate list (the LREM takes it out)
-- and no other worker has taken the same id (queued twice, popped by two workers at once); or when this very
-- registration already ran (a retry after a lost reply: its member, unique per execution, is in the registry).
-- An id that another worker re-queued from the intermediate list while this registration waited (Redis full or
-- stalled past the orphan age) is not registered: the copy re-queued runs instead, never both.
-- Under maxmemory: all or nothing (tests/test_rqfence.py). Returns 1 (registered) or 0 (not ours) per job.
-- TAKEN (statuses of a job some worker already took: rqfence.TAKEN_STATUSES) is defined by the line rqfence.py
-- puts before this script.
local out, started, alive = {}, {}, {}
for i = 2, #ARGV, 3 do
  local id, member = ARGV[i], ARGV[i + 1]
  local jkey = 'rq:job:' .. id
  if redis.call('LREM', KEYS[1], 1, id) == 1 then
    if TAKEN[redis.call('HGET', jkey, 'status')] then
      out[#out + 1] = 0
    else
      local flat = {}
      for k, v in pairs(cjson.decode(ARGV[i + 2])) do flat[#flat + 1] = k; flat[#flat + 1] = v end
      redis.call('HSET', jkey, unpack(flat))
      started[#started + 1] = '+inf'
      started[#started + 1] = member
      alive[#alive + 1] = ARGV[1]
      alive[#alive + 1] = member
      out[#out + 1] = 1
    end
  elseif redis.call('ZSCORE', KEYS[2], member) then
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
for j = 1, #started, 1000 do  -- one ZADD per 500 entries (unpack's stack is bounded)
  redis.call('ZADD', KEYS[2], unpack(started, j, math.min(j + 999, #started)))
  redis.call('ZADD', KEYS[3], unpack(alive, j, math.min(j + 999, #alive)))
end
return out
