// Benchmark tool (not a test): how a ReactorPool's Balance modes spread connections and CPU time
// over its reactor threads, for the requirement "dispatch modes keep the busiest thread within
// 1.2x of the least busy" (1000 short and 100 long-lived connections).
//
//   bench_pool_balance [--threads T] [--mode reuseport|round-robin|least-connections|exclusive|all]
//                      [--seconds S] [--long N] [--short N] [--concurrency K] [--json FILE]
//
// For each mode (default all, in that order) it starts an echo server on a fresh pool of T
// reactors (default 2) with a PoolAcceptor on 127.0.0.1, port 0, and drives it from one epoll
// client thread in the same process (the main thread):
//   --long N (100)        connections opened at the start, each doing 64 B ping-pong (one message
//                         in flight) for the whole run;
//   --short N (1000)      connections spread evenly over the run, at most --concurrency K (4) at a
//                         time: connect, one 64 B echo, close;
//   --seconds S (3)       the run lasts S seconds, or until the last short connection is done.
// Every echo is checked byte for byte. Per reactor thread it prints the connections it served
// (short/long, counted in on_open on pool.current(), and PoolAcceptor::accepted_count(i)), the
// connections open on it on average (connection_count(), sampled every 5 ms: what
// least-connections balances), the messages it echoed, its epoll wake-ups (loop iterations) and
// its CPU time (the thread's CLOCK_THREAD_CPUTIME_ID, read by a task posted to the reactor at the
// start and at the end of the run); then the max/min ratio over threads of each, and for the
// dispatch modes whether the busiest thread's CPU time is within 1.2x of the least busy one's.
// --json FILE writes the same figures.
//
// Exit status: 0 (whether or not the 1.2x target is met); 1 if the library misbehaved (a
// connection failed or stalled, an echo differed, server and client byte counts disagree, a
// connection was left open); 2 on bad usage.
//
// The figures are indicative only. The client runs in the same process and competes with the
// reactors for the cores (with T reactors on T cores, they are oversubscribed), and its pace, one
// thread with one message in flight per connection, sets the message rate: CPU times show how the
// work is spread over the reactors, not what they can do. Measured on a 2-core machine with:
//   cmake -S . -B build/balance -DCMAKE_BUILD_TYPE=Release -DREACTOR_BUILD_TESTS=OFF
//   cmake --build build/balance -j2 --target bench_pool_balance
//   build/balance/bench/bench_pool_balance --threads 2 --json balance-2.json
//   build/balance/bench/bench_pool_balance --threads 4 --json balance-4.json   (oversubscribed)
#include <reactor.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using Pool = reactor::ReactorPool<>;

constexpr std::size_t kMessageSize = 64;
constexpr char kLongTag = 'L';  // the first byte of every message on a long-lived connection
constexpr char kShortTag = 'S';
// The client gives up when nothing completes for this long: a hang in the library.
constexpr auto kStallLimit = std::chrono::seconds(5);

struct Options {
  std::size_t threads = 2;
  std::vector<reactor::Balance> modes;
  double seconds = 3;
  std::size_t long_conns = 100;
  std::size_t short_conns = 1000;
  std::size_t concurrency = 4;
  std::string json;
};

const char* mode_name(reactor::Balance balance) {
  switch (balance) {
    case reactor::Balance::kReusePort:
      return "reuseport";
    case reactor::Balance::kRoundRobin:
      return "round-robin";
    case reactor::Balance::kLeastConnections:
      return "least-connections";
    case reactor::Balance::kExclusive:
      return "exclusive";
  }
  return "?";
}

[[noreturn]] void usage(const char* program) {
  std::fprintf(stderr,
               "usage: %s [--threads T] [--mode reuseport|round-robin|least-connections|exclusive|"
               "all]\n"
               "       [--seconds S] [--long N] [--short N] [--concurrency K] [--json FILE]\n",
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
      value > static_cast<double>(high)) {
    std::fprintf(stderr, "%s: bad number '%s'\n", program, text);
    usage(program);
  }
  return static_cast<T>(value);
}

