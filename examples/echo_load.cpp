// echo_load: a load client for echo_server, written with reactor. Every connection keeps DEPTH
// messages of SIZE bytes in flight, verifies every echoed byte and measures round-trip latency.
//
//   echo_load [--host HOST] --port N [--unix PATH] --conns N --size BYTES [--depth D] --seconds T
//             [--connect-timeout MS] [--tls [--tls-ca FILE | --tls-insecure] [--tls-name NAME]]
//
// --host defaults to 127.0.0.1, --depth to 1, --connect-timeout to 5000; --unix replaces
// --host/--port. HOST is a numeric address (127.0.0.1, ::1, [::1]) or a name such as localhost,
// which each connection's reactor::Connector resolves on the resolver's worker threads. The
// connections are opened concurrently (up to 1000 connects in flight), without blocking the loop;
// each must be established within MS milliseconds of its start (lookup included), and the measured
// run starts once all of them are. The first connect that fails (refused, timed out, the name not
// resolved) is reported on stderr in one line, "echo_load: connect to ADDRESS (connection I):
// REASON" or "echo_load: resolve HOST: REASON", and the program exits 1 without starting the load.
// Prints one progress line per second and a final line starting with "summary:". Exits 0 when
// every byte came back intact, 1 on a mismatch or any connection error (connect failure, reset,
// unexpected close, an echo that does not come back within 5 s of the end), 2 on bad usage.
// SIGINT/SIGTERM end the run early.
//
// --tls speaks TLS, verifying the server's certificate against the system's CA store, or the PEM
// bundle --tls-ca names, or not at all with --tls-insecure; the name checked and sent as SNI is
// --tls-name, by default --host (none with --unix). A failed handshake is reported as a failed
// connect. Builds without OpenSSL refuse these flags (exit status 2).
//
// Each connection sends a byte pattern that is a function of (connection, stream offset), so a
// lost, duplicated, reordered or crossed-over byte is detected without keeping what was sent.
#include <sys/resource.h>
#include <reactor.hpp>
#if REACTOR_EXAMPLES_TLS
#include <reactor/tls.hpp>
#endif

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::size_t kMaxSize = 16 * 1024 * 1024;
constexpr std::size_t kMaxDepth = 65536;
constexpr std::size_t kMaxInFlightBytes = std::size_t{1} << 30;  // depth * size, per connection
constexpr std::size_t kMaxConns = 1'000'000;
constexpr double kMaxSeconds = 7 * 24 * 3600;
constexpr std::uint32_t kDefaultConnectTimeoutMs = 5000;
// After the run, how long in-flight messages may take to come back before they count as lost.
constexpr auto kDrainLimit = std::chrono::seconds(5);
// Connects in flight at most: more would only overflow the server's accept queue (SOMAXCONN), and
// a SYN it drops is sent again only a second later.
constexpr std::size_t kMaxConnecting = 1000;
// Per-connection problems reported on stderr; the rest are only counted.
constexpr int kMaxReports = 10;

struct Options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  std::string unix_path;
  std::size_t conns = 0;
  std::size_t size = 0;
  std::size_t depth = 1;
  double seconds = 0;
  std::uint32_t connect_timeout_ms = kDefaultConnectTimeoutMs;
  bool tls = false;
  std::string tls_ca;  // empty: the system's store
  bool tls_insecure = false;
  std::string tls_name;  // empty: the host connected to
};

// --- The byte pattern ----------------------------------------------------------------------------

// splitmix64's finalizer: a cheap bijective hash whose output bits all depend on every input bit.
constexpr std::uint64_t mix(std::uint64_t x) noexcept {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9u;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebu;
  return x ^ (x >> 31);
}

// Stream `seed`'s bytes 8*index .. 8*index+7, little end first.
constexpr std::uint64_t pattern_word(std::uint64_t seed, std::uint64_t index) noexcept {
  return mix(seed + index * 0x9e3779b97f4a7c15u);
}

constexpr unsigned char pattern_byte(std::uint64_t seed, std::uint64_t offset) noexcept {
  return static_cast<unsigned char>(pattern_word(seed, offset >> 3) >> (8 * (offset & 7)));
}

