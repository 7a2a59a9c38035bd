// Benchmark tool (not a test): what TLS costs a server, for reactor's TlsAcceptor and any other
// echo server that follows the protocol below (bench/peers/asio_ssl_echo.cpp does).
//
//   bench_tls serve [--cert FILE --key FILE] [--keep-buffers]
//       The server: a reactor echo server on 127.0.0.1 (ephemeral port), TLS when given a
//       certificate, plain otherwise, on one thread. --keep-buffers clears SSL_MODE_RELEASE_BUFFERS
//       on each connection in on_open (the context sets it).
//   bench_tls run [--plain] [--key ecdsa|rsa] [--repeats R] [--strace] TEST [--conns N]
//                 [--seconds T] [--messages M] [--size B] [--mib S] -- SERVER [ARGS...]
//       The client: starts SERVER ARGS (with --cert FILE --key FILE appended unless --plain; the
//       certificate is made at run time, the key type per --key), a fresh one per repeat, drives
//       it with reactor Connectors / TlsConnectors (TLS 1.3 only, no verification, no resumption:
//       every handshake is a full one) and prints each repeat, then the median and range. TEST:
//         handshake  N (50) connectors connect, handshake and close, again and again, T (5) s;
//         echo       N (100) connections each send M (2000) messages of B (64) bytes, one at a
//                    time; --strace also counts the server's syscalls for the messages (strace -c
//                    -f -p, attached after the handshakes; that run's CPU figures are not valid);
//         bulk       one connection streams S (1024) MiB through the server, 1 MiB in flight;
//         idle       N (2000) connections handshake, send one byte each and hold the echo: the
//                    server's heap growth (malloc's in-use bytes) per connection.
//
// The server protocol: print "listening on 127.0.0.1:PORT" once ready; on SIGUSR1 print
// "stats CPU_US HEAP" (user+system CPU of the process in µs, mallinfo2().uordblks); exit on
// SIGTERM. Server CPU and heap are therefore the server process's, the client's excluded.
// Figures and commands: docs/performance.md, "Issue 12 (TLS)".
#include <malloc.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <reactor.hpp>
#include <reactor/signals.hpp>
#include <reactor/tls.hpp>
#include <string>
#include <string_view>
#include <thread>
#include <tls_certs.hpp>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

void raise_fd_limit() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &limit);
  }
}

void print_stats() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  const auto us = [](timeval t) { return t.tv_sec * 1'000'000LL + t.tv_usec; };
  std::printf("stats %lld %zu\n", us(usage.ru_utime) + us(usage.ru_stime), mallinfo2().uordblks);
  std::fflush(stdout);
}

// --- The server ---------------------------------------------------------------------------------
struct Echo {
  bool keep_buffers = false;
  template <class Connection>
  void on_open(Connection& connection) {
    if constexpr (requires { connection.transport().native_handle(); }) {
      if (keep_buffers)
        SSL_clear_mode(connection.transport().native_handle(), SSL_MODE_RELEASE_BUFFERS);
    }
  }
  void on_data(auto& connection, std::string_view bytes) {
    connection.send(bytes.data(), bytes.size());
  }
};

int serve(const std::vector<std::string_view>& args) {
  std::string cert, key;
  bool keep_buffers = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--cert" && i + 1 < args.size()) {
      cert = args[++i];
    } else if (args[i] == "--key" && i + 1 < args.size()) {
      key = args[++i];
    } else if (args[i] == "--keep-buffers") {
      keep_buffers = true;
    } else {
      std::fprintf(stderr, "bench_tls serve: unknown argument %s\n", std::string(args[i]).c_str());
      return 2;
    }
  }
  raise_fd_limit();
  reactor::Reactor<> loop;
  auto on_signal = [&loop](int signal) { signal == SIGUSR1 ? print_stats() : loop.stop(); };
  reactor::SignalSet<decltype(on_signal)> signals(loop, {SIGUSR1, SIGTERM, SIGINT}, on_signal);
  const reactor::Endpoint endpoint = reactor::Endpoint::parse("127.0.0.1:0");
  std::optional<reactor::TlsContext> context;
  std::optional<reactor::TlsAcceptor<Echo>> tls;
  std::optional<reactor::Acceptor<Echo>> plain;
  if (!cert.empty()) {
    reactor::TlsOptions options;
    options.certificates.push_back(reactor::TlsCertificate::from_files(cert, key));
    context.emplace(reactor::TlsRole::kServer, options);
    tls.emplace(loop, endpoint, *context, Echo{keep_buffers});
  } else {
    plain.emplace(loop, endpoint, Echo{keep_buffers});
  }
  std::printf("listening on 127.0.0.1:%u\n",
              unsigned{tls ? tls->local_endpoint().port() : plain->local_endpoint().port()});
  std::fflush(stdout);
  loop.run();
  return 0;
}

