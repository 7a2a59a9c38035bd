// Benchmark tool (not part of reactor): the load client for what examples/echo_load cannot do,
// written on plain epoll so that it is the same for every server it drives.
//
//   bench_client [--host ADDR] --port N pingpong --conns N --size BYTES --messages M
//       Every connection sends M messages of BYTES, one at a time, each after the previous one
//       came back whole; then all close. A fixed message count, for syscall, allocation and
//       instruction counts taken as the difference between two runs.
//   bench_client [--host ADDR] --port N accept --seconds T [--concurrency K]
//       Accept rate: K connections at a time each connect, send 1 byte, read it back and close.
//   bench_client [--host ADDR] --port N idle --conns N
//       Opens N connections, sends 1 byte on each and waits for every echo, prints
//       "idle: N connections ready", then holds them open until stdin reaches EOF.
//
// pingpong and accept print one progress line per second ("[  1s] R msg/s ...") and a final line
// in echo_load's format ("summary: M messages in T s, R msg/s, ..."); a connection counts as one
// message in accept mode. Exit status 0 when every echo came back, 1 otherwise, 2 on bad usage.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string host = "127.0.0.1";
  int port = 0;
  std::string mode;
  std::size_t conns = 1;
  std::size_t size = 64;
  std::uint64_t messages = 1000;
  double seconds = 1;
  std::size_t concurrency = 16;
};

[[noreturn]] void usage(const char* program) {
  std::fprintf(stderr,
               "usage: %s [--host ADDR] --port N pingpong --conns N --size BYTES --messages M\n"
               "       %s [--host ADDR] --port N accept --seconds T [--concurrency K]\n"
               "       %s [--host ADDR] --port N idle --conns N\n",
               program, program, program);
  std::exit(2);
}

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "bench_client: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void raise_fd_limit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }
}

sockaddr_in server_address(const Options& options) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<std::uint16_t>(options.port));
  if (inet_pton(AF_INET, options.host.c_str(), &address.sin_addr) != 1) {
    std::fprintf(stderr, "bench_client: bad IPv4 address '%s'\n", options.host.c_str());
    std::exit(2);
  }
  return address;
}

// A blocking connect; the socket is returned non-blocking, with TCP_NODELAY.
int connect_blocking(const sockaddr_in& address) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  if (connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) die("connect");
  const int on = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
  const int flags = fcntl(fd, F_GETFL, 0);
  fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  return fd;
}

void add(int epfd, int fd, std::uint32_t events, std::uint64_t data) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = data;
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl");
}

void modify(int epfd, int fd, std::uint32_t events, std::uint64_t data) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = data;
  if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) != 0) die("epoll_ctl");
}

// Latencies in microseconds, for p50/p99 in the summary line.
std::uint64_t percentile(std::vector<std::uint32_t>& samples, double q) {
  if (samples.empty()) return 0;
  const auto rank = static_cast<std::size_t>(q * static_cast<double>(samples.size() - 1));
  std::nth_element(samples.begin(), samples.begin() + static_cast<std::ptrdiff_t>(rank),
                   samples.end());
  return samples[rank];
}

void print_summary(std::uint64_t messages, double seconds, std::size_t bytes_per_message,
                   std::vector<std::uint32_t>& latencies, std::size_t connections,
                   std::uint64_t errors) {
  const double elapsed = seconds > 0 ? seconds : 1;
  const std::uint64_t p50 = percentile(latencies, 0.50);
  const std::uint64_t p99 = percentile(latencies, 0.99);
  std::printf(
      "summary: %llu messages in %.2f s, %.0f msg/s, %.2f MB/s, p50 %llu us, p99 %llu us, "
      "%zu connections, %llu errors, 0 mismatches\n",
      static_cast<unsigned long long>(messages), seconds, static_cast<double>(messages) / elapsed,
      static_cast<double>(messages * bytes_per_message) / elapsed / 1e6,
      static_cast<unsigned long long>(p50), static_cast<unsigned long long>(p99), connections,
      static_cast<unsigned long long>(errors));
  std::fflush(stdout);
}

