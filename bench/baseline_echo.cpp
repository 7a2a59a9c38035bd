// Benchmark tool (not part of reactor): the hand-written epoll echo server that bench/compare and
// bench/scale hold every other server to. No library, no abstraction: what a careful programmer
// writes by hand, and so the floor for syscalls, instructions and memory per message.
//
//   bench_baseline_echo [--host ADDR] [--port N] [--threads N]
//
// Level-triggered. Each connection reads once per EPOLLIN event into its thread's 64 KiB buffer and
// writes the bytes straight back; only what the kernel does not take is copied into a
// per-connection heap block, and then the connection waits for EPOLLOUT (and stops reading) until
// that is written. Connection state lives in an array indexed by fd: 16 bytes per connection.
//
// --threads N (default 1) runs N such loops, one per thread, each with its own listening socket,
// epoll set, read buffer and connection array; the threads share nothing but the stop signal. With
// N > 1 every listener sets SO_REUSEPORT and binds the same address, and the kernel spreads
// incoming connections over them by a hash of the connection's addresses (socket(7), Linux 3.9);
// with port 0 the first listener gets the ephemeral port and the others bind to it. With N = 1
// there is no SO_REUSEPORT and the loop runs on the main thread, as it always did.
// Prints "listening on HOST:PORT" once every listener is ready; on SIGINT or SIGTERM every thread
// stops and it exits 0.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace {

constexpr int kMaxEvents = 4096;            // as reactor's ReactorOptions::max_events
constexpr std::size_t kReadBuffer = 65536;  // as reactor's ReactorOptions::read_buffer_size
constexpr int kAcceptBudget = 64;           // as reactor's ListenOptions::accept_budget
constexpr int kMaxThreads = 1024;

// The unwritten rest of an echo, if any.
struct Conn {
  char* pending;
  std::uint32_t size;
  std::uint32_t unused;
};

// The stop signal, the only state the threads share: the handler sets `stop` and makes `wake_fd`
// (an eventfd in every thread's epoll set) readable, so that a thread blocked in epoll_wait wakes
// up even when the signal went to another thread, or came just before it blocked.
volatile sig_atomic_t stop = 0;
int wake_fd = -1;

void on_signal(int) {
  const int saved = errno;
  stop = 1;
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t written = write(wake_fd, &one, sizeof one);
  errno = saved;
}

// One event loop and everything it owns; only its own thread touches it once it runs. Aligned to
// a cache line so that neighbouring workers never share one.
struct alignas(64) Worker {
  int epfd = -1;
  int listener = -1;
  Conn* conns = nullptr;  // one per possible fd, this thread's connections only
  epoll_event events[kMaxEvents];
  char buffer[kReadBuffer];

  void close_conn(int fd) {
    std::free(conns[fd].pending);
    conns[fd].pending = nullptr;
    conns[fd].size = 0;
    close(fd);  // leaves the epoll set with it: nobody else holds a dup of the fd
  }

  void set_events(int fd, std::uint32_t mask) {
    epoll_event ev{};
    ev.events = mask;
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

  void on_listener() {
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

  // Runs until the stop signal.
  void run() {
    while (stop == 0) {
      const int n = epoll_wait(epfd, events, kMaxEvents, -1);
      for (int i = 0; i < n; ++i) {
        const int fd = events[i].data.fd;
        if (fd == listener) {
          on_listener();
        } else if (fd == wake_fd) {
          return;
        } else if (conns[fd].size > 0) {
          on_writable(fd);
        } else {
          on_readable(fd);  // EPOLLIN, EPOLLHUP or EPOLLERR: the read reports which
        }
      }
    }
  }
};

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(1);
}

[[noreturn]] void usage(const char* program) {
  std::fprintf(stderr, "usage: %s [--host ADDR] [--port N] [--threads N]\n", program);
  std::exit(2);
}

// A listening socket on `address`; its port is then written back into `address`, so that with
// port 0 the next listener binds the port this one was given.
int open_listener(sockaddr_in& address, bool reuse_port) {
  const int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listener < 0) die("socket");
  const int on = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  if (reuse_port && setsockopt(listener, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) != 0) {
    die("setsockopt(SO_REUSEPORT)");
  }
  if (bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) die("bind");
  if (listen(listener, SOMAXCONN) != 0) die("listen");
  socklen_t length = sizeof address;
  getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length);
  return listener;
}

void watch(int epfd, int fd) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = fd;
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl");
}

}  // namespace

int main(int argc, char** argv) {
  const char* host = "127.0.0.1";
  int port = 0;
  int threads = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--host") == 0 && i + 1 < argc) {
      host = argv[++i];
    } else if (std::strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      port = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
      if (threads < 1 || threads > kMaxThreads) usage(argv[0]);
    } else {
      usage(argv[0]);
    }
  }

  // One Conn per possible fd: raise the soft fd limit to the hard one and size the tables by it.
  rlimit limit{};
  getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
  getrlimit(RLIMIT_NOFILE, &limit);
  const std::size_t max_fds = limit.rlim_cur > (1u << 20) ? (1u << 20) : limit.rlim_cur;

  wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd < 0) die("eventfd");
  struct sigaction action {};
  action.sa_handler = on_signal;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);

  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<std::uint16_t>(port));
  if (inet_pton(AF_INET, host, &address.sin_addr) != 1) die("inet_pton");

  // Everything that can fail is set up here, before any thread starts.
  const auto workers = std::make_unique<Worker[]>(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t) {
    Worker& worker = workers[static_cast<std::size_t>(t)];
    worker.listener = open_listener(address, threads > 1);
    worker.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (worker.epfd < 0) die("epoll_create1");
    watch(worker.epfd, worker.listener);
    watch(worker.epfd, wake_fd);
    // Pages are touched only as fds are used.
    worker.conns = static_cast<Conn*>(std::calloc(max_fds, sizeof(Conn)));
    if (worker.conns == nullptr) die("calloc");
  }

  std::vector<std::thread> others;
  others.reserve(static_cast<std::size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) {
    others.emplace_back([worker = &workers[static_cast<std::size_t>(t)]] { worker->run(); });
  }

  std::printf("listening on %s:%d\n", host, ntohs(address.sin_port));
  std::fflush(stdout);

  workers[0].run();
  for (std::thread& thread : others) thread.join();
  return 0;
}
