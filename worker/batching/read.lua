-- Every job hash of a take in one round trip (worker/batching/rqfence.py: Fence.read_jobs).
-- KEYS: job hash keys; ARGV[1]: the most bytes one hash may hold. Per key: its flat field/value list; {} for a key
-- that is missing or not a hash (WRONGTYPE must not fail the batch); {TOO_LARGE, size} for a hash over the bound
-- (never sent over the wire: a 100 MB description costs the worker nothing).
local limit = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local ok, t = pcall(redis.call, 'HGETALL', key)
  if not ok then
    out[i] = {}
  else
    local n = 0
    for j = 1, #t do n = n + #t[j] end
    if n > limit then out[i] = {'__arcface_hash_too_large__', tostring(n)} else out[i] = t end
  end
end
return out