// --- The server process, seen from the client ---------------------------------------------------
class ServerProcess {
 public:
  explicit ServerProcess(const std::vector<std::string>& command) {
    int out[2];
    if (::pipe(out) != 0) throw std::runtime_error("pipe");
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(out[1], STDOUT_FILENO);
      ::close(out[0]);
      ::close(out[1]);
      std::vector<char*> argv;
      for (const std::string& arg : command) argv.push_back(const_cast<char*>(arg.c_str()));
      argv.push_back(nullptr);
      ::execvp(argv[0], argv.data());
      std::perror("bench_tls: execvp");
      ::_exit(127);
    }
    ::close(out[1]);
    out_ = ::fdopen(out[0], "r");
    unsigned port = 0;
    if (std::sscanf(line().c_str(), "listening on 127.0.0.1:%u", &port) != 1) {
      throw std::runtime_error("the server did not print \"listening on 127.0.0.1:PORT\"");
    }
    port_ = static_cast<std::uint16_t>(port);
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  ~ServerProcess() {
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
    std::fclose(out_);
  }

  std::uint16_t port() const { return port_; }
  pid_t pid() const { return pid_; }

  struct Stats {
    double cpu_us = 0;
    double heap = 0;
  };
  Stats stats() {
    ::kill(pid_, SIGUSR1);
    long long cpu = 0;
    unsigned long long heap = 0;
    if (std::sscanf(line().c_str(), "stats %lld %llu", &cpu, &heap) != 2) {
      throw std::runtime_error("the server did not answer SIGUSR1 with \"stats CPU_US HEAP\"");
    }
    return {static_cast<double>(cpu), static_cast<double>(heap)};
  }

 private:
  std::string line() {
    char buffer[256];
    return std::fgets(buffer, sizeof buffer, out_) == nullptr ? std::string() : std::string(buffer);
  }

  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  std::uint16_t port_ = 0;
};

// strace -c -f attached to a running process; calls() stops it and returns the total call count.
class Strace {
 public:
  explicit Strace(pid_t pid) {
    pid_ = ::fork();
    if (pid_ == 0) {
      const std::string target = std::to_string(pid);
      ::execlp("strace", "strace", "-c", "-f", "-q", "-o", kFile, "-p", target.c_str(), nullptr);
      ::_exit(127);
    }
    std::this_thread::sleep_for(std::chrono::seconds(1));  // strace has attached by then
  }
  Strace(const Strace&) = delete;
  Strace& operator=(const Strace&) = delete;
  double calls() {
    ::kill(pid_, SIGINT);
    ::waitpid(pid_, nullptr, 0);
    double total = 0;
    if (FILE* file = std::fopen(kFile, "r")) {
      char buffer[256];
      while (std::fgets(buffer, sizeof buffer, file) != nullptr) {
        double percent = 0, seconds = 0, per_call = 0, count = 0;
        if (std::string_view(buffer).find(" total") != std::string_view::npos &&
            std::sscanf(buffer, "%lf %lf %lf %lf", &percent, &seconds, &per_call, &count) == 4) {
          total = count;
        }
      }
      std::fclose(file);
    }
    return total;
  }

 private:
  static constexpr const char* kFile = "/tmp/bench_tls_strace.txt";
  pid_t pid_ = -1;
};

// --- The client
// -----------------------------------------------------------------------------------
enum class Test { kHandshake, kEcho, kBulk, kIdle };

struct Options {
  Test test = Test::kEcho;
  bool plain = false;
  bool strace = false;
  reactor_test::KeyType key = reactor_test::KeyType::kEcdsaP256;
  std::size_t repeats = 5;
  std::size_t conns = 0;  // 0: the test's default
  double seconds = 5;
  std::uint64_t messages = 2000;
  std::size_t size = 64;
  std::uint64_t mib = 1024;
};

// What every client connection shares: the payload, and the counts the tests wait for.
struct Shared {
  Test test;
  std::string payload;
  std::uint64_t messages = 0;    // per connection (echo, idle)
  std::uint64_t done = 0;        // messages back (echo, idle)
  std::uint64_t bulk_total = 0;  // bytes (bulk)
  std::uint64_t sent = 0, received = 0;
};

struct Load {
  Shared* shared;
  std::uint64_t left = 0;
  std::size_t got = 0;

