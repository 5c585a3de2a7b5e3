/* The engine's Lua scripts. Each starts with "#!lua" so that Redis checks
 * memory before running it (a refused script changed nothing: a batch is
 * stored whole or not at all) and never in the middle. Key names are built
 * from ARGV[1], the prefix ("amp2dify:"): standalone Redis only.
 *
 * Fencing: every script that touches a shard's jobs takes the caller's lease
 * token and compares it with <s>:lease first. */
#include "redisq_int.h"

/* ARGV: prefix, dedupe window s, number of events; then per event: key ("":
 * none), number of requests; then per request: shard, route, app, user,
 * per_user ("1"/"0"), body, source event ("": none). Publishes the shards
 * written to on "wake". Returns {accepted, duplicates}. */
static const char accept_lua[] =
    "#!lua\n"
    "local p, win, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "local i, acc, dup = 4, 0, 0\n"
    "local touched, list = {}, {}\n"
    "for e = 1, n do\n"
    "  local key, nreq = ARGV[i], tonumber(ARGV[i + 1])\n"
    "  i = i + 2\n"
    "  local fresh = true\n"
    "  if key ~= '' and win > 0 then\n"
    "    fresh = redis.call('SET', p .. 'dedupe:' .. key, '1', 'NX', 'EX', win)\n"
    "  end\n"
    "  if fresh then\n"
    "    for r = 1, nreq do\n"
    "      redis.call('XADD', p .. ARGV[i] .. ':stream', '*', 'route', ARGV[i + 1], 'app',\n"
    "                 ARGV[i + 2], 'user', ARGV[i + 3], 'per_user', ARGV[i + 4], 'body',\n"
    "                 ARGV[i + 5], 'key', key, 'source', ARGV[i + 6])\n"
    "      if not touched[ARGV[i]] then touched[ARGV[i]] = true; list[#list + 1] = ARGV[i] end\n"
    "      i = i + 7\n"
    "    end\n"
    "    acc = acc + 1\n"
    "  else\n"
    "    i = i + 7 * nreq\n"
    "    dup = dup + 1\n"
    "  end\n"
    "end\n"
    "if #list > 0 then redis.call('PUBLISH', p .. 'wake', table.concat(list, ',')) end\n"
    "return {acc, dup}\n";

/* ARGV: prefix, shard, owner, lease ms, now ms. A free shard is taken: the
 * generation goes up, the former owner's claimed jobs are due now and its
 * pending entries move to this owner (XAUTOCLAIM). Returns the token, or
 * nil when another replica holds the lease. */
static const char acquire_lua[] =
    "#!lua\n"
    "local p, s, owner, ms, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])\n"
    "local pre = p .. s .. ':'\n"
    "if redis.call('EXISTS', pre .. 'lease') == 1 then return false end\n"
    "local gen = redis.call('INCR', pre .. 'gen')\n"
    "local token = gen .. ':' .. owner\n"
    "redis.call('SET', pre .. 'lease', token, 'PX', ms)\n"
    "local sk = pre .. 'stream'\n"
    "redis.pcall('XGROUP', 'CREATE', sk, 'g', '0', 'MKSTREAM')\n"
    "local ids = redis.call('HKEYS', pre .. 'inflight')\n"
    "for _, id in ipairs(ids) do redis.call('ZADD', pre .. 'ready', now, id) end\n"
    "redis.call('DEL', pre .. 'inflight')\n"
    "local cursor, moved = '0-0', 0\n"
    "repeat\n"
    "  local r = redis.call('XAUTOCLAIM', sk, 'g', owner, 0, cursor, 'COUNT', 1000, 'JUSTID')\n"
    "  cursor = r[1]\n"
    "  moved = moved + #r[2]\n"
    "until cursor == '0-0'\n"
    "return {token, #ids, moved}\n";

/* ARGV: prefix, then (shard, token) pairs. Returns per pair 1 when the lease
 * was still the caller's (renewed for ARGV[2] ms), else 0. */