Options parse(int argc, char** argv) {
  Options options;
  std::string_view mode = "all";
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage(argv[0]);
      return argv[++i];
    };
    if (arg == "--threads") {
      options.threads = number<std::size_t>(argv[0], value(), 1, 256);
    } else if (arg == "--mode") {
      mode = value();
    } else if (arg == "--seconds") {
      options.seconds = number<double>(argv[0], value(), 0.1, 3600);
    } else if (arg == "--long") {
      options.long_conns = number<std::size_t>(argv[0], value(), 0, 20000);
    } else if (arg == "--short") {
      options.short_conns = number<std::size_t>(argv[0], value(), 0, 1000000);
    } else if (arg == "--concurrency") {
      options.concurrency = number<std::size_t>(argv[0], value(), 1, 1000);
    } else if (arg == "--json") {
      options.json = value();
    } else {
      usage(argv[0]);
    }
  }
  using reactor::Balance;
  for (const Balance balance : {Balance::kReusePort, Balance::kRoundRobin,
                                Balance::kLeastConnections, Balance::kExclusive}) {
    if (mode == "all" || mode == mode_name(balance)) options.modes.push_back(balance);
  }
  if (options.modes.empty()) {
    std::fprintf(stderr, "%s: unknown mode '%.*s'\n", argv[0], static_cast<int>(mode.size()),
                 mode.data());
    usage(argv[0]);
  }
  return options;
}

std::int64_t thread_cpu_ns() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<std::int64_t>(now.tv_sec) * 1'000'000'000 + now.tv_nsec;
}

double ms_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

// --- Server --------------------------------------------------------------------------------------

// What one reactor thread did; written by that thread only, read once the pool has stopped.
struct alignas(64) ThreadCounters {
  std::uint64_t opened = 0;
  std::uint64_t closed = 0;
  std::uint64_t close_errors = 0;  // on_close with a reason
  std::uint64_t short_conns = 0;
  std::uint64_t long_conns = 0;
  std::uint64_t bytes = 0;
};

struct Server {
  Pool* pool = nullptr;
  // One per reactor, plus one for a connection opened on no reactor's thread (never expected).
  std::vector<ThreadCounters> threads;
};

// Echoes every byte, counting per reactor thread. A connection's kind is its first byte.
struct Echo {
  Server* server = nullptr;
  std::size_t thread = 0;
  bool classified = false;

  void on_open(auto& /*connection*/) {
    thread = server->pool->current();
    ++server->threads[thread].opened;
  }
  void on_data(auto& connection, std::string_view bytes) {
    ThreadCounters& counters = server->threads[thread];
    if (!classified) {
      classified = true;
      ++(bytes.front() == kLongTag ? counters.long_conns : counters.short_conns);
    }
    counters.bytes += bytes.size();
    connection.send(bytes);
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++server->threads[thread].closed;
    if (reason) ++server->threads[thread].close_errors;
  }
};

// Each reactor's CPU clock and loop iterations at one moment, read on its own thread.
struct ProbeRound {
  explicit ProbeRound(std::size_t n) : cpu_ns(n), iterations(n), remaining(n) {}
  std::vector<std::int64_t> cpu_ns;
  std::vector<std::uint64_t> iterations;
  std::atomic<std::size_t> remaining;
};

