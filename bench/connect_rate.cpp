// Benchmark tool (not a test): connections per second for N concurrent connects on one reactor,
// made three ways:
//   blocking    reactor::connect() then reactor::adopt(), one connection after the other (what
//               examples/echo_load did before it used Connector);
//   connector   N reactor::Connector, all in flight at once, to 127.0.0.1 (numeric: no lookup);
//   localhost   the same to "localhost": each lookup on the shared Resolver's worker threads
//               (getaddrinfo, /etc/hosts), then Happy Eyeballs over what it returns.
//
//   bench_connect_rate [--conns N] [--repeats R]
//
// N defaults to 1000 (keep it at most net.core.somaxconn: the server's accept queue must hold a
// whole burst), R to 5. The server is an Acceptor on its own Reactor in a second thread, listening
// on 127.0.0.1 and, when the machine has IPv6, on [::1] at the same port (so that "localhost",
// which resolves to ::1 first, connects at the first attempt); it accepts and keeps every
// connection until the round ends. A round times one mode from its first connect until every
// connection is established (on_result, or adopt() returning), client and server each on a fresh
// reactor; the client's connections are then reset (RST, so no TIME_WAIT piles up) and the server
// stopped. The modes take turns, round after round. One line per mode: the median connections/s
// over the R rounds, with the slowest and fastest. Exit status 1 if any connect failed.
//
// Measured with:
//   cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release
//   cmake --build build/release -j2 --target bench_connect_rate
//   build/release/bench/bench_connect_rate --conns 1000 --repeats 11
// Figures and what they mean: docs/performance.md, "Issue 11". In short, on loopback a handshake
// is kernel CPU work with no round trip to overlap, so the connector matches the blocking loop;
// what it buys is a loop that never blocks and connects that overlap real round trips.
#include <reactor.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

// Both ends do nothing with the bytes: the connections only need to exist.
struct Idle {
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
};

// The server: its own reactor on its own thread, accepting and keeping connections until stopped.
class Server {
 public:
  Server() {
    v4_.emplace(loop_, reactor::Endpoint::parse("127.0.0.1:0"), Idle{});
    port_ = v4_->local_endpoint().port();
    std::error_code ec;
    const reactor::Endpoint v6 = reactor::Endpoint::from_host_port("::1", port_, ec);
    if (!ec) v6_.emplace(loop_, v6, Idle{}, reactor::ListenOptions{}, ec);
    if (ec) v6_.reset();  // no IPv6 loopback: "localhost" falls back to 127.0.0.1
    thread_ = std::thread([this] { loop_.run(); });
  }

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Stops the loop, then (on this thread) closes the listeners and every connection.
  ~Server() {
    loop_.stop();
    thread_.join();
    v6_.reset();
    v4_.reset();
  }

  std::uint16_t port() const { return port_; }
  bool has_v6() const { return v6_.has_value(); }

 private:
  reactor::Reactor<> loop_;
  std::optional<reactor::Acceptor<Idle>> v4_;
  std::optional<reactor::Acceptor<Idle>> v6_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};

enum class Mode { kBlocking, kConnector, kLocalhost };

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kBlocking:
      return "blocking connect()+adopt(), one by one ";
    case Mode::kConnector:
      return "Connector to 127.0.0.1, all at once    ";
    case Mode::kLocalhost:
      return "Connector to \"localhost\" (resolver)    ";
  }
  return "?";
}

// Counts what the connectors report and keeps a way to reset each connection at the end (a
// std::function, as the two modes' connections differ in type; it stores the pointer inline).
struct Tally {
  std::size_t connected = 0;
  std::size_t failed = 0;
  std::error_code first_error;
  std::vector<std::function<void()>> resets;
};

struct Report {
  Tally* tally;
  void operator()(auto* connection, std::error_code ec, const reactor::Endpoint& /*address*/) {
    if (connection == nullptr) {
      if (tally->failed++ == 0) tally->first_error = ec;
      return;
    }
    ++tally->connected;
    tally->resets.emplace_back([connection] { connection->abort(true); });
  }
};