// Calls visit(i, expected) for the pattern bytes at stream offsets offset .. offset+size-1, one
// hash per 8 bytes; stops early, returning i, when visit returns false. Returns size otherwise.
template <class Visit>
std::size_t for_each_pattern_byte(std::size_t size, std::uint64_t seed, std::uint64_t offset,
                                  Visit visit) noexcept {
  std::size_t i = 0;
  while (i < size) {
    const std::uint64_t position = offset + i;
    const unsigned skip = static_cast<unsigned>(position & 7);
    std::uint64_t word = pattern_word(seed, position >> 3) >> (8 * skip);
    const std::size_t take = std::min<std::size_t>(8 - skip, size - i);
    for (std::size_t k = 0; k < take; ++k, word >>= 8) {
      if (!visit(i + k, static_cast<unsigned char>(word))) return i + k;
    }
    i += take;
  }
  return size;
}

void fill_pattern(char* out, std::size_t size, std::uint64_t seed, std::uint64_t offset) noexcept {
  for_each_pattern_byte(size, seed, offset, [out](std::size_t i, unsigned char expected) {
    out[i] = static_cast<char>(expected);
    return true;
  });
}

// Index of the first byte that differs from the pattern, or size when all match.
std::size_t find_mismatch(const char* data, std::size_t size, std::uint64_t seed,
                          std::uint64_t offset) noexcept {
  return for_each_pattern_byte(size, seed, offset, [data](std::size_t i, unsigned char expected) {
    return static_cast<unsigned char>(data[i]) == expected;
  });
}

// --- Latency histogram ---------------------------------------------------------------------------

// Round-trip latencies in 1 us buckets up to 1 s, plus one overflow bucket. record() never
// allocates; clear() and add() touch only the buckets used so far.
class Histogram {
 public:
  static constexpr std::size_t kBuckets = 1'000'000;

  Histogram() : counts_(kBuckets + 1, 0) {}

  void record(Clock::duration latency) noexcept {
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(latency).count();
    const std::size_t index = us < 0 ? 0 : std::min(static_cast<std::size_t>(us), kBuckets);
    ++counts_[index];
    ++count_;
    used_ = std::max(used_, index + 1);
  }

  void add(const Histogram& other) noexcept {
    for (std::size_t i = 0; i < other.used_; ++i) counts_[i] += other.counts_[i];
    count_ += other.count_;
    used_ = std::max(used_, other.used_);
  }

  void clear() noexcept {
    std::fill_n(counts_.begin(), used_, 0);
    count_ = 0;
    used_ = 0;
  }

  std::uint64_t count() const noexcept { return count_; }

  // The latency in us at or below which a fraction q (0 < q <= 1) of the samples lie; kBuckets
  // means "1 s or more". 0 without samples.
  std::uint64_t percentile(double q) const noexcept {
    if (count_ == 0) return 0;
    const auto rank = std::max<std::uint64_t>(
        1, static_cast<std::uint64_t>(q * static_cast<double>(count_) + 0.999999));
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < used_; ++i) {
      seen += counts_[i];
      if (seen >= rank) return i;
    }
    return used_ - 1;
  }

 private:
  std::vector<std::uint64_t> counts_;
  std::uint64_t count_ = 0;
  std::size_t used_ = 0;
};

// "45", or ">=1000000" for the overflow bucket.
std::string format_us(std::uint64_t us) {
  return us >= Histogram::kBuckets ? ">=" + std::to_string(Histogram::kBuckets)
                                   : std::to_string(us);
}

// --- Connections ---------------------------------------------------------------------------------

using Loop = reactor::Reactor<>;

// One connection's progress through its byte stream.
struct Session {
  std::size_t id = 0;
  std::uint64_t seed = 0;
  bool open = false;             // established and not closed yet
  std::uint64_t sent_bytes = 0;  // stream offset of the next message
  std::uint64_t received_bytes = 0;
  std::uint64_t completed_bytes = 0;     // received_bytes rounded down to whole messages
  Clock::time_point* sent_at = nullptr;  // `depth` slots: send time of each message in flight
  std::size_t send_slot = 0;
  std::size_t receive_slot = 0;
  bool mismatched = false;
};

// Everything the connections share: settings, the one send buffer, counters and histograms.
struct Run {
  explicit Run(const Options& options)
      : size(options.size),
        depth(options.depth),
        scratch(new char[options.size]),
        send_times(options.conns * options.depth) {}

