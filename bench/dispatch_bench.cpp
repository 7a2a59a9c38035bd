// Microbenchmarks (Google Benchmark) for the per-event path: what one readiness event costs when
// it goes through a Reactor and a Connection<Handler>, against a raw epoll loop doing the same
// work by hand.
//
// - *_Socketpair (AF_UNIX) and *_Loopback (TCP over 127.0.0.1): real syscalls. Each iteration the
//   peer writes 64 bytes, the loop waits (epoll_wait), reads, and echoes them, and the peer reads
//   the echo: five syscalls for the raw loop, so the difference between Raw and Reactor is the
//   library's overhead (plus any syscall it adds: edge mode reads Unix sockets until EAGAIN).
// - *_Scripted: no syscalls at all. A syscall policy reports the connection readable, returns 64
//   bytes to its first read and EAGAIN after that (as the kernel would), and takes every write,
//   so what is left is the user-space cost of one event: the reactor's dispatch, the
//   connection's read and send path, and the handler call (Raw calls the same scripted functions
//   from a hand-written loop). The idle-timeout variant shows what ConnectionOptions::
//   idle_timeout adds per event.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <reactor.hpp>
#include <string_view>

namespace {

constexpr std::size_t kMessage = 64;

struct Echo {
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
};

struct Sink {
  std::size_t bytes = 0;
  void on_data(auto& /*connection*/, std::string_view data) { bytes += data.size(); }
};

struct Socketpair {
  int fds[2] = {-1, -1};
  Socketpair() {
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0) fds[0] = -1;
  }
  ~Socketpair() {
    for (const int fd : fds) {
      if (fd >= 0) ::close(fd);
    }
  }
};

// A connected TCP pair over 127.0.0.1, both ends non-blocking with TCP_NODELAY.
struct LoopbackPair {
  int fds[2] = {-1, -1};
  LoopbackPair() {
    const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof address;
    if (::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0 &&
        ::listen(listener, 1) == 0 &&
        ::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
      fds[0] = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (::connect(fds[0], reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) {
        fds[1] = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      }
    }
    ::close(listener);
    const int on = 1;
    for (const int fd : fds) {
      if (fd < 0) continue;
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    }
  }
  ~LoopbackPair() {
    for (const int fd : fds) {
      if (fd >= 0) ::close(fd);
    }
  }
};

// --- Real syscalls -------------------------------------------------------------------------------

template <class Pair>
void BM_RawEpoll(benchmark::State& state) {
  Pair pair;
  const int ep = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = pair.fds[1];
  ::epoll_ctl(ep, EPOLL_CTL_ADD, pair.fds[1], &ev);
  char message[kMessage] = {};
  static char buffer[64 * 1024];
  char reply[kMessage];
  epoll_event events[64];
  for (auto _ : state) {
    ::write(pair.fds[0], message, sizeof message);
    const int n = ::epoll_wait(ep, events, 64, 0);
    for (int i = 0; i < n; ++i) {
      const ssize_t r = ::read(events[i].data.fd, buffer, sizeof buffer);
      if (r > 0) ::send(events[i].data.fd, buffer, static_cast<std::size_t>(r), MSG_NOSIGNAL);
    }
    benchmark::DoNotOptimize(::read(pair.fds[0], reply, sizeof reply));
  }
  ::close(ep);
}
BENCHMARK(BM_RawEpoll<Socketpair>)->Name("BM_RawEpoll_Socketpair");
BENCHMARK(BM_RawEpoll<LoopbackPair>)->Name("BM_RawEpoll_Loopback");

template <class Pair, class Mode>
void BM_Reactor(benchmark::State& state) {
  Pair pair;
  reactor::Reactor<Mode> loop;
  reactor::adopt(loop, reactor::UniqueFd(pair.fds[1]), Echo{});
  pair.fds[1] = -1;  // the connection owns it now
  char message[kMessage] = {};
  char reply[kMessage];
  for (auto _ : state) {
    ::write(pair.fds[0], message, sizeof message);
    loop.run_once(std::chrono::milliseconds(0));
    benchmark::DoNotOptimize(::read(pair.fds[0], reply, sizeof reply));
  }
}
BENCHMARK(BM_Reactor<Socketpair, reactor::LevelTriggered>)->Name("BM_Reactor_Socketpair/level");
BENCHMARK(BM_Reactor<Socketpair, reactor::EdgeTriggered>)->Name("BM_Reactor_Socketpair/edge");
BENCHMARK(BM_Reactor<LoopbackPair, reactor::LevelTriggered>)->Name("BM_Reactor_Loopback/level");
BENCHMARK(BM_Reactor<LoopbackPair, reactor::EdgeTriggered>)->Name("BM_Reactor_Loopback/edge");

// --- Scripted syscalls: user space only ----------------------------------------------------------

// Forwards everything to the kernel except, for the one scripted fd: epoll_wait reports it
// readable, the next read returns kMessage bytes and later ones EAGAIN until the next epoll_wait,
// send and sendmsg take everything.
struct ScriptedSyscalls : reactor::LinuxSyscalls {
  static inline int scripted_fd = -1;
  static inline void* scripted_ptr = nullptr;  // the epoll data.ptr registered for scripted_fd
  static inline bool readable = false;

