// Public: the two epoll trigger modes, chosen at compile time as the Reactor's first template
// argument. Both are first-class; they differ only in how connections read and arm EPOLLOUT.
#pragma once

namespace reactor {

// Level-triggered (the default). A connection reads once per readiness event, and EPOLLOUT is in
// the interest set only while output is pending, so an idle or caught-up connection never wakes
// the loop. Interest changes cost one epoll_ctl each.
struct LevelTriggered {
  static constexpr bool kEdge = false;
};

// Edge-triggered. A connection is registered once for EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET and
// never modified: reads drain until EAGAIN or a short read (up to a per-wakeup budget, after which
// the connection goes on the reactor's ready list), and EPOLLOUT edges only fire after the socket
// buffer was full, so keeping it registered costs no wakeups and saves every epoll_ctl.
struct EdgeTriggered {
  static constexpr bool kEdge = true;
};

}  // namespace reactor
