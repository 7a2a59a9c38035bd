// line_client --host HOST --port N [--connect-timeout MS] [--reconnect]: sends stdin (a pipe or
// terminal) to a server and prints the replies, connecting with reactor::Connector. HOST: a name
// (resolved on worker threads) or an address; each connect, retries included, gets MS ms (default
// 5000), else one line on stderr and exit 1. At stdin EOF: FIN, print until the server closes,
// exit 0 (no reply lost). A connection lost before that: one line on stderr, exit 1; --reconnect
// connects again and sends what was not sent yet (bytes in flight may be lost). Bad usage: exit 2.
#include <unistd.h>
#include <cerrno>
#include <cstdio>
#include <functional>
#include <optional>
#include <reactor.hpp>
#include <string>

struct Shared {
  reactor::Reactor<> loop;
  std::string unsent;  // read from stdin, not sent yet
  bool stdin_done = false, reconnect = false;
  int status = 0;
  void fail() {
    status = 1;
    loop.stop();
  }
};

struct Printer {  // the connection's handler
  Shared* shared;
  void on_data(auto&, std::string_view b) { std::fwrite(b.data(), 1, b.size(), stdout); }
  void on_close(auto& /*conn*/, std::error_code reason) {
    if (shared->stdin_done && !reason) return shared->loop.stop();  // after our FIN: all in
    const bool again = shared->reconnect && !shared->stdin_done;    // the connector reconnects
    std::fprintf(stderr, "line_client: connection lost: %s%s\n",
                 reason ? reason.message().c_str() : "peer closed", again ? ", reconnecting" : "");
    if (!again) shared->fail();
  }
};

int main(int argc, char** argv) {
  Shared shared;
  reactor::ConnectOptions options;
  std::string host;
  unsigned port = 0, ms = 5000;
  bool ok = true;
  for (int i = 1; ok && i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--reconnect") {
      options.reconnect = shared.reconnect = true;
    } else if (arg == "--host" && i + 1 < argc) {
      host = argv[++i];
    } else {  // --port N or --connect-timeout MS: a number > 0
      unsigned& value = arg == "--port" ? port : ms;
      ok = (arg == "--port" || arg == "--connect-timeout") && i + 1 < argc &&
           std::sscanf(argv[++i], "%u", &value) == 1 && value > 0;
    }
  }
  if (!ok || host.empty() || port == 0 || port > 65535) {
    std::fprintf(stderr,
                 "usage: line_client --host H --port N [--connect-timeout MS] [--reconnect]\n");
    return 2;
  }
  options.deadline = options.attempt_timeout = options.resolve_timeout =
      std::chrono::milliseconds(ms);
  options.retry.tries = options.reconnect ? 0 : 1;  // 0: retry until the deadline
  options.connection.high_water = options.connection.low_water = 64 << 20;  // reads never pause
  std::setvbuf(stdout, nullptr, _IOLBF, 0);   // each reply line is out as soon as it is in
  const auto flush = [&shared](auto* conn) {  // sends what stdin gave; after its EOF, FIN
    if (conn != nullptr && conn->send(shared.unsent)) shared.unsent.clear();
    if (conn != nullptr && shared.stdin_done) conn->shutdown();  // replies come until EOF
  };
  reactor::Connector connector(
      shared.loop, Printer{&shared},
      [&](auto* conn, std::error_code ec, const reactor::Endpoint& address) {
        if (conn != nullptr) return flush(conn);
        std::fprintf(stderr, "line_client: connect to %s: %s\n",
                     (address.empty() ? host : address.to_string()).c_str(), ec.message().c_str());
        shared.fail();
      },
      options);
  std::optional<reactor::FdWatcher<std::function<void(std::uint32_t)>>> input;
  try {
    input.emplace(shared.loop, STDIN_FILENO, EPOLLIN, [&](std::uint32_t /*events*/) {
      char buffer[65536];
      const ssize_t n = ::read(STDIN_FILENO, buffer, sizeof buffer);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
      if (n > 0) shared.unsent.append(buffer, static_cast<std::size_t>(n));
      if (n < 0) std::perror("line_client: stdin");  // ends the input, as EOF does, but fails
      shared.status = n < 0 ? 1 : 0;
      shared.stdin_done = n <= 0;
      flush(connector.connection());
      if (shared.stdin_done) input.reset();  // last: this destroys the lambda
    });
  } catch (const std::system_error& e) {  // epoll cannot watch a regular file
    std::fprintf(stderr, "line_client: stdin: %s (use a pipe)\n", e.what());
    return 2;
  }
  connector.connect(host, port);
  shared.loop.run();
  return shared.status;
}
