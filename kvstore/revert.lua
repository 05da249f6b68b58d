-- revert.lua: undo the version a message wrote, if it is still the current one.
-- Used when a sync fails for good after its Redis write, so that nothing stays half-applied.
--
-- KEYS[1]  head hash      {prefix}:head:{namespace}:{key}
-- KEYS[2]  history list   {prefix}:hist:{namespace}:{key}
-- KEYS[3]  key index zset {prefix}:keys:{namespace}
-- ARGV[1]  key
-- ARGV[2]  message id
--
-- Returns 1 when the message's version was undone, 0 when the head belongs to another message.

local head_key, hist_key, index_key = KEYS[1], KEYS[2], KEYS[3]
if redis.call("HGET", head_key, "msg_id") ~= ARGV[2] then return 0 end

local previous = redis.call("LPOP", hist_key)
redis.call("DEL", head_key)
if not previous then
    redis.call("ZREM", index_key, ARGV[1])
    return 1
end

local old = cjson.decode(previous)
for field, value in pairs(old) do redis.call("HSET", head_key, field, value) end
if old.value ~= nil then
    redis.call("ZADD", index_key, 0, ARGV[1])
else
    redis.call("ZREM", index_key, ARGV[1])
end
return 1