// Posts a probe to every reactor and waits up to 5 s for all of them; null if one did not run.
// The round is shared with the tasks, so a late one writes into memory that is still there.
std::shared_ptr<ProbeRound> probe(Pool& pool) {
  auto round = std::make_shared<ProbeRound>(pool.size());
  for (std::size_t i = 0; i < pool.size(); ++i) {
    pool.post(i, [round, &pool, i] {
      round->cpu_ns[i] = thread_cpu_ns();
      round->iterations[i] = pool[i].loop_iterations();
      round->remaining.fetch_sub(1, std::memory_order_release);
    });
  }
  const Clock::time_point deadline = Clock::now() + std::chrono::seconds(5);
  while (round->remaining.load(std::memory_order_acquire) != 0) {
    if (Clock::now() > deadline) return nullptr;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return round;
}

// --- Client --------------------------------------------------------------------------------------

struct ClientResult {
  std::uint64_t long_messages = 0;
  std::uint64_t short_done = 0;
  std::uint64_t bytes = 0;  // echoed bytes received
  std::uint64_t errors = 0;
  std::uint64_t mismatches = 0;
  bool stalled = false;
  std::string first_error;
  double cpu_ms = 0;
  double wall_ms = 0;
};

// One epoll thread: the long-lived connections in slots [0, long), the short ones in the K slots
// after them, reused. Level-triggered; EPOLLOUT only while connecting or stuck on a full buffer.
class Client {
 public:
  Client(const sockaddr_in& address, const Options& options)
      : address_(address),
        options_(options),
        conns_(options.long_conns + options.concurrency),
        epfd_(epoll_create1(EPOLL_CLOEXEC)) {
    if (epfd_ < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
  }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client() {
    for (Conn& conn : conns_) {
      if (conn.fd >= 0) ::close(conn.fd);
    }
    ::close(epfd_);
  }

  ClientResult run() {
    const std::int64_t cpu_start = thread_cpu_ns();
    const Clock::time_point start = Clock::now();
    const auto duration = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(options_.seconds));
    const Clock::time_point deadline = start + duration;
    progress_ = start;

    for (std::size_t slot = options_.long_conns + options_.concurrency;
         slot-- > options_.long_conns;) {
      free_short_.push_back(slot);
    }
    open_long_ = options_.long_conns;
    for (std::size_t slot = 0; slot < options_.long_conns; ++slot) start_conn(slot, true);

    const std::size_t total_short = options_.short_conns;
    std::size_t short_started = 0;
    std::array<epoll_event, 256> events{};
    while (open_long_ > 0 || short_started < total_short || active_short_ > 0) {
      const Clock::time_point now = Clock::now();
      if (!stopping_ && now >= deadline && short_started == total_short && active_short_ == 0) {
        stopping_ = true;  // each long connection closes when its message in flight comes back
      }
      // Short connection k is due at start + k * duration / total: spread over the run.
      const double fraction = std::chrono::duration<double>(now - start) / duration;
      const std::size_t due = std::min(
          total_short, static_cast<std::size_t>(fraction * static_cast<double>(total_short)) + 1);
      while (short_started < due && !free_short_.empty()) {
        const std::size_t slot = free_short_.back();
        free_short_.pop_back();
        ++short_started;
        ++active_short_;
        start_conn(slot, false);
      }
      if (now - progress_ > kStallLimit) {
        report_stall(short_started);
        break;
      }

      int timeout_ms = 10;
      if (short_started < total_short && !free_short_.empty()) {
        const Clock::time_point next =
            start +
            std::chrono::duration_cast<Clock::duration>(
                duration * (static_cast<double>(short_started) / static_cast<double>(total_short)));
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(next - now).count();
        timeout_ms = static_cast<int>(std::clamp<long long>(left, 0, 10));
      }
      const int n = epoll_wait(epfd_, events.data(), static_cast<int>(events.size()), timeout_ms);
      if (n < 0) {
        if (errno == EINTR) continue;
        throw std::system_error(errno, std::generic_category(), "epoll_wait");
      }
      for (int i = 0; i < n; ++i) {
        on_event(static_cast<std::size_t>(events[static_cast<std::size_t>(i)].data.u64),
                 events[static_cast<std::size_t>(i)].events);
      }
    }
    result_.wall_ms = ms_between(start, Clock::now());
    result_.cpu_ms = static_cast<double>(thread_cpu_ns() - cpu_start) / 1e6;
    return result_;
  }

 private:
  struct Conn {
    int fd = -1;
    bool is_long = false;
    bool connecting = false;
    bool want_out = false;
    std::uint64_t id = 0;
    std::uint64_t seq = 0;
    std::size_t sent = 0;
    std::size_t received = 0;
    std::array<char, kMessageSize> message{};
  };

  void start_conn(std::size_t slot, bool is_long) {
    Conn& conn = conns_[slot];
    conn = Conn{};
    conn.is_long = is_long;
    conn.id = next_id_++;
    conn.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (conn.fd < 0) {
      fail(slot, "socket", errno);
      return;
    }
    const int on = 1;
    setsockopt(conn.fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    if (connect(conn.fd, reinterpret_cast<const sockaddr*>(&address_), sizeof address_) == 0) {
      watch(slot, EPOLL_CTL_ADD, EPOLLIN);
      begin_message(slot);
      return;
    }
    if (errno != EINPROGRESS) {
      fail(slot, "connect", errno);
      return;
    }
    conn.connecting = true;
    watch(slot, EPOLL_CTL_ADD, EPOLLOUT);
  }

  void watch(std::size_t slot, int op, std::uint32_t events) {
    epoll_event event{};
    event.events = events;
    event.data.u64 = slot;
    if (epoll_ctl(epfd_, op, conns_[slot].fd, &event) != 0) {
      throw std::system_error(errno, std::generic_category(), "epoll_ctl");
    }
  }

  void on_event(std::size_t slot, std::uint32_t events) {
    Conn& conn = conns_[slot];
    if (conn.fd < 0) return;
    if (conn.connecting) {
      int error = 0;
      socklen_t length = sizeof error;
      if (getsockopt(conn.fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0) error = errno;
      if (error != 0) {
        fail(slot, "connect", error);
        return;
      }
      if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) == 0) return;
      conn.connecting = false;
      watch(slot, EPOLL_CTL_MOD, EPOLLIN);
      begin_message(slot);
      return;
    }
    if ((events & EPOLLOUT) != 0) {
      flush(slot);
      if (conns_[slot].fd < 0) return;
    }
    if ((events & (EPOLLIN | EPOLLERR | EPOLLHUP)) != 0) receive(slot);
  }

  // Message `seq` of connection `id`: its kind's tag, then letters that differ per connection and
  // per message, so an echo from the wrong connection or of an old message is caught.
  void begin_message(std::size_t slot) {
    Conn& conn = conns_[slot];
    conn.message[0] = conn.is_long ? kLongTag : kShortTag;
    for (std::size_t i = 1; i < kMessageSize; ++i) {
      conn.message[i] = static_cast<char>('a' + (conn.id * 31 + conn.seq * 7 + i) % 26);
    }
    conn.sent = 0;
    conn.received = 0;
    flush(slot);
  }

  void flush(std::size_t slot) {
    Conn& conn = conns_[slot];
    while (conn.sent < kMessageSize) {
      const ssize_t n =
          send(conn.fd, conn.message.data() + conn.sent, kMessageSize - conn.sent, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          if (!conn.want_out) watch(slot, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
          conn.want_out = true;
          return;
        }
        fail(slot, "send", errno);
        return;
      }
      conn.sent += static_cast<std::size_t>(n);
    }
    if (conn.want_out) watch(slot, EPOLL_CTL_MOD, EPOLLIN);
    conn.want_out = false;
  }

  void receive(std::size_t slot) {
    Conn& conn = conns_[slot];
    std::array<char, 4096> buffer;
    const ssize_t n = recv(conn.fd, buffer.data(), buffer.size(), 0);
    if (n < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) fail(slot, "recv", errno);
      return;
    }
    if (n == 0) {
      char what[80];
      std::snprintf(what, sizeof what, "EOF after %zu of %zu echoed bytes", conn.received,
                    kMessageSize);
      fail(slot, what, 0);
      return;
    }
    const auto size = static_cast<std::size_t>(n);
    result_.bytes += size;
    if (conn.received + size > conn.sent ||
        std::memcmp(buffer.data(), conn.message.data() + conn.received, size) != 0) {
      ++result_.mismatches;
      fail(slot, "echo differs from what was sent", 0);
      return;
    }
    conn.received += size;
    if (conn.received == kMessageSize) complete(slot);
  }

  void complete(std::size_t slot) {
    Conn& conn = conns_[slot];
    progress_ = Clock::now();
    if (!conn.is_long) {
      ++result_.short_done;
      finish(slot);
      return;
    }
    ++result_.long_messages;
    if (stopping_) {
      finish(slot);
      return;
    }
    ++conn.seq;
    begin_message(slot);
  }

  void fail(std::size_t slot, const char* what, int error) {
    ++result_.errors;
    if (result_.first_error.empty()) {
      const Conn& conn = conns_[slot];
      result_.first_error = std::string(conn.is_long ? "long" : "short") + " connection " +
                            std::to_string(conn.id) + ": " + what;
      if (error != 0) result_.first_error += std::string(": ") + std::strerror(error);
    }
    finish(slot);
  }

  // Closes the slot's connection (closing the fd also leaves the epoll set: it has no duplicate).
  void finish(std::size_t slot) {
    Conn& conn = conns_[slot];
    if (conn.fd >= 0) ::close(conn.fd);
    conn.fd = -1;
    if (conn.is_long) {
      --open_long_;
    } else {
      --active_short_;
      free_short_.push_back(slot);
    }
  }

  void report_stall(std::size_t short_started) {
    result_.stalled = true;
    ++result_.errors;
    std::size_t connecting = 0;
    std::size_t waiting = 0;
    for (const Conn& conn : conns_) {
      if (conn.fd < 0) continue;
      ++(conn.connecting ? connecting : waiting);
    }
    char text[200];
    std::snprintf(text, sizeof text,
                  "stalled: nothing completed for %lld s; %zu long and %zu short connections "
                  "open (%zu connecting, %zu awaiting an echo), %zu of %zu short ones started",
                  static_cast<long long>(kStallLimit.count()), open_long_, active_short_,
                  connecting, waiting, short_started, options_.short_conns);
    if (result_.first_error.empty()) result_.first_error = text;
    std::fprintf(stderr, "bench_pool_balance: %s\n", text);
  }

  sockaddr_in address_;
  const Options& options_;
  std::vector<Conn> conns_;
  std::vector<std::size_t> free_short_;
  int epfd_;
  std::uint64_t next_id_ = 0;
  std::size_t open_long_ = 0;
  std::size_t active_short_ = 0;
  bool stopping_ = false;
  Clock::time_point progress_{};
  ClientResult result_;
};