static const char renew_lua[] = "#!lua\n"
                                "local p, ms, out = ARGV[1], ARGV[2], {}\n"
                                "for i = 3, #ARGV, 2 do\n"
                                "  local lk = p .. ARGV[i] .. ':lease'\n"
                                "  if redis.call('GET', lk) == ARGV[i + 1] then\n"
                                "    redis.call('PEXPIRE', lk, ms)\n"
                                "    out[#out + 1] = 1\n"
                                "  else\n"
                                "    out[#out + 1] = 0\n"
                                "  end\n"
                                "end\n"
                                "return out\n";

/* ARGV: prefix, shard, token. Gives the lease up (1), or 0 when it was no
 * longer the caller's. */
static const char release_lua[] = "#!lua\n"
                                  "local lk = ARGV[1] .. ARGV[2] .. ':lease'\n"
                                  "if redis.call('GET', lk) ~= ARGV[3] then return 0 end\n"
                                  "redis.call('DEL', lk)\n"
                                  "return 1\n";

/* ARGV: prefix, now ms, max, tag, then (shard, token, owner) triples. For each
 * shard whose lease is the caller's: new entries are read into the group
 * (XREADGROUP without BLOCK) when fewer than max are due, a per_user entry
 * joining its user's list and becoming ready only as its head; then up to
 * max due ids leave <s>:ready for <s>:inflight, marked with the caller's
 * tag (unique per claim call, for unclaim_lua). Returns per shard
 * {shard, 0} when the lease is not the caller's, else {shard, 1, next due
 * ms ("-1": none; now when more may be due), jobs}, a job being {id, route,
 * app, user, per_user, body, key, attempts, conversation id or "", the run
 * id a retry left in <s>:run or "", the source event or ""}. */
static const char claim_lua[] =
    "#!lua\n"
    "local p, now, left, tag = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]\n"
    "local out = {}\n"
    "local function fields(e)\n"
    "  local f = {}\n"
    "  for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end\n"
    "  return f\n"
    "end\n"
    "for a = 5, #ARGV, 3 do\n"
    "  local s, token, owner = ARGV[a], ARGV[a + 1], ARGV[a + 2]\n"
    "  local pre = p .. s .. ':'\n"
    "  if redis.call('GET', pre .. 'lease') ~= token then\n"
    "    out[#out + 1] = {s, 0}\n"
    "  else\n"
    "    local sk, rk = pre .. 'stream', pre .. 'ready'\n"
    "    local more = false\n"
    "    local due = redis.call('ZCOUNT', rk, '-inf', now)\n"
    "    if due < left then\n"
    "      local want = left - due + 16\n"
    "      local r = redis.call('XREADGROUP', 'GROUP', 'g', owner, 'COUNT', want, 'STREAMS', sk, "
    "'>')\n"
    "      if r and r[1] then\n"
    "        local es = r[1][2]\n"
    "        more = #es >= want\n"
    "        for _, e in ipairs(es) do\n"
    "          local f = fields(e)\n"
    "          local ms = tonumber(string.match(e[1], '^(%d+)'))\n"
    "          if f.per_user == '1' then\n"
    "            local uk = pre .. 'u:' .. #f.app .. ':' .. f.app .. f.user\n"
    "            if redis.call('RPUSH', uk, e[1]) == 1 then redis.call('ZADD', rk, ms, e[1]) end\n"
    "          else\n"
    "            redis.call('ZADD', rk, ms, e[1])\n"
    "          end\n"
    "        end\n"
    "      end\n"
    "    end\n"
    "    local jobs = {}\n"
    "    if left > 0 then\n"
    "      local ids = redis.call('ZRANGEBYSCORE', rk, '-inf', now, 'LIMIT', 0, left)\n"
    "      for _, id in ipairs(ids) do\n"
    "        redis.call('ZREM', rk, id)\n"
    "        local e = redis.call('XRANGE', sk, id, id)[1]\n"
    "        if e then\n"
    "          local f = fields(e)\n"
    "          redis.call('HSET', pre .. 'inflight', id, tag)\n"
    "          local att = redis.call('HGET', pre .. 'meta', id) or '0'\n"
    "          local conv = redis.call('HGET', pre .. 'conv', #f.app .. ':' .. f.app .. f.user) "
    "or ''\n"
    "          local run = redis.call('HGET', pre .. 'run', id) or ''\n"
    "          jobs[#jobs + 1] = {id, f.route, f.app, f.user, f.per_user, f.body, f.key, att, "
    "conv, run, f.source or ''}\n"
    "        end\n"
    "      end\n"
    "      left = left - #jobs\n"
    "    end\n"
    "    local nd = '-1'\n"
    "    if more or left <= 0 then\n"
    "      nd = tostring(now)\n"
    "    else\n"
    "      local first = redis.call('ZRANGE', rk, 0, 0, 'WITHSCORES')\n"
    "      if first[2] then nd = first[2] end\n"
    "    end\n"
    "    out[#out + 1] = {s, 1, nd, jobs}\n"
    "  end\n"
    "end\n"
    "return out\n";

