// Fuzz target: the HTTP/1.1 request parser of examples/http_server.cpp (examples/http_parser.hpp).
// The input's first byte says how many split points follow (0 to 8, two bytes each); the rest is
// a byte stream from a client. It is fed to a parser whole, then to another in the pieces the
// split points make, the way Connection feeds on_data: what was not consumed comes back in front
// of the next piece. Each call's bytes sit at the end of a buffer of exactly their size, so ASan
// reports any read past them. Invariants: a complete request lies inside the bytes given, within
// the header and body limits, and parses the same alone; consumed bytes never exceed those fed; a
// partial request never outgrows the limits (http_server's max_pending_input is never reached);
// an error is one of the documented statuses and sticks; and pieces give the same requests, error
// and leftover as the whole.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_input.hpp"
#include "http_parser.hpp"

namespace {

// A complete request, copied out of the buffer it pointed into.
struct Parsed {
  std::string method;
  std::string target;
  int minor_version;
  bool keep_alive;
  std::string headers;
  std::string body;
  std::size_t size;
  bool operator==(const Parsed&) const = default;
};

struct Outcome {
  std::vector<Parsed> requests;
  int status = 0;           // the error's status; 0 if none
  std::size_t pending = 0;  // bytes left unconsumed at the end; 0 after an error
  bool operator==(const Outcome&) const = default;
};

bool inside(std::string_view part, std::string_view whole) {
  return part.empty() ||
         (part.data() >= whole.data() && part.data() + part.size() <= whole.data() + whole.size());
}

// Checks a complete request against the bytes it came from, and returns a copy of it.
Parsed check_request(const http::Request& request, std::string_view bytes) {
  FUZZ_CHECK(request.size >= 4 && request.size <= bytes.size());
  const std::string_view taken = bytes.substr(0, request.size);
  FUZZ_CHECK(!request.method.empty() && request.method.data() == bytes.data());
  FUZZ_CHECK(!request.target.empty() && inside(request.target, taken));
  FUZZ_CHECK(inside(request.headers, taken));
  FUZZ_CHECK(request.body.size() <= http::kMaxBodyBytes);
  FUZZ_CHECK(request.size - request.body.size() <= http::kMaxHeaderBytes);
  FUZZ_CHECK(taken.ends_with(request.body) &&
             (request.body.empty() || inside(request.body, taken)));
  FUZZ_CHECK(request.minor_version == 0 || request.minor_version == 1);
  return {std::string(request.method),
          std::string(request.target),
          request.minor_version,
          request.keep_alive,
          std::string(request.headers),
          std::string(request.body),
          request.size};
}

// Feeds `stream` to a fresh parser in pieces ending at `cuts` (ascending, within the stream) and
// at its end.
Outcome feed(std::string_view stream, std::vector<std::size_t> cuts) {
  http::RequestParser parser;
  Outcome outcome;
  std::string pending;
  std::size_t fed = 0;
  std::size_t consumed_total = 0;
  cuts.push_back(stream.size());
  for (const std::size_t cut : cuts) {
    pending.append(stream.substr(fed, cut - fed));
    fed = cut;
    // Exactly pending.size() bytes on the heap: a read past them is a heap overflow.
    const std::unique_ptr<char[]> buffer(new char[pending.size() + 1]);
    char* const exact = buffer.get() + 1;  // an empty buffer still has a valid pointer
    std::memcpy(exact, pending.data(), pending.size());
    const std::string_view bytes(exact, pending.size());
    std::size_t consumed = 0;
    for (;;) {
      const std::string_view rest = bytes.substr(consumed);
      http::Request request;
      const http::ParseResult result = parser.parse(rest, request);
      if (result == http::ParseResult::kIncomplete) {
        // What on_data would leave: a head not yet 8 KiB, or a head and a body within the limit.
        FUZZ_CHECK(rest.size() < http::kMaxHeaderBytes + http::kMaxBodyBytes);
        break;
      }
      if (result == http::ParseResult::kError) {
        const int status = parser.status();
        FUZZ_CHECK(status == 400 || status == 413 || status == 431 || status == 501 ||
                   status == 505);
        FUZZ_CHECK(parser.parse(rest, request) == http::ParseResult::kError);
        FUZZ_CHECK(parser.parse("GET / HTTP/1.0\r\n\r\n", request) == http::ParseResult::kError);
        FUZZ_CHECK(parser.status() == status);
        outcome.status = status;
        return outcome;
      }
      outcome.requests.push_back(check_request(request, rest));
      // The request's bytes alone parse to the same request.
      http::RequestParser alone;
      http::Request again;
      FUZZ_CHECK(alone.parse(rest.substr(0, request.size), again) == http::ParseResult::kComplete);
      FUZZ_CHECK(check_request(again, rest) == outcome.requests.back());
      consumed += request.size;
    }
    consumed_total += consumed;
    FUZZ_CHECK(consumed <= pending.size() && consumed_total <= fed);
    pending.erase(0, consumed);
  }
  outcome.pending = pending.size();
  return outcome;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::FuzzInput input(data, size);
  const std::size_t cut_count = input.below(9);
  std::vector<std::uint16_t> raw_cuts;
  for (std::size_t i = 0; i < cut_count; ++i) raw_cuts.push_back(input.u16());
  const std::size_t header = std::min(size, 1 + 2 * cut_count);
  const std::string_view stream(reinterpret_cast<const char*>(data) + header, size - header);

  std::vector<std::size_t> cuts;
  for (const std::uint16_t raw : raw_cuts) cuts.push_back(raw % (stream.size() + 1));
  std::sort(cuts.begin(), cuts.end());

  const Outcome whole = feed(stream, {});
  FUZZ_CHECK(feed(stream, cuts) == whole);
  // Byte by byte too, for short streams (each byte a piece).
  if (stream.size() <= 512) {
    std::vector<std::size_t> every;
    for (std::size_t i = 1; i < stream.size(); ++i) every.push_back(i);
    FUZZ_CHECK(feed(stream, every) == whole);
  }
  return 0;
}
