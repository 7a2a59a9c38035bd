// Public: every compile-time policy the library accepts, as named C++20 concepts in one place —
// the trigger mode, the syscall policy and the connection handler with its optional hooks.
#pragma once

#include <sys/epoll.h>
#include <sys/socket.h>

#include <concepts>
#include <cstddef>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

namespace reactor {

// A trigger mode: LevelTriggered or EdgeTriggered (see trigger.hpp).
template <class T>
concept TriggerMode = requires {
  { T::kEdge } -> std::convertible_to<bool>;
};

// A syscall policy: static functions with the kernel's signatures and errno convention
// (see syscalls.hpp). Checked on the calls the reactor's core needs.
template <class S>
concept SyscallPolicy = requires(int fd, void* buffer, const void* data, std::size_t size,
                                 epoll_event* event, const msghdr* message, sockaddr* address,
                                 socklen_t* length) {
  { S::epoll_create1(0) } -> std::same_as<int>;
  { S::epoll_ctl(fd, 0, fd, event) } -> std::same_as<int>;
  { S::epoll_wait(fd, event, 1, 0) } -> std::same_as<int>;
  { S::eventfd(0u, 0) } -> std::same_as<int>;
  { S::read(fd, buffer, size) } -> std::same_as<ssize_t>;
  { S::write(fd, data, size) } -> std::same_as<ssize_t>;
  { S::send(fd, data, size, 0) } -> std::same_as<ssize_t>;
  { S::sendmsg(fd, message, 0) } -> std::same_as<ssize_t>;
  { S::accept4(fd, address, length, 0) } -> std::same_as<int>;
  { S::shutdown(fd, 0) } -> std::same_as<int>;
  { S::close(fd) } -> std::same_as<int>;
};

// A connection handler: the one required hook is
//   on_data(Connection& c, std::string_view bytes)
// returning void (every byte consumed) or an integer count of the bytes consumed (the rest is kept
// and handed over again, followed by new bytes, when more arrive — not before, so consume every
// complete frame in one call; what is left at the peer's EOF is dropped as an incomplete frame; a
// count past the size, or negative, means all). bool is refused: `true` would read as "consumed one
// byte".
template <class H, class Conn>
concept ConnectionHandler = requires(H& handler, Conn& connection, std::string_view bytes) {
  handler.on_data(connection, bytes);
};

template <class R>
concept OnDataResult = std::is_void_v<R> ||
    (std::integral<R> && !std::same_as<std::remove_cv_t<R>, bool>);

// Optional hooks, detected by name and signature.
// on_open(c): the connection is registered; may send or close.
template <class H, class Conn>
concept HasOnOpen = requires(H& handler, Conn& connection) {
  handler.on_open(connection);
};

// on_drain(c): pending output fell to the low watermark after it had passed the high watermark.
template <class H, class Conn>
concept HasOnDrain = requires(H& handler, Conn& connection) {
  handler.on_drain(connection);
};

// `static constexpr bool coalesce_sends = false;` in a handler: its connections write each send
// at once (no copy, one write per send), as before coalescing; without it (or true) the sends made
// inside the loop coalesce (Connection::send).
template <class H>
constexpr bool coalesces_sends() noexcept {
  if constexpr (requires { H::coalesce_sends; }) {
    return static_cast<bool>(H::coalesce_sends);
  } else {
    return true;
  }
}

// on_eof(c): the peer half-closed. Without this hook the connection closes after flushing; with
// it, the handler decides (it may go on sending, then call shutdown() or close()).
template <class H, class Conn>
concept HasOnEof = requires(H& handler, Conn& connection) {
  handler.on_eof(connection);
};

// on_close(c, reason): called exactly once, after the fd is closed; reason is empty for an
// orderly close. The connection is freed when the hook returns.
template <class H, class Conn>
concept HasOnClose = requires(H& handler, Conn& connection, std::error_code reason) {
  handler.on_close(connection, reason);
};

// on_shutdown(c): the reactor began a graceful shutdown (Reactor::shutdown). Without this hook
// the connection is closed once it is quiet; with it, the handler decides when to close (an HTTP
// server finishes the response in progress, say) and the connection stays until it does or the
// grace period ends.
template <class H, class Conn>
concept HasOnShutdown = requires(H& handler, Conn& connection) {
  handler.on_shutdown(connection);
};

// on_handshake_failed(c, reason): a transport with a handshake (TLS) could not complete it (a
// bad certificate, a timeout, a peer that closed or sent garbage). on_open never ran, so on_close
// will not run either: this is the one report, after the fd is closed; the connection is freed
// when the hook returns. Without it the failure is silent (a server's usual choice).
template <class H, class Conn>
concept HasOnHandshakeFailed = requires(H& handler, Conn& connection, std::error_code reason) {
  handler.on_handshake_failed(connection, reason);
};

namespace detail {

// Converts to any lvalue reference: calling a hook with it finds a member of that name whatever
// its parameter types, so that a hook with the wrong signature can be told apart from no hook.
struct AnyArgument {
  template <class T>
  operator T&() const noexcept;
};

// A member called `name` that can be called with 0 to 5 arguments of any type, or whose address
// can be taken: the handler meant to define that hook.
#define REACTOR_DETAIL_NAMES_HOOK(name)                   \
  template <class H>                                      \
  concept Names_##name = requires(H & h, AnyArgument a) { \
    h.name();                                             \
  }                                                       \
  || requires(H & h, AnyArgument a) {                     \
    h.name(a);                                            \
  }                                                       \
  || requires(H & h, AnyArgument a) {                     \
    h.name(a, a);                                         \
  }                                                       \
  || requires(H & h, AnyArgument a) {                     \
    h.name(a, a, a);                                      \
  }                                                       \
  || requires(H & h, AnyArgument a) {                     \
    h.name(a, a, a, a);                                   \
  }                                                       \
  || requires(H & h, AnyArgument a) {                     \
    h.name(a, a, a, a, a);                                \
  }                                                       \
  || requires {                                           \
    &H::name;                                             \
  };
REACTOR_DETAIL_NAMES_HOOK(on_open)
REACTOR_DETAIL_NAMES_HOOK(on_drain)
REACTOR_DETAIL_NAMES_HOOK(on_eof)
REACTOR_DETAIL_NAMES_HOOK(on_close)
REACTOR_DETAIL_NAMES_HOOK(on_shutdown)
REACTOR_DETAIL_NAMES_HOOK(on_handshake_failed)
#undef REACTOR_DETAIL_NAMES_HOOK

}  // namespace detail

