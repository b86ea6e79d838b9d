"""The Redis scripts of the exactly-once protocol (README "More than one host").

Each runs atomically inside Redis. The sender's SET_IF_NONE; the bridge's
CLAIM, RECORD and FINISH; the reads (READ, TAKE, SCAN_CLAIMED), which screen every
entry inside Redis so that an oversize one never reaches the bridge.
"""

# KEYS[1]=out:ID KEYS[2]=done:ID; ARGV[1]=state JSON ARGV[2]=done ttl ARGV[3]=keep ttl
# Set the work's state if it has none; a final state wakes outcome().
# Returns the state now recorded (ours if we set it).
SET_IF_NONE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[3])) then
  local st = cjson.decode(ARGV[1])['state']
  if st ~= 'delivering' then
    redis.call('RPUSH', KEYS[2], ARGV[1])
    redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
  end
  return ARGV[1]
end
return redis.call('GET', KEYS[1])
"""

# KEYS: out:ID, claimed, stream ; ARGV: id, delivering JSON, entry fields JSON,
# group, entry id, keep ttl
# Invariant: the work's fate is set once (SET NX); only the bridge that set it
# records the entry in its claimed hash; the stream entry is acknowledged in
# the same script, so no reader sees it claimed and still pending.
CLAIM = """
local got = redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', tonumber(ARGV[6]))
if got then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
redis.call('XDEL', KEYS[3], ARGV[5])
if got then return ARGV[2] end
return redis.call('GET', KEYS[1])
"""

# KEYS: out:ID, claimed, done[, watch] ; ARGV: id, outcome JSON, done ttl,
# keep ttl[, local id]
# With a watch hash (a queued work): the work enters the node's watch hash in
# the same script that drops it from claimed, so a bridge killed at any point
# has it in one of the two (what its restart resumes).
RECORD = """
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[4]))
redis.call('HDEL', KEYS[2], ARGV[1])
if KEYS[4] then redis.call('HSET', KEYS[4], ARGV[1], ARGV[5]) end
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
return 1
"""

# KEYS: out:ID, watch, done ; ARGV: id, final outcome JSON, done ttl, keep ttl, node
# The final outcome of a queued work (ran, failed, cancelled, dead_letter,
# interrupted, unknown). Invariant: one final state per work - it replaces
# only this node's "queued", so a repeat (a restarted bridge, the watcher
# after a cancel already recorded) changes nothing and wakes no one. The
# work leaves the watch hash either way. Returns 1 if it recorded.
FINISH = """
redis.call('HDEL', KEYS[2], ARGV[1])
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, st = pcall(cjson.decode, cur)
if not ok or type(st) ~= 'table' or st['state'] ~= 'queued' or st['node'] ~= ARGV[5] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[4]))
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
return 1
"""

#: Limits of what one entry may hold, checked inside Redis before the entry
#: is sent to the bridge (the payload's own limit is the domain's payload_size).
MAX_FIELDS = 16
FIELD_MAX = 1024          # bytes of a field name, and of any value but the payload
READ_COUNT = 64           # entries one read returns at most
READ_BYTES = 8 << 20      # and its entries' copies (about 4 per payload byte) this many
OVERSIZE = "__oversize__"

# Screens one entry inside Redis: an entry with too many fields, or a field
# larger than its limit, is returned as {OVERSIZE, what} instead of its
# fields, so its bytes never reach the bridge. ARGV[5]: payload limit,
# ARGV[6]: limit of the other fields, ARGV[7]: most fields.
_SCREEN = """
local function screen(e)
  local f = e[2]
  if not f then return end
  local bad = nil
  if #f > 2 * tonumber(ARGV[7]) then bad = 'fields=' .. (#f / 2) end
  if not bad then
    for k = 1, #f, 2 do
      local lim = tonumber(ARGV[6])
      if f[k] == 'payload' then lim = tonumber(ARGV[5]) end
      if #f[k] > tonumber(ARGV[6]) then bad = 'field name of ' .. #f[k] .. ' bytes' break end
      if #f[k + 1] > lim then bad = f[k] .. ' of ' .. #f[k + 1] .. ' bytes' break end
    end
  end
  if bad then e[2] = {'%s', bad} end
end
""" % OVERSIZE

# KEYS: streams ; ARGV: group, consumer, start ('>' or '0'), count, limits.
# A non-blocking XREADGROUP of at most ARGV[4] entries over every stream.
READ = _SCREEN + """
local left = tonumber(ARGV[4])
local out = {}
for i, s in ipairs(KEYS) do
  if left <= 0 then break end
  local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
                         'STREAMS', s, ARGV[3])
  if res and res[1] and #res[1][2] > 0 then
    for j, e in ipairs(res[1][2]) do screen(e) end
    out[#out + 1] = {s, res[1][2]}
    left = left - #res[1][2]
  end
end
return out
"""

# KEYS: stream ; ARGV: group, consumer, min idle ms, count, limits, start id.
TAKE = _SCREEN + """
local res = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[8],
                       'COUNT', ARGV[4])
for j, e in ipairs(res[2]) do screen(e) end
return {res[1], res[2]}
"""

# KEYS: claimed hash ; ARGV: cursor, count, value limit, field limit.
# One HSCAN step; a field or value over its limit comes back as false.
SCAN_CLAIMED = """
local res = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local kv = res[2]
local out = {}
for k = 1, #kv, 2 do
  if #kv[k] > tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[1], kv[k])
  elseif #kv[k + 1] > tonumber(ARGV[3]) then
    out[#out + 1] = kv[k]
    out[#out + 1] = false
  else
    out[#out + 1] = kv[k]
    out[#out + 1] = kv[k + 1]
  end
end
return {res[1], out}
"""


