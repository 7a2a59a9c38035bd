// Tests for examples/http_parser.hpp, the HTTP/1.1 request parser of examples/http_server.cpp:
// requests alone, pipelined and split at every offset (fed as Connection feeds on_data: what was
// not consumed comes back in front of the next piece), every error status at its exact boundary,
// header names in any case, and keep-alive for HTTP/1.0 and HTTP/1.1.
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "catch.hpp"
#include "http_parser.hpp"

using namespace std::string_view_literals;

namespace {

// A parsed request with its own copies of the bytes.
struct Parsed {
  std::string method;
  std::string target;
  int minor_version = 0;
  bool keep_alive = false;
  std::string body;
  std::size_t size = 0;
  bool operator==(const Parsed&) const = default;
};

Parsed copy(const http::Request& request) {
  return {std::string(request.method), std::string(request.target), request.minor_version,
          request.keep_alive,          std::string(request.body),   request.size};
}

// What a parser made of a whole input.
struct Outcome {
  std::vector<Parsed> requests;
  int status = 0;           // the error status; 0 if none
  std::size_t pending = 0;  // bytes left unconsumed at the end (a partial request); 0 on error
  bool operator==(const Outcome&) const = default;
};

// Feeds `input` to a fresh parser in pieces that end at `cuts` (ascending) and at the end, the
// way a Connection calls on_data: each call gets what was left unconsumed, then the new piece;
// every complete request is consumed.
Outcome feed(std::string_view input, std::vector<std::size_t> cuts = {}) {
  http::RequestParser parser;
  Outcome outcome;
  std::string pending;
  std::size_t begin = 0;
  cuts.push_back(input.size());
  for (const std::size_t cut : cuts) {
    pending.append(input.substr(begin, cut - begin));
    begin = cut;
    std::size_t consumed = 0;
    for (;;) {
      http::Request request;
      const http::ParseResult result =
          parser.parse(std::string_view(pending).substr(consumed), request);
      if (result == http::ParseResult::kIncomplete) break;
      if (result == http::ParseResult::kError) {
        outcome.status = parser.status();
        return outcome;
      }
      outcome.requests.push_back(copy(request));
      consumed += request.size;
    }
    pending.erase(0, consumed);
  }
  outcome.pending = pending.size();
  return outcome;
}

// Every byte on its own.
Outcome feed_bytewise(std::string_view input) {
  std::vector<std::size_t> cuts;
  for (std::size_t i = 1; i < input.size(); ++i) cuts.push_back(i);
  return feed(input, cuts);
}

// The error status a fresh parser gives `input` (fed whole); 0 if none.
int status_of(std::string_view input) {
  return feed(input).status;
}

constexpr std::string_view kGet = "GET /plaintext HTTP/1.1\r\nHost: example.com\r\n\r\n";
constexpr std::string_view kPost =
    "POST /echo?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world";
constexpr std::string_view kGet10 = "GET /json HTTP/1.0\r\n\r\n";

// A request whose head (request line through the empty line) is `head_size` bytes.
std::string request_with_head_size(std::size_t head_size) {
  const std::string start = "GET / HTTP/1.1\r\nHost: h\r\nX-Pad: ";
  const std::string end = "\r\n\r\n";
  return start + std::string(head_size - start.size() - end.size(), 'a') + end;
}

// A POST whose Content-Length is `length`, with that many body bytes.
std::string post_with_body(std::size_t length) {
  return "POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: " + std::to_string(length) +
         "\r\n\r\n" + std::string(length, 'b');
}

}  // namespace

TEST_CASE("one request is parsed into method target version headers and no body",
          "[http][parser]") {
  http::RequestParser parser;
  http::Request request;
  REQUIRE(parser.parse(kGet, request) == http::ParseResult::kComplete);
  CHECK(request.method == "GET");
  CHECK(request.target == "/plaintext");
  CHECK(request.minor_version == 1);
  CHECK(request.keep_alive);
  CHECK(request.headers == "Host: example.com\r\n");
  CHECK(request.header("Host") == "example.com");
  CHECK(request.header("Content-Length").empty());
  CHECK(request.body.empty());
  CHECK(request.size == kGet.size());
  // The fields point into the input: nothing was copied.
  CHECK(request.method.data() == kGet.data());
  CHECK(parser.status() == 0);
}

