// Tests for include/reactor/endpoint.hpp: parsing and printing socket addresses.
#include <reactor/endpoint.hpp>

#include "catch.hpp"

using reactor::Endpoint;

TEST_CASE("an IPv4 endpoint parses and prints back the same text", "[endpoint]") {
  const Endpoint ep = Endpoint::parse("127.0.0.1:8080");
  CHECK(ep.family() == AF_INET);
  CHECK(ep.port() == 8080);
  CHECK(ep.host() == "127.0.0.1");
  CHECK(ep.to_string() == "127.0.0.1:8080");
  CHECK(ep.size() == sizeof(sockaddr_in));
}

TEST_CASE("an IPv6 endpoint needs brackets and prints with them", "[endpoint]") {
  const Endpoint ep = Endpoint::parse("[::1]:443");
  CHECK(ep.family() == AF_INET6);
  CHECK(ep.port() == 443);
  CHECK(ep.host() == "::1");
  CHECK(ep.to_string() == "[::1]:443");

  std::error_code ec;
  Endpoint::parse("::1:443", ec);
  CHECK(ec == std::errc::invalid_argument);
}

TEST_CASE("host and port build IPv4, IPv6 and localhost endpoints", "[endpoint]") {
  CHECK(Endpoint::from_host_port("::1", 0).family() == AF_INET6);
  CHECK(Endpoint::from_host_port("[::1]", 7).to_string() == "[::1]:7");
  CHECK(Endpoint::from_host_port("localhost", 9).to_string() == "127.0.0.1:9");
  CHECK_THROWS_AS(Endpoint::from_host_port("not-an-address", 1), std::system_error);
}

TEST_CASE("malformed endpoints are rejected with invalid_argument", "[endpoint]") {
  for (const char* text : {"127.0.0.1", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:8x",
                           "300.1.1.1:80", ":80", "[::1]"}) {
    INFO(text);
    std::error_code ec;
    const Endpoint ep = Endpoint::parse(text, ec);
    CHECK(ec == std::errc::invalid_argument);
    CHECK(ep.empty());
  }
  try {
    Endpoint::parse("nonsense");
    FAIL("parse did not throw");
  } catch (const std::system_error& e) {
    CHECK(std::string(e.what()).find("parse endpoint") != std::string::npos);
  }
}

TEST_CASE("unix endpoints accept paths and the abstract namespace", "[endpoint]") {
  const Endpoint path = Endpoint::parse("unix:/tmp/reactor.sock");
  CHECK(path.family() == AF_UNIX);
  CHECK(path.host() == "/tmp/reactor.sock");
  CHECK(path.to_string() == "unix:/tmp/reactor.sock");
  CHECK(Endpoint::parse("./relative/sock").host() == "./relative/sock");

  const Endpoint abstract = Endpoint::unix_path("@reactor-test");
  CHECK(abstract.to_string() == "unix:@reactor-test");
  CHECK(abstract.size() == offsetof(sockaddr_un, sun_path) + 13);

  std::error_code ec;
  Endpoint::unix_path(std::string(200, 'x'), ec);
  CHECK(ec == std::errc::filename_too_long);
}

TEST_CASE("endpoints compare equal by address", "[endpoint]") {
  CHECK(Endpoint::parse("10.0.0.1:1") == Endpoint::parse("10.0.0.1:1"));
  CHECK_FALSE(Endpoint::parse("10.0.0.1:1") == Endpoint::parse("10.0.0.1:2"));
  CHECK(Endpoint().empty());
  CHECK(Endpoint().to_string().empty());
}

// Before: the port parameter was std::uint16_t, so 70000 silently became 4464.
TEST_CASE("from_host_port rejects ports outside 0..65535 instead of narrowing them", "[endpoint]") {
  std::error_code ec;
  CHECK(Endpoint::from_host_port("127.0.0.1", 65535, ec).port() == 65535);
  CHECK_FALSE(ec);
  CHECK(Endpoint::from_host_port("127.0.0.1", 70000, ec).empty());
  CHECK(ec == std::errc::invalid_argument);
  CHECK(Endpoint::from_host_port("::1", -1, ec).empty());
  CHECK(ec == std::errc::invalid_argument);
  CHECK(Endpoint::from_host_port("::1", 65536L, ec).empty());
  CHECK(ec == std::errc::invalid_argument);
  CHECK_THROWS_AS(Endpoint::from_host_port("127.0.0.1", 1 << 20), std::system_error);
  CHECK(Endpoint::from_host_port("127.0.0.1", std::uint16_t{80}).port() == 80);
}
