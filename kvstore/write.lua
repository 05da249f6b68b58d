-- write.lua: make a new version of one key atomically (a set, a delete or a rollback).
--
-- KEYS[1]  head hash      {prefix}:head:{namespace}:{key}
-- KEYS[2]  history list   {prefix}:hist:{namespace}:{key}, newest first
-- KEYS[3]  key index zset {prefix}:keys:{namespace}
-- KEYS[4]  namespaces set {prefix}:namespaces
-- KEYS[5]  index lock     {prefix}:lock:{namespace}:{key}
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
-- ARGV[13] index lock token, "" to take no lock
-- ARGV[14] index lock time to live in ms
-- ARGV[15] set: "1" to change nothing when the current value, embed flag, hash and metadata are the same
-- ARGV[16] set: the metadata's canonical JSON, "" for none
--
-- Returns {outcome, lock, field, value, field, value, ...}: the outcome ("applied", "duplicate",
-- "stale", "unchanged", or for a rollback "missing", "nothing", "no_version"); the index lock ("held"
-- when this call took it, "busy" when the index has work for the key but another holder has the lock,
-- "" when the index has nothing to do or no token was given); and the head's fields after the call.
-- The index has work for an applied write whose new version is embedded or whose previous one was;
-- for a duplicate of such a write (its index step may not have run); and for an unchanged embedded
-- value (the step of the write that made it may not have run).
-- A message whose id wrote the current version, or that was sent before the message that did
-- (ties broken by id), changes nothing.

local head_key, hist_key, index_key, ns_key, lock_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local key, namespace, mode = ARGV[1], ARGV[2], ARGV[3]
local msg_id, msg_ts, now = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local keep, ttl, ordered = tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12] == "1"
local token, lock_ttl, skip_same = ARGV[13], ARGV[14], ARGV[15] == "1"

local function as_map(flat)
    local map = {}
    for i = 1, #flat, 2 do map[flat[i]] = flat[i + 1] end
    return map
end

local head = as_map(redis.call("HGETALL", head_key))
local had_vector = head.embed == "1" and head.value ~= nil

-- Whether the version before the current one was embedded (its vector may still need removing).
local function previous_embedded()
    local previous = redis.call("LINDEX", hist_key, 0)
    if not previous then return false end
    local old = cjson.decode(previous)
    return old.embed == "1" and old.value ~= nil
end

local function lock_for(outcome)
    if token == "" or outcome == "stale" then return "" end
    local embedded = redis.call("HGET", head_key, "embed") == "1"
    if outcome == "applied" and not (embedded or had_vector) then return "" end
    if outcome == "unchanged" and not embedded then return "" end
    if outcome == "duplicate" and not (embedded or previous_embedded()) then return "" end
    if redis.call("SET", lock_key, token, "NX", "PX", lock_ttl) then return "held" end
    return "busy"
end

local function answer(outcome)
    local out = {outcome, lock_for(outcome)}
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
    new = {value = ARGV[4], embed = ARGV[5], hash = ARGV[6], meta = ARGV[16]}
    local same = head.value == new.value and head.embed == new.embed and (head.hash or "") == new.hash
        and (head.meta or "") == new.meta
    if skip_same and same then return answer("unchanged") end
elseif mode == "delete" then
    new = {embed = "0", hash = ""}
else
    if not head.version then return answer("missing") end
    local wanted = ARGV[4]
    for _, entry in ipairs(redis.call("LRANGE", hist_key, 0, -1)) do
        local old = cjson.decode(entry)
        if wanted == "" or old.version == wanted then
            new = {value = old.value, embed = old.embed, hash = old.hash, meta = old.meta}
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
if new.meta ~= nil and new.meta ~= "" then redis.call("HSET", head_key, "meta", new.meta) end
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
