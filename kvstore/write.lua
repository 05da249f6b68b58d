-- write.lua: make a new version of one key atomically (a set, a delete or a rollback).
--
-- KEYS[1]  head hash      {prefix}:head:{namespace}:{key}
-- KEYS[2]  history list   {prefix}:hist:{namespace}:{key}, newest first
-- KEYS[3]  key index zset {prefix}:keys:{namespace}
-- KEYS[4]  namespaces set {prefix}:namespaces
-- ARGV[1]  key
-- ARGV[2]  namespace
-- ARGV[3]  mode: "set", "delete" or "rollback"
-- ARGV[4]  set: the value's canonical JSON; rollback: the version to restore, "" for the previous one
-- ARGV[5]  set: "1" when the value is embedded, else "0"
-- ARGV[6]  set: the content hash of the embedded text
-- ARGV[7]  message id
-- ARGV[8]  message send time, ms since the epoch
-- ARGV[9]  now, ms since the epoch
-- ARGV[10] how many earlier versions to keep
-- ARGV[11] time to live in ms, "0" for none
-- ARGV[12] "1" when the message's send time orders it; "0" for a direct call, which always applies
--
-- Returns {outcome, had_vector, field, value, field, value, ...}: the outcome ("applied", "duplicate",
-- "stale", or for a rollback "missing", "nothing", "no_version"); "1" when the version before this
-- write was embedded (always "1" for a duplicate, whose index step may not have run); and the head's
-- fields after the call.
-- A message whose id wrote the current version, or that was sent before the message that did
-- (ties broken by id), changes nothing.

local head_key, hist_key, index_key, ns_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key, namespace, mode = ARGV[1], ARGV[2], ARGV[3]
local msg_id, msg_ts, now = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local keep, ttl, ordered = tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12] == "1"

local function as_map(flat)
    local map = {}
    for i = 1, #flat, 2 do map[flat[i]] = flat[i + 1] end
    return map
end

local head = as_map(redis.call("HGETALL", head_key))
local had_vector = (head.embed == "1" and head.value ~= nil) and "1" or "0"

local function answer(outcome)
    local out = {outcome, outcome == "duplicate" and "1" or had_vector}
    for _, item in ipairs(redis.call("HGETALL", head_key)) do table.insert(out, item) end
    return out
end

if head.msg_id == msg_id then return answer("duplicate") end
if head.version then
    local head_ts = tonumber(head.msg_ts)
    if not ordered then
        msg_ts = math.max(msg_ts, head_ts)
    elseif msg_ts < head_ts or (msg_ts == head_ts and msg_id < head.msg_id) then
        return answer("stale")
    end
end

-- What the new version holds: {value=..., embed=..., hash=...}; value nil means deleted.
local new = nil
if mode == "set" then
    new = {value = ARGV[4], embed = ARGV[5], hash = ARGV[6]}
elseif mode == "delete" then
    new = {embed = "0", hash = ""}
else
    if not head.version then return answer("missing") end
    local wanted = ARGV[4]
    for _, entry in ipairs(redis.call("LRANGE", hist_key, 0, -1)) do
        local old = cjson.decode(entry)
        if wanted == "" or old.version == wanted then
            new = {value = old.value, embed = old.embed, hash = old.hash}
            break
        end
    end
    if new == nil and wanted ~= "" then return answer("no_version") end
    if new == nil and head.value == nil then return answer("nothing") end
    if new == nil then new = {embed = "0", hash = ""} end
end

local version = 1
if head.version then
    version = tonumber(head.version) + 1
    redis.call("LPUSH", hist_key, cjson.encode(head))
    redis.call("LTRIM", hist_key, 0, keep - 1)
end

redis.call("DEL", head_key)
redis.call("HSET", head_key, "version", version, "embed", new.embed, "hash", new.hash,
    "msg_id", msg_id, "msg_ts", string.format("%.0f", msg_ts), "at_ms", now)
if new.value ~= nil then
    redis.call("HSET", head_key, "value", new.value)
    redis.call("ZADD", index_key, 0, key)
else
    redis.call("ZREM", index_key, key)
end
redis.call("SADD", ns_key, namespace)

if ttl > 0 then
    redis.call("PEXPIRE", head_key, ttl)
    redis.call("PEXPIRE", hist_key, ttl)
else
    redis.call("PERSIST", head_key)
    redis.call("PERSIST", hist_key)
end
return answer("applied")
