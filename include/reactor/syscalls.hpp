// Public: the syscall policy. Every system call the library makes goes through a policy type; this
// is the default, a set of inline forwarders to the kernel. Tests substitute their own policy to
// inject EINTR, EAGAIN, short transfers, EMFILE and other faults (see
// tests/support/fault_syscalls.hpp).
//
// Contract shared by every policy: each function behaves like the syscall of the same name,
// returning -1 and setting errno on failure. As with the kernel, EAGAIN from read on a socket
// means nothing was queued at that moment (edge mode relies on it; it re-arms once after a wakeup
// whose first read finds nothing, which covers a stray EAGAIN there). Functions are static so that
// a policy costs no storage in the objects that use it; a policy that needs state keeps it itself
// (thread_local, say).
//
// The clock is part of the policy too: a policy may define `static std::chrono::steady_clock::
// time_point now() noexcept`, and every clock read the library makes (timer deadlines, connection
// timeouts, shutdown deadlines, accept back-off) goes through it, so a simulated kernel can run
// virtual time (tests/support/sim_kernel.hpp). Its time points must be the ones timerfd_settime
// with TFD_TIMER_ABSTIME on CLOCK_MONOTONIC is given. A policy without now() gets steady_clock.
#pragma once

#include <fcntl.h>
#include <linux/sockios.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <concepts>
#include <cstddef>