  void start(auto& connection) {
    left = shared->messages;
    if (shared->test == Test::kBulk) return top_up(connection);
    connection.send(shared->payload.data(), shared->payload.size());
  }
  void on_data(auto& connection, std::string_view bytes) {
    if (shared->test == Test::kBulk) {
      shared->received += bytes.size();
      return top_up(connection);
    }
    for (got += bytes.size(); got >= shared->payload.size(); got -= shared->payload.size()) {
      ++shared->done;
      if (--left > 0) connection.send(shared->payload.data(), shared->payload.size());
    }
  }
  void top_up(auto& connection) {
    constexpr std::uint64_t kWindow = 1 << 20;
    while (shared->sent < shared->bulk_total && shared->sent - shared->received < kWindow) {
      const std::size_t n =
          std::min<std::uint64_t>(shared->payload.size(), shared->bulk_total - shared->sent);
      connection.send(shared->payload.data(), n);
      shared->sent += n;
    }
  }
};

// A connector's result (its connection type names this type, hence the void*).
struct Opened {
  std::vector<void*>* open;
  std::size_t* failed;
  std::size_t index;
  std::vector<std::size_t>* finished;  // connectors to start again (handshake)
  void operator()(auto* connection, std::error_code ec, const reactor::Endpoint&) {
    if (connection == nullptr) {
      if ((*failed)++ == 0)
        std::fprintf(stderr, "bench_tls: connect failed: %s\n", ec.message().c_str());
    } else {
      open->push_back(connection);
    }
    finished->push_back(index);
  }
};

using Result = std::vector<std::pair<const char*, double>>;

