-- ingest.lua — wrk script for the ingest benchmark (bench/run.sh).
--
--   BENCH_LABEL=L wrk -t T -c C -d D -s bench/ingest.lua URL -- CORPUS T
--
-- CORPUS is sign_corpus's output, one request a line:
--   <timestamp> TAB <hex HMAC> TAB <JSON body>
-- Thread k (0-based) keeps the lines i with i % T == k, so no two threads
-- send the same insert_id, and cycles through them; a thread that runs out
-- starts again from its first line (those events then count as duplicates)
-- and says so in "wrapped". Every request is built once, at load time, so
-- the client spends as little as possible per request: the baseline server
-- answers fast enough for wrk's own cost to show.
--
-- Start barrier. wrk runs each thread's init() on its main thread, one
-- after the other, and starts thread k as soon as its init returns, but
-- starts the clock only after the last one. Loading a large corpus takes a
-- noticeable fraction of a second per thread, so the first threads would
-- send for that long before the clock starts and inflate requests/s. With
-- LuaJIT's FFI (Debian's wrk has it), each init bumps a counter shared by
-- all threads, and a thread's first request waits (sleeping in 1 ms steps,
-- at most 60 s) until every init has finished. Without the FFI the run goes
-- on without the barrier and done() says barrier=off.
--
-- done() prints one line that run.sh parses:
--   BENCH label=L requests=N duration_us=U rps=R p50_us=A p99_us=B non2xx=K
--         socket_errors=E wrapped=W barrier=on statuses=503:7 first_error=<status body>

local has_ffi, ffi = pcall(require, "ffi")
if has_ffi then
   ffi.cdef [[
      void *calloc(size_t nmemb, size_t size);
      int usleep(unsigned int usec);
      unsigned long pthread_self(void);
   ]]
end

-- ---- main state: setup() and done() ----------------------------------

local threads = {}
local next_id = 0
local shared_addr = 0 -- main state's copy; threads see it as the global barrier_addr

function setup(thread)
   if has_ffi and shared_addr == 0 then
      -- Never freed: it must outlive every thread, and wrk exits after done().
      shared_addr = tonumber(ffi.cast("intptr_t", ffi.C.calloc(1, 8)))
   end
   thread:set("id", next_id)
   thread:set("barrier_addr", shared_addr)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function done(summary, latency, requests)
   -- done() runs in wrk's main Lua state, which never sees init's args.
   local label = os.getenv("BENCH_LABEL") or "run"
   local total_non2xx, total_wrapped = 0, 0
   local merged, first = {}, ""
   for _, t in ipairs(threads) do
      total_non2xx = total_non2xx + (t:get("non2xx") or 0)
      total_wrapped = total_wrapped + (t:get("wrapped") or 0)
      for code, n in (t:get("statuses") or ""):gmatch("(%d+):(%d+)") do
         merged[code] = (merged[code] or 0) + tonumber(n)
      end
      if first == "" then first = t:get("first_error") or "" end
   end
   local parts = {}
   for code, n in pairs(merged) do parts[#parts + 1] = code .. ":" .. n end
   table.sort(parts)
   local e = summary.errors
   io.write(string.format(
      "BENCH label=%s requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d " ..
      "non2xx=%d socket_errors=%d wrapped=%d barrier=%s statuses=%s first_error=%s\n",
      label, summary.requests, summary.duration,
      summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(99), total_non2xx,
      e.connect + e.read + e.write + e.timeout, total_wrapped,
      shared_addr ~= 0 and "on" or "off",
      #parts > 0 and table.concat(parts, ",") or "-",
      first ~= "" and first or "-"))
end

-- ---- thread states: init(), request(), response() ----------------------
-- (id and barrier_addr are globals set by setup() through thread:set.)

local reqs, nreqs, pos = {}, 0, 0
local nthreads = 1
local barrier = nil     -- int * shared by all threads, when the FFI exists
local init_tid = nil    -- wrk's main thread, which runs init()
local waited = false
local status_counts = {}
wrapped = 0
non2xx = 0
statuses = ""
first_error = ""

function init(args)
   local corpus = args[1]
   nthreads = tonumber(args[2] or "")
   if not corpus or not nthreads then
      error("usage: wrk ... -s ingest.lua URL -- CORPUS NTHREADS")
   end
   local path = wrk.path
   if path == nil or path == "" then path = "/" end
   local host = wrk.headers["Host"] or wrk.host
   local head = "POST " .. path .. " HTTP/1.1\r\nHost: " .. host ..
                "\r\nContent-Type: application/json\r\nContent-Length: "
   local i = 0
   for line in io.lines(corpus) do
      if i % nthreads == id then
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
      error("ingest.lua: no requests for thread " .. id .. " in " .. corpus)
   end
   if barrier_addr ~= 0 then
      barrier = ffi.cast("volatile int *", barrier_addr)
      init_tid = ffi.C.pthread_self()
      barrier[0] = barrier[0] + 1 -- inits run one at a time on the main thread
   end
end

function request()
   if barrier then
      -- wrk also calls thread 0's request() once on the main thread, to
      -- check for pipelining, before the other inits: never wait there,
      -- and do not use up a request.
      if ffi.C.pthread_self() == init_tid then return reqs[1] end
      if not waited then
         waited = true
         local n = 0
         while barrier[0] < nthreads and n < 60000 do
            ffi.C.usleep(1000)
            n = n + 1
         end
      end
   end
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
         first_error = status .. " " .. (body or ""):gsub("%s+", " "):sub(1, 200)
      end
   end
end
