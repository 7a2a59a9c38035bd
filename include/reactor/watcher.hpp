// Public: FdWatcher<Callback, Reactor>, readiness notifications for any fd the user owns (a pipe,
// an inotify or timer fd, a device). The callback is stored inline and called directly as
// callback(events) with the epoll event mask, masked by the interest set.
//
// Threading: construct, use and destroy on the reactor's thread, before the reactor is destroyed.
// It may be destroyed from inside any callback, its own included (no stale event reaches it).
#pragma once

#include <sys/epoll.h>

#include <cstdint>
#include <system_error>
#include <utility>

#include "detail/watcher.hpp"
#include "error.hpp"
#include "reactor.hpp"

namespace reactor {

template <class Callback, class R = Reactor<>>
class FdWatcher : private detail::Watcher {
 public:
  // Watches `fd` (not owned; it must outlive the watcher) for `events` (EPOLLIN, EPOLLOUT, and
  // EPOLLET if wanted). Throws std::system_error ("epoll_ctl") on failure.
  FdWatcher(R& loop, int watched_fd, std::uint32_t events, Callback on_ready)
      : Watcher(&on_watcher_op), loop_(&loop), callback_(std::move(on_ready)) {
    fd = watched_fd;
    detail::throw_if(loop_->add(*this, events), "epoll_ctl");
  }

  FdWatcher(const FdWatcher&) = delete;
  FdWatcher& operator=(const FdWatcher&) = delete;
  ~FdWatcher() { loop_->remove(*this); }

  // Changes the interest set (0 silences everything but EPOLLERR/EPOLLHUP).
  std::error_code set_events(std::uint32_t events) noexcept { return loop_->modify(*this, events); }
  std::uint32_t events() const noexcept { return interest; }
  int native_handle() const noexcept { return fd; }
  Callback& callback() noexcept { return callback_; }

 private:
  static void on_watcher_op(detail::Watcher& watcher, detail::WatcherOp op, std::uint32_t events,
                            void* /*argument*/) noexcept {
    if (op != detail::WatcherOp::kEvent) return;
    auto& self = static_cast<FdWatcher&>(watcher);
    try {
      self.callback_(events);
    } catch (...) {
      // There is no connection to fail here; a throwing fd callback is ignored, and a
      // level-triggered fd that stays ready simply calls it again.
    }
  }

  R* loop_;
  Callback callback_;
};

}  // namespace reactor