namespace reactor {

struct LinuxSyscalls {
  // steady_clock is CLOCK_MONOTONIC on Linux (libstdc++ and libc++), the clock the timerfd uses.
  static std::chrono::steady_clock::time_point now() noexcept {
    return std::chrono::steady_clock::now();
  }
  static int epoll_create1(int flags) noexcept { return ::epoll_create1(flags); }
  static int epoll_ctl(int epfd, int op, int fd, epoll_event* event) noexcept {
    return ::epoll_ctl(epfd, op, fd, event);
  }
  static int epoll_wait(int epfd, epoll_event* events, int max_events, int timeout_ms) noexcept {
    return ::epoll_wait(epfd, events, max_events, timeout_ms);
  }
  static int eventfd(unsigned initial, int flags) noexcept { return ::eventfd(initial, flags); }
  static int signalfd(int fd, const sigset_t* mask, int flags) noexcept {
    return ::signalfd(fd, mask, flags);
  }
  static int timerfd_create(int clock, int flags) noexcept {
    return ::timerfd_create(clock, flags);
  }
  static int timerfd_settime(int fd, int flags, const itimerspec* value, itimerspec* old) noexcept {
    return ::timerfd_settime(fd, flags, value, old);
  }
  static int sigprocmask(int how, const sigset_t* set, sigset_t* old) noexcept {
    // pthread_sigmask returns the error number instead of setting errno.
    const int err = ::pthread_sigmask(how, set, old);
    if (err == 0) return 0;
    errno = err;
    return -1;
  }
  static ssize_t read(int fd, void* buffer, std::size_t size) noexcept {
    return ::read(fd, buffer, size);
  }
  static ssize_t write(int fd, const void* buffer, std::size_t size) noexcept {
    return ::write(fd, buffer, size);
  }
  static ssize_t send(int fd, const void* buffer, std::size_t size, int flags) noexcept {
    return ::send(fd, buffer, size, flags);
  }
  static ssize_t sendmsg(int fd, const msghdr* message, int flags) noexcept {
    return ::sendmsg(fd, message, flags);
  }
  // send_file(): the kernel copies file bytes to the socket (sendfile(2)), or, where it cannot,
  // pread(2) reads them for an ordinary write. Optional in a policy: without sendfile (and
  // sigtimedwait, which takes back the SIGPIPE sendfile can raise), files are copied through
  // pread; without pread too, Connection::send_file() is not supported.
  static ssize_t sendfile(int out_fd, int in_fd, off_t* offset, std::size_t count) noexcept {
    return ::sendfile(out_fd, in_fd, offset, count);
  }
  static int sigtimedwait(const sigset_t* set, siginfo_t* info, const timespec* timeout) noexcept {
    return ::sigtimedwait(set, info, timeout);
  }
  static ssize_t pread(int fd, void* buffer, std::size_t size, off_t offset) noexcept {
    return ::pread(fd, buffer, size, offset);
  }
  static int socket(int domain, int type, int protocol) noexcept {
    return ::socket(domain, type, protocol);
  }
  static int bind(int fd, const sockaddr* address, socklen_t length) noexcept {
    return ::bind(fd, address, length);
  }
  static int listen(int fd, int backlog) noexcept { return ::listen(fd, backlog); }
  static int accept4(int fd, sockaddr* address, socklen_t* length, int flags) noexcept {
    return ::accept4(fd, address, length, flags);
  }
  static int connect(int fd, const sockaddr* address, socklen_t length) noexcept {
    return ::connect(fd, address, length);
  }
  static int poll(pollfd* fds, nfds_t count, int timeout_ms) noexcept {
    return ::poll(fds, count, timeout_ms);
  }
  static int setsockopt(int fd, int level, int name, const void* value, socklen_t length) noexcept {
    return ::setsockopt(fd, level, name, value, length);
  }
  static int getsockopt(int fd, int level, int name, void* value, socklen_t* length) noexcept {
    return ::getsockopt(fd, level, name, value, length);
  }
  static int getsockname(int fd, sockaddr* address, socklen_t* length) noexcept {
    return ::getsockname(fd, address, length);
  }
  static int getpeername(int fd, sockaddr* address, socklen_t* length) noexcept {
    return ::getpeername(fd, address, length);
  }
  static int fcntl(int fd, int command, int argument) noexcept {
    return ::fcntl(fd, command, argument);
  }
  // Used with SIOCOUTQ only: bytes the kernel has not yet delivered (TCP: sent but not
  // acknowledged, or not sent). Optional in a policy, like now().
  static int ioctl(int fd, unsigned long request, int* argument) noexcept {
    return ::ioctl(fd, request, argument);
  }
  static int shutdown(int fd, int how) noexcept { return ::shutdown(fd, how); }
  static int close(int fd) noexcept { return ::close(fd); }
  static int unlink(const char* path) noexcept { return ::unlink(path); }
};

namespace detail {

// The policy's clock: Sys::now() where the policy has one, else steady_clock.
template <class Sys>
std::chrono::steady_clock::time_point clock_now() noexcept {
  // A policy that names now() with another signature would silently get the real clock, mixed
  // with its own timerfd: say so instead.
  static_assert(
      !requires { Sys::now(); } ||
          requires {
            { Sys::now() }
            noexcept->std::same_as<std::chrono::steady_clock::time_point>;
          },
      "reactor: a syscall policy's now() must be "
      "`static std::chrono::steady_clock::time_point now() noexcept`");
  if constexpr (requires {
                  { Sys::now() }
                  noexcept->std::same_as<std::chrono::steady_clock::time_point>;
                }) {
    return Sys::now();
  } else {
    return std::chrono::steady_clock::now();
  }
}

// Bytes of a socket's output the kernel still holds undelivered (SIOCOUTQ), 0 when unknown: the
// call failed, or the policy has no ioctl().
template <class Sys>
int unsent_bytes(int fd) noexcept {
  static_assert(
      !requires { &Sys::ioctl; } ||
          requires(int value) {
            { Sys::ioctl(fd, SIOCOUTQ, &value) }
            noexcept->std::same_as<int>;
          },
      "reactor: a syscall policy's ioctl() must be "
      "`static int ioctl(int fd, unsigned long request, int* argument) noexcept`");
  if constexpr (requires(int value) {
                  { Sys::ioctl(fd, SIOCOUTQ, &value) }
                  noexcept->std::same_as<int>;
                }) {
    int value = 0;
    return Sys::ioctl(fd, SIOCOUTQ, &value) == 0 ? value : 0;
  } else {
    return 0;
  }
}

// Whether policy Sys can read files (pread) and have the kernel send them (sendfile).
template <class Sys>
constexpr bool has_pread() noexcept {
  return requires(int fd, char* buffer, std::size_t size, off_t offset) {
    { Sys::pread(fd, buffer, size, offset) } -> std::same_as<ssize_t>;
  };
}
template <class Sys>
constexpr bool has_sendfile() noexcept {
  return requires(int fd, off_t* offset, std::size_t size, const sigset_t* set, siginfo_t* info,
                  const timespec* timeout) {
    { Sys::sendfile(fd, fd, offset, size) } -> std::same_as<ssize_t>;
    { Sys::sigtimedwait(set, info, timeout) } -> std::same_as<int>;
  };
}

}  // namespace detail

}  // namespace reactor