  std::size_t size;
  std::size_t depth;
  std::unique_ptr<char[]> scratch;            // the message being sent (send() copies or sends it)
  std::vector<Clock::time_point> send_times;  // every session's `depth` slots
  bool sending = true;    // false once the time is up: in-flight messages drain, none are added
  bool recording = true;  // completions count towards the statistics
  bool finished = false;  // closes from now on are ours
  std::uint64_t in_flight = 0;  // messages sent and not yet echoed, over all connections
  std::uint64_t errors = 0;
  std::uint64_t mismatches = 0;
  int reports = 0;
  Histogram interval;  // this second's latencies
  Histogram total;     // every earlier second's
  std::uint64_t interval_messages = 0;
  std::uint64_t interval_bytes = 0;
  std::uint64_t total_messages = 0;
  std::uint64_t total_bytes = 0;

  // Prints a per-connection problem on stderr, up to kMaxReports of them.
  [[gnu::format(printf, 2, 3)]] void report(const char* format, ...) noexcept {
    if (reports++ >= kMaxReports) return;
    va_list args;
    va_start(args, format);
    std::vfprintf(stderr, format, args);
    va_end(args);
  }

  // Folds this second into the totals and starts the next one.
  void end_interval() noexcept {
    total.add(interval);
    interval.clear();
    total_messages += interval_messages;
    total_bytes += interval_bytes;
    interval_messages = 0;
    interval_bytes = 0;
  }
};

// Each connection's handler. A Connector gives the connection a handler derived from this one, so
// the hooks take the connection as `auto&` (its type is Dialer::connection_type, below).
struct LoadHandler {
  Run* run;
  Session* session;

  void on_open(auto& /*connection*/) noexcept { session->open = true; }

  // Puts the first `depth` messages in flight: the measured run begins.
  void start(auto& connection, Clock::time_point now) noexcept {
    for (std::size_t i = 0; i < run->depth; ++i) {
      if (!send_message(connection, now)) return;
    }
  }

  void on_data(auto& connection, std::string_view bytes) noexcept {
    Session& s = *session;
    const std::size_t bad = find_mismatch(bytes.data(), bytes.size(), s.seed, s.received_bytes);
    if (bad < bytes.size() || s.received_bytes + bytes.size() > s.sent_bytes) {
      mismatch(connection, bytes, bad);
      return;
    }
    s.received_bytes += bytes.size();
    if (run->recording) run->interval_bytes += bytes.size();
    const Clock::time_point now = Clock::now();
    while (s.received_bytes - s.completed_bytes >= run->size) {
      s.completed_bytes += run->size;
      --run->in_flight;
      const Clock::time_point sent_at = s.sent_at[s.receive_slot];
      s.receive_slot = s.receive_slot + 1 == run->depth ? 0 : s.receive_slot + 1;
      if (run->recording) {
        run->interval.record(now - sent_at);
        ++run->interval_messages;
      }
      if (run->sending && !send_message(connection, now)) return;
    }
  }

  void on_close(auto& /*connection*/, std::error_code reason) noexcept {
    Session& s = *session;
    s.open = false;
    run->in_flight -= (s.sent_bytes - s.completed_bytes) / run->size;
    if (s.mismatched || run->finished) return;
    ++run->errors;
    if (reason) {
      run->report("echo_load: connection %zu: %s\n", s.id, reason.message().c_str());
    } else {
      run->report("echo_load: connection %zu: closed by the server after %llu of %llu bytes\n",
                  s.id, static_cast<unsigned long long>(s.received_bytes),
                  static_cast<unsigned long long>(s.sent_bytes));
    }
  }

 private:
  // Sends the next message of the stream; false when the connection refused it (it is closed, and
  // on_close says why).
  bool send_message(auto& connection, Clock::time_point now) noexcept {
    Session& s = *session;
    fill_pattern(run->scratch.get(), run->size, s.seed, s.sent_bytes);
    if (!connection.send(run->scratch.get(), run->size)) return false;
    s.sent_bytes += run->size;
    s.sent_at[s.send_slot] = now;
    s.send_slot = s.send_slot + 1 == run->depth ? 0 : s.send_slot + 1;
    ++run->in_flight;
    return true;
  }