// Prints "[  Ns] R msg/s" once a second while a run goes on.
class Progress {
 public:
  explicit Progress(Clock::time_point start)
      : last_(start), next_(start + std::chrono::seconds(1)) {}

  void tick(std::uint64_t total) {
    const Clock::time_point now = Clock::now();
    if (now < next_) return;
    const double interval = std::chrono::duration<double>(now - last_).count();
    std::printf("[%3lds] %.0f msg/s\n", ++second_,
                static_cast<double>(total - reported_) / interval);
    std::fflush(stdout);
    reported_ = total;
    last_ = now;
    next_ += std::chrono::seconds(1);
  }

  // Milliseconds until the next line is due, for epoll_wait.
  int wait_ms() const {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(next_ - Clock::now()).count();
    return static_cast<int>(std::clamp<long long>(left, 0, 1000));
  }

 private:
  Clock::time_point last_;
  Clock::time_point next_;
  long second_ = 0;
  std::uint64_t reported_ = 0;
};

// --- pingpong ------------------------------------------------------------------------------------

int run_pingpong(const Options& options) {
  const sockaddr_in address = server_address(options);
  struct Conn {
    int fd = -1;
    std::size_t sent = 0;      // bytes of the current message written
    std::size_t received = 0;  // bytes of the current message echoed
    std::uint64_t done = 0;    // messages completed
    Clock::time_point started{};
  };
  std::vector<Conn> conns(options.conns);
  std::vector<char> message(options.size, 'x');
  std::vector<char> reply(std::max<std::size_t>(options.size, 65536));
  std::vector<std::uint32_t> latencies;
  latencies.reserve(static_cast<std::size_t>(
      std::min<std::uint64_t>(options.conns * options.messages, 4'000'000)));

  const int epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) die("epoll_create1");
  for (std::size_t i = 0; i < conns.size(); ++i) conns[i].fd = connect_blocking(address);

  // Writes what is left of connection i's current message; arms EPOLLOUT only if it is stuck.
  const auto push = [&](std::size_t i) {
    Conn& c = conns[i];
    while (c.sent < options.size) {
      const ssize_t n = send(c.fd, message.data() + c.sent, options.size - c.sent, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EAGAIN) {
          modify(epfd, c.fd, EPOLLIN | EPOLLOUT, i);
          return;
        }
        die("send");
      }
      c.sent += static_cast<std::size_t>(n);
    }
  };

  const Clock::time_point start = Clock::now();
  for (std::size_t i = 0; i < conns.size(); ++i) {
    add(epfd, conns[i].fd, EPOLLIN, i);
    conns[i].started = Clock::now();
    push(i);
  }
  std::uint64_t total = 0;
  std::size_t active = options.messages > 0 ? conns.size() : 0;
  std::vector<epoll_event> events(1024);
  Progress progress(start);
  while (active > 0) {
    const int n =
        epoll_wait(epfd, events.data(), static_cast<int>(events.size()), progress.wait_ms());
    if (n < 0 && errno != EINTR) die("epoll_wait");
    for (int e = 0; e < n; ++e) {
      const auto i = static_cast<std::size_t>(events[static_cast<std::size_t>(e)].data.u64);
      Conn& c = conns[i];
      if ((events[static_cast<std::size_t>(e)].events & EPOLLOUT) != 0) {
        modify(epfd, c.fd, EPOLLIN, i);
        push(i);
      }
      if ((events[static_cast<std::size_t>(e)].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) == 0) {
        continue;
      }
      const ssize_t r = read(c.fd, reply.data(), reply.size());
      if (r == 0) {
        std::fprintf(stderr, "bench_client: connection %zu closed by the server\n", i);
        return 1;
      }
      if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        die("read");
      }
      c.received += static_cast<std::size_t>(r);
      if (c.received < options.size) continue;
      if (c.received > options.size) {
        std::fprintf(stderr, "bench_client: connection %zu: more bytes echoed than sent\n", i);
        return 1;
      }
      const Clock::time_point now = Clock::now();
      latencies.push_back(static_cast<std::uint32_t>(
          std::chrono::duration_cast<std::chrono::microseconds>(now - c.started).count()));
      ++total;
      c.sent = c.received = 0;
      if (++c.done == options.messages) {
        --active;
        continue;
      }
      c.started = now;
      push(i);
    }
    progress.tick(total);
  }
  const double elapsed = seconds_since(start);
  for (Conn& c : conns) close(c.fd);
  close(epfd);
  print_summary(total, elapsed, options.size, latencies, conns.size(), 0);
  return 0;
}