// --- One mode ------------------------------------------------------------------------------------

struct ThreadResult {
  std::uint64_t short_conns = 0;
  std::uint64_t long_conns = 0;
  std::uint64_t accepted = 0;
  std::uint64_t messages = 0;
  std::uint64_t wakeups = 0;
  double avg_open = 0;  // connections open on the reactor, averaged over samples every 5 ms
  double cpu_ms = 0;
};

struct ModeResult {
  reactor::Balance balance{};
  reactor::Balance in_use{};  // what the acceptor did: kReusePort for a pool of one
  std::vector<ThreadResult> threads;
  ClientResult client;
  double wall_ms = 0;  // between the two probes
  std::uint64_t server_bytes = 0;
  std::vector<std::string> problems;  // the library misbehaved

  bool ok() const { return problems.empty(); }
};

// max/min over the threads; infinity when some thread got none, 1 when none got any.
template <class F>
double spread(const std::vector<ThreadResult>& threads, F value) {
  double low = std::numeric_limits<double>::infinity();
  double high = 0;
  for (const ThreadResult& thread : threads) {
    const double v = value(thread);
    low = std::min(low, v);
    high = std::max(high, v);
  }
  if (high == 0) return 1;
  if (low == 0) return std::numeric_limits<double>::infinity();
  return high / low;
}