  void mismatch(auto& connection, std::string_view bytes, std::size_t bad) noexcept {
    Session& s = *session;
    s.mismatched = true;
    ++run->mismatches;
    if (bad < bytes.size()) {
      const std::uint64_t offset = s.received_bytes + bad;
      run->report(
          "echo_load: connection %zu: mismatch at stream offset %llu: expected 0x%02x, got "
          "0x%02x\n",
          s.id, static_cast<unsigned long long>(offset),
          static_cast<unsigned>(pattern_byte(s.seed, offset)),
          static_cast<unsigned>(static_cast<unsigned char>(bytes[bad])));
    } else {
      run->report("echo_load: connection %zu: %llu bytes echoed, only %llu sent\n", s.id,
                  static_cast<unsigned long long>(s.received_bytes + bytes.size()),
                  static_cast<unsigned long long>(s.sent_bytes));
    }
    connection.abort();  // the stream is out of step; nothing after this can be checked
  }
};

// --- Connecting ----------------------------------------------------------------------------------

template <class Transport>
struct Connecting;

// Each connection's Connector reports here (on_result) whether it connected.
template <class Transport>
struct ConnectOutcome {
  Connecting<Transport>* tally;
  std::size_t index;

  void operator()(auto* connection, std::error_code ec,
                  const reactor::Endpoint& address) const noexcept;
};

// The connector of one connection: plain TCP (reactor::PlainTransport) or TLS.
template <class Transport>
using Dialer = reactor::Connector<LoadHandler, ConnectOutcome<Transport>, Loop, Transport>;

// The connect phase: which connections are established, and the first failure.
template <class Transport>
struct Connecting {
  using Conn = typename Dialer<Transport>::connection_type;

  explicit Connecting(std::size_t conns) : connections(conns, nullptr) {}

  std::vector<Conn*> connections;  // valid while the session is open
  std::size_t connected = 0;
  std::vector<std::size_t> reported;  // connectors that are done, to be destroyed
  bool failed = false;
  std::size_t failed_index = 0;
  std::error_code error;      // a failed TLS handshake's too: it fails the connect
  reactor::Endpoint address;  // empty: the host name was not resolved
};

template <class Transport>
void ConnectOutcome<Transport>::operator()(auto* connection, std::error_code ec,
                                           const reactor::Endpoint& address) const noexcept {
  tally->reported.push_back(index);  // reserved for all: no allocation here
  if (connection != nullptr) {
    tally->connections[index] = connection;
    ++tally->connected;
    return;
  }
  if (tally->failed) return;  // only the first failure is reported
  tally->failed = true;
  tally->failed_index = index;
  tally->error = ec;
  tally->address = address;
}

// --- Command line --------------------------------------------------------------------------------

void print_usage(std::FILE* out, const char* program) {
  std::fprintf(out,
               "usage: %s [--host HOST] --port N [--unix PATH] --conns N --size BYTES [--depth D] "
               "--seconds T [--connect-timeout MS]\n"
               "  --host HOST    server name or address (default 127.0.0.1; IPv6 as ::1 or [::1];\n"
               "                 a name such as localhost is resolved)\n"
               "  --port N       server port (not needed with --unix)\n"
               "  --unix PATH    connect to a Unix socket instead\n"
               "  --conns N      connections (1..%zu), opened concurrently\n"
               "  --size BYTES   message size (1..%zu)\n"
               "  --depth D      messages in flight per connection (1..%zu, default 1; "
               "depth*size <= 1 GiB)\n"
               "  --seconds T    run time (may be fractional)\n"
               "  --connect-timeout MS\n"
               "                 give up when a connection is not established within MS\n"
               "                 milliseconds, name lookup included (1..%lu, default %lu)\n"
               "  --tls          connect with TLS, verifying the server against the system's CAs\n"
               "  --tls-ca FILE  ... against the CA certificates in PEM FILE instead\n"
               "  --tls-insecure ... without verifying the server (self-signed test certificates)\n"
               "  --tls-name NAME\n"
               "                 the server name to verify and send as SNI (default: --host)\n",
               program, kMaxConns, kMaxSize, kMaxDepth,
               static_cast<unsigned long>(std::numeric_limits<std::uint32_t>::max()),
               static_cast<unsigned long>(kDefaultConnectTimeoutMs));
}

template <class T>
bool parse_number(std::string_view text, T& value) {
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc{} && end == text.data() + text.size();
}

