// echo_server: echoes every byte back, in order, on TCP (IPv4/IPv6) or a Unix socket.
//
//   echo_server [--host ADDR] [--port N] [--unix PATH] [--edge] [--high-water BYTES]
//               [--idle-timeout SECONDS] [--threads N]
//               [--balance reuseport|dispatch|round-robin|exclusive]
//
// Prints one line "listening on HOST:PORT" (or "listening on unix:PATH") when ready. On peer EOF
// it flushes what is pending, then closes. Reading from a client pauses while more than
// --high-water bytes (default 1 MiB) wait to be sent to it. A connection with no traffic in either
// direction for --idle-timeout seconds (default 0: never) is closed after flushing. On SIGINT or
// SIGTERM it stops accepting and keeps echoing what clients had already sent, closing each
// connection once it is quiet (nothing to send, nothing received for 100 ms) or its client
// half-closes; after 3 s, or at a second SIGINT/SIGTERM, it aborts what is left. It then reports
// the counts on stderr ("flushed": closed after echoing everything; "aborted": the rest, including
// connections that failed during the stop) and exits 0.
//
// --threads N (default 1) runs N reactors, one thread each, and --balance says how connections
// reach them: "reuseport" (a listening socket per thread, the kernel hashes connections to them;
// TCP only, and the default there), "dispatch" (one listener, each connection handed to the
// thread with the fewest; the default for --unix), "round-robin" (the same, in turn) or
// "exclusive" (one listener in every thread's epoll set, EPOLLEXCLUSIVE). Signals, the stop and
// the report cover all threads.
//
//   echo_server ... --tls-cert FILE --tls-key FILE
//
// serves TLS instead (PEM certificate chain and unencrypted key, both or neither; builds without
// OpenSSL refuse them with exit status 2). A certificate or key that cannot be loaded is reported
// as "echo_server: tls: REASON", exit status 1. SIGHUP reloads both files: new handshakes use
// them, open connections keep theirs; if the reload fails the old ones stay and a line says why.
// --threads and --balance work as without TLS. With TLS the process ignores SIGPIPE, so that
// kernel TLS can be used where the kernel has it.
#include <reactor.hpp>
#if REACTOR_EXAMPLES_TLS
#include <reactor/tls.hpp>
#endif

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace {

struct Options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  std::string unix_path;
  bool edge = false;
  std::size_t high_water = 1024 * 1024;
  double idle_timeout_seconds = 0;
  std::size_t threads = 1;
  std::optional<reactor::Balance> balance;  // default: reuseport for TCP, dispatch for --unix
  std::string tls_cert;                     // both set: serve TLS
  std::string tls_key;
};

// The whole protocol: send back what arrived. Backpressure needs no code here: when the peer
// stops reading, pending output reaches the high watermark and the connection stops reading.
struct Echo {
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
};

[[noreturn]] void usage(const char* program) {
  std::fprintf(stderr,
               "usage: %s [--host ADDR] [--port N] [--unix PATH] [--edge] [--high-water BYTES]"
               " [--idle-timeout SECONDS] [--threads N]"
               " [--balance reuseport|dispatch|round-robin|exclusive]\n",
               program);
  std::exit(2);
}

// The whole of `text` as a number in [low, high], or usage().
template <class T>
T number(const char* program, const char* text, T low, T high) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text, &end);
  if (errno != 0 || end == text || *end != '\0' || value < static_cast<double>(low) ||
      value > static_cast<double>(high) ||
      (std::is_integral_v<T> && value != static_cast<double>(static_cast<T>(value)))) {
    std::fprintf(stderr, "%s: bad number '%s'\n", program, text);
    usage(program);
  }
  return static_cast<T>(value);
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
      options.port = number<std::uint16_t>(argv[0], value(), 0, 65535);
    } else if (arg == "--unix") {
      options.unix_path = value();
    } else if (arg == "--edge") {
      options.edge = true;
    } else if (arg == "--high-water") {
      options.high_water = number<std::size_t>(argv[0], value(), 1, std::size_t{1} << 40);
    } else if (arg == "--idle-timeout") {
      options.idle_timeout_seconds = number<double>(argv[0], value(), 0, 1e6);
    } else if (arg == "--threads") {
      options.threads = number<std::size_t>(argv[0], value(), 1, 1024);
    } else if (arg == "--balance") {
      const std::string_view name = value();
      if (name == "reuseport") {
        options.balance = reactor::Balance::kReusePort;
      } else if (name == "dispatch") {
        options.balance = reactor::Balance::kLeastConnections;
      } else if (name == "round-robin") {
        options.balance = reactor::Balance::kRoundRobin;
      } else if (name == "exclusive") {
        options.balance = reactor::Balance::kExclusive;
      } else {
        std::fprintf(stderr, "%s: unknown balance '%.*s'\n", argv[0], static_cast<int>(name.size()),
                     name.data());
        usage(argv[0]);
      }
    } else if (arg == "--tls-cert") {
      options.tls_cert = value();
    } else if (arg == "--tls-key") {
      options.tls_key = value();
    } else {
      usage(argv[0]);
    }
  }
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    std::fprintf(stderr, "%s: --tls-cert and --tls-key go together\n", argv[0]);
    usage(argv[0]);
  }
  if (!options.tls_cert.empty()) {
#if !REACTOR_EXAMPLES_TLS
    std::fprintf(stderr, "echo_server: built without TLS (install libssl-dev and rebuild)\n");
    std::exit(2);
#endif
  }
  return options;
}