/* ARGV: prefix, tag, now ms, then (shard, token) pairs. Undoes a claim
 * whose answer was lost (the connection failed: the script may have run and
 * no job was handed out): for each shard whose lease is still the caller's,
 * the ids claimed with tag go back to <s>:ready, due now. Returns how many
 * ids went back. */
static const char unclaim_lua[] = "#!lua\n"
                                  "local p, tag, now, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), 0\n"
                                  "for i = 4, #ARGV, 2 do\n"
                                  "  local pre = p .. ARGV[i] .. ':'\n"
                                  "  if redis.call('GET', pre .. 'lease') == ARGV[i + 1] then\n"
                                  "    local all = redis.call('HGETALL', pre .. 'inflight')\n"
                                  "    for j = 1, #all, 2 do\n"
                                  "      if all[j + 1] == tag then\n"
                                  "        redis.call('HDEL', pre .. 'inflight', all[j])\n"
                                  "        redis.call('ZADD', pre .. 'ready', now, all[j])\n"
                                  "        n = n + 1\n"
                                  "      end\n"
                                  "    end\n"
                                  "  end\n"
                                  "end\n"
                                  "return n\n";

/* ARGV: prefix, shard, token, id, kind (delivered, retry, dead, release,
 * waiting), due ms, now ms, http status, code, message, conversation op ("",
 * "set", "clear"), conversation id, result JSON (waiting; "" or absent:
 * none), run id (retry; "" or absent: none). Returns 1 when it landed; 0
 * when the lease is not the caller's, 2 when the job is not claimed (both:
 * nothing changed). A retry or a release keeps the stream entry and puts its
 * id back in <s>:ready at the due time; a retry stores its run id in
 * <s>:run (the next claim hands it back; none clears it), a release stores
 * one it names and otherwise leaves it. Delivered, dead and waiting entries leave the stream (XACK
 * + XDEL; dead ones are copied to the dead letters first, waiting ones with their result to the
 * waiting stream) and the next job of a per_user conversation becomes ready: like the SQLite
 * engine, a waiting job does not hold its user's later jobs back. */