// Parses argv into `options`; false (after saying why on stderr) on bad usage.
bool parse(int argc, char** argv, Options& options, bool& help) {
  bool have_port = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help = true;
      return true;
    }
    if (arg == "--tls" || arg == "--tls-insecure") {  // the two flags without a value
      (arg == "--tls" ? options.tls : options.tls_insecure) = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "echo_load: %s needs a value\n", argv[i]);
      return false;
    }
    const std::string_view value = argv[++i];
    bool ok = true;
    if (arg == "--host") {
      options.host = value;
    } else if (arg == "--port") {
      ok = parse_number(value, options.port) && options.port != 0;
      have_port = true;
    } else if (arg == "--unix") {
      options.unix_path = value;
    } else if (arg == "--conns") {
      ok = parse_number(value, options.conns) && options.conns >= 1 && options.conns <= kMaxConns;
    } else if (arg == "--size") {
      ok = parse_number(value, options.size) && options.size >= 1 && options.size <= kMaxSize;
    } else if (arg == "--depth") {
      ok = parse_number(value, options.depth) && options.depth >= 1 && options.depth <= kMaxDepth;
    } else if (arg == "--connect-timeout") {
      ok = parse_number(value, options.connect_timeout_ms) && options.connect_timeout_ms > 0;
    } else if (arg == "--tls-ca") {
      options.tls_ca = value;
      ok = !value.empty();
    } else if (arg == "--tls-name") {
      options.tls_name = value;
      ok = !value.empty();
    } else if (arg == "--seconds") {
      // strtod rather than from_chars<double>, which older standard libraries lack.
      const std::string text(value);
      char* end = nullptr;
      errno = 0;
      options.seconds = std::strtod(text.c_str(), &end);
      ok = errno == 0 && !text.empty() && *end == '\0' && options.seconds > 0 &&
           options.seconds <= kMaxSeconds;
    } else {
      std::fprintf(stderr, "echo_load: unknown option %s\n", argv[i - 1]);
      return false;
    }
    if (!ok) {
      std::fprintf(stderr, "echo_load: bad value for %s: '%s'\n", argv[i - 1], argv[i]);
      return false;
    }
  }
  if (options.tls || options.tls_insecure || !options.tls_ca.empty() || !options.tls_name.empty()) {
#if !REACTOR_EXAMPLES_TLS
    std::fprintf(stderr, "echo_load: built without TLS (install libssl-dev and rebuild)\n");
    std::exit(2);
#endif
    const char* needs_tls = options.tls_insecure      ? "--tls-insecure"
                            : !options.tls_ca.empty() ? "--tls-ca"
                                                      : "--tls-name";
    if (!options.tls) {
      std::fprintf(stderr, "echo_load: %s needs --tls\n", needs_tls);
      return false;
    }
    if (options.tls_insecure && !options.tls_ca.empty()) {
      std::fprintf(stderr, "echo_load: --tls-ca and --tls-insecure exclude each other\n");
      return false;
    }
  }
  const char* missing = options.unix_path.empty() && !have_port ? "--port"
                        : options.conns == 0                    ? "--conns"
                        : options.size == 0                     ? "--size"
                        : options.seconds == 0                  ? "--seconds"
                                                                : nullptr;
  if (missing != nullptr) {
    std::fprintf(stderr, "echo_load: %s is required\n", missing);
    return false;
  }
  if (options.depth * options.size > kMaxInFlightBytes) {
    std::fprintf(stderr, "echo_load: --depth times --size must not exceed 1 GiB\n");
    return false;
  }
  return true;
}

// Raises the soft fd limit to the hard one: every connection is an fd.
void raise_fd_limit(std::size_t wanted) {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
  if (limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) {
      std::fprintf(stderr, "echo_load: setrlimit(RLIMIT_NOFILE): %s\n", std::strerror(errno));
      ::getrlimit(RLIMIT_NOFILE, &limit);
    }
  }
  if (limit.rlim_cur != RLIM_INFINITY && wanted + 16 > limit.rlim_cur) {
    std::fprintf(stderr, "echo_load: warning: %zu connections but the fd limit is %llu\n", wanted,
                 static_cast<unsigned long long>(limit.rlim_cur));
  }
}

// --- The run -------------------------------------------------------------------------------------

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

