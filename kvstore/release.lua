-- release.lua: let go of a key's index lock, only if this holder still has it.
--
-- KEYS[1]  index lock     {prefix}:lock:{namespace}:{key}
-- ARGV[1]  the holder's token
--
-- Returns 1 when the lock was this holder's and is released, 0 when it had expired (or was taken
-- by another holder since), so the holder's index step may have raced another's.

if redis.call("GET", KEYS[1]) == ARGV[1] then
    redis.call("DEL", KEYS[1])
    return 1
end
return 0
