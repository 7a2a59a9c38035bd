// Benchmark tool (not part of reactor): the hand-written epoll echo server that bench/compare
// holds every other server to. No library, no abstraction: what a careful programmer writes by
// hand, and so the floor for syscalls, instructions and memory per message.
//
//   bench_baseline_echo [--host ADDR] [--port N]
//
// Level-triggered. Each connection reads once per EPOLLIN event into one shared 64 KiB buffer and
// writes the bytes straight back; only what the kernel does not take is copied into a
// per-connection heap block, and then the connection waits for EPOLLOUT (and stops reading) until
// that is written. Connection state lives in an array indexed by fd: 16 bytes per connection.
// Prints "listening on HOST:PORT" when ready; exits 0 on SIGINT or SIGTERM.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int kMaxEvents = 4096;            // as reactor's ReactorOptions::max_events
constexpr std::size_t kReadBuffer = 65536;  // as reactor's ReactorOptions::read_buffer_size
constexpr int kAcceptBudget = 64;           // as reactor's ListenOptions::accept_budget

// The unwritten rest of an echo, if any.
struct Conn {
  char* pending;
  std::uint32_t size;
  std::uint32_t unused;
};

volatile sig_atomic_t stop = 0;
void on_signal(int) {
  stop = 1;
}

int epfd = -1;
Conn* conns = nullptr;
char buffer[kReadBuffer];

void close_conn(int fd) {
  std::free(conns[fd].pending);
  conns[fd].pending = nullptr;
  conns[fd].size = 0;
  close(fd);  // leaves the epoll set with it: nobody else holds a dup of the fd
}

void set_events(int fd, std::uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
}

void on_readable(int fd) {
  const ssize_t n = read(fd, buffer, sizeof buffer);
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
    close_conn(fd);
    return;
  }
  if (n < 0) return;
  ssize_t w = send(fd, buffer, static_cast<std::size_t>(n), MSG_NOSIGNAL);
  if (w < 0) {
    if (errno != EAGAIN) {
      close_conn(fd);
      return;
    }
    w = 0;
  }
  if (w == n) return;
  // Queue the rest and wait for the socket to drain; stop reading meanwhile.
  const auto rest = static_cast<std::size_t>(n - w);
  conns[fd].pending = static_cast<char*>(std::malloc(rest));
  if (conns[fd].pending == nullptr) {
    close_conn(fd);
    return;
  }
  std::memcpy(conns[fd].pending, buffer + w, rest);
  conns[fd].size = static_cast<std::uint32_t>(rest);
  set_events(fd, EPOLLOUT);
}

void on_writable(int fd) {
  Conn& c = conns[fd];
  const ssize_t w = send(fd, c.pending, c.size, MSG_NOSIGNAL);
  if (w < 0) {
    if (errno != EAGAIN && errno != EINTR) close_conn(fd);
    return;
  }
  c.size -= static_cast<std::uint32_t>(w);
  if (c.size > 0) {
    std::memmove(c.pending, c.pending + w, c.size);
    return;
  }
  std::free(c.pending);
  c.pending = nullptr;
  set_events(fd, EPOLLIN);
}

void on_listener(int listener) {
  for (int i = 0; i < kAcceptBudget; ++i) {
    const int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN, or an error that concerns one connection: next event
    const int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) close(fd);
  }
}

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  const char* host = "127.0.0.1";
  int port = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--host") == 0 && i + 1 < argc) {
      host = argv[++i];
    } else if (std::strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      port = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--host ADDR] [--port N]\n", argv[0]);
      return 2;
    }
  }

  // One Conn per possible fd: raise the soft fd limit to the hard one and size the table by it.
  rlimit limit{};
  getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
  getrlimit(RLIMIT_NOFILE, &limit);
  const std::size_t max_fds = limit.rlim_cur > (1u << 20) ? (1u << 20) : limit.rlim_cur;
  conns = static_cast<Conn*>(std::calloc(max_fds, sizeof(Conn)));  // pages touched as fds are used

  struct sigaction action {};
  action.sa_handler = on_signal;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);

  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<std::uint16_t>(port));
  if (inet_pton(AF_INET, host, &address.sin_addr) != 1) die("inet_pton");
  const int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listener < 0) die("socket");
  const int on = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  if (bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) die("bind");
  if (listen(listener, SOMAXCONN) != 0) die("listen");
  socklen_t length = sizeof address;
  getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length);

  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) die("epoll_create1");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = listener;
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &ev) != 0) die("epoll_ctl");

  std::printf("listening on %s:%d\n", host, ntohs(address.sin_port));
  std::fflush(stdout);

  static epoll_event events[kMaxEvents];
  while (stop == 0) {
    const int n = epoll_wait(epfd, events, kMaxEvents, -1);
    for (int i = 0; i < n; ++i) {
      const int fd = events[i].data.fd;
      if (fd == listener) {
        on_listener(listener);
      } else if (conns[fd].size > 0) {
        on_writable(fd);
      } else {
        on_readable(fd);  // EPOLLIN, EPOLLHUP or EPOLLERR: the read reports which
      }
    }
  }
  return 0;
}