static const char ack_lua[] =
    "#!lua\n"
    "local p, s, token, id, kind = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]\n"
    "local due, now = tonumber(ARGV[6]), tonumber(ARGV[7])\n"
    "local pre = p .. s .. ':'\n"
    "if redis.call('GET', pre .. 'lease') ~= token then return 0 end\n"
    "if redis.call('HDEL', pre .. 'inflight', id) == 0 then return 2 end\n"
    "local sk, rk = pre .. 'stream', pre .. 'ready'\n"
    "local e = redis.call('XRANGE', sk, id, id)[1]\n"
    "if not e then return 2 end\n"
    "local f = {}\n"
    "for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end\n"
    "local ukey = #f.app .. ':' .. f.app .. f.user\n"
    "if ARGV[11] == 'set' then\n"
    "  redis.call('HSET', pre .. 'conv', ukey, ARGV[12])\n"
    "elseif ARGV[11] == 'clear' then\n"
    "  redis.call('HDEL', pre .. 'conv', ukey)\n"
    "end\n"
    "local result, run = ARGV[13] or '', ARGV[14] or ''\n"
    "if kind == 'retry' or kind == 'release' then\n"
    "  if kind == 'retry' then\n"
    "    redis.call('HINCRBY', pre .. 'meta', id, 1)\n"
    "    if run ~= '' then\n"
    "      redis.call('HSET', pre .. 'run', id, run)\n"
    "    else\n"
    "      redis.call('HDEL', pre .. 'run', id)\n"
    "    end\n"
    "  elseif run ~= '' then\n"
    "    redis.call('HSET', pre .. 'run', id, run)\n"
    "  end\n"
    "  redis.call('ZADD', rk, due, id)\n"
    "  return 1\n"
    "end\n"
    "local att = tonumber(redis.call('HGET', pre .. 'meta', id) or '0') + 1\n"
    "if kind == 'dead' or kind == 'waiting' then\n"
    "  redis.call('XADD', p .. kind, '*', 'shard', s, 'route', f.route, 'app', f.app, 'user',\n"
    "             f.user, 'per_user', f.per_user, 'body', f.body, 'key', f.key, 'source',\n"
    "             f.source or '', 'status', ARGV[8],\n"
    "             'code', ARGV[9], 'message', ARGV[10], 'attempts', att, 'created_ms',\n"
    "             string.match(id, '^(%d+)'), 'result', result)\n"
    "else\n"
    "  redis.call('INCR', p .. 'delivered')\n"
    "end\n"
    "redis.call('XACK', sk, 'g', id)\n"
    "redis.call('XDEL', sk, id)\n"
    "redis.call('HDEL', pre .. 'meta', id)\n"
    "redis.call('HDEL', pre .. 'run', id)\n"
    "if f.per_user == '1' then\n"
    "  local uk = pre .. 'u:' .. ukey\n"
    "  redis.call('LREM', uk, 1, id)\n"
    "  local nxt = redis.call('LINDEX', uk, 0)\n"
    "  if nxt then redis.call('ZADD', rk, now, nxt) end\n"
    "end\n"
    "return 1\n";

/* ARGV: prefix, the stream the rows are in ("dead" or "waiting"), then
 * (row id, shard) pairs. Each row goes back to its shard's stream as a new
 * job (a fresh schedule: attempts 0, no run id, no result) and leaves its
 * stream. Returns the number moved. */
static const char replay_lua[] =
    "#!lua\n"
    "local p, n = ARGV[1], 0\n"
    "local from = p .. ARGV[2]\n"
    "for i = 3, #ARGV, 2 do\n"
    "  local e = redis.call('XRANGE', from, ARGV[i], ARGV[i])[1]\n"
    "  if e then\n"
    "    local f = {}\n"
    "    for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end\n"
    "    redis.call('XADD', p .. ARGV[i + 1] .. ':stream', '*', 'route', f.route, 'app', f.app,\n"
    "               'user', f.user, 'per_user', f.per_user, 'body', f.body, 'key', f.key,\n"
    "               'source', f.source or '')\n"
    "    redis.call('XDEL', from, ARGV[i])\n"
    "    n = n + 1\n"
    "  end\n"
    "end\n"
    "return n\n";

static const char *const texts[RQ_NSCRIPTS] = {
    [RQ_ACCEPT] = accept_lua,   [RQ_ACQUIRE] = acquire_lua, [RQ_RENEW] = renew_lua,
    [RQ_RELEASE] = release_lua, [RQ_CLAIM] = claim_lua,     [RQ_ACK] = ack_lua,
    [RQ_REPLAY] = replay_lua,   [RQ_UNCLAIM] = unclaim_lua,
};

const char *amp_redisq_script(int script) {
    return texts[script];
}