// --- accept --------------------------------------------------------------------------------------

int run_accept(const Options& options) {
  const sockaddr_in address = server_address(options);
  const int epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) die("epoll_create1");
  struct Slot {
    int fd = -1;
    bool connected = false;
    Clock::time_point started{};
  };
  std::vector<Slot> slots(options.concurrency);
  std::vector<std::uint32_t> latencies;
  std::uint64_t completed = 0;
  std::uint64_t errors = 0;
  bool running = true;

  // Each connection ends in TIME_WAIT on this side (the client closes first). On loopback the
  // source address is ours to choose: spreading connections over 127.0.0.2 .. 127.0.0.17 gives
  // 16 times the (address, port) pairs, so neither this run nor the TIME_WAIT sockets that other
  // runs left on 127.0.0.1 make connect() hunt for a free port. Only for a loopback server.
  const bool loopback = (ntohl(address.sin_addr.s_addr) >> 24) == 127;
  std::uint32_t next_source = 0;
  const auto open_slot = [&](std::size_t i) {
    Slot& s = slots[i];
    s.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s.fd < 0) die("socket");
    s.connected = false;
    s.started = Clock::now();
    if (loopback) {
      const int on = 1;
      // The port is picked by connect() for the whole 4-tuple, not by bind() (Linux 4.2).
      setsockopt(s.fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &on, sizeof on);
      sockaddr_in source{};
      source.sin_family = AF_INET;
      source.sin_addr.s_addr = htonl((127u << 24) | (2 + next_source++ % 16));
      if (bind(s.fd, reinterpret_cast<const sockaddr*>(&source), sizeof source) != 0) die("bind");
    }
    if (connect(s.fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0 &&
        errno != EINPROGRESS) {
      die("connect");
    }
    add(epfd, s.fd, EPOLLOUT, i);
  };
  const auto finish_slot = [&](std::size_t i, bool ok) {
    Slot& s = slots[i];
    close(s.fd);  // leaves the epoll set with it
    s.fd = -1;
    if (ok) {
      ++completed;
      latencies.push_back(static_cast<std::uint32_t>(
          std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - s.started).count()));
    } else {
      ++errors;
    }
    if (running) open_slot(i);
  };

  const Clock::time_point start = Clock::now();
  const Clock::time_point end = start + std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(options.seconds));
  for (std::size_t i = 0; i < slots.size(); ++i) open_slot(i);
  std::vector<epoll_event> events(slots.size());
  Progress progress(start);
  std::size_t open = slots.size();
  while (open > 0) {
    const int n =
        epoll_wait(epfd, events.data(), static_cast<int>(events.size()), progress.wait_ms());
    if (n < 0 && errno != EINTR) die("epoll_wait");
    for (int e = 0; e < n; ++e) {
      const auto i = static_cast<std::size_t>(events[static_cast<std::size_t>(e)].data.u64);
      Slot& s = slots[i];
      if (s.fd < 0) continue;
      if (!s.connected) {
        int error = 0;
        socklen_t length = sizeof error;
        getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &error, &length);
        const char byte = 'a';
        if (error != 0 || send(s.fd, &byte, 1, MSG_NOSIGNAL) != 1) {
          finish_slot(i, false);
          if (s.fd < 0) --open;
          continue;
        }
        s.connected = true;
        modify(epfd, s.fd, EPOLLIN, i);
        continue;
      }
      char byte = 0;
      const ssize_t r = read(s.fd, &byte, 1);
      if (r < 0 && errno == EAGAIN) continue;
      finish_slot(i, r == 1 && byte == 'a');
      if (s.fd < 0) --open;
    }
    progress.tick(completed);
    if (running && Clock::now() >= end) running = false;  // slots finishing now are not reopened
  }
  const double elapsed = seconds_since(start);
  close(epfd);
  print_summary(completed, elapsed, 1, latencies, static_cast<std::size_t>(completed), errors);
  return errors == 0 ? 0 : 1;
}