TEST_CASE("a POST body of Content-Length bytes is returned and what follows is left",
          "[http][parser]") {
  const std::string input = std::string(kPost) + "GET";
  http::RequestParser parser;
  http::Request request;
  REQUIRE(parser.parse(input, request) == http::ParseResult::kComplete);
  CHECK(request.method == "POST");
  CHECK(request.target == "/echo?x=1");
  CHECK(request.body == "hello world");
  CHECK(request.size == kPost.size());
  CHECK(parser.parse(std::string_view(input).substr(request.size), request) ==
        http::ParseResult::kIncomplete);
}

TEST_CASE("pipelined requests in one buffer come out in order", "[http][parser]") {
  std::string input;
  for (int i = 0; i < 16; ++i) {
    input += "GET /" + std::to_string(i) + " HTTP/1.1\r\nHost: h\r\n\r\n";
  }
  input += kPost;
  input += kGet10;
  const Outcome outcome = feed(input);
  REQUIRE(outcome.requests.size() == 18);
  for (int i = 0; i < 16; ++i) CHECK(outcome.requests[i].target == "/" + std::to_string(i));
  CHECK(outcome.requests[16].body == "hello world");
  CHECK(outcome.requests[17] == Parsed{"GET", "/json", 0, false, "", kGet10.size()});
  CHECK(outcome.status == 0);
  CHECK(outcome.pending == 0);
}

TEST_CASE("input split at every offset gives the same requests as whole input",
          "[http][parser][split]") {
  constexpr std::string_view kPartial = "GET /partial HTTP/1.1\r\nHo";
  const std::string input =
      std::string(kGet) + std::string(kPost) + std::string(kGet10) + std::string(kPartial);
  const Outcome whole = feed(input);
  REQUIRE(whole.requests.size() == 3);
  CHECK(whole.requests[0] == Parsed{"GET", "/plaintext", 1, true, "", kGet.size()});
  CHECK(whole.requests[1] == Parsed{"POST", "/echo?x=1", 1, true, "hello world", kPost.size()});
  CHECK(whole.requests[2] == Parsed{"GET", "/json", 0, false, "", kGet10.size()});
  CHECK(whole.pending == kPartial.size());

  CHECK(feed_bytewise(input) == whole);
  for (std::size_t first = 1; first < input.size(); ++first) {
    INFO("split at " << first);
    REQUIRE(feed(input, {first}) == whole);
    for (std::size_t second = first + 1; second < input.size(); second += 7) {
      INFO("and at " << second);
      REQUIRE(feed(input, {first, second}) == whole);
    }
  }
}

TEST_CASE("a split body completes only with its last byte", "[http][parser][split]") {
  const std::string head = "POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n";
  const std::string input = head + "abcde";
  http::RequestParser parser;
  http::Request request;
  for (std::size_t size = 0; size < input.size(); ++size) {
    INFO("bytes " << size);
    REQUIRE(parser.parse(std::string_view(input).substr(0, size), request) ==
            http::ParseResult::kIncomplete);
  }
  REQUIRE(parser.parse(input, request) == http::ParseResult::kComplete);
  CHECK(request.body == "abcde");
  CHECK(request.size == input.size());
}

TEST_CASE("every error is found the same whole or byte by byte", "[http][parser][split]") {
  const std::vector<std::string> inputs = {
      "GET / HTTP/1.1\nHost: h\r\n\r\n",
      std::string(kGet) + "GET / HTTP/2.0\r\n\r\n",
      "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1048577\r\n\r\n",
      "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
      request_with_head_size(http::kMaxHeaderBytes + 1),
  };
  for (const std::string& input : inputs) {
    INFO(input.substr(0, 80));
    const Outcome whole = feed(input);
    CHECK(whole.status != 0);
    CHECK(feed_bytewise(input) == whole);
  }
}

