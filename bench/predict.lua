-- wrk script for bench/predict.sh and bench/run.sh.
-- Environment (read once per wrk thread):
--   BENCH_MODE     ping | chatflow | anon | predict | stream
--                  ping: GET /api/v1/ping with a bearer token (authenticated
--                  pass-through); chatflow: GET /api/v1/chatflows/{id} with a
--                  bearer token (authenticated read of a granted chatflow);
--                  anon: GET /api/v1/chatflows-streaming/{id} without a token
--                  (unauthenticated pass-through, the same size of answer as
--                  ping); predict: debited JSON POST /api/v1/prediction/{id};
--                  stream: the same with "streaming":true
--   BENCH_TOKENS   file with one bearer token per line
--   BENCH_HOT      1 = use only the first token (one hot user)
--   BENCH_CHATFLOW chatflow id
--   BENCH_EVENTS   stream mode: events per stream (default 50). The Flowise
--                  double streams one event per word of the question plus
--                  five (start, two answer prefix tokens, metadata, end).
-- Each request uses the next token (round-robin, offset per thread so threads
-- do not march in step).

local mode = os.getenv("BENCH_MODE") or "ping"
local tokens_file = os.getenv("BENCH_TOKENS")
local hot = os.getenv("BENCH_HOT") == "1"
local chatflow = os.getenv("BENCH_CHATFLOW") or ""
local events = tonumber(os.getenv("BENCH_EVENTS") or "50")

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

if mode == "stream" then
  local words = {}
  for w = 1, math.max(events - 5, 1) do
    words[w] = "w" .. w
  end
  body = '{"question":"' .. table.concat(words, " ") .. '","streaming":true}'
end

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
  if mode == "predict" or mode == "stream" then
    path = "/api/v1/prediction/" .. chatflow
  elseif mode == "anon" then
    path = "/api/v1/chatflows-streaming/" .. chatflow
  elseif mode == "chatflow" then
    path = "/api/v1/chatflows/" .. chatflow
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
  if mode == "predict" or mode == "stream" then
    headers["Content-Type"] = "application/json"
    return wrk.format("POST", path, headers, body)
  end
  return wrk.format("GET", path, headers, nil)
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  io.write(string.format(
    "RESULT mode=%s users=%s requests=%d secs=%.3f req_per_s=%.0f p50_ms=%.2f p99_ms=%.2f errors=%d non2xx=%d\n",
    mode, mode == "anon" and "0" or (hot and "1(hot)" or tostring(#tokens)), summary.requests, secs,
    summary.requests / secs, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
