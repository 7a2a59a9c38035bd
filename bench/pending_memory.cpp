// Benchmark tool (not a test): the memory one connection costs while it holds a little unsent
// output, for issue 13 ("small pending output").
//
//   bench_pending_memory [--conns N] [--bytes B]
//
// Opens N loopback TCP pairs in this process (a blocking reactor::connect() to a plain listener,
// the accepted end adopt()ed by one reactor; N defaults to 1000, B to 100), then makes every
// server-side Connection hold exactly B unsent bytes: cork() and one send() of B bytes, which
// puts them in the connection's output queue (the same OutputQueue::append a full socket leads
// to), checked with pending_output_bytes(). It reports, per connection, what opening the idle
// connections added and then what the pending bytes added, two ways:
//   heap   bytes malloc hands out (mallinfo2().uordblks): what the chunks really take;
//   RSS    resident memory (/proc/self/statm): what the machine sees. A chunk is touched only
//          where it is written (its header and the B bytes), so the RSS of a fresh 16 KiB chunk
//          is about one 4 KiB page, not 16 KiB; heap is the honest figure for chunk sizing.
// N pairs need 2N fds: the soft RLIMIT_NOFILE is raised to the hard limit first, and N is refused
// when it does not fit. Exit status 1 if a connection cannot be made or does not hold B bytes.
//
// Measured with (docs/performance.md, "Issue 13: small pending output"):
//   cmake --preset release && cmake --build --preset release -j1 --target bench_pending_memory
//   build/release/bench/bench_pending_memory --conns 9000 --bytes 100
#include <reactor.hpp>

#include <malloc.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

// The server ends only hold output: whatever arrives is dropped.
struct Holder {
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
};

struct Memory {
  long long rss = 0;   // bytes resident
  long long heap = 0;  // bytes malloc has handed out and not had back
};

Memory measure() {
  Memory memory;
  long long pages = 0;
  long long resident = 0;
  if (std::FILE* statm = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(statm, "%lld %lld", &pages, &resident) != 2) resident = 0;
    std::fclose(statm);
  }
  memory.rss = resident * ::sysconf(_SC_PAGESIZE);
  memory.heap = static_cast<long long>(::mallinfo2().uordblks);
  return memory;
}

// Raises the soft fd limit to the hard one; returns the limit now in force.
unsigned long long raise_fd_limit() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return 0;
  limit.rlim_cur = limit.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &limit);
  ::getrlimit(RLIMIT_NOFILE, &limit);
  return limit.rlim_cur == RLIM_INFINITY ? ~0ULL : static_cast<unsigned long long>(limit.rlim_cur);
}

bool parse_count(const char* text, std::size_t& value, std::size_t max) {
  char* end = nullptr;
  const unsigned long long parsed = std::strtoull(text, &end, 10);
  if (end == text || *end != '\0' || parsed > max) return false;
  value = static_cast<std::size_t>(parsed);
  return true;
}

// A plain listener on 127.0.0.1, port chosen by the kernel; -1 on failure.
int listen_loopback(std::uint16_t& port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::listen(fd, 128) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    ::close(fd);
    return -1;
  }
  port = ntohs(address.sin_port);
  return fd;
}

double per(long long bytes, std::size_t conns) {
  return static_cast<double>(bytes) / static_cast<double>(conns);
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t conns = 1000;
  std::size_t bytes = 100;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--conns" && has_value && parse_count(argv[++i], conns, 1'000'000) && conns > 0) {
      continue;
    }
    if (arg == "--bytes" && has_value && parse_count(argv[++i], bytes, 1 << 20)) continue;
    std::fprintf(stderr, "usage: bench_pending_memory [--conns N] [--bytes B]\n");
    return 2;
  }
  const unsigned long long fd_limit = raise_fd_limit();
  if (2 * conns + 32 > fd_limit) {
    std::fprintf(stderr,
                 "bench_pending_memory: %zu connections need %zu fds, the limit is %llu "
                 "(try --conns %llu)\n",
                 conns, 2 * conns + 32, fd_limit, fd_limit > 32 ? (fd_limit - 32) / 2 : 0ULL);
    return 1;
  }

  std::uint16_t port = 0;
  const int listener = listen_loopback(port);
  if (listener < 0) {
    std::perror("bench_pending_memory: listen");
    return 1;
  }
  const reactor::Endpoint endpoint = reactor::Endpoint::from_host_port("127.0.0.1", port);
  reactor::Reactor<> loop;
  using Conn = reactor::Connection<Holder, reactor::Reactor<>>;
  std::vector<reactor::UniqueFd> clients;
  std::vector<Conn*> servers;
  clients.reserve(conns);
  servers.reserve(conns);
  const std::string payload(bytes, 'x');

  const Memory start = measure();
  for (std::size_t i = 0; i < conns; ++i) {
    std::error_code ec;
    reactor::UniqueFd client = reactor::connect(endpoint, ec);
    const int accepted = ec ? -1 : ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    Conn* server = nullptr;
    if (accepted >= 0) {
      server = reactor::adopt(loop, reactor::UniqueFd(accepted), Holder{}, {}, ec);
    } else if (!ec) {
      ec = std::error_code(errno, std::system_category());
    }
    if (server == nullptr) {
      std::fprintf(stderr, "bench_pending_memory: connection %zu: %s\n", i, ec.message().c_str());
      return 1;
    }
    clients.push_back(std::move(client));
    servers.push_back(server);
  }
  const Memory idle = measure();

  std::size_t pending = 0;
  for (Conn* server : servers) {
    server->cork();
    if (!server->send(payload) || server->pending_output_bytes() != bytes) {
      std::fprintf(stderr, "bench_pending_memory: a connection holds %zu bytes, not %zu\n",
                   server->pending_output_bytes(), bytes);
      return 1;
    }
    pending += server->pending_output_bytes();
  }
  const Memory held = measure();

  std::printf("connections            %zu (each a loopback TCP pair in this process)\n", conns);
  std::printf("pending output         %zu bytes per connection, %zu in all\n", bytes, pending);
  std::printf("idle connection        heap %8.0f B   RSS %8.0f B  per connection\n",
              per(idle.heap - start.heap, conns), per(idle.rss - start.rss, conns));
  std::printf("pending output adds    heap %8.0f B   RSS %8.0f B  per connection\n",
              per(held.heap - idle.heap, conns), per(held.rss - idle.rss, conns));

  for (Conn* server : servers) server->abort(true);
  loop.run_once(std::chrono::milliseconds(0));  // their on_close
  ::close(listener);
  return 0;
}