TEST_CASE("malformed request lines and header lines get 400", "[http][parser][errors]") {
  const std::vector<std::string> inputs = {
      "GET\r\nHost: h\r\n\r\n",                 // no target, no version
      "GET /\r\nHost: h\r\n\r\n",               // no version
      "GET  / HTTP/1.1\r\nHost: h\r\n\r\n",     // two spaces: an empty target
      "GET / x HTTP/1.1\r\nHost: h\r\n\r\n",    // a space in the target
      "G(T / HTTP/1.1\r\nHost: h\r\n\r\n",      // not a token
      " GET / HTTP/1.1\r\nHost: h\r\n\r\n",     // leading space
      "\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",  // an empty line first
      "GET / http/1.1\r\nHost: h\r\n\r\n",      // the name is case-sensitive
      "GET / HTTP/1.10\r\nHost: h\r\n\r\n",     // more than one digit
      "GET / HTTP/1\r\nHost: h\r\n\r\n",        // no minor version
      "GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n",  // DEL in the target
      "GET / HTTP/1.1\r\nHost : h\r\n\r\n",     // whitespace before the colon
      "GET / HTTP/1.1\r\nHost: h\r\nNo colon\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: h\r\n: empty name\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n",         // obs-fold
      std::string("GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n"sv),  // NUL in a value
      "GET / HTTP/1.1\r\nHost: h\r\nX: \x01\r\n\r\n",
      "GET / HTTP/1.1\r\n\r\n",                        // HTTP/1.1 without Host
      "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",  // two Hosts
      "GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
  };
  for (const std::string& input : inputs) {
    INFO(input);
    CHECK(status_of(input) == 400);
  }
}

TEST_CASE("bare LF and bare CR get 400 as soon as they arrive", "[http][parser][errors]") {
  for (const std::string_view input :
       {"GET / HTTP/1.1\nHost: h\n\n", "GET / HTTP/1.1\r\nHost: h\n", "GET / HTTP/1.1\rHost", "\n",
        "GET / HTTP/1.1\r\nHost: h\r\n\n", "GET / HTTP/1.1\r\nHost: h\r\n\r\r"}) {
    INFO(input);
    // No need to wait for the end of the head: the line that is bad is enough.
    CHECK(status_of(input) == 400);
  }
}

TEST_CASE("Content-Length that is not digits or comes twice gets 400", "[http][parser][errors]") {
  const std::string head = "POST /echo HTTP/1.1\r\nHost: h\r\n";
  for (const std::string_view field :
       {"Content-Length: -1", "Content-Length: +1", "Content-Length: 1x",
        "Content-Length:", "Content-Length: 1 1", "Content-Length: 1,1", "Content-Length: 0x10",
        "Content-Length: 1\r\nContent-Length: 1", "content-length: 1\r\nCONTENT-LENGTH: 2"}) {
    INFO(field);
    CHECK(status_of(head + std::string(field) + "\r\n\r\nx") == 400);
  }
  // Leading zeros and whitespace around the value are fine.
  const Outcome outcome = feed(head + "Content-Length: \t007 \r\n\r\nabcdefg");
  REQUIRE(outcome.requests.size() == 1);
  CHECK(outcome.requests[0].body == "abcdefg");
}

TEST_CASE("the head may be 8 KiB exactly and not one byte more", "[http][parser][limits]") {
  const std::string fits = request_with_head_size(http::kMaxHeaderBytes);
  REQUIRE(fits.size() == 8192);
  const Outcome outcome = feed(fits);
  REQUIRE(outcome.requests.size() == 1);
  CHECK(outcome.requests[0].size == 8192);
  CHECK(outcome.status == 0);

  const std::string too_big = request_with_head_size(http::kMaxHeaderBytes + 1);
  CHECK(status_of(too_big) == 431);
  // 431 comes as soon as 8 KiB are there without the end of the head, not later.
  http::RequestParser parser;
  http::Request request;
  CHECK(parser.parse(std::string_view(too_big).substr(0, 8191), request) ==
        http::ParseResult::kIncomplete);
  CHECK(parser.parse(std::string_view(too_big).substr(0, 8192), request) ==
        http::ParseResult::kError);
  CHECK(parser.status() == 431);
  CHECK(status_of(std::string(100000, 'A')) == 431);
}