double connections_of(const ThreadResult& t) {
  return static_cast<double>(t.short_conns + t.long_conns);
}
double long_of(const ThreadResult& t) {
  return static_cast<double>(t.long_conns);
}
double open_of(const ThreadResult& t) {
  return t.avg_open;
}
double messages_of(const ThreadResult& t) {
  return static_cast<double>(t.messages);
}
double cpu_of(const ThreadResult& t) {
  return t.cpu_ms;
}

ModeResult run_mode(const Options& options, reactor::Balance balance) {
  ModeResult result;
  result.balance = balance;
  Pool pool(options.threads);
  Server server;
  server.pool = &pool;
  server.threads.resize(pool.size() + 1);
  const auto problem = [&](std::string text) { result.problems.push_back(std::move(text)); };

  {
    reactor::PoolAcceptor<Echo> acceptor(pool, reactor::Endpoint::from_host_port("127.0.0.1", 0),
                                         Echo{&server}, reactor::ListenOptions{}, balance);
    result.in_use = acceptor.balance();
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(acceptor.local_endpoint().port());
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    std::string server_error;
    std::thread server_thread([&] {
      try {
        pool.run();
      } catch (const std::exception& e) {
        server_error = e.what();
      }
    });

    const std::shared_ptr<ProbeRound> before = probe(pool);
    const Clock::time_point started = Clock::now();
    if (before == nullptr) problem("a reactor did not run the start probe within 5 s");
    // What least-connections balances: connections open at once (connection_count() may be
    // read from any thread).
    std::vector<double> open_sum(pool.size());
    std::size_t samples = 0;
    std::atomic<bool> sampling{true};
    std::thread sampler([&] {
      while (sampling.load(std::memory_order_relaxed)) {
        for (std::size_t i = 0; i < pool.size(); ++i) {
          open_sum[i] += static_cast<double>(pool[i].connection_count());
        }
        ++samples;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    });
    if (before != nullptr) {
      try {
        Client client(address, options);
        result.client = client.run();
      } catch (const std::exception& e) {
        problem(std::string("client: ") + e.what());
      }
    }
    sampling.store(false, std::memory_order_relaxed);
    sampler.join();
    // The client has closed everything: wait for the server to see it.
    const Clock::time_point limit = Clock::now() + std::chrono::seconds(2);
    while (pool.connection_count() > 0 && Clock::now() < limit) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (const std::size_t left = pool.connection_count(); left > 0) {
      problem(std::to_string(left) + " connections still open 2 s after the client closed all");
    }
    const std::shared_ptr<ProbeRound> after = before != nullptr ? probe(pool) : nullptr;
    result.wall_ms = ms_between(started, Clock::now());
    if (before != nullptr && after == nullptr) problem("a reactor did not run the end probe");
    pool.stop();
    server_thread.join();
    if (!server_error.empty()) problem("ReactorPool::run: " + server_error);
    const reactor::ShutdownReport report = pool.shutdown(std::chrono::milliseconds(200));
    if (report.aborted + report.failed > 0 || report.error) {
      problem("shutdown: " + std::to_string(report.aborted + report.failed) + " aborted" +
              (report.error ? ", " + report.error.message() : std::string()));
    }

    result.threads.resize(pool.size());
    for (std::size_t i = 0; i < pool.size(); ++i) {
      const ThreadCounters& counters = server.threads[i];
      ThreadResult& thread = result.threads[i];
      thread.short_conns = counters.short_conns;
      thread.long_conns = counters.long_conns;
      thread.accepted = acceptor.accepted_count(i);
      thread.messages = counters.bytes / kMessageSize;
      thread.avg_open = samples > 0 ? open_sum[i] / static_cast<double>(samples) : 0;
      result.server_bytes += counters.bytes;
      if (before != nullptr && after != nullptr) {
        thread.cpu_ms = static_cast<double>(after->cpu_ns[i] - before->cpu_ns[i]) / 1e6;
        thread.wakeups = after->iterations[i] - before->iterations[i];
      }
      if (counters.opened != thread.accepted) {
        problem("reactor " + std::to_string(i) + ": " + std::to_string(counters.opened) +
                " opened, accepted_count " + std::to_string(thread.accepted));
      }
      if (counters.opened != counters.closed) {
        problem("reactor " + std::to_string(i) + ": " + std::to_string(counters.opened) +
                " opened, " + std::to_string(counters.closed) + " closed");
      }
      if (counters.close_errors > 0) {
        problem("reactor " + std::to_string(i) + ": " + std::to_string(counters.close_errors) +
                " connections closed with an error");
      }
    }
    if (server.threads.back().opened > 0) {
      problem(std::to_string(server.threads.back().opened) +
              " connections opened outside every reactor's thread");
    }
    if (acceptor.failed_count() > 0) {
      problem(std::to_string(acceptor.failed_count()) + " failed accepts");
    }
  }

  const ClientResult& client = result.client;
  if (client.errors > 0) {
    problem(std::to_string(client.errors) + " client errors, first: " + client.first_error);
  }
  if (client.bytes != result.server_bytes) {
    problem("server echoed " + std::to_string(result.server_bytes) + " bytes, client got " +
            std::to_string(client.bytes));
  }
  const std::uint64_t connections = options.long_conns + options.short_conns;
  std::uint64_t served = 0;
  for (const ThreadResult& thread : result.threads) {
    served += thread.short_conns + thread.long_conns;
  }
  if (client.errors == 0 && served != connections) {
    problem("server saw " + std::to_string(served) + " connections, client made " +
            std::to_string(connections));
  }
  return result;
}

// --- Output --------------------------------------------------------------------------------------

std::string ratio_text(double ratio) {
  if (std::isinf(ratio)) return "inf";
  char text[32];
  std::snprintf(text, sizeof text, "%.2f", ratio);
  return text;
}

void print(const Options& options, const ModeResult& result) {
  const ClientResult& client = result.client;
  std::printf(
      "\n== %s%s: %zu reactor threads, %.2f s, %zu long + %zu short connections (%zu at a "
      "time), %zu B messages\n",
      mode_name(result.balance),
      result.in_use != result.balance ? " (a pool of one: one Acceptor)" : "",
      result.threads.size(), result.wall_ms / 1000, options.long_conns, options.short_conns,
      options.concurrency, kMessageSize);
  std::printf(
      "  thread   short    long  accepted  avg open   messages    wakeups    CPU ms  CPU %%\n");
  for (std::size_t i = 0; i < result.threads.size(); ++i) {
    const ThreadResult& t = result.threads[i];
    std::printf("  %6zu  %6llu  %6llu  %8llu  %8.1f  %9llu  %9llu  %8.1f  %5.1f\n", i,
                static_cast<unsigned long long>(t.short_conns),
                static_cast<unsigned long long>(t.long_conns),
                static_cast<unsigned long long>(t.accepted), t.avg_open,
                static_cast<unsigned long long>(t.messages),
                static_cast<unsigned long long>(t.wakeups), t.cpu_ms,
                result.wall_ms > 0 ? 100 * t.cpu_ms / result.wall_ms : 0.0);
  }
  const double cpu = spread(result.threads, cpu_of);
  std::printf("  max/min: connections %s (long %s), avg open %s, messages %s, CPU %s",
              ratio_text(spread(result.threads, connections_of)).c_str(),
              ratio_text(spread(result.threads, long_of)).c_str(),
              ratio_text(spread(result.threads, open_of)).c_str(),
              ratio_text(spread(result.threads, messages_of)).c_str(), ratio_text(cpu).c_str());
  if (result.in_use == reactor::Balance::kRoundRobin ||
      result.in_use == reactor::Balance::kLeastConnections) {
    std::printf("  (dispatch target, CPU <= 1.2: %s)", cpu <= 1.2 ? "met" : "MISSED");
  }
  std::printf(
      "\n  client: 1 thread, CPU %.1f ms; %llu long messages (%.0f msg/s), %llu short "
      "connections; %llu errors, %llu mismatches; %llu bytes echoed\n",
      client.cpu_ms, static_cast<unsigned long long>(client.long_messages),
      client.wall_ms > 0 ? static_cast<double>(client.long_messages) * 1000 / client.wall_ms : 0.0,
      static_cast<unsigned long long>(client.short_done),
      static_cast<unsigned long long>(client.errors),
      static_cast<unsigned long long>(client.mismatches),
      static_cast<unsigned long long>(client.bytes));
  for (const std::string& text : result.problems) std::printf("  PROBLEM: %s\n", text.c_str());
  std::fflush(stdout);
}

std::string json_number(double value) {
  if (!std::isfinite(value)) return "null";
  char text[32];
  std::snprintf(text, sizeof text, "%.3f", value);
  return text;
}

// Problems are our own sentences: quotes and backslashes are all that need escaping, plus any
// control character an strerror() might hold.
std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out + "\"";
}

