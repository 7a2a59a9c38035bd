// Benchmark tool (not part of reactor): the hand-written epoll HTTP/1.1 server that
// bench/http_compare holds examples/http_server, nginx and h2o to. No library: what a careful
// programmer writes by hand for a plaintext benchmark, and so the floor for requests/s, CPU and
// syscalls per request.
//
//   bench_http_floor [--host ADDR] [--port N]
//
// One thread, level-triggered. Every complete request ("\r\n\r\n"-terminated, GET, no body) is
// answered with the same fixed /plaintext response, whatever its path; every other method closes
// the connection. All responses to the requests of one read go out in ONE send (or one sendmsg when
// they do not fit the prebuilt block), straight from a static block of back-to-back copies of the
// response, so a 16-deep pipelined batch costs one read and one write. Only what the kernel does
// not take is copied to the heap; the connection then waits for EPOLLOUT (and stops reading) until
// it is written. A request cut by a read boundary is carried over in a per-connection block of
// kMaxRequest bytes, allocated the first time it is needed; with whole requests per read (wrk, and
// anything else that writes a request or a pipelined batch at once) no connection ever allocates.
// Connection state lives in an array indexed by fd.
//
// Prints "listening on HOST:PORT" when ready (port 0: an ephemeral one); exits 0 on SIGINT or
// SIGTERM.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace {

// The same header set as examples/http_server's response, and the same length (95 bytes): only the
// Server token differs ("floor/1" has as many characters as "reactor").
constexpr std::string_view kResponse =
    "HTTP/1.1 200 OK\r\n"
    "Server: floor/1\r\n"
    "Content-Type: text/plain\r\n"
    "Content-Length: 13\r\n"
    "\r\n"
    "Hello, World!";
constexpr std::string_view kEndOfHeaders = "\r\n\r\n";

constexpr int kMaxEvents = 4096;            // as reactor's ReactorOptions::max_events
constexpr std::size_t kReadBuffer = 65536;  // as reactor's ReactorOptions::read_buffer_size
constexpr int kAcceptBudget = 64;           // as reactor's ListenOptions::accept_budget
constexpr std::size_t kMaxRequest = 8192;   // a longer request head closes the connection
constexpr std::size_t kBlockResponses = 256;
constexpr std::size_t kBlockBytes = kBlockResponses * kResponse.size();

struct Conn {
  char* partial;  // the start of a request cut by the last read; kMaxRequest bytes
  char* pending;  // responses the kernel did not take yet
  std::uint32_t partial_size;
  std::uint32_t pending_size;
  std::uint32_t pending_sent;
};

class Server {
 public:
  Server(int epfd, int listener, int signal_fd, Conn* conns, std::size_t max_fds)
      : epfd_(epfd), listener_(listener), signal_fd_(signal_fd), conns_(conns), max_fds_(max_fds) {
    for (std::size_t i = 0; i < kBlockResponses; ++i) {
      std::memcpy(block_ + i * kResponse.size(), kResponse.data(), kResponse.size());
    }
  }

  void run() {
    for (;;) {
      const int n = epoll_wait(epfd_, events_, kMaxEvents, -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        std::perror("epoll_wait");
        return;
      }
      for (int i = 0; i < n; ++i) {
        const int fd = events_[i].data.fd;
        const std::uint32_t mask = events_[i].events;
        if (fd == listener_) {
          accept_all();
        } else if (fd == signal_fd_) {
          return;
        } else if (conns_[fd].pending != nullptr) {
          on_writable(fd);  // EPOLLOUT, or an error or hang-up that the send reports
        } else if (mask & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
          on_readable(fd);
        }
      }
    }
  }

