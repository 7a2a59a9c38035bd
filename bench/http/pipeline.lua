-- wrk script for bench/http_compare: HTTP/1.1 pipelining, N requests per write (default 16), as
-- TechEmpower's plaintext test sends them:
--   wrk -t1 -c100 -d10s -s bench/http/pipeline.lua http://127.0.0.1:PORT/plaintext -- 16
-- Every request is the same 44 bytes, whatever the URL's host and port; wrk counts each response
-- as a request.
local request_bytes = "GET /plaintext HTTP/1.1\r\nHost: localhost\r\n\r\n"
local batch

function init(args)
  local depth = tonumber(args[1]) or 16
  batch = string.rep(request_bytes, depth)
end

function request()
  return batch
end
