-- wrk script: POST a JSON body read from a file, with the bearer token from the
-- environment (BENCH_TOKEN; never argv).
--   BENCH_TOKEN=... wrk ... -s bench/wrk/post.lua URL -- BODY_FILE
-- done() prints one machine-readable line, WRK_JSON {...}, with exact percentiles in
-- microseconds (wrk's own text rounds them), parsed by bench/stats.py.

local req

function init(args)
   local f = assert(io.open(args[1], "rb"))
   local body = f:read("*a")
   f:close()
   local headers = { ["Content-Type"] = "application/json" }
   local token = os.getenv("BENCH_TOKEN")
   if token ~= nil and token ~= "" then
      headers["Authorization"] = "Bearer " .. token
   end
   req = wrk.format("POST", nil, headers, body)
end

function request()
   return req
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"max":%d,"mean":%.3f,"stdev":%.3f,' ..
      '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.max, latency.mean, latency.stdev,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