 private:
  void accept_all() {
    for (int i = 0; i < kAcceptBudget; ++i) {
      const int fd = accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        // EAGAIN: drained. ECONNABORTED, EPROTO and friends (accept(2)): that connection only.
        // EMFILE, ENFILE, ENOBUFS, ENOMEM: stop for this round; level-triggered, so we come back.
        if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
        return;
      }
      if (static_cast<std::size_t>(fd) >= max_fds_) {
        close(fd);
        continue;
      }
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      if (epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0) close(fd);
    }
  }

  void close_conn(int fd) {
    Conn& c = conns_[fd];
    std::free(c.partial);
    std::free(c.pending);
    c = Conn{};
    close(fd);  // leaves the epoll set with it: nobody else holds a dup of the fd
  }

  void set_events(int fd, std::uint32_t mask) {
    epoll_event ev{};
    ev.events = mask;
    ev.data.fd = fd;
    epoll_ctl(epfd_, EPOLL_CTL_MOD, fd, &ev);
  }

  void on_readable(int fd) {
    Conn& c = conns_[fd];
    // A carried-over request start goes in front of the new bytes, so parsing sees one run.
    const std::size_t carried = c.partial_size;
    if (carried != 0) std::memcpy(buffer_, c.partial, carried);
    const ssize_t n = read(fd, buffer_ + carried, sizeof buffer_ - carried);
    if (n <= 0) {
      if (n == 0 || (errno != EAGAIN && errno != EINTR)) close_conn(fd);
      return;
    }
    const std::string_view input(buffer_, carried + static_cast<std::size_t>(n));

    std::size_t requests = 0;
    std::size_t start = 0;
    for (;;) {
      const std::size_t end = input.find(kEndOfHeaders, start);
      if (end == std::string_view::npos) break;
      if (input.substr(start, 4) != "GET ") {
        close_conn(fd);
        return;
      }
      ++requests;
      start = end + kEndOfHeaders.size();
    }

    const std::size_t rest = input.size() - start;
    if (rest > kMaxRequest) {
      close_conn(fd);
      return;
    }
    if (rest != 0 && c.partial == nullptr) {
      c.partial = static_cast<char*>(std::malloc(kMaxRequest));
      if (c.partial == nullptr) {
        close_conn(fd);
        return;
      }
    }
    if (rest != 0) std::memmove(c.partial, input.data() + start, rest);
    c.partial_size = static_cast<std::uint32_t>(rest);

    if (requests != 0) respond(fd, requests);
  }

  // Sends `requests` responses in one syscall; queues what the kernel does not take.
  void respond(int fd, std::size_t requests) {
    const std::size_t total = requests * kResponse.size();
    ssize_t w;
    if (total <= kBlockBytes) {
      w = send(fd, block_, total, MSG_NOSIGNAL);
    } else {
      // At most kReadBuffer / 18 (the shortest request, "GET / HTTP/1.1\r\n\r\n") requests per
      // read: 15 iovecs, far below IOV_MAX.
      iovec iov[kReadBuffer / 18 / kBlockResponses + 1];
      std::size_t count = 0;
      for (std::size_t left = total; left != 0; ++count) {
        const std::size_t chunk = left < kBlockBytes ? left : kBlockBytes;
        iov[count] = iovec{block_, chunk};
        left -= chunk;
      }
      msghdr message{};
      message.msg_iov = iov;
      message.msg_iovlen = count;
      w = sendmsg(fd, &message, MSG_NOSIGNAL);
    }
    if (w < 0) {
      if (errno != EAGAIN) {
        close_conn(fd);
        return;
      }
      w = 0;
    }
    if (static_cast<std::size_t>(w) == total) return;

    // Queue the rest (copies of the response from offset w on) and wait for the socket to drain;
    // stop reading meanwhile.
    Conn& c = conns_[fd];
    const std::size_t left = total - static_cast<std::size_t>(w);
    c.pending = static_cast<char*>(std::malloc(left));
    if (c.pending == nullptr) {
      close_conn(fd);
      return;
    }
    for (std::size_t done = 0, offset = static_cast<std::size_t>(w) % kResponse.size();
         done < left;) {
      const std::size_t chunk = std::min(left - done, kResponse.size() - offset);
      std::memcpy(c.pending + done, kResponse.data() + offset, chunk);
      done += chunk;
      offset = 0;
    }
    c.pending_size = static_cast<std::uint32_t>(left);
    c.pending_sent = 0;
    set_events(fd, EPOLLOUT);
  }

  void on_writable(int fd) {
    Conn& c = conns_[fd];
    const ssize_t w =
        send(fd, c.pending + c.pending_sent, c.pending_size - c.pending_sent, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno != EAGAIN && errno != EINTR) close_conn(fd);
      return;
    }
    c.pending_sent += static_cast<std::uint32_t>(w);
    if (c.pending_sent < c.pending_size) return;
    std::free(c.pending);
    c.pending = nullptr;
    c.pending_size = c.pending_sent = 0;
    set_events(fd, EPOLLIN);
  }

  int epfd_;
  int listener_;
  int signal_fd_;
  Conn* conns_;
  std::size_t max_fds_;
  epoll_event events_[kMaxEvents];
  char buffer_[kReadBuffer];
  char block_[kBlockBytes];
};

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(1);
}

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr, "usage: %s [--host ADDR] [--port N]\n", argv0);
  std::exit(2);
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
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--host") == 0 && i + 1 < argc) {
      host = argv[++i];
    } else if (std::strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      port = std::atoi(argv[++i]);
    } else {
      usage(argv[0]);
    }
  }

  // One Conn per possible fd: raise the soft fd limit to the hard one and size the table by it.
  rlimit limit{};
  getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
  getrlimit(RLIMIT_NOFILE, &limit);
  const std::size_t max_fds = limit.rlim_cur > (1u << 20) ? (1u << 20) : limit.rlim_cur;

  // SIGINT and SIGTERM arrive as a readable signalfd in the epoll set: no handler, no race with
  // epoll_wait.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  if (sigprocmask(SIG_BLOCK, &stop_signals, nullptr) != 0) die("sigprocmask");
  const int signal_fd = signalfd(-1, &stop_signals, SFD_NONBLOCK | SFD_CLOEXEC);
  if (signal_fd < 0) die("signalfd");

  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<std::uint16_t>(port));
  if (inet_pton(AF_INET, host, &address.sin_addr) != 1) die("inet_pton");
  const int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listener < 0) die("socket");
  const int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) die("bind");
  if (listen(listener, SOMAXCONN) != 0) die("listen");
  socklen_t length = sizeof address;
  getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length);

  const int epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) die("epoll_create1");
  watch(epfd, listener);
  watch(epfd, signal_fd);
  // Pages are touched only as fds are used.
  auto* conns = static_cast<Conn*>(std::calloc(max_fds, sizeof(Conn)));
  if (conns == nullptr) die("calloc");
  // Large (events, two 64 KiB buffers): on the heap, not the stack.
  auto* server = new Server(epfd, listener, signal_fd, conns, max_fds);

  std::printf("listening on %s:%d\n", host, ntohs(address.sin_port));
  std::fflush(stdout);
  server->run();
  return 0;
}
