// Internal: what the reactor knows about the objects it dispatches to. Everything registered in
// an epoll set derives from Watcher; epoll_event.data.ptr points at it. Dispatch goes through one
// plain function pointer per watcher (set by the concrete, templated type), which keeps the reactor
// ignorant of handler types without virtual functions or std::function; inside that function every
// handler call is direct and inlinable.
#pragma once

#include <chrono>
#include <cstdint>

#include "../timer.hpp"
#include "intrusive_list.hpp"

namespace reactor::detail {

// What the reactor asks of a watcher.
enum class WatcherOp : std::uint8_t {
  kEvent,     // epoll reported `events` (already masked by the registered interest)
  kResume,    // the watcher asked to be run again without a new event (ready list, backoff)
  kClose,     // close gracefully: flush pending output, then close (connections)
  kAbort,     // close now with operation_canceled: the reactor is being destroyed, or a graceful
              // shutdown's grace ended (connections)
  kFinalize,  // the watcher is closed and unlinked: run its last callback and free it (connections)
  kSend,      // send the std::string_view that `argument` points to (connections, via handles)
  kDrain,     // a graceful shutdown began: finish serving, close once quiet (connections)
  kFlush,     // write the output coalesced during the callbacks that just ran (connections)
  kTimer,     // its deadline (TimedWatcher) fired; it is out of the heap (connections)
};

struct Watcher {
  using Function = void (*)(Watcher& self, WatcherOp op, std::uint32_t events,
                            void* argument) noexcept;

  explicit Watcher(Function on_op) noexcept : function(on_op) {}

  Function function;
  int fd = -1;                 // -1 once closed: any event still queued for it is dropped
  std::uint32_t interest = 0;  // the mask currently registered with epoll_ctl
  bool registered = false;
};

struct AllConnectionsTag {};
struct ReadyTag {};

// A watcher the reactor owns and frees: a connection. It sits in the reactor's list of all
// connections, at most once in the ready list (it asked to be run again), and at most once in the
// list of connections closed during this loop iteration, to be finalized after dispatch.
struct OwnedWatcher : Watcher, ListHook<AllConnectionsTag>, ListHook<ReadyTag> {
  using Watcher::Watcher;
  OwnedWatcher* next_closed = nullptr;
};

// An owned watcher with one deadline in the reactor's timer queue (a connection's timer): the
// reactor finds the watcher from the deadline and calls it with WatcherOp::kTimer, so the deadline
// needs no function pointer of its own.
struct TimedWatcher : OwnedWatcher, Deadline {
  using OwnedWatcher::OwnedWatcher;
};

struct ListenerTag {};

// A listener (acceptor) known to the reactor, so that a graceful shutdown can stop accepting.
struct ListenerNode : ListHook<ListenerTag> {
  Watcher* watcher = nullptr;
};

struct FdWaitTag {};

// A watcher waiting for file descriptors to be freed (an acceptor after EMFILE): the reactor
// resumes it when one of its connections closes, or at `due`, whichever comes first.
struct FdWaiter : ListHook<FdWaitTag> {
  Watcher* watcher = nullptr;
  std::chrono::steady_clock::time_point due{};
};

}  // namespace reactor::detail