void print_progress(const Run& run, long second, double interval_seconds) {
  const double messages = static_cast<double>(run.interval_messages) / interval_seconds;
  const double megabytes = static_cast<double>(run.interval_bytes) / interval_seconds / 1e6;
  std::printf("[%3lds] %.0f msg/s  %.1f MB/s  p50 %s us  p99 %s us  errors %llu  mismatches %llu\n",
              second, messages, megabytes, format_us(run.interval.percentile(0.50)).c_str(),
              format_us(run.interval.percentile(0.99)).c_str(),
              static_cast<unsigned long long>(run.errors),
              static_cast<unsigned long long>(run.mismatches));
  std::fflush(stdout);
}

void print_summary(const Run& run, double seconds, std::size_t connections) {
  const double elapsed = seconds > 0 ? seconds : 1;
  std::printf(
      "summary: %llu messages in %.2f s, %.0f msg/s, %.2f MB/s, p50 %s us, p99 %s us, "
      "%zu connections, %llu errors, %llu mismatches\n",
      static_cast<unsigned long long>(run.total_messages), seconds,
      static_cast<double>(run.total_messages) / elapsed,
      static_cast<double>(run.total_bytes) / elapsed / 1e6,
      format_us(run.total.percentile(0.50)).c_str(), format_us(run.total.percentile(0.99)).c_str(),
      connections, static_cast<unsigned long long>(run.errors),
      static_cast<unsigned long long>(run.mismatches));
  std::fflush(stdout);
}

std::chrono::milliseconds until(Clock::time_point deadline, Clock::time_point now) {
  // Rounded up, so the loop never spins on a 0 ms wait just short of the deadline.
  return std::max(std::chrono::ceil<std::chrono::milliseconds>(deadline - now),
                  std::chrono::milliseconds(0));
}