reactor::ListenOptions listen_options(const Options& options) {
  reactor::ListenOptions listen;
  listen.connection.high_water = options.high_water;
  listen.connection.low_water = options.high_water / 4;
  listen.connection.max_pending_output = options.high_water * 4 + 64 * 1024;
  listen.connection.idle_timeout =
      std::chrono::milliseconds(static_cast<std::int64_t>(options.idle_timeout_seconds * 1000));
  return listen;
}

reactor::Endpoint listen_endpoint(const Options& options) {
  if (!options.unix_path.empty()) return reactor::Endpoint::unix_path(options.unix_path);
  return reactor::Endpoint::from_host_port(options.host, options.port);
}

void print_report(const reactor::ShutdownReport& report) {
  std::fprintf(stderr, "echo_server: shut down: %zu connections flushed, %zu aborted\n",
               report.flushed, report.failed + report.aborted);
}

// Transport: reactor::PlainTransport, or reactor::TlsTransport with `on_hangup` reloading the
// certificate at SIGHUP (only then is SIGHUP caught).
template <class Mode, class Transport = reactor::PlainTransport>
int serve(const Options& options, Transport transport = {},
          std::function<void()> on_hangup = nullptr) {
  using Loop = reactor::Reactor<Mode>;
  reactor::ReactorPool<Loop> pool(options.threads);

  const reactor::ListenOptions listen = listen_options(options);
  const reactor::Endpoint endpoint = listen_endpoint(options);
  const reactor::Balance balance = options.balance.value_or(
      endpoint.is_unix() ? reactor::Balance::kLeastConnections : reactor::Balance::kReusePort);
  if (endpoint.is_unix() && balance == reactor::Balance::kReusePort && options.threads > 1) {
    std::fprintf(stderr,
                 "echo_server: --balance reuseport needs TCP (SO_REUSEPORT); with --unix use"
                 " dispatch, round-robin or exclusive\n");
    return 1;
  }
  reactor::PoolAcceptor<Echo, Loop, Transport> acceptor(pool, endpoint, std::move(transport),
                                                        Echo{}, listen, balance);

  // Before run() starts the other threads, which inherit the blocked signals: only the signalfd,
  // on reactor 0, sees SIGINT and SIGTERM, and stops every thread.
  reactor::SignalSet signals(pool[0], {SIGINT, SIGTERM}, [&](int) { pool.stop(); });
  std::optional<reactor::SignalSet<std::function<void(int)>, Loop>> hangup;
  if (on_hangup)
    hangup.emplace(pool[0], std::initializer_list<int>{SIGHUP}, [&](int) { on_hangup(); });

  std::printf("listening on %s\n", acceptor.local_endpoint().to_string().c_str());
  std::fflush(stdout);

  pool.run();
  // Stop accepting, serve out what clients sent, abort what is left after 3 s or at a second
  // signal (the SignalSet still calls pool.stop(), which ends the grace period everywhere).
  print_report(pool.shutdown(std::chrono::seconds(3)));
  return 0;
}

#if REACTOR_EXAMPLES_TLS
// The TLS server: serve() with a TLS transport; SIGHUP reloads the certificate files.
template <class Mode>
int serve_tls(const Options& options) {
  reactor::TlsOptions tls;
  tls.certificates.push_back(
      reactor::TlsCertificate::from_files(options.tls_cert, options.tls_key));
  reactor::TlsContext context(reactor::TlsRole::kServer, tls);  // throws "tls: ..."
  return serve<Mode>(options, reactor::TlsTransport(context), [&] {
    if (const std::error_code ec = context.reload(tls)) {
      std::fprintf(stderr, "echo_server: tls: reload failed, keeping the old certificate: %s\n",
                   ec.message().c_str());
    }
  });
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  try {
#if REACTOR_EXAMPLES_TLS
    if (!options.tls_cert.empty()) {
      // A program's choice (the library never changes signal dispositions): with SIGPIPE
      // ignored, the TLS transport may hand the record layer to the kernel (kernel TLS).
      std::signal(SIGPIPE, SIG_IGN);
      return options.edge ? serve_tls<reactor::EdgeTriggered>(options)
                          : serve_tls<reactor::LevelTriggered>(options);
    }
#endif
    return options.edge ? serve<reactor::EdgeTriggered>(options)
                        : serve<reactor::LevelTriggered>(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "echo_server: %s\n", e.what());
    return 1;
  }
}
