-- ingest.lua — wrk script for the ingest benchmark (bench/run.sh).
--
--   BENCH_LABEL=L wrk -t T -c C -d D -s bench/ingest.lua URL -- CORPUS T
--
-- CORPUS is sign_corpus's output, one request a line:
--   <timestamp> TAB <hex HMAC> TAB <JSON body>
-- Thread k (0-based) keeps the lines i with i % T == k, so no two threads
-- send the same insert_id, and cycles through them; a thread that runs out
-- starts again from its first line (the events then count as duplicates)
-- and says so in "wrapped". Every request is built once, at load time, so
-- the client spends as little as possible per request: the baseline server
-- answers fast enough for wrk's own cost to show.
--
-- done() prints one line that run.sh parses:
--   BENCH label=L requests=N duration_us=U rps=R p50_us=A p99_us=B non2xx=K
--         socket_errors=E wrapped=W statuses=404:3,503:7 first_error=<body>

local threads = {}   -- main state: one entry per thread, filled by setup()
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state).
local reqs = {}
local nreqs = 0
local pos = 0
wrapped = 0
non2xx = 0
statuses = ""        -- "status:count,..." of non-2xx answers, built in done()
first_error = ""
local status_counts = {}

function init(args)
   local corpus = args[1]
   local nthreads = tonumber(args[2])
   if not corpus or not nthreads then
      error("usage: wrk ... -s ingest.lua URL -- CORPUS NTHREADS")
   end
   local me = id
   local path = wrk.path
   if path == nil or path == "" then path = "/" end
   local host = wrk.headers["Host"] or wrk.host
   local head = "POST " .. path .. " HTTP/1.1\r\nHost: " .. host ..
                "\r\nContent-Type: application/json\r\nContent-Length: "
   local i = 0
   for line in io.lines(corpus) do
      if i % nthreads == me then
         local ts, sig, body = line:match("^(%d+)\t(%x+)\t(.*)$")
         if ts then
            nreqs = nreqs + 1
            reqs[nreqs] = head .. #body .. "\r\nX-Amplitude-Timestamp: " .. ts ..
                          "\r\nX-Amplitude-Sig: sha256=" .. sig .. "\r\n\r\n" .. body
         end
      end
      i = i + 1
   end
   if nreqs == 0 then
      error("ingest.lua: no requests for thread " .. me .. " in " .. corpus)
   end
end

function request()
   pos = pos + 1
   if pos > nreqs then
      pos = 1
      wrapped = wrapped + 1
   end
   return reqs[pos]
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      status_counts[status] = (status_counts[status] or 0) + 1
      local parts = {}
      for s, n in pairs(status_counts) do parts[#parts + 1] = s .. ":" .. n end
      statuses = table.concat(parts, ",")
      if first_error == "" then
         first_error = tostring(status) .. " " .. (body or ""):gsub("[\r\n]", " "):sub(1, 200)
      end
   end
end

function done(summary, latency, requests)
   -- done() runs in wrk's main Lua state, which never sees init's args.
   local label = os.getenv("BENCH_LABEL") or "run"
   local total_non2xx, total_wrapped = 0, 0
   local merged = {}
   local first = ""
   for _, t in ipairs(threads) do
      total_non2xx = total_non2xx + (t:get("non2xx") or 0)
      total_wrapped = total_wrapped + (t:get("wrapped") or 0)
      local s = t:get("statuses") or ""
      for code, n in s:gmatch("(%d+):(%d+)") do
         merged[code] = (merged[code] or 0) + tonumber(n)
      end
      local fe = t:get("first_error") or ""
      if first == "" then first = fe end
   end
   local parts = {}
   for code, n in pairs(merged) do parts[#parts + 1] = code .. ":" .. n end
   table.sort(parts)
   local e = summary.errors
   local socket_errors = e.connect + e.read + e.write + e.timeout
   local secs = summary.duration / 1e6
   io.write(string.format(
      "BENCH label=%s requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d " ..
      "non2xx=%d socket_errors=%d wrapped=%d statuses=%s first_error=%s\n",
      label, summary.requests, summary.duration, summary.requests / secs,
      latency:percentile(50), latency:percentile(99), total_non2xx, socket_errors,
      total_wrapped, (#parts > 0) and table.concat(parts, ",") or "-",
      (first ~= "") and first or "-"))
end
