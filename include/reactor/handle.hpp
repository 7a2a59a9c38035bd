// Public: ConnectionHandle<Reactor>, a small copyable value (reactor pointer, slot index,
// generation) that names one connection and may be used from any thread to send to it or close
// it. A handle outliving its connection is detected (the slot's generation moved on, even if the
// slot now holds another connection): the call reports not_connected and touches nothing.
//
// Threading: every member is safe from any thread while the reactor exists. Inside the reactor's
// run()/run_once()/shutdown() (its callbacks), send() sends directly; anywhere else — another
// thread, or the creating thread while nobody runs the loop — it copies the bytes and post()s
// them to whichever thread runs the loop next. So outside the loop, bytes sent through a handle
// arrive after anything sent on the Connection itself before the loop runs again: "a" on the
// connection, "b" through its handle, "c" on the connection arrive as "acb". Keep to one of the
// two for bytes whose order matters.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>

#include "detail/handle_table.hpp"
#include "detail/watcher.hpp"

namespace reactor {

namespace detail {

// What kSend carries to a connection: the bytes, and whether the connection accepted them.
struct SendRequest {
  std::string_view bytes;
  bool accepted = false;
};

}  // namespace detail

template <class R>
class ConnectionHandle {
 public:
  // An empty handle; every call reports not_connected.
  ConnectionHandle() noexcept = default;

  // Sends `bytes` to the connection. Returns not_connected for an empty or stale handle; inside
  // the loop also when the connection refused the bytes (closing, or a failed send, which its
  // on_close reports). Posted bytes are dropped if the connection closes before they are handed
  // to it, as it would drop anything queued at close. Outside the loop, not_enough_memory when the
  // bytes cannot be copied or queued (nothing was sent then).
  std::error_code send(std::string_view bytes) const noexcept {
    if (!is_current()) return not_connected();
    if (loop_->on_loop_thread()) return send_here(*loop_, index_, generation_, bytes);
    try {
      loop_->post([loop = loop_, index = index_, generation = generation_,
                   copy = std::string(bytes)] { send_here(*loop, index, generation, copy); });
    } catch (...) {  // bad_alloc, or length_error for a view past max_size()
      return std::make_error_code(std::errc::not_enough_memory);
    }
    return {};
  }

  // Closes the connection gracefully (flush, then close). not_connected when stale;
  // not_enough_memory when, outside the loop, the request cannot be queued.
  std::error_code close() const noexcept {
    if (!is_current()) return not_connected();
    if (loop_->on_loop_thread()) return close_here(*loop_, index_, generation_);
    try {
      loop_->post([loop = loop_, index = index_, generation = generation_] {
        close_here(*loop, index, generation);
      });
    } catch (...) {
      return std::make_error_code(std::errc::not_enough_memory);
    }
    return {};
  }

  // Whether the connection was still open when asked; it may close right after.
  bool is_current() const noexcept {
    return loop_ != nullptr && loop_->handles().is_current(index_, generation_);
  }

  R* reactor() const noexcept { return loop_; }

  friend bool operator==(const ConnectionHandle&, const ConnectionHandle&) = default;

 private:
  template <class Handler, class Loop, class Transport>
  friend class Connection;

  ConnectionHandle(R* loop, std::uint32_t index, std::uint32_t generation) noexcept
      : loop_(loop), index_(index), generation_(generation) {}

  static std::error_code not_connected() noexcept {
    return std::make_error_code(std::errc::not_connected);
  }

  static std::error_code send_here(R& loop, std::uint32_t index, std::uint32_t generation,
                                   std::string_view bytes) noexcept {
    detail::OwnedWatcher* watcher = loop.handles().find(index, generation);
    if (watcher == nullptr || watcher->fd < 0) return not_connected();
    detail::SendRequest request{bytes};
    watcher->function(*watcher, detail::WatcherOp::kSend, 0, &request);
    return request.accepted ? std::error_code() : not_connected();
  }

  static std::error_code close_here(R& loop, std::uint32_t index,
                                    std::uint32_t generation) noexcept {
    detail::OwnedWatcher* watcher = loop.handles().find(index, generation);
    if (watcher == nullptr || watcher->fd < 0) return not_connected();
    watcher->function(*watcher, detail::WatcherOp::kClose, 0, nullptr);
    return {};
  }

  R* loop_ = nullptr;
  std::uint32_t index_ = detail::HandleTable::kNone;
  std::uint32_t generation_ = detail::HandleTable::kNone;
};

}  // namespace reactor