template <class Transport>
Result run_once(const Options& options, Transport prototype, ServerProcess& server) {
  using Connector = reactor::Connector<Load, Opened, reactor::Reactor<>, Transport>;
  using Connection = typename Connector::connection_type;
  reactor::Reactor<> loop;
  Shared shared;
  shared.test = options.test;
  const reactor::Endpoint endpoint = reactor::Endpoint::from_host_port("127.0.0.1", server.port());
  std::vector<void*> open;
  std::vector<std::size_t> finished;
  std::size_t failed = 0;
  std::size_t conns = options.conns;
  if (conns == 0) {
    conns = options.test == Test::kHandshake ? 50
            : options.test == Test::kEcho    ? 100
            : options.test == Test::kIdle    ? 2000
                                             : 1;
  }
  shared.payload.assign(options.test == Test::kBulk   ? 64 * 1024
                        : options.test == Test::kIdle ? 1
                                                      : options.size,
                        'x');
  shared.messages = options.test == Test::kIdle ? 1 : options.messages;
  shared.bulk_total = options.mib << 20;
  std::vector<std::unique_ptr<Connector>> connectors;
  const auto connect_all = [&] {
    for (std::size_t i = 0; i < conns; ++i) {
      connectors.push_back(std::make_unique<Connector>(loop, prototype, Load{&shared},
                                                       Opened{&open, &failed, i, &finished}));
      connectors.back()->connect(endpoint);
    }
  };
  const auto wait = [&](auto done) {
    while (!done() && failed == 0) loop.run_once(std::chrono::milliseconds(100));
    if (failed != 0) throw std::runtime_error("a connection failed");
  };

  Result result;
  ServerProcess::Stats before = server.stats();
  if (options.test == Test::kHandshake) {
    const Clock::time_point start = Clock::now();
    connect_all();
    std::uint64_t handshakes = 0;
    while (Clock::now() - start < std::chrono::duration<double>(options.seconds) && failed == 0) {
      loop.run_once(std::chrono::milliseconds(10));
      for (void* connection : open) static_cast<Connection*>(connection)->close();
      handshakes += open.size();
      open.clear();
      for (std::size_t i : finished) connectors[i]->connect(endpoint);
      finished.clear();
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const ServerProcess::Stats after = server.stats();
    result = {{"handshakes/s", static_cast<double>(handshakes) / seconds},
              {"server CPU us/handshake",
               (after.cpu_us - before.cpu_us) / static_cast<double>(handshakes)}};
  } else {
    connect_all();
    wait([&] { return open.size() == conns; });
    std::optional<Strace> strace;
    if (options.strace) strace.emplace(server.pid());
    if (options.test != Test::kIdle) before = server.stats();  // idle: the handshakes' heap counts
    const Clock::time_point start = Clock::now();
    for (void* connection : open) {
      static_cast<Connection*>(connection)->handler().start(*static_cast<Connection*>(connection));
    }
    const std::uint64_t messages = conns * shared.messages;
    wait([&] {
      return options.test == Test::kBulk ? shared.received == shared.bulk_total
                                         : shared.done == messages;
    });
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const double calls = strace ? strace->calls() : 0;
    const ServerProcess::Stats after = server.stats();
    const double cpu = after.cpu_us - before.cpu_us;
    if (options.test == Test::kEcho) {
      result = {{"msg/s", static_cast<double>(messages) / seconds},
                {"server CPU us/msg", cpu / static_cast<double>(messages)}};
      if (strace) result.emplace_back("server syscalls/msg", calls / static_cast<double>(messages));
    } else if (options.test == Test::kBulk) {
      const double mb = static_cast<double>(shared.bulk_total) / 1e6;
      result = {{"MB/s", mb / seconds}, {"server CPU us/MB", cpu / mb}};
    } else {
      result = {{"server heap B/conn", (after.heap - before.heap) / static_cast<double>(conns)}};
    }
  }
  connectors.clear();
  for (void* connection : open) static_cast<Connection*>(connection)->abort(true);
  loop.run_once(std::chrono::milliseconds(0));
  return result;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t middle = values.size() / 2;
  return values.size() % 2 == 1 ? values[middle] : (values[middle - 1] + values[middle]) / 2;
}

int run(const std::vector<std::string_view>& args) {
  Options options;
  std::vector<std::string> command;
  bool have_test = false;
  const auto number = [](std::string_view text) {
    return std::strtod(std::string(text).c_str(), nullptr);
  };
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string_view arg = args[i];
    const bool value = i + 1 < args.size();
    if (arg == "--") {
      command.assign(args.begin() + static_cast<std::ptrdiff_t>(i) + 1, args.end());
      break;
    }
    if (arg == "--plain") {
      options.plain = true;
    } else if (arg == "--strace") {
      options.strace = true;
    } else if (arg == "--key" && value) {
      options.key =
          args[++i] == "rsa" ? reactor_test::KeyType::kRsa2048 : reactor_test::KeyType::kEcdsaP256;
    } else if (arg == "--repeats" && value) {
      options.repeats = static_cast<std::size_t>(number(args[++i]));
    } else if (arg == "--conns" && value) {
      options.conns = static_cast<std::size_t>(number(args[++i]));
    } else if (arg == "--seconds" && value) {
      options.seconds = number(args[++i]);
    } else if (arg == "--messages" && value) {
      options.messages = static_cast<std::uint64_t>(number(args[++i]));
    } else if (arg == "--size" && value) {
      options.size = static_cast<std::size_t>(number(args[++i]));
    } else if (arg == "--mib" && value) {
      options.mib = static_cast<std::uint64_t>(number(args[++i]));
    } else if (arg == "handshake" || arg == "echo" || arg == "bulk" || arg == "idle") {
      have_test = true;
      options.test = arg == "handshake" ? Test::kHandshake
                     : arg == "echo"    ? Test::kEcho
                     : arg == "bulk"    ? Test::kBulk
                                        : Test::kIdle;
    } else {
      have_test = false;
      break;
    }
  }
  if (!have_test || command.empty() || options.repeats == 0 || options.size == 0) {
    std::fprintf(stderr,
                 "usage: bench_tls run [--plain] [--key ecdsa|rsa] [--repeats R] [--strace] "
                 "handshake|echo|bulk|idle [--conns N] [--seconds T] [--messages M] [--size B] "
                 "[--mib S] -- SERVER [ARGS...]\n");
    return 2;
  }
  raise_fd_limit();
  const reactor_test::TempDir directory;
  if (!options.plain) {
    const reactor_test::TestCa ca(options.key);
    const reactor_test::Pem pem = ca.issue({"localhost"}, {"127.0.0.1"}, options.key);
    command.insert(command.end(), {"--cert", directory.write("cert.pem", pem.certificate), "--key",
                                   directory.write("key.pem", pem.key)});
  }
  reactor::TlsOptions tls;
  tls.verify = reactor::TlsVerify::kNone;
  tls.min_version = reactor::TlsVersion::k1_3;
  const reactor::TlsContext client(reactor::TlsRole::kClient, tls);
  std::vector<Result> results;
  for (std::size_t r = 0; r < options.repeats; ++r) {
    ServerProcess server(command);
    results.push_back(options.plain ? run_once(options, reactor::PlainTransport{}, server)
                                    : run_once(options, reactor::TlsTransport(client), server));
    for (const auto& [name, value] : results.back()) std::printf("  %s %.2f", name, value);
    std::printf("\n");
  }
  for (std::size_t m = 0; m < results.front().size(); ++m) {
    std::vector<double> values;
    for (const Result& result : results) values.push_back(result[m].second);
    const auto [low, high] = std::minmax_element(values.begin(), values.end());
    std::printf("%-24s %12.2f (median of %zu; %.2f .. %.2f)\n", results.front()[m].first,
                median(values), values.size(), *low, *high);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string_view> args(argv + std::min(argc, 2), argv + argc);
  const std::string_view command = argc > 1 ? argv[1] : "";
  try {
    if (command == "serve") return serve(args);
    if (command == "run") return run(args);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tls: %s\n", e.what());
    return 1;
  }
  std::fprintf(
      stderr,
      "usage: bench_tls serve|run ... (see the comment at the top of bench/tls_load.cpp)\n");
  return 2;
}
