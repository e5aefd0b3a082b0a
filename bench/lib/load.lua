-- wrk script for the benchmark. BENCH_MODE=connect cycles POST /v1/connect over
-- the users in BENCH_REQUESTS ("<token> <device id>" per line), each from the
-- same client location; BENCH_MODE=regions sends GET /v1/regions. done() prints
-- one JSON line with the figures the harness reads.
local mode = os.getenv("BENCH_MODE") or "connect"
local path = os.getenv("BENCH_REQUESTS")
local reqs = {}
local i = 0

function init(args)
  if mode == "regions" or mode == "healthz" then
    reqs[1] = wrk.format("GET", mode == "regions" and "/v1/regions" or "/healthz")
    return
  end
  for line in io.lines(path) do
    local token, device = line:match("^(%S+) (%S+)$")
    if token then
      reqs[#reqs + 1] = wrk.format("POST", "/v1/connect", {
        ["authorization"] = "Bearer " .. token,
        ["content-type"] = "application/json",
        ["x-keenvpn-client-location"] = "50.11,8.68",
      }, '{"device_id":"' .. device .. '"}')
    end
  end
end

function request()
  i = i % #reqs + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
