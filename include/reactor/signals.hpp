// Public: SignalSet<Callback, Reactor>, POSIX signals delivered as ordinary events through a
// signalfd, so a handler can react to SIGINT/SIGTERM with any library call (no async-signal-safety
// concerns). callback(signal_number) runs on the reactor thread.
//
// The signals are blocked in the calling thread's mask while the set exists (signalfd needs that)
// and unblocked again on destruction if they were not blocked before. No signal disposition is
// changed. Create the set before starting other threads, so they inherit the blocked mask.
#pragma once

#include <signal.h>
#include <sys/signalfd.h>

#include <cerrno>
#include <initializer_list>
#include <system_error>
#include <utility>

#include "detail/watcher.hpp"
#include "error.hpp"
#include "reactor.hpp"

namespace reactor {

template <class Callback, class R = Reactor<>>
class SignalSet : private detail::Watcher {
  using Sys = typename R::syscalls;

 public:
  // Throws std::system_error naming "sigprocmask", "signalfd" or "epoll_ctl" on failure.
  SignalSet(R& loop, std::initializer_list<int> signals, Callback on_signal)
      : Watcher(&on_watcher_op), loop_(&loop), callback_(std::move(on_signal)) {
    sigemptyset(&mask_);
    sigemptyset(&added_);
    for (int signal : signals) sigaddset(&mask_, signal);
    sigset_t previous;
    if (Sys::sigprocmask(SIG_BLOCK, &mask_, &previous) != 0) {
      detail::throw_error(detail::last_errno_code(), "sigprocmask");
    }
    for (int signal : signals) {
      if (sigismember(&previous, signal) == 0) sigaddset(&added_, signal);
    }
    fd = Sys::signalfd(-1, &mask_, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0) {
      const std::error_code ec = detail::last_errno_code();
      restore_mask();
      detail::throw_error(ec, "signalfd");
    }
    if (const std::error_code ec = loop_->add(*this, EPOLLIN)) {
      Sys::close(std::exchange(fd, -1));
      restore_mask();
      detail::throw_error(ec, "epoll_ctl");
    }
  }

  SignalSet(const SignalSet&) = delete;
  SignalSet& operator=(const SignalSet&) = delete;

  ~SignalSet() {
    if (destroyed_ != nullptr) *destroyed_ = true;
    loop_->remove(*this);
    Sys::close(std::exchange(fd, -1));
    restore_mask();
  }

 private:
  void restore_mask() noexcept { Sys::sigprocmask(SIG_UNBLOCK, &added_, nullptr); }

  static void on_watcher_op(detail::Watcher& watcher, detail::WatcherOp op,
                            std::uint32_t /*events*/, void* /*argument*/) noexcept {
    if (op != detail::WatcherOp::kEvent) return;
    auto& self = static_cast<SignalSet&>(watcher);
    bool destroyed = false;
    self.destroyed_ = &destroyed;
    for (;;) {
      signalfd_siginfo info;
      const ssize_t n = Sys::read(self.fd, &info, sizeof info);
      if (n != static_cast<ssize_t>(sizeof info)) {
        if (n < 0 && errno == EINTR) continue;
        break;  // EAGAIN: all read
      }
      try {
        self.callback_(static_cast<int>(info.ssi_signo));
      } catch (...) {
        // Ignored: a signal has no connection to fail.
      }
      if (destroyed) return;  // the callback destroyed this set
    }
    self.destroyed_ = nullptr;
  }

  R* loop_;
  Callback callback_;
  sigset_t mask_;
  sigset_t added_;  // signals this set blocked, to unblock on destruction
  bool* destroyed_ = nullptr;
};

}  // namespace reactor