// Checked where a Connection<Handler> is instantiated: the required hook is there, returns what
// it may, and every optional hook the handler names has a signature the library calls (a hook it
// would silently never call is a compile error naming the hook and the signature it needs).
template <class H, class Conn>
constexpr bool check_handler() noexcept {
  static_assert(ConnectionHandler<H, Conn>,
                "reactor: handler must define on_data(Connection&, std::string_view) "
                "returning void or an integer byte count");
  if constexpr (ConnectionHandler<H, Conn>) {
    static_assert(OnDataResult<decltype(std::declval<H&>().on_data(
                      std::declval<Conn&>(), std::declval<std::string_view>()))>,
                  "reactor: on_data must return void or an integer byte count, not bool "
                  "(true would mean one byte consumed)");
  }
  static_assert(!detail::Names_on_open<H> || HasOnOpen<H, Conn>,
                "reactor: on_open is never called: it must be on_open(Connection&)");
  static_assert(!detail::Names_on_drain<H> || HasOnDrain<H, Conn>,
                "reactor: on_drain is never called: it must be on_drain(Connection&)");
  static_assert(!detail::Names_on_eof<H> || HasOnEof<H, Conn>,
                "reactor: on_eof is never called: it must be on_eof(Connection&)");
  static_assert(!detail::Names_on_close<H> || HasOnClose<H, Conn>,
                "reactor: on_close is never called: it must be "
                "on_close(Connection&, std::error_code)");
  static_assert(!detail::Names_on_shutdown<H> || HasOnShutdown<H, Conn>,
                "reactor: on_shutdown is never called: it must be on_shutdown(Connection&)");
  static_assert(!detail::Names_on_handshake_failed<H> || HasOnHandshakeFailed<H, Conn>,
                "reactor: on_handshake_failed is never called: it must be "
                "on_handshake_failed(Connection&, std::error_code)");
  return true;
}

}  // namespace reactor
