-- wrk script for bench/predict.sh.
-- Environment (read once per wrk thread):
--   BENCH_MODE     ping | anon | predict
--                  ping: GET /api/v1/ping with a bearer token (authenticated
--                  pass-through); anon: GET /api/v1/chatflows-streaming/{id}
--                  without a token (unauthenticated pass-through, the same
--                  size of answer); predict: debited POST /api/v1/prediction/{id}
--   BENCH_TOKENS   file with one bearer token per line
--   BENCH_HOT      1 = use only the first token (one hot user)
--   BENCH_CHATFLOW chatflow id for predict mode
-- Each request uses the next token (round-robin, offset per thread so threads
-- do not march in step).

local mode = os.getenv("BENCH_MODE") or "ping"
local tokens_file = os.getenv("BENCH_TOKENS")
local hot = os.getenv("BENCH_HOT") == "1"
local chatflow = os.getenv("BENCH_CHATFLOW") or ""

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_index", thread_count)
  table.insert(threads, thread)
end

local tokens = {}
local i = 0
local body = '{"question":"benchmark","streaming":false}'
local path

-- Loaded at the top level: every thread's state, and the main one that runs
-- done(), has the tokens.
for line in io.lines(tokens_file) do
  line = line:gsub("%s+$", "")
  if line ~= "" then
    table.insert(tokens, line)
    if hot then break end
  end
end
if #tokens == 0 then
  error("no tokens in " .. tostring(tokens_file))
end

function init(args)
  i = ((thread_index or 1) * 7919) % #tokens
  if mode == "predict" then
    path = "/api/v1/prediction/" .. chatflow
  elseif mode == "anon" then
    path = "/api/v1/chatflows-streaming/" .. chatflow
  else
    path = "/api/v1/ping"
  end
end

function request()
  if mode == "anon" then
    return wrk.format("GET", path, {}, nil)
  end
  i = i % #tokens + 1
  local headers = { ["Authorization"] = "Bearer " .. tokens[i] }
  if mode == "predict" then
    headers["Content-Type"] = "application/json"
    return wrk.format("POST", path, headers, body)
  end
  return wrk.format("GET", path, headers, nil)
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  io.write(string.format(
    "RESULT mode=%s users=%s requests=%d req_per_s=%.0f p50_ms=%.2f p99_ms=%.2f errors=%d non2xx=%d\n",
    mode, mode == "anon" and "0" or (hot and "1(hot)" or tostring(#tokens)), summary.requests, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