// Connects `options.conns` connections to `unix_endpoint`, or when it is empty to options.host
// and options.port, concurrently, each through its own Connector with a copy of `transport`;
// then runs the load over them.
template <class Transport>
int run_load(const Options& options, const reactor::Endpoint& unix_endpoint,
             const Transport& transport) {
  // Declared before the reactor: on_close, called as late as the reactor's destructor, uses them.
  Run run(options);
  std::vector<Session> sessions(options.conns);
  Connecting<Transport> tally(options.conns);
  Loop loop;
  bool interrupted = false;
  reactor::SignalSet signals(loop, {SIGINT, SIGTERM}, [&](int) { interrupted = true; });

  reactor::ConnectOptions connect_options;
  const std::chrono::milliseconds connect_timeout(options.connect_timeout_ms);
  connect_options.deadline = connect_timeout;
  connect_options.attempt_timeout = connect_timeout;
  connect_options.resolve_timeout = connect_timeout;
  // Reading must never pause for backpressure here: the server stops reading while its echoes
  // are not read, so a client that stopped reading while its own output was queued would
  // deadlock with it. At most depth*size bytes are ever queued, so no high water is reached.
  reactor::ConnectionOptions& connection_options = connect_options.connection;
  connection_options.max_pending_output = options.depth * options.size + 64 * 1024;
  connection_options.high_water = connection_options.max_pending_output;
  connection_options.low_water = connection_options.max_pending_output;

  // Connect everything first, concurrently, and start sending only when every connection is
  // established, so the first messages' latency does not include the other connections'
  // handshakes. Each connection has its own Connector, destroyed once it has reported (the
  // connection stays with the loop); at most kMaxConnecting of them at a time.
  {
    std::vector<std::unique_ptr<Dialer<Transport>>> dialers(options.conns);
    tally.reported.reserve(options.conns);
    std::size_t started = 0;
    std::size_t finished = 0;
    while (tally.connected < options.conns && !tally.failed && !interrupted) {
      for (; started < options.conns && started - finished < kMaxConnecting; ++started) {
        Session& session = sessions[started];
        session.id = started;
        session.seed = mix(started + 1);
        session.sent_at = run.send_times.data() + started * options.depth;
        auto& dialer = dialers[started];
        dialer = std::make_unique<Dialer<Transport>>(loop, transport, LoadHandler{&run, &session},
                                                     ConnectOutcome<Transport>{&tally, started},
                                                     connect_options);
        if (unix_endpoint.empty()) {
          dialer->connect(options.host, options.port);
        } else {
          dialer->connect(unix_endpoint);
        }
      }
      loop.run_once();
      for (; finished < tally.reported.size(); ++finished) {
        dialers[tally.reported[finished]].reset();
      }
    }
  }
  if (tally.failed) {
    if (tally.address.empty()) {
      std::fprintf(stderr, "echo_load: resolve %s: %s\n", options.host.c_str(),
                   tally.error.message().c_str());
    } else {
      std::fprintf(stderr, "echo_load: connect to %s (connection %zu): %s\n",
                   tally.address.to_string().c_str(), tally.failed_index,
                   tally.error.message().c_str());
    }
    ++run.errors;
    print_summary(run, 0, tally.connected);
    run.finished = true;  // the connections made close with the loop, as ours, not reported
    return 1;
  }
  const std::size_t adopted = tally.connected;
  const Clock::time_point now_connected = Clock::now();
  for (std::size_t i = 0; i < options.conns; ++i) {
    if (!sessions[i].open) continue;  // closed by the server already: counted as an error
    tally.connections[i]->handler().start(*tally.connections[i], now_connected);
  }

  const Clock::time_point start = Clock::now();
  const Clock::time_point end = start + std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(options.seconds));
  Clock::time_point interval_start = start;
  Clock::time_point next_tick = start + std::chrono::seconds(1);
  long second = 0;
  Clock::time_point now = start;
  for (;;) {
    if (now >= next_tick) {
      print_progress(run, ++second, seconds_between(interval_start, now));
      run.end_interval();
      interval_start = now;
      next_tick += std::chrono::seconds(1);
      if (next_tick <= now) next_tick = now + std::chrono::seconds(1);  // the loop fell behind
    }
    if (now >= end || interrupted || loop.connection_count() == 0) break;
    loop.run_once(until(std::min(next_tick, end), now));
    now = Clock::now();
  }
  const double elapsed = seconds_between(start, now);
  run.end_interval();  // the last partial second, if any
  run.recording = false;
  run.sending = false;

  // Let the messages still in flight come back, so that every byte sent is verified.
  const Clock::time_point drain_deadline = Clock::now() + kDrainLimit;
  for (now = Clock::now(); run.in_flight > 0 && now < drain_deadline && !interrupted;
       now = Clock::now()) {
    loop.run_once(until(drain_deadline, now));
  }
  run.finished = true;
  for (Session& session : sessions) {
    if (!session.open) continue;
    if (session.sent_bytes != session.completed_bytes && !interrupted) {
      ++run.errors;
      run.report("echo_load: connection %zu: %llu bytes not echoed within %lld s\n", session.id,
                 static_cast<unsigned long long>(session.sent_bytes - session.completed_bytes),
                 static_cast<long long>(kDrainLimit.count()));
    }
    tally.connections[session.id]->abort();
  }
  loop.run_once(std::chrono::milliseconds(0));  // runs the on_close of every aborted connection

  print_summary(run, elapsed, adopted);
  if (run.reports > kMaxReports) {
    std::fprintf(stderr, "echo_load: %d more problems not shown\n", run.reports - kMaxReports);
  }
  return run.errors == 0 && run.mismatches == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  bool help = false;
  if (!parse(argc, argv, options, help)) {
    print_usage(stderr, argv[0]);
    return 2;
  }
  if (help) {
    print_usage(stdout, argv[0]);
    return 0;
  }

  // A host name is resolved later, by the connectors; a Unix path must fit sockaddr_un.
  std::error_code ec;
  reactor::Endpoint unix_endpoint;
  if (!options.unix_path.empty()) {
    unix_endpoint = reactor::Endpoint::unix_path(options.unix_path, ec);
  } else if (options.host.empty()) {
    ec = std::make_error_code(std::errc::invalid_argument);
  }
  if (ec) {
    std::fprintf(stderr, "echo_load: bad address '%s': %s\n",
                 options.unix_path.empty() ? options.host.c_str() : options.unix_path.c_str(),
                 ec.message().c_str());
    return 2;
  }
  raise_fd_limit(options.conns);

  try {
#if REACTOR_EXAMPLES_TLS
    if (options.tls) {
      reactor::TlsOptions tls;
      tls.ca_file = options.tls_ca;
      if (options.tls_insecure) tls.verify = reactor::TlsVerify::kNone;
      const reactor::TlsContext context(reactor::TlsRole::kClient, tls);  // throws "tls: ..."
      // An empty name: each Connector takes the host it connects to.
      return run_load(options, unix_endpoint, reactor::TlsTransport(context, options.tls_name));
    }
#endif
    return run_load(options, unix_endpoint, reactor::PlainTransport{});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "echo_load: %s\n", e.what());
    return 1;
  }
}
