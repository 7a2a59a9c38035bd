// echo_server: echoes every byte back, in order, on TCP (IPv4/IPv6) or a Unix socket.
//
//   echo_server [--host ADDR] [--port N] [--unix PATH] [--edge] [--high-water BYTES]
//
// Prints one line "listening on HOST:PORT" (or "listening on unix:PATH") when ready. On peer EOF
// it flushes what is pending, then closes. Reading from a client pauses while more than
// --high-water bytes (default 1 MiB) wait to be sent to it. On SIGINT/SIGTERM it stops accepting,
// flushes pending output for up to 3 s, closes everything and exits 0.
#include <reactor.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

namespace {

struct Options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  std::string unix_path;
  bool edge = false;
  std::size_t high_water = 1024 * 1024;
};

// The whole protocol: send back what arrived. Backpressure needs no code here: when the peer
// stops reading, pending output reaches the high watermark and the connection stops reading.
struct Echo {
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
};

[[noreturn]] void usage(const char* program) {
  std::fprintf(stderr,
               "usage: %s [--host ADDR] [--port N] [--unix PATH] [--edge] [--high-water BYTES]\n",
               program);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage(argv[0]);
      return argv[++i];
    };
    if (arg == "--host") {
      options.host = value();
    } else if (arg == "--port") {
      options.port = static_cast<std::uint16_t>(std::strtoul(value(), nullptr, 10));
    } else if (arg == "--unix") {
      options.unix_path = value();
    } else if (arg == "--edge") {
      options.edge = true;
    } else if (arg == "--high-water") {
      options.high_water = std::strtoull(value(), nullptr, 10);
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
  listen.connection.high_water = options.high_water;
  listen.connection.low_water = options.high_water / 4;
  listen.connection.max_pending_output = options.high_water * 4 + 64 * 1024;

  reactor::Endpoint endpoint;
  if (!options.unix_path.empty()) {
    endpoint = reactor::Endpoint::unix_path(options.unix_path);
  } else {
    endpoint = reactor::Endpoint::from_host_port(options.host, options.port);
  }
  reactor::Acceptor<Echo, Loop> acceptor(loop, endpoint, Echo{}, listen);

  using Clock = std::chrono::steady_clock;
  Clock::time_point deadline{};
  reactor::SignalSet signals(loop, {SIGINT, SIGTERM}, [&](int) {
    acceptor.close();   // stop accepting
    loop.close_all();   // flush, then close every connection
    deadline = Clock::now() + std::chrono::seconds(3);
    loop.stop();
  });

  std::printf("listening on %s\n", acceptor.local_endpoint().to_string().c_str());
  std::fflush(stdout);

  loop.run();
  while (loop.connection_count() > 0 && Clock::now() < deadline) {
    loop.run_once(std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()));
  }
  // Whatever is still open is aborted when the reactor goes out of scope.
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  try {
    return options.edge ? serve<reactor::EdgeTriggered>(options)
                        : serve<reactor::LevelTriggered>(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "echo_server: %s\n", e.what());
    return 1;
  }
}