bool write_json(const Options& options, const std::vector<ModeResult>& results) {
  std::FILE* file = std::fopen(options.json.c_str(), "w");
  if (file == nullptr) {
    std::fprintf(stderr, "bench_pool_balance: %s: %s\n", options.json.c_str(),
                 std::strerror(errno));
    return false;
  }
  std::fprintf(file,
               "{\n  \"threads\": %zu, \"seconds\": %g, \"long\": %zu, \"short\": %zu, "
               "\"concurrency\": %zu, \"message_bytes\": %zu,\n  \"modes\": [",
               options.threads, options.seconds, options.long_conns, options.short_conns,
               options.concurrency, kMessageSize);
  for (std::size_t m = 0; m < results.size(); ++m) {
    const ModeResult& r = results[m];
    std::fprintf(
        file, "%s\n    {\"mode\": \"%s\", \"in_use\": \"%s\", \"wall_ms\": %s, \"threads\": [",
        m ? "," : "", mode_name(r.balance), mode_name(r.in_use), json_number(r.wall_ms).c_str());
    for (std::size_t i = 0; i < r.threads.size(); ++i) {
      const ThreadResult& t = r.threads[i];
      std::fprintf(file,
                   "%s\n      {\"short\": %llu, \"long\": %llu, \"accepted\": %llu, "
                   "\"avg_open\": %s, \"messages\": %llu, \"wakeups\": %llu, \"cpu_ms\": %s}",
                   i ? "," : "", static_cast<unsigned long long>(t.short_conns),
                   static_cast<unsigned long long>(t.long_conns),
                   static_cast<unsigned long long>(t.accepted), json_number(t.avg_open).c_str(),
                   static_cast<unsigned long long>(t.messages),
                   static_cast<unsigned long long>(t.wakeups), json_number(t.cpu_ms).c_str());
    }
    std::fprintf(file,
                 "],\n     \"max_over_min\": {\"connections\": %s, \"long\": %s, "
                 "\"avg_open\": %s, \"messages\": %s, \"cpu\": %s},\n",
                 json_number(spread(r.threads, connections_of)).c_str(),
                 json_number(spread(r.threads, long_of)).c_str(),
                 json_number(spread(r.threads, open_of)).c_str(),
                 json_number(spread(r.threads, messages_of)).c_str(),
                 json_number(spread(r.threads, cpu_of)).c_str());
    std::fprintf(file,
                 "     \"client\": {\"cpu_ms\": %s, \"long_messages\": %llu, \"short_done\": %llu, "
                 "\"errors\": %llu, \"mismatches\": %llu, \"bytes\": %llu},\n"
                 "     \"server_bytes\": %llu, \"problems\": [",
                 json_number(r.client.cpu_ms).c_str(),
                 static_cast<unsigned long long>(r.client.long_messages),
                 static_cast<unsigned long long>(r.client.short_done),
                 static_cast<unsigned long long>(r.client.errors),
                 static_cast<unsigned long long>(r.client.mismatches),
                 static_cast<unsigned long long>(r.client.bytes),
                 static_cast<unsigned long long>(r.server_bytes));
    for (std::size_t p = 0; p < r.problems.size(); ++p) {
      std::fprintf(file, "%s%s", p ? ", " : "", json_string(r.problems[p]).c_str());
    }
    std::fprintf(file, "]}");
  }
  std::fprintf(file, "\n  ]\n}\n");
  return std::fclose(file) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  std::vector<ModeResult> results;
  bool ok = true;
  try {
    for (const reactor::Balance balance : options.modes) {
      results.push_back(run_mode(options, balance));
      print(options, results.back());
      ok = ok && results.back().ok();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_pool_balance: %s\n", e.what());
    return 1;
  }
  if (!options.json.empty() && !write_json(options, results)) return 1;
  return ok ? 0 : 1;
}
