// http_server: a small HTTP/1.1 server, the example to copy for a request/response protocol.
//
//   http_server [--host ADDR] [--port N] [--edge]
//
// Prints one line "listening on HOST:PORT" when ready (--host defaults to 127.0.0.1, --port to 0:
// a free port; --edge: edge-triggered epoll). It answers
//   GET /plaintext   200, text/plain: Hello, World!
//   GET /json        200, application/json: {"message":"Hello, World!"}
//   POST /echo       200, application/octet-stream: the request's body
// any other path with 404, and another method on these paths with 405 (and Allow). Every response
// has Content-Length and "Server: reactor" (no Date header). A query string is ignored.
//
// Connections stay open for more requests (HTTP/1.1 unless the client sends "Connection: close",
// HTTP/1.0 only with "Connection: keep-alive"); otherwise the connection closes once the response
// is sent. Requests may be pipelined: each is answered in order as soon as it is complete, and one
// may arrive in any number of pieces (on_data returns the bytes of the complete requests; the
// library keeps the rest and hands it back with what follows). Bad input is answered with its
// status, then the connection closes: 400 malformed (lines must end in CRLF), 413 a body over
// 1 MiB, 431 a request line and headers over 8 KiB, 501 Transfer-Encoding (chunked bodies are not
// supported), 505 a version other than HTTP/1.0 and 1.1; http_parser.hpp has the exact rules. A
// connection idle for 30 s is closed.
//
// On SIGINT or SIGTERM it stops accepting, answers the requests clients had already sent, and
// closes each connection once it is quiet (nothing to send, nothing received for 100 ms) or its
// client closes; after 3 s, or at a second signal, it aborts what is left. It then reports the
// counts on stderr and exits 0. A usage error exits with status 2, a failure to listen with 1.
#include <reactor.hpp>

#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iterator>
#include <string>
#include <string_view>

#include "http_parser.hpp"

namespace {

struct Options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  bool edge = false;
};

// The status line's code and reason.
std::string_view status_text(int status) {
  switch (status) {
    case 200:
      return "200 OK";
    case 400:
      return "400 Bad Request";
    case 404:
      return "404 Not Found";
    case 405:
      return "405 Method Not Allowed";
    case 413:
      return "413 Content Too Large";
    case 431:
      return "431 Request Header Fields Too Large";
    case 501:
      return "501 Not Implemented";
    case 505:
      return "505 HTTP Version Not Supported";
  }
  return "500 Internal Server Error";
}

constexpr std::string_view kClose = "Connection: close\r\n";
constexpr std::string_view kKeepAlive = "Connection: keep-alive\r\n";
constexpr std::string_view kText = "Content-Type: text/plain\r\n";

// One connection's state: the parser, and the buffer responses are built in (its capacity is kept,
// so a keep-alive connection allocates only for a response larger than any before).
struct Http {
  http::RequestParser parser_;
  std::string response_;

  std::size_t on_data(auto& conn, std::string_view bytes) {
    std::size_t consumed = 0;
    for (;;) {
      http::Request request;
      const http::ParseResult result = parser_.parse(bytes.substr(consumed), request);
      if (result == http::ParseResult::kIncomplete) return consumed;  // the rest comes back later
      if (result == http::ParseResult::kError) {
        const int status = parser_.status();
        respond(conn, status, kClose, kText, status_text(status));
        conn.close();  // flushes the response first; the rest of the input is dropped
        return bytes.size();
      }
      consumed += request.size;
      if (!answer(conn, request) || !request.keep_alive) {
        conn.close();
        return consumed;
      }
    }
  }

  // Answers one request; false when the send failed (the connection is closed then).
  bool answer(auto& conn, const http::Request& request) {
    // Say whether the connection stays: HTTP/1.1 assumes it does, HTTP/1.0 that it does not.
    std::string_view connection;
    if (!request.keep_alive) {
      connection = kClose;
    } else if (request.minor_version == 0) {
      connection = kKeepAlive;
    }
    const std::string_view path = request.target.substr(0, request.target.find('?'));
    if (path == "/plaintext" || path == "/json") {
      if (request.method != "GET") {
        return respond(conn, 405, connection, "Allow: GET\r\nContent-Type: text/plain\r\n",
                       status_text(405));
      }
      if (path == "/plaintext") return respond(conn, 200, connection, kText, "Hello, World!");
      return respond(conn, 200, connection, "Content-Type: application/json\r\n",
                     R"({"message":"Hello, World!"})");
    }
    if (path == "/echo") {
      if (request.method != "POST") {
        return respond(conn, 405, connection, "Allow: POST\r\nContent-Type: text/plain\r\n",
                       status_text(405));
      }
      return respond(conn, 200, connection, "Content-Type: application/octet-stream\r\n",
                     request.body);
    }
    return respond(conn, 404, connection, kText, status_text(404));
  }

  // Sends one response: the status line, Server, `headers` (whole lines), Content-Length,
  // `connection` (a Connection line or nothing), then `body`. Returns what send() returned.
  bool respond(auto& conn, int status, std::string_view connection, std::string_view headers,
               std::string_view body) {
    char digits[24];
    const std::string_view length(digits, std::to_chars(digits, std::end(digits), body.size()).ptr);
    response_.clear();
    response_.append("HTTP/1.1 ").append(status_text(status)).append("\r\nServer: reactor\r\n");
    response_.append(headers).append("Content-Length: ").append(length);
    response_.append("\r\n").append(connection).append("\r\n").append(body);
    return conn.send(response_);
  }
};

[[noreturn]] void usage(const char* program) {
  std::fprintf(stderr, "usage: %s [--host ADDR] [--port N] [--edge]\n", program);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--edge") {
      options.edge = true;
    } else if (arg == "--host" && i + 1 < argc) {
      options.host = argv[++i];
    } else if (arg == "--port" && i + 1 < argc) {
      const std::string_view value = argv[++i];
      const char* end = value.data() + value.size();
      if (const auto result = std::from_chars(value.data(), end, options.port);
          result.ec != std::errc() || result.ptr != end) {
        std::fprintf(stderr, "%s: bad port '%s'\n", argv[0], argv[i]);
        usage(argv[0]);
      }
    } else {
      usage(argv[0]);
    }
  }
  return options;
}

template <class Mode>
int serve(const Options& options) {
  using Loop = reactor::Reactor<Mode>;
  Loop loop;
  reactor::ListenOptions listen;
  // A partial request is at most a head and a body; the parser refuses more before this is hit.
  listen.connection.max_pending_input = http::kMaxHeaderBytes + http::kMaxBodyBytes;
  listen.connection.idle_timeout = std::chrono::seconds(30);
  reactor::Acceptor<Http, Loop> acceptor(
      loop, reactor::Endpoint::from_host_port(options.host, options.port), Http{}, listen);
  reactor::SignalSet signals(loop, {SIGINT, SIGTERM}, [&](int) { loop.stop(); });

  std::printf("listening on %s\n", acceptor.local_endpoint().to_string().c_str());
  std::fflush(stdout);

  loop.run();
  // Stop accepting, answer what clients already sent, abort what is left after 3 s or at a second
  // signal (the SignalSet still calls loop.stop(), which ends the grace period).
  const reactor::ShutdownReport report = loop.shutdown(std::chrono::seconds(3));
  std::fprintf(stderr, "http_server: shut down: %zu connections flushed, %zu aborted\n",
               report.flushed, report.failed + report.aborted);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  try {
    return options.edge ? serve<reactor::EdgeTriggered>(options)
                        : serve<reactor::LevelTriggered>(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "http_server: %s\n", e.what());
    return 1;
  }
}