TEST_CASE("a body may be 1 MiB exactly and not one byte more", "[http][parser][limits]") {
  const std::string fits = post_with_body(http::kMaxBodyBytes);
  const Outcome outcome = feed(fits, {100, 5000, 70000, 600000});
  REQUIRE(outcome.requests.size() == 1);
  CHECK(outcome.requests[0].body == std::string(1024 * 1024, 'b'));
  CHECK(outcome.status == 0);

  // 413 comes with the head: the body is not waited for.
  const std::string too_big = post_with_body(http::kMaxBodyBytes + 1);
  const std::size_t head_size = too_big.find("\r\n\r\n") + 4;
  const Outcome refused = feed(std::string_view(too_big).substr(0, head_size));
  CHECK(refused.status == 413);
  CHECK(refused.requests.empty());
  CHECK(status_of(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999999\r\n\r\n") ==
        413);
}

TEST_CASE("Transfer-Encoding gets 501 since chunked bodies are not supported",
          "[http][parser][errors]") {
  CHECK(status_of("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n") == 501);
  CHECK(status_of("POST / HTTP/1.1\r\nHost: h\r\ntransfer-encoding: identity\r\n\r\n") == 501);
  CHECK(status_of("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: "
                  "chunked\r\n\r\n") == 501);
}

TEST_CASE("versions other than HTTP/1.0 and HTTP/1.1 get 505", "[http][parser][errors]") {
  for (const std::string_view version :
       {"HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "HTTP/3.0", "HTTP/9.9"}) {
    INFO(version);
    CHECK(status_of("GET / " + std::string(version) + "\r\nHost: h\r\n\r\n") == 505);
  }
  CHECK(feed("GET / HTTP/1.0\r\n\r\n").requests.size() == 1);
  CHECK(feed("GET / HTTP/1.1\r\nHost: h\r\n\r\n").requests.size() == 1);
}

TEST_CASE("an error stays until reset", "[http][parser][errors]") {
  http::RequestParser parser;
  http::Request request;
  REQUIRE(parser.parse("GET / HTTP/2.0\r\n\r\n", request) == http::ParseResult::kError);
  CHECK(parser.status() == 505);
  CHECK(parser.parse(kGet, request) == http::ParseResult::kError);
  CHECK(parser.status() == 505);
  parser.reset();
  CHECK(parser.status() == 0);
  REQUIRE(parser.parse(kGet, request) == http::ParseResult::kComplete);
  CHECK(request.target == "/plaintext");
}

TEST_CASE("header names are matched in any case", "[http][parser]") {
  const Outcome outcome =
      feed("POST /echo HTTP/1.1\r\nhOsT: h\r\ncontent-LENGTH: 3\r\nCONNECTION: Close\r\n\r\nabc");
  REQUIRE(outcome.requests.size() == 1);
  CHECK(outcome.requests[0].body == "abc");
  CHECK_FALSE(outcome.requests[0].keep_alive);

  http::RequestParser parser;
  http::Request request;
  REQUIRE(parser.parse("GET / HTTP/1.1\r\nX-One: 1\r\nHOST:  h \t\r\nx-two:2\r\n\r\n", request) ==
          http::ParseResult::kComplete);
  CHECK(request.header("host") == "h");
  CHECK(request.header("X-TWO") == "2");
  CHECK(request.header("x-one") == "1");
  CHECK(request.header("x-on").empty());
}

TEST_CASE("HTTP/1.1 keeps the connection unless Connection says close", "[http][parser]") {
  const auto keeps = [](std::string_view connection_field) {
    const Outcome outcome =
        feed("GET / HTTP/1.1\r\nHost: h\r\n" + std::string(connection_field) + "\r\n");
    REQUIRE(outcome.requests.size() == 1);
    CHECK(outcome.requests[0].minor_version == 1);
    return outcome.requests[0].keep_alive;
  };
  CHECK(keeps(""));
  CHECK(keeps("Connection: keep-alive\r\n"));
  CHECK(keeps("Connection: closed\r\n"));  // not the token "close"
  CHECK_FALSE(keeps("Connection: close\r\n"));
  CHECK_FALSE(keeps("connection: CLOSE\r\n"));
  CHECK_FALSE(keeps("Connection: Upgrade ,  close\r\n"));
  CHECK_FALSE(keeps("Connection: keep-alive\r\nConnection: close\r\n"));
}

TEST_CASE("HTTP/1.0 closes unless Connection says keep-alive", "[http][parser]") {
  const auto keeps = [](std::string_view connection_field) {
    const Outcome outcome = feed("GET / HTTP/1.0\r\n" + std::string(connection_field) + "\r\n");
    REQUIRE(outcome.requests.size() == 1);
    CHECK(outcome.requests[0].minor_version == 0);
    return outcome.requests[0].keep_alive;
  };
  CHECK_FALSE(keeps(""));
  CHECK_FALSE(keeps("Connection: close\r\n"));
  CHECK_FALSE(keeps("Connection: keep-alive, close\r\n"));
  CHECK(keeps("Connection: keep-alive\r\n"));
  CHECK(keeps("Connection: Keep-Alive\r\n"));
  CHECK(keeps("Connection: foo,keep-alive\r\n"));
}
