"""The Redis scripts of the exactly-once protocol (README "More than one host").

Each runs atomically inside Redis. The sender's SET_IF_NONE; the bridge's
CLAIM, RECORD and FINISH, each over a batch of entries in one call; the reads (READ, TAKE, SCAN_CLAIMED), which screen every
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

# The per-entry steps below run over a whole read batch in one script (one
# call, one reply): each entry's writes are those a script of its own would
# make, in the same order, and an entry whose command Redis refuses (a key of
# another type, say) gets "!<error>" in its place while the others go on.
# An entry's writes are not undone when a later one of the same entry fails,
# as a script's never are.

# KEYS: claimed, stream, out:ID... ; ARGV: group, keep ttl, then per entry:
# id, delivering JSON, entry fields JSON, entry id.
# Invariant: the work's fate is set once (SET NX); only the bridge that set it
# records the entry in its claimed hash; the stream entry is acknowledged in
# the same script, so no reader sees it claimed and still pending. Per entry:
# the delivering JSON if this call claimed it, else the state already there.
CLAIM = """
local res = {}
for i = 1, #KEYS - 2 do
  local a = 3 + (i - 1) * 4
  local out = KEYS[2 + i]
  local got = redis.pcall('SET', out, ARGV[a + 1], 'NX', 'EX', tonumber(ARGV[2]))
  if type(got) == 'table' and got.err then
    res[i] = '!' .. got.err
  else
    if got then
      local h = redis.pcall('HSET', KEYS[1], ARGV[a], ARGV[a + 2])
      if type(h) == 'table' and h.err then got = nil; res[i] = '!' .. h.err end
    end
    if res[i] == nil then
      redis.call('XACK', KEYS[2], ARGV[1], ARGV[a + 3])
      redis.call('XDEL', KEYS[2], ARGV[a + 3])
      if got then
        res[i] = ARGV[a + 1]
      else
        local cur = redis.pcall('GET', out)
        if type(cur) == 'table' and cur.err then cur = '!' .. cur.err end
        res[i] = cur
      end
    end
  end
end
return res
"""

# KEYS: claimed, watch, then per entry out:ID, done:ID ; ARGV: done ttl, keep
# ttl, then per entry: id, outcome JSON, local id ('' unless queued).
# A queued work enters the node's watch hash in the same script that drops it
# from claimed, so a bridge killed at any point has it in one of the two (what
# its restart resumes). Per entry: 1, or "!<error>".
RECORD = """
local res = {}
for i = 1, (#KEYS - 2) / 2 do
  local a = 3 + (i - 1) * 3
  local out, done = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local r = redis.pcall('SET', out, ARGV[a + 1], 'EX', tonumber(ARGV[2]))
  if not (type(r) == 'table' and r.err) then
    redis.call('HDEL', KEYS[1], ARGV[a])
    if ARGV[a + 2] ~= '' then r = redis.pcall('HSET', KEYS[2], ARGV[a], ARGV[a + 2]) end
  end
  if not (type(r) == 'table' and r.err) then
    r = redis.pcall('RPUSH', done, ARGV[a + 1])
    if not (type(r) == 'table' and r.err) then redis.call('EXPIRE', done, tonumber(ARGV[1])) end
  end
  if type(r) == 'table' and r.err then res[i] = '!' .. r.err else res[i] = 1 end
end
return res
"""

# KEYS: watch, then per entry out:ID, done:ID ; ARGV: done ttl, keep ttl,
# node, then per entry: id, final outcome JSON.
# The final outcome of a queued work (ran, failed, cancelled, dead_letter,
# interrupted, unknown). Invariant: one final state per work - it replaces
# only this node's "queued", so a repeat (a restarted bridge, the watcher
# after a cancel already recorded) changes nothing and wakes no one. The
# work leaves the watch hash either way. Per entry: 1 if it recorded, else 0,
# or "!<error>".
FINISH = """
local res = {}
for i = 1, (#KEYS - 1) / 2 do
  local a = 4 + (i - 1) * 2
  local out, done = KEYS[2 * i], KEYS[1 + 2 * i]
  redis.call('HDEL', KEYS[1], ARGV[a])
  local cur = redis.pcall('GET', out)
  res[i] = 0
  if type(cur) == 'table' and cur.err then
    res[i] = '!' .. cur.err
  elseif cur then
    local ok, st = pcall(cjson.decode, cur)
    if ok and type(st) == 'table' and st['state'] == 'queued' and st['node'] == ARGV[3] then
      redis.call('SET', out, ARGV[a + 1], 'EX', tonumber(ARGV[2]))
      local r = redis.pcall('RPUSH', done, ARGV[a + 1])
      if type(r) == 'table' and r.err then
        res[i] = '!' .. r.err
      else
        redis.call('EXPIRE', done, tonumber(ARGV[1]))
        res[i] = 1
      end
    end
  end
end
return res
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


def reply_or_error(script, keys: list, args: list):
    """Run a registered script: its reply, or the ``ResponseError`` Redis
    answered, as a value (a lost connection raises: redis-py's
    ``ConnectionError`` is not a ``ResponseError``)."""
    from redis.exceptions import ResponseError
    try:
        return script(keys=keys, args=args)
    except ResponseError as exc:
        return exc


def entry_error(reply) -> str | None:
    """The error Redis answered for one entry of a batch script (its reply
    slot holds "!<error>", see CLAIM), or None."""
    if isinstance(reply, bytes) and reply.startswith(b"!"):
        return reply[1:].decode(errors="replace")
    return None