// One round of `mode`: connections/s, or nullopt (after saying why) when a connect failed.
std::optional<double> round(Mode mode, std::size_t conns) {
  Server server;
  reactor::Reactor<> loop;
  Tally tally;
  tally.resets.reserve(conns);
  const reactor::Endpoint endpoint = reactor::Endpoint::from_host_port("127.0.0.1", server.port());
  std::vector<std::unique_ptr<reactor::Connector<Idle, Report>>> connectors;
  connectors.reserve(conns);

  const Clock::time_point start = Clock::now();
  if (mode == Mode::kBlocking) {
    for (std::size_t i = 0; i < conns; ++i) {
      std::error_code ec;
      reactor::UniqueFd socket = reactor::connect(endpoint, ec);
      auto* connection = ec ? nullptr : reactor::adopt(loop, std::move(socket), Idle{}, {}, ec);
      if (connection == nullptr) {
        if (tally.failed++ == 0) tally.first_error = ec;
        continue;
      }
      ++tally.connected;
      tally.resets.emplace_back([connection] { connection->abort(true); });
    }
  } else {
    for (std::size_t i = 0; i < conns; ++i) {
      connectors.push_back(
          std::make_unique<reactor::Connector<Idle, Report>>(loop, Idle{}, Report{&tally}));
      if (mode == Mode::kConnector) {
        connectors.back()->connect(endpoint);
      } else {
        connectors.back()->connect("localhost", server.port());
      }
    }
    while (tally.connected + tally.failed < conns) loop.run_once();
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  connectors.clear();
  for (const auto& reset : tally.resets) reset();
  loop.run_once(std::chrono::milliseconds(0));  // their on_close
  if (tally.failed != 0) {
    std::fprintf(stderr, "bench_connect_rate: %s: %zu of %zu connects failed (first: %s)\n",
                 mode_name(mode), tally.failed, conns, tally.first_error.message().c_str());
    return std::nullopt;
  }
  return static_cast<double>(conns) / seconds;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t middle = values.size() / 2;
  return values.size() % 2 == 1 ? values[middle] : (values[middle - 1] + values[middle]) / 2;
}

// Raises the soft fd limit to the hard one: every connection is two fds here (client, server).
void raise_fd_limit(std::size_t conns) {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
  limit.rlim_cur = limit.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &limit);
  ::getrlimit(RLIMIT_NOFILE, &limit);
  if (limit.rlim_cur != RLIM_INFINITY && 2 * conns + 64 > limit.rlim_cur) {
    std::fprintf(stderr,
                 "bench_connect_rate: warning: %zu connections need %zu fds, the limit is %llu\n",
                 conns, 2 * conns + 64, static_cast<unsigned long long>(limit.rlim_cur));
  }
}

bool parse_count(const char* text, std::size_t& value) {
  char* end = nullptr;
  const unsigned long long parsed = std::strtoull(text, &end, 10);
  if (end == text || *end != '\0' || parsed == 0 || parsed > 1'000'000) return false;
  value = static_cast<std::size_t>(parsed);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t conns = 1000;
  std::size_t repeats = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool ok = i + 1 < argc && ((arg == "--conns" && parse_count(argv[++i], conns)) ||
                                     (arg == "--repeats" && parse_count(argv[++i], repeats)));
    if (!ok) {
      std::fprintf(stderr, "usage: %s [--conns N] [--repeats R]\n", argv[0]);
      return 2;
    }
  }
  raise_fd_limit(conns);

  const Mode modes[] = {Mode::kBlocking, Mode::kConnector, Mode::kLocalhost};
  std::vector<double> rates[3];
  try {
    const bool v6 = Server().has_v6();
    std::printf(
        "bench_connect_rate: %zu concurrent connects over loopback, %zu rounds per mode%s\n", conns,
        repeats, v6 ? "" : " (no IPv6 loopback: localhost tries ::1, then 127.0.0.1)");
    for (std::size_t r = 0; r < repeats; ++r) {
      for (std::size_t m = 0; m < 3; ++m) {
        const std::optional<double> rate = round(modes[m], conns);
        if (!rate) return 1;
        rates[m].push_back(*rate);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_connect_rate: %s\n", e.what());
    return 1;
  }
  for (std::size_t m = 0; m < 3; ++m) {
    const auto [slowest, fastest] = std::minmax_element(rates[m].begin(), rates[m].end());
    std::printf("%s %9.0f connections/s (median; %.0f .. %.0f)\n", mode_name(modes[m]),
                median(rates[m]), *slowest, *fastest);
  }
  return 0;
}