  static int epoll_ctl(int epfd, int op, int fd, epoll_event* event) noexcept {
    if (fd == scripted_fd && op != EPOLL_CTL_DEL) scripted_ptr = event->data.ptr;
    return ::epoll_ctl(epfd, op, fd, event);
  }
  static int epoll_wait(int epfd, epoll_event* events, int max_events, int timeout_ms) noexcept {
    if (scripted_ptr == nullptr) return ::epoll_wait(epfd, events, max_events, timeout_ms);
    events[0].events = EPOLLIN;
    events[0].data.ptr = scripted_ptr;
    readable = true;
    return 1;
  }
  static ssize_t read(int fd, void* buffer, std::size_t size) noexcept {
    if (fd != scripted_fd) return ::read(fd, buffer, size);
    if (!readable) {
      errno = EAGAIN;
      return -1;
    }
    readable = false;
    const std::size_t n = std::min(size, kMessage);
    std::memset(buffer, 'x', n);  // what the kernel's copy would cost at least
    return static_cast<ssize_t>(n);
  }
  static ssize_t send(int fd, const void* buffer, std::size_t size, int flags) noexcept {
    if (fd != scripted_fd) return ::send(fd, buffer, size, flags);
    return static_cast<ssize_t>(size);
  }
  static ssize_t sendmsg(int fd, const msghdr* message, int flags) noexcept {
    if (fd != scripted_fd) return ::sendmsg(fd, message, flags);
    ssize_t total = 0;
    for (std::size_t i = 0; i < message->msg_iovlen; ++i) {
      total += static_cast<ssize_t>(message->msg_iov[i].iov_len);
    }
    return total;
  }
};

void BM_RawEpoll_Scripted(benchmark::State& state) {
  using Sys = ScriptedSyscalls;
  LoopbackPair pair;
  const int ep = ::epoll_create1(EPOLL_CLOEXEC);
  Sys::scripted_fd = pair.fds[1];
  epoll_event ev{};
  ev.events = EPOLLIN;
  static int token = 0;
  ev.data.ptr = &token;
  Sys::epoll_ctl(ep, EPOLL_CTL_ADD, pair.fds[1], &ev);
  static char buffer[64 * 1024];
  epoll_event events[64];
  for (auto _ : state) {
    const int n = Sys::epoll_wait(ep, events, 64, 0);
    for (int i = 0; i < n; ++i) {
      void* const token_seen = events[i].data.ptr;  // a copy: epoll_event is packed
      benchmark::DoNotOptimize(token_seen);
      const ssize_t r = Sys::read(pair.fds[1], buffer, sizeof buffer);
      if (r > 0) {
        benchmark::DoNotOptimize(
            Sys::send(pair.fds[1], buffer, static_cast<std::size_t>(r), MSG_NOSIGNAL));
      }
    }
  }
  Sys::scripted_fd = -1;
  Sys::scripted_ptr = nullptr;
  ::close(ep);
}
BENCHMARK(BM_RawEpoll_Scripted);

template <class Mode, class Handler>
void scripted_reactor(benchmark::State& state, std::chrono::milliseconds idle_timeout) {
  using Sys = ScriptedSyscalls;
  LoopbackPair pair;
  {
    reactor::Reactor<Mode, Sys> loop;
    Sys::scripted_fd = pair.fds[1];
    reactor::ConnectionOptions options;
    options.idle_timeout = idle_timeout;
    reactor::adopt(loop, reactor::UniqueFd(pair.fds[1]), Handler{}, options);
    pair.fds[1] = -1;
    for (auto _ : state) loop.run_once(std::chrono::milliseconds(0));
    Sys::scripted_ptr = nullptr;  // the reactor's destructor must see the real epoll_wait
  }
  Sys::scripted_fd = -1;
}

void BM_Reactor_Scripted_Level(benchmark::State& state) {
  scripted_reactor<reactor::LevelTriggered, Echo>(state, std::chrono::milliseconds(0));
}
BENCHMARK(BM_Reactor_Scripted_Level);

// Edge mode on TCP stops at a short read (64 bytes into a 64 KiB buffer): one read per event.
void BM_Reactor_Scripted_Edge(benchmark::State& state) {
  scripted_reactor<reactor::EdgeTriggered, Echo>(state, std::chrono::milliseconds(0));
}
BENCHMARK(BM_Reactor_Scripted_Edge);

void BM_Reactor_Scripted_Level_IdleTimeout(benchmark::State& state) {
  scripted_reactor<reactor::LevelTriggered, Echo>(state, std::chrono::seconds(60));
}
BENCHMARK(BM_Reactor_Scripted_Level_IdleTimeout);

// The handler alone does nothing but count: the dispatch and read path without the send.
void BM_Reactor_Scripted_Level_SinkHandler(benchmark::State& state) {
  scripted_reactor<reactor::LevelTriggered, Sink>(state, std::chrono::milliseconds(0));
}
BENCHMARK(BM_Reactor_Scripted_Level_SinkHandler);

}  // namespace

// What closing a registered TCP socket costs with and without EPOLL_CTL_DEL first (every
// Connection close does the DEL since issue 8: epoll watches the file description, which a fork()ed
// child may keep alive). Each iteration: socket, ADD, [DEL], close; the difference is the DEL.
void close_registered(benchmark::State& state, bool del) {
  const int epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
  for (auto _ : state) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    epoll_event event{};
    event.events = EPOLLIN;
    ::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event);
    if (del) ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, &event);
    ::close(fd);
  }
  ::close(epoll_fd);
}
void BM_CloseRegistered_NoDel(benchmark::State& state) {
  close_registered(state, false);
}
void BM_CloseRegistered_Del(benchmark::State& state) {
  close_registered(state, true);
}
BENCHMARK(BM_CloseRegistered_NoDel);
BENCHMARK(BM_CloseRegistered_Del);

BENCHMARK_MAIN();