// --- idle ----------------------------------------------------------------------------------------

int run_idle(const Options& options) {
  const sockaddr_in address = server_address(options);
  const int epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) die("epoll_create1");
  std::vector<int> fds;
  fds.reserve(options.conns);
  for (std::size_t i = 0; i < options.conns; ++i) {
    const int fd = connect_blocking(address);
    const char byte = 'i';
    if (send(fd, &byte, 1, MSG_NOSIGNAL) != 1) die("send");
    add(epfd, fd, EPOLLIN, i);
    fds.push_back(fd);
  }
  std::size_t waiting = fds.size();
  std::vector<epoll_event> events(1024);
  while (waiting > 0) {
    const int n = epoll_wait(epfd, events.data(), static_cast<int>(events.size()), 10'000);
    if (n == 0) {
      std::fprintf(stderr, "bench_client: %zu echoes missing after 10 s\n", waiting);
      return 1;
    }
    for (int e = 0; e < n; ++e) {
      const auto i = static_cast<std::size_t>(events[static_cast<std::size_t>(e)].data.u64);
      char byte = 0;
      if (read(fds[i], &byte, 1) != 1) {
        std::fprintf(stderr, "bench_client: connection %zu: no echo\n", i);
        return 1;
      }
      epoll_ctl(epfd, EPOLL_CTL_DEL, fds[i], nullptr);
      --waiting;
    }
  }
  std::printf("idle: %zu connections ready\n", fds.size());
  std::fflush(stdout);
  char sink[64];
  while (read(STDIN_FILENO, sink, sizeof sink) > 0) {
  }
  for (const int fd : fds) close(fd);
  return 0;
}

// --- command line --------------------------------------------------------------------------------

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "pingpong" || arg == "accept" || arg == "idle") {
      options.mode = arg;
      continue;
    }
    if (i + 1 >= argc) usage(argv[0]);
    const char* value = argv[++i];
    if (arg == "--host") {
      options.host = value;
    } else if (arg == "--port") {
      options.port = std::atoi(value);
    } else if (arg == "--conns") {
      options.conns = std::strtoull(value, nullptr, 10);
    } else if (arg == "--size") {
      options.size = std::strtoull(value, nullptr, 10);
    } else if (arg == "--messages") {
      options.messages = std::strtoull(value, nullptr, 10);
    } else if (arg == "--seconds") {
      options.seconds = std::strtod(value, nullptr);
    } else if (arg == "--concurrency") {
      options.concurrency = std::strtoull(value, nullptr, 10);
    } else {
      usage(argv[0]);
    }
  }
  if (options.mode.empty() || options.port <= 0 || options.port > 65535 || options.conns == 0 ||
      options.size == 0 || options.concurrency == 0 || options.seconds <= 0) {
    usage(argv[0]);
  }
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  raise_fd_limit();
  if (options.mode == "pingpong") return run_pingpong(options);
  if (options.mode == "accept") return run_accept(options);
  return run_idle(options);
}
