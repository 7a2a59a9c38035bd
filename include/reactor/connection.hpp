// Public: Connection<Handler, Reactor>, one connected stream socket driven by a reactor, and
// adopt(), which hands an already-connected socket to a reactor.
//
// The handler is a policy type stored inline: its hooks are called directly (no virtual call, no
// std::function), and an idle connection costs sizeof(Connection) + malloc's overhead, with no
// buffers (see docs/design.md). Connections are owned by their reactor. A Connection& handed to a
// callback stays valid until on_close returns, even if the handler closes it (or another
// connection) meanwhile: freeing is deferred until the current dispatch is over.
//
// Lifecycle (docs/design.md, "Connection lifecycle"): one phase, changed only by the members below
// that name it — open -> (shutdown: flushing, then FIN sent) -> closing (flushing) -> lingering
// (FIN sent, draining the peer's input) -> closed. The connection's one timer belongs to the phase:
// the timeout check until closing (and the graceful-shutdown quiet check), the linger deadline
// while lingering, nothing once closed; its callback looks at the phase, so no path can leave a
// timer meant for one phase running in another.
//
// Threading: every member must be called on the reactor's thread.
#pragma once

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <new>
#include <span>
#include <string_view>
#include <system_error>
#include <utility>

#include "buffer.hpp"
#include "concepts.hpp"
#include "detail/file_queue.hpp"
#include "detail/watcher.hpp"
#include "endpoint.hpp"
#include "error.hpp"
#include "fd.hpp"
#include "handle.hpp"
#include "reactor.hpp"
#include "timer.hpp"
#include "transport.hpp"

namespace reactor {

struct ConnectionOptions {
  // Reading pauses when pending output reaches high_water and resumes (with on_drain) when it
  // falls to low_water.
  std::size_t high_water = 1024 * 1024;
  std::size_t low_water = 256 * 1024;
  // A send() that would take pending output past this closes the connection with
  // Error::kOutputLimit instead of letting memory grow without bound.
  std::size_t max_pending_output = 64 * 1024 * 1024;
  // Bytes a handler may leave unconsumed (a partial frame) before the connection is closed with
  // Error::kInputLimit.
  std::size_t max_pending_input = 1024 * 1024;
  // Timeouts (zero: none), checked lazily against per-connection timestamps, so traffic costs one
  // store per read or write and a timer operation only once per period:
  // - idle: no byte in either direction for this long: flush, then close (reason timed_out);
  // - read: reading is enabled but no byte arrived for this long: abort (timed_out);
  // - write: output is pending but none of it was written for this long: abort (timed_out).
  std::chrono::milliseconds idle_timeout{0};
  std::chrono::milliseconds read_timeout{0};
  std::chrono::milliseconds write_timeout{0};
  // After close() has flushed everything, if the peer has not half-closed yet: send FIN, then read
  // and discard until the peer's EOF, for at most this long, before closing the socket. Closing a
  // TCP socket with unread input makes the kernel send RST, and an RST drops whatever of the
  // flushed bytes the kernel had not yet delivered (the peer stopped reading, say). If the time
  // runs out while the kernel still holds undelivered bytes (TCP: SIOCOUTQ), on_close reports
  // timed_out: delivery was not confirmed. Zero: close at once, leaving the rest to the kernel;
  // should the peer send more, or input be left unread, the kernel answers with RST and drops
  // what it had not delivered yet, which on_close cannot report.
  std::chrono::milliseconds linger_timeout{2000};
};

// What state() reports: where a connection is in its lifecycle.
enum class ConnectionState : std::uint8_t {
  kHandshaking,   // a transport with a handshake (TLS) has not finished it: on_open has not run
  kOpen,          // reading and writing (the peer may have half-closed: see on_eof)
  kShuttingDown,  // shutdown() was called: output flushes, then FIN; reading goes on
  kClosing,       // close() was called: input is dropped, output flushes, then the socket closes
                  // (after lingering for the peer's FIN, see ConnectionOptions::linger_timeout)
  kClosed,        // the socket is closed; on_close runs after the current dispatch
};

// Transport: how bytes reach the socket (transport.hpp); PlainTransport, the default, costs
// nothing. With one that has a handshake (TlsTransport, reactor/tls.hpp) the connection starts in
// kHandshaking: on_open runs once the handshake is done, and a failed one is reported to
// on_handshake_failed instead of on_close.
template <class Handler, class R = Reactor<>, class Transport = PlainTransport>
class Connection final : private detail::TimedWatcher {
  using Sys = typename R::syscalls;
  static_assert(reactor::Transport<Transport, Sys>,
                "reactor: Connection's transport must model reactor::Transport (transport.hpp)");
  static constexpr bool kHandshake = Transport::kHandshake;
  using Clock = std::chrono::steady_clock;
  static constexpr bool kEdge = R::kEdgeTriggered;
  static constexpr bool kCoalesce = coalesces_sends<Handler>();
  static constexpr int kMaxIovecs = 64;
  static constexpr int kMaxGather = 16;  // buffers per writev of send(span): the rest in groups

 public:
  using handler_type = Handler;
  using reactor_type = R;
  using transport_type = Transport;

  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  Handler& handler() noexcept { return handler_; }
  const Handler& handler() const noexcept { return handler_; }
  R& reactor() noexcept { return *loop_; }

  // The transport: for TLS, the negotiated protocol, ALPN, peer certificate, kernel offload.
  Transport& transport() noexcept { return transport_; }
  const Transport& transport() const noexcept { return transport_; }

  // The socket, or -1 once closed. Do not close it, and do not dup it (a dup would keep it in the
  // epoll set after the connection closed).
  int native_handle() const noexcept { return fd; }

  // True until the socket is closed (close() with output still pending keeps it open until the
  // output is flushed); state() tells an open connection from a closing one.
  bool is_open() const noexcept { return fd >= 0; }

  ConnectionState state() const noexcept {
    switch (phase_) {
      case Phase::kHandshake:
        return ConnectionState::kHandshaking;
      case Phase::kOpen:
        return ConnectionState::kOpen;
      case Phase::kShutdown:
      case Phase::kFinSent:
        return ConnectionState::kShuttingDown;
      case Phase::kClosing:
      case Phase::kLingering:
        return ConnectionState::kClosing;
      case Phase::kClosed:
        break;
    }
    return ConnectionState::kClosed;
  }

  // Sends bytes, in order with everything sent before. Inside the loop (any callback: on_data,
  // on_drain, a timer, posted work) the sends made to one connection in a row are coalesced:
  // held, and written together with one write when the callbacks of the current loop step are
  // done, so a handler answering 16 pipelined requests with 16 sends makes one write. A
  // loop writes sends at once until one of its connections first sends twice in one step (a
  // handler that sends once per callback keeps a direct write, with no copy); from that second
  // send on, every send below kCoalesceLimit bytes made inside the loop is held. A larger send goes
  // out at once, together with what was held (one writev), so that large buffers are not copied.
  // Outside the loop (before run(), between run_once() calls) bytes are written at once. Whatever
  // the kernel does not take is queued and written as the socket drains. While a transport's
  // handshake runs, all is queued: it goes out once the handshake is done (on_handshake_failed
  // reports its loss if it fails). A handler with `static constexpr bool coalesce_sends = false;`
  // never holds: each send is written at once.
  // Returns false when the bytes were not accepted: the connection is closed or closing, or this
  // send failed and closed it (on_close reports why: a write error, or Error::kOutputLimit when
  // pending output would pass max_pending_output; part of the bytes may have been written).
  // Accepted bytes are delivered in order unless the connection later fails (the write of held
  // bytes can fail after the callback returned), which on_close then reports. close() and
  // shutdown() after sends in the same step wait for the held bytes; abort() and a handler that
  // throws give them one write first.
  bool send(const void* data, std::size_t size) noexcept {
    const char* bytes = static_cast<const char*>(data);
    // Nothing queued or held, and no reason to hold this (outside the loop, a large send, or the
    // first send of this step on a loop where no connection has sent twice in one): written at
    // once.
    if (phase_ == Phase::kOpen && (flags_ & (kUserCorked | kFlushPending)) == 0 && output_idle() &&
        (!kCoalesce || (!loop_->sent_in_step(*this) && !loop_->holds_sends()) ||
         size >= kCoalesceLimit || !loop_->inside())) [[likely]] {
      if constexpr (kCoalesce) loop_->mark_sent(*this);
      while (size > 0) {
        const ssize_t n = transport_.template send<Sys>(fd, bytes, size);
        if (n >= 0) {
          last_write_ = loop_->activity_now();  // send() may run outside the loop
          bytes += n;
          size -= static_cast<std::size_t>(n);
          break;  // the kernel took what fits; the rest waits for EPOLLOUT
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          if (!rearm_after_full_write()) return false;
          break;
        }
        fail(transport_.error());
        return false;
      }
      if (size == 0) return true;
      const iovec rest{const_cast<char*>(bytes), size};
      return enqueue(&rest, 1, size, 0);  // the socket is full: the rest waits for EPOLLOUT
    }
    const iovec piece{const_cast<char*>(bytes), size};
    return send_pieces(&piece, 1, size);
  }

  bool send(std::string_view bytes) noexcept { return send(bytes.data(), bytes.size()); }

  // Gather send: the buffers' bytes in order, as one send() of their concatenation would send
  // them, without concatenating them first (a header and a body: one writev). Same contract as
  // send().
  bool send(std::span<const std::string_view> buffers) noexcept {
    iovec pieces[kMaxGather];
    std::size_t i = 0;
    while (i < buffers.size()) {  // in groups of kMaxGather: each group keeps the order
      int count = 0;
      std::size_t total = 0;
      for (; i < buffers.size() && count < kMaxGather; ++i) {
        if (buffers[i].empty()) continue;
        pieces[count++] = {const_cast<char*>(buffers[i].data()), buffers[i].size()};
        total += buffers[i].size();
      }
      if (!send_pieces(pieces, count, total)) return false;
    }
    return phase_ == Phase::kOpen || handshaking();
  }
  bool send(std::initializer_list<std::string_view> buffers) noexcept {
    return send(std::span<const std::string_view>(buffers.begin(), buffers.size()));
  }

  // Holds output back: sends only queue it until uncork() (or close()/shutdown(), which uncork),
  // which writes it with as few writes as the kernel allows. For code outside the loop's
  // callbacks (inside them, sends coalesce by themselves); pending_output_bytes() counts what is
  // held. Output the kernel was already refusing at cork() keeps going out as the socket drains
  // (with what was sent after it, in the same writes) and keeps its write timeout; once it is
  // out, sends are held. Not nestable: one uncork() ends any number of cork()s. Does nothing on
  // a connection that is not open or during a graceful shutdown, which serves out at once.
  void cork() noexcept {
    // A graceful shutdown serves out: nothing may be held back from it.
    if (phase_ != Phase::kOpen || (flags_ & kDraining) != 0) return;
    if ((flags_ & kFlushPending) != 0) {  // what the loop holds goes first: out (or queued) now
      loop_->uncork(*this);
      flush_coalesced();
      if (phase_ != Phase::kOpen) return;
    }
    // Bytes the kernel was already refusing keep their write timeout; held ones have none.
    flags_ |= kUserCorked | (output_idle() ? kCorkedEmpty : Flag{});
    update_interest();  // level mode: no EPOLLOUT for held output (it would fire on every wait)
  }
  void uncork() noexcept { release_cork(); }

  // Queues `length` bytes of the file `file` from `offset` (a static file's body, say): they go
  // out after everything sent before and before everything sent after, cork()ed and coalesced
  // bytes included. The caller keeps `file`: the connection sends from a dup of it (one fd per
  // queued file, closed once its bytes are written or the connection closes), so the caller may
  // close its own fd at once and send the same file to many connections. `file` must support
  // pread(2) (a regular file; not a pipe or socket). The kernel copies the bytes to the socket
  // (sendfile(2), no copy through user space) where it can; with a transport that transforms
  // bytes (TLS), a syscall policy without sendfile, or a file sendfile refuses (EINVAL, ENOSYS),
  // they are read with pread into a 64 KiB buffer and written as send() writes. File bytes count
  // in pending_output_bytes() and for the write timeout, and close() and shutdown() wait for them,
  // but they hold no memory, so they count neither towards high_water nor max_pending_output.
  // Returns an empty error_code when the range was queued (length 0 queues nothing and looks at
  // nothing, `file` included); otherwise nothing was queued, or (with no output ahead of it) the
  // range was written at once and that failed and closed the connection, and the error says why:
  // that write's error (ESPIPE for a pipe, EISDIR for a directory, Error::kFileTruncated past the
  // file's end, a peer's reset; on_close reports it too), not_connected (sending has ended:
  // shutdown(), close(), or a failed write of bytes held from this step, which on_close reports;
  // send() then returns false), invalid_argument (offset + length past the largest file offset),
  // operation_not_supported (the syscall policy has no pread, as the simulated kernel's), or
  // dup's error (EMFILE, say), which leaves the connection as it was. Should the file turn out
  // shorter than offset + length, or a read of it fail, the connection closes: on_close gets
  // Error::kFileTruncated, or the read's error (EOVERFLOW for offsets the file system cannot
  // reach, say), after the bytes the file had when they were read (a file truncated while queued
  // may still send what was read before the cut). Reactor thread only; no ConnectionHandle form.
  std::error_code send_file(int file, std::uint64_t offset, std::uint64_t length) noexcept {
    if (phase_ != Phase::kOpen && !handshaking()) {
      return std::make_error_code(std::errc::not_connected);
    }
    if constexpr (!detail::has_pread<Sys>()) {
      return std::make_error_code(std::errc::operation_not_supported);
    } else {
      constexpr auto kMaxOffset = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
      if (offset > kMaxOffset || length > kMaxOffset - offset) {
        return std::make_error_code(std::errc::invalid_argument);
      }
      if (length == 0) return {};
      // What the loop holds from this step goes first: out (or queued) now, as cork() does.
      if ((flags_ & kFlushPending) != 0) {
        loop_->uncork(*this);
        flush_coalesced();
        if (phase_ != Phase::kOpen) return std::make_error_code(std::errc::not_connected);
      }
      const int copy = Sys::fcntl(file, F_DUPFD_CLOEXEC, 0);
      if (copy < 0) return detail::last_errno_code();
      auto* entry = new (std::nothrow) detail::FileSend;
      detail::FileQueue* files = file_queue();
      if (entry != nullptr && files == nullptr) {
        files = new (std::nothrow) detail::FileQueue;
        if (files != nullptr && !loop_->attach_file_queue(this, files)) {
          delete std::exchange(files, nullptr);
        }
        if (files == nullptr) {
          delete entry;
          entry = nullptr;
        } else {
          flags_ |= kHasFiles;
        }
      }
      if (entry == nullptr) {
        Sys::close(copy);
        return std::make_error_code(std::errc::not_enough_memory);
      }
      entry->fd = copy;
      entry->offset = offset;
      entry->left = length;
      entry->copy = !kKernelSendsFiles;
      const bool was_idle = output_.empty() && files->empty();
      if (was_idle) last_write_ = loop_->activity_now();  // the write timeout counts from here
      files->push(entry, output_.size());
      // Nothing ahead of it: start now, unless cork() holds output or a handshake runs.
      if (was_idle && phase_ == Phase::kOpen && (flags_ & kUserCorked) == 0) {
        write_files();
        // Its first write failed (not a readable file, a reset peer...): closed, as a send()
        // whose write fails returns false.
        if (fd < 0) return reason_ ? reason_ : std::make_error_code(std::errc::not_connected);
        update_interest();
      } else {
        update_interest();
      }
      return {};
    }
  }

  // Sends coalesce below this size (see send()).
  static constexpr std::size_t kCoalesceLimit = 4096;

  // A handle for other threads (and for code that may outlive this connection). Returns an empty
  // handle when the reactor's handle table cannot grow (out of memory).
  ConnectionHandle<R> handle() noexcept {
    if (handle_index_ == detail::HandleTable::kNone && fd >= 0) {
      std::uint32_t generation = 0;
      if (!loop_->handles().acquire(*this, handle_index_, generation)) return {};
      return {loop_, handle_index_, generation};
    }
    if (handle_index_ == detail::HandleTable::kNone) return {};
    return {loop_, handle_index_, loop_->handles().generation(handle_index_)};
  }

  // Flushes pending output, then sends FIN (half-close); reading goes on. Once the peer's EOF has
  // also arrived, the connection closes.
  void shutdown() noexcept {
    if (phase_ != Phase::kOpen) return;
    release_cork();  // its on_drain may act here
    if (phase_ != Phase::kOpen) return;
    phase_ = Phase::kShutdown;
    if (output_idle() && (flags_ & kFlushPending) == 0) send_fin();
  }

  // Stops delivering input, flushes pending output, then closes (lingering for the peer's EOF
  // first, see ConnectionOptions::linger_timeout). on_close gets an empty reason; it runs after the
  // current dispatch, once the socket is closed. Called from on_data, it drops the rest of the
  // input: what on_data returns is then ignored.
  void close() noexcept {
    if (phase_ >= Phase::kClosing) return;
    if (phase_ == Phase::kHandshake) {  // nothing of the user's to flush: the handshake is dropped
      close_now(std::make_error_code(std::errc::operation_canceled));
      return;
    }
    release_cork();  // its on_drain may act here
    if (phase_ >= Phase::kClosing) return;
    const bool fin_sent = phase_ == Phase::kFinSent;
    phase_ = Phase::kClosing;
    drop_input();
    if (output_idle() && (flags_ & kFlushPending) == 0) {
      finish_close(fin_sent);
    } else {
      update_interest();
    }
  }

  // Closes now, dropping pending output; with send_reset the peer gets RST instead of FIN
  // (SO_LINGER 0). on_close gets an empty reason, after the current dispatch.
  void abort(bool send_reset = false) noexcept { close_now({}, send_reset); }

  // Stops reading until resume_reading(); independent of the automatic backpressure pause.
  void pause_reading() noexcept {
    flags_ |= kUserPaused;
    update_interest();
  }

  // Resumes reading; bytes left unconsumed are handed to on_data again (with any new ones).
  void resume_reading() noexcept {
    if ((flags_ & kUserPaused) == 0) return;
    flags_ &= ~kUserPaused;
    reading_resumed();
  }

  // False while paused by the user, by backpressure, after EOF, or while closing.
  bool is_reading() const noexcept { return reading_enabled(); }

  // Bytes accepted by send() and send_file() and not yet written (coalesced ones included).
  std::size_t pending_output_bytes() const noexcept {
    return output_.size() + ((flags_ & kFlushPending) != 0 ? loop_->cork_size() : 0) +
           ((flags_ & kHasFiles) != 0 ? static_cast<std::size_t>(file_queue()->bytes()) : 0);
  }
  std::size_t pending_input_bytes() const noexcept { return input_.size(); }

  // Socket addresses; empty endpoints once closed or on failure.
  Endpoint local_endpoint() const noexcept { return address(&Sys::getsockname); }
  Endpoint remote_endpoint() const noexcept { return address(&Sys::getpeername); }

  // Registers `fd` (connected, non-blocking, owned from now on) with `loop` and calls on_open.
  // Returns nullptr with `ec` set when the connection cannot be created (the fd is closed then,
  // and no hook has run). The pointer is valid until on_close returns, and on_close runs only
  // after on_open. tcp: the socket is TCP (not AF_UNIX), which decides how edge mode treats a
  // short read. in_epoll: the fd is already in the loop's epoll set (a Connector's socket, which
  // waited there for its connect to complete), so it is re-pointed at the connection with one
  // EPOLL_CTL_MOD instead of added; the caller drops its own watcher's queued events (forget()).
  // During a graceful shutdown the new connection is served out like the others. transport: a
  // prototype for this connection (TlsTransport: the context, and for a client the peer's name);
  // with a handshake, on_open runs once it is done (a failure goes to on_handshake_failed), and a
  // graceful shutdown lets a handshake in progress finish (or time out), then serves it out.
  static Connection* open(R& loop, int fd, Handler&& handler, const ConnectionOptions& options,
                          bool tcp, std::error_code& ec, bool in_epoll = false,
                          Transport transport = Transport()) noexcept {
    static_assert(check_handler<Handler, Connection>());
    ec.clear();
    if (loop.destroying()) {  // an on_close adopting while the reactor is destroyed
      Sys::close(fd);
      ec = std::make_error_code(std::errc::operation_canceled);
      return nullptr;
    }
    Connection* connection = nullptr;
    try {
      connection = new Connection(loop, fd, std::move(handler), options, std::move(transport));
    } catch (const std::bad_alloc&) {
      ec = std::make_error_code(std::errc::not_enough_memory);
    } catch (...) {
      ec = make_error_code(Error::kHandlerException);
    }
    if (connection == nullptr) {
      if (in_epoll) {  // out of the set before the close (a fork()ed child may hold the socket)
        detail::Watcher held(nullptr);
        held.fd = fd;
        held.registered = true;
        loop.deregister(held);
      }
      Sys::close(fd);
      return nullptr;
    }
    if (tcp) connection->flags_ |= Transport::kShortReadDrains ? kShortReadDrains | kTcp : kTcp;
    const std::uint32_t events =
        kEdge ? EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET | (tcp ? EPOLLPRI : 0u)
              : EPOLLIN | EPOLLRDHUP;
    connection->registered = in_epoll;  // so that discard() takes it out of the set on failure
    if ((ec = in_epoll ? loop.modify(*connection, events) : loop.add(*connection, events)) ||
        (ec = connection->start_transport())) {
      connection->discard();
      return nullptr;
    }
    loop.link_connection(*connection);
    if constexpr (kHandshake) {
      connection->drive_handshake();  // a client's hello goes out now; a server's may be in
      return connection;
    }
    if constexpr (HasOnOpen<Handler, Connection>) {
      connection->guarded([connection] { connection->handler_.on_open(*connection); });
    }
    if (loop.draining()) connection->begin_drain();
    return connection;
  }

 private:
  // The lifecycle; the order matters: reading is possible up to kFinSent, sending only in kOpen.
  enum class Phase : std::uint8_t {
    kHandshake,  // the transport's handshake (TLS); timer: the handshake timeout
    kOpen,       // timer: the timeout check (if any timeout is set, or during a graceful stop)
    kShutdown,   // shutdown() called, output still flushing; timer: the timeout check
    kFinSent,    // shutdown()'s FIN is out; reading until the peer's EOF; timer: the timeout check
    kClosing,    // close() called, output flushing, input dropped; timer: the timeout check
    kLingering,  // close() flushed and sent FIN; discarding input until the peer's EOF; timer: the
                 // linger deadline
    kClosed,     // socket closed, on_close pending; no timer
  };

  // Independent facts, one bit each in flags_.
  enum Flag : std::uint16_t {
    kUserPaused = 1 << 0,       // pause_reading()
    kBackpressure = 1 << 1,     // paused because output reached high_water_
    kEof = 1 << 2,              // the peer's EOF was read
    kRedeliverInput = 1 << 3,   // kept input goes to on_data again without new bytes
    kPeerClosing = 1 << 4,      // edge mode: EPOLLRDHUP/EPOLLHUP seen, read on to the EOF
    kShortReadDrains = 1 << 5,  // edge mode: a short read means the socket is empty (TCP)
    kInOnData = 1 << 6,         // on_data is running: the bytes it was given must stay alive
    kDraining = 1 << 7,         // a graceful shutdown is serving this connection out
    kTcp = 1 << 8,              // TCP, not AF_UNIX: SIOCOUTQ counts bytes not yet delivered
    kHandshakeWrite = 1 << 9,   // the handshake waits for the socket to be writable
    kNeverOpened = 1 << 10,     // the handshake never finished: on_handshake_failed, not on_close
    kFlushPending = 1 << 11,    // output_ holds bytes coalesced in this loop step (the loop's cork)
    kUserCorked = 1 << 12,      // cork(): output waits for uncork()
    kCorkedEmpty = 1 << 13,     // corked with nothing refused queued (at cork(), or drained
                                // since): output waits for uncork(), with no write timeout
    kHasFiles = 1 << 14,        // send_file() queued files: the loop keeps their FileQueue
  };

  Connection(R& loop, int socket, Handler&& handler, const ConnectionOptions& options,
             Transport&& transport)
      : TimedWatcher(&on_watcher_op),
        loop_(&loop),
        high_water_(clamp32(options.high_water)),
        low_water_(clamp32(std::min(options.low_water, options.high_water))),
        max_pending_output_(std::max(options.max_pending_output, options.high_water)),
        max_pending_input_(clamp32(options.max_pending_input)),
        idle_timeout_ms_(milliseconds32(options.idle_timeout)),
        read_timeout_ms_(milliseconds32(options.read_timeout)),
        write_timeout_ms_(milliseconds32(options.write_timeout)),
        linger_timeout_ms_(milliseconds32(options.linger_timeout)),
        transport_(std::move(transport)),
        handler_(std::move(handler)) {
    fd = socket;
    if (high_water_ == 0) high_water_ = 1;
    if constexpr (kHandshake) {
      phase_ = Phase::kHandshake;
      flags_ |= kNeverOpened;
    } else {
      phase_ = Phase::kOpen;
    }
  }

  ~Connection() = default;

  static std::uint32_t milliseconds32(std::chrono::milliseconds value) noexcept {
    return clamp32(static_cast<std::size_t>(std::max<std::int64_t>(value.count(), 0)));
  }

  static std::uint32_t clamp32(std::size_t value) noexcept {
    return static_cast<std::uint32_t>(
        std::min<std::size_t>(value, std::numeric_limits<std::uint32_t>::max()));
  }

  static void on_watcher_op(detail::Watcher& watcher, detail::WatcherOp op, std::uint32_t events,
                            void* argument) noexcept {
    auto& self = static_cast<Connection&>(static_cast<detail::OwnedWatcher&>(watcher));
    switch (op) {
      case detail::WatcherOp::kEvent:
        self.handle_events(events);
        self.flush_own_coalesced();
        break;
      case detail::WatcherOp::kResume:
        self.handle_resume();
        self.flush_own_coalesced();
        break;
      case detail::WatcherOp::kClose:
        self.close();
        break;
      case detail::WatcherOp::kAbort:
        // A lingering connection whose bytes the kernel has all delivered has nothing left to
        // lose: closing it is orderly.
        self.close_now(self.phase_ == Phase::kLingering && !self.undelivered()
                           ? std::error_code()
                           : std::make_error_code(std::errc::operation_canceled));
        break;
      case detail::WatcherOp::kFinalize:
        self.finalize();
        break;
      case detail::WatcherOp::kSend: {
        auto& request = *static_cast<detail::SendRequest*>(argument);
        request.accepted = self.send(request.bytes);
        break;
      }
      case detail::WatcherOp::kDrain:
        self.begin_drain();
        break;
      case detail::WatcherOp::kTimer:  // its deadline, already out of the reactor's heap
        self.on_timer();
        break;
      case detail::WatcherOp::kFlush:
        if ((self.flags_ & kFlushPending) != 0 && self.fd >= 0) self.flush_coalesced();
        break;
    }
  }

  // In the handshake phase (never, without a transport that has one).
  bool handshaking() const noexcept {
    if constexpr (kHandshake) {
      return phase_ == Phase::kHandshake;
    } else {
      return false;
    }
  }

  bool reading_enabled() const noexcept {
    if (handshaking()) return false;  // the handshake reads for itself
    return phase_ <= Phase::kFinSent && (flags_ & (kEof | kUserPaused | kBackpressure)) == 0;
  }

  void handle_events(std::uint32_t events) noexcept {
    if constexpr (kHandshake) {
      if (phase_ == Phase::kHandshake) {
        // An error or hang-up surfaces in the handshake's own read or write, with its reason.
        drive_handshake();
        return;
      }
    }
    if (phase_ == Phase::kLingering) {
      // Everything was delivered and FIN sent: an error now (the peer's RST) only ends the wait,
      // as its EOF would; discard_input() reads it and closes with an empty reason.
      discard_input();
      return;
    }
    if ((events & EPOLLERR) != 0) {
      if (const int error = pending_error()) {
        fail(detail::errno_code(error));
        return;
      }
    }
    if constexpr (kEdge) {
      // The FIN may already be queued behind the data this wakeup reports, and will raise no
      // further edge: remember it, so reads go on to the EOF instead of stopping at a short read.
      if ((events & (EPOLLRDHUP | EPOLLHUP)) != 0) flags_ |= kPeerClosing;
      // TCP urgent data: a read stops short at the urgent mark with more bytes behind it
      // (tcp_recvmsg), so from now on this connection reads until EAGAIN.
      if ((events & EPOLLPRI) != 0) flags_ &= ~kShortReadDrains;
    }
    if ((events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0 && reading_enabled()) {
      if constexpr (!kEdge) {
        // Input kept while paused goes back to on_data before anything read after it, the EOF
        // included: resume_reading() re-armed EPOLLIN, and this event can come before the ready
        // list that was to redeliver it (edge mode redelivers there, with no new event first).
        if ((flags_ & kRedeliverInput) != 0) {
          redeliver_kept_input();
          if (fd < 0) return;
        }
      }
      if (reading_enabled()) read_some(true);
      if (fd < 0) return;
    }
    // Held by cork(): edge mode still reports EPOLLOUT; a hang-up or error ends the hold.
    if ((events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) != 0 && !output_idle() &&
        ((flags_ & kCorkedEmpty) == 0 || (events & (EPOLLHUP | EPOLLERR)) != 0)) {
      flush();
      if (fd < 0) return;
    }
    if constexpr (!kEdge) {
      // EPOLLHUP cannot be masked: level-triggered, it would fire on every epoll_wait. When the
      // connection can neither read (paused, EOF seen) nor write, nothing will clear it.
      // A close() from on_data during this event made it linger: the next event reads the EOF.
      if ((events & EPOLLHUP) != 0 && phase_ != Phase::kLingering && !reading_enabled() &&
          output_idle()) {
        if ((flags_ & (kUserPaused | kEof)) == kUserPaused && phase_ <= Phase::kFinSent) {
          // The peer is done (TCP: both FINs are through; a Unix socket: the peer closed) but the
          // handler paused before reading its EOF. Leave the epoll set (the EPOLLHUP would spin)
          // until the handler resumes (reading_resumed re-adds it). Should EPOLL_CTL_DEL fail, the
          // fd stays in the set and the EPOLLHUP would come back at once: close with that error.
          if (const std::error_code ec = loop_->deregister(*this)) fail(ec);
        } else {
          fail(make_error_code(Error::kPeerHangup));
        }
      }
    }
  }

  // open(): sets the transport up on the socket and, with a handshake, arms its timeout; otherwise
  // starts the timeout clock.
  std::error_code start_transport() noexcept {
    if constexpr (kHandshake) {
      static_assert(HandshakeTransport<Transport, Sys>);
      std::error_code ec;
      transport_.template start<Sys>(fd, ec);
      if (ec) return ec;
      const std::chrono::milliseconds timeout = transport_.handshake_timeout();
      if (timeout.count() <= 0) return {};
      return set_timer(detail::saturating_add(detail::clock_now<Sys>(), timeout));
    } else {
      return arm_timeouts(detail::clock_now<Sys>());
    }
  }

  // kHandshake: one step of the transport's handshake, then wait for what it asks for.
  void drive_handshake() noexcept {
    if constexpr (kHandshake) {
      switch (transport_.template handshake<Sys>(fd)) {
        case HandshakeStatus::kDone:
          handshake_done();
          return;
        case HandshakeStatus::kWantRead:
          flags_ &= ~kHandshakeWrite;
          break;
        case HandshakeStatus::kWantWrite:
          flags_ |= kHandshakeWrite;
          break;
        case HandshakeStatus::kFailed:
          fail(transport_.error());
          return;
      }
      // Edge mode is registered for both directions and learns of each from its edge.
      update_interest();
    }
  }

  // kHandshake -> kOpen: the timeout clock starts, on_open runs, then input that came with the
  // handshake's last flight (no readiness will announce what the transport already holds).
  void handshake_done() noexcept {
    phase_ = Phase::kOpen;
    flags_ &= ~(kNeverOpened | kHandshakeWrite);
    loop_->disarm_deadline(*this);
    // activity_now(): a handshake that finished inside open() may run outside the loop.
    if (const std::error_code ec = arm_timeouts(loop_->activity_now())) {
      fail(ec);
      return;
    }
    update_interest();
    if (fd < 0) return;
    if constexpr (HasOnOpen<Handler, Connection>) {
      if (!guarded([this] { handler_.on_open(*this); }) || fd < 0) return;
    }
    if (!output_idle()) {  // sent during the handshake (through a handle, say), then on_open's
      flush();
      if (fd < 0) return;
    }
    if (loop_->draining()) begin_drain();
    if (fd >= 0 && reading_enabled() && (kEdge || transport_.has_buffered_input())) {
      loop_->schedule_ready(*this);
    }
  }

  // Level-triggered: one read per readiness event. Edge-triggered: read until EAGAIN, at most
  // max_reads_per_wakeup times, then yield through the ready list. On TCP a short read also ends
  // it — the receive queue was empty, so the next byte brings a new edge, and the EAGAIN read is
  // saved — unless the peer is closing (its FIN raises no further edge) or sent urgent data.
  // AF_UNIX reads can stop short at a boundary between messages carrying different credentials
  // or fds, so Unix sockets always read to EAGAIN.
  [[gnu::always_inline]] inline void read_some(bool woken_by_epoll) noexcept {
    const std::size_t capacity = loop_->read_buffer_size();
    int budget = kEdge ? loop_->max_reads_per_wakeup() : 1;
    bool first = true;
    while (reading_enabled()) {
      char* buffer = loop_->read_buffer();  // each time: bytes sent from it are copied out first
      const ssize_t n = transport_.template read<Sys>(fd, buffer, capacity);
      if (n > 0) {
        first = false;
        last_read_ = loop_->cached_now();
        deliver(buffer, static_cast<std::size_t>(n));
        if constexpr (!kEdge) {
          // Bytes the transport holds (a TLS record read whole) raise no readiness: read on
          // through the ready list.
          if (transport_.has_buffered_input() && reading_enabled()) loop_->schedule_ready(*this);
          return;
        }
        if (static_cast<std::size_t>(n) < capacity &&
            (flags_ & (kShortReadDrains | kPeerClosing)) == kShortReadDrains) {
          return;
        }
        if (--budget == 0) {
          if (reading_enabled()) loop_->schedule_ready(*this);
          return;
        }
        continue;
      }
      if (n == 0) {
        peer_eof();
        return;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        fail(transport_.error());
      } else if (kEdge && Transport::kEagainIsFinal && first && woken_by_epoll) {
        // Woken for input that is not there: a stale edge, or an EAGAIN that was not the kernel's
        // last word (a layer under the syscall policy). Re-arming makes epoll look again and queue
        // a new edge if input is in fact ready; it costs a syscall only on such wakeups.
        if (const std::error_code ec = loop_->modify(*this, interest)) fail(ec);
      }
      return;
    }
  }

  // Run from the ready list: after a read budget ran out (edge mode) or after reading resumed.
  void handle_resume() noexcept {
    if (phase_ == Phase::kLingering) {
      discard_input();
      return;
    }
    if (!reading_enabled()) return;
    if ((flags_ & kRedeliverInput) != 0) {
      redeliver_kept_input();
      if (!reading_enabled()) return;
    }
    if (kEdge || transport_.has_buffered_input()) read_some(false);
  }

  // Hands the input kept while reading was paused back to on_data (resume_reading() asked for it).
  void redeliver_kept_input() noexcept {
    flags_ &= ~kRedeliverInput;
    if (!input_.empty()) call_on_data(input_.data(), input_.size(), true);
  }

  void reading_resumed() noexcept {
    if (!reading_enabled()) return;
    if constexpr (!kEdge) {
      if (!registered) {  // left the epoll set on EPOLLHUP while paused: back in, reading
        if (const std::error_code ec = rejoin(EPOLLIN | EPOLLRDHUP)) {
          fail(ec);
          return;
        }
      }
    }
    // The read timeout does not count time spent paused; resume_reading() may run outside the
    // loop, where the loop's cached clock is as old as its last iteration.
    last_read_ = loop_->activity_now();
    if (!input_.empty()) flags_ |= kRedeliverInput;
    // Edge mode: bytes that arrived while paused raised no new edge, so go and read them.
    if (kEdge || !input_.empty() || transport_.has_buffered_input()) loop_->schedule_ready(*this);
    update_interest();
  }

  [[gnu::always_inline]] inline void deliver(const char* data, std::size_t size) noexcept {
    if (input_.empty()) {
      call_on_data(data, size, false);
      return;
    }
    // The limit applies to what on_data leaves behind, not to this read: the kept bytes plus one
    // read may exceed it for the length of the call.
    if (!input_.append(data, size)) {
      fail(std::make_error_code(std::errc::not_enough_memory));
      return;
    }
    call_on_data(input_.data(), input_.size(), true);
  }

  // Hands bytes to on_data and keeps what it left unconsumed. `stored`: the bytes are input_'s.
  void call_on_data(const char* data, std::size_t size, bool stored) noexcept {
    std::size_t consumed = size;
    if constexpr (ConnectionHandler<Handler, Connection>) {
      const std::string_view bytes(data, size);
      flags_ |= kInOnData;  // `bytes` may point into input_: keep it alive until on_data returns
      const bool ok = guarded([&] {
        if constexpr (std::is_void_v<decltype(handler_.on_data(*this, bytes))>) {
          handler_.on_data(*this, bytes);
        } else {
          consumed =
              std::min<std::size_t>(static_cast<std::size_t>(handler_.on_data(*this, bytes)), size);
        }
      });
      flags_ &= ~kInOnData;
      if (!ok || phase_ >= Phase::kClosing) {
        input_.reset();  // closing: nothing more will be delivered
        return;
      }
    }
    if (stored) {
      input_.consume(consumed);
      if (input_.size() > max_pending_input_) fail(make_error_code(Error::kInputLimit));
    } else if (consumed < size) {
      if (size - consumed > max_pending_input_) {
        fail(make_error_code(Error::kInputLimit));
      } else if (!input_.append(data + consumed, size - consumed)) {
        fail(std::make_error_code(std::errc::not_enough_memory));
      }
    }
  }

  // Frees unconsumed input, unless on_data is running and may still be reading it: then
  // call_on_data frees it when the handler returns.
  void drop_input() noexcept {
    if ((flags_ & kInOnData) == 0) input_.reset();
  }

  void peer_eof() noexcept {
    flags_ |= kEof;
    input_.reset();  // an incomplete frame can never complete now
    if constexpr (HasOnEof<Handler, Connection>) {
      if (!guarded([this] { handler_.on_eof(*this); }) || fd < 0) return;
      if (phase_ == Phase::kFinSent) {
        close();
      } else {
        update_interest();
      }
    } else {
      close();
    }
  }

  // send()'s body: `count` pieces, `total` bytes in all.
  [[gnu::noinline]] bool send_pieces(const iovec* pieces, int count, std::size_t total) noexcept {
    if (phase_ != Phase::kOpen) return handshaking() && enqueue(pieces, count, total, 0);
    if (total == 0) return true;
    // Held by cork(), or behind bytes that wait for EPOLLOUT: queued after them. (While bytes are
    // coalesced, output_ is empty.)
    // Behind a queued file too: a file leaves no bytes in output_ until it is written.
    if ((flags_ & kUserCorked) != 0 || !output_idle()) return enqueue(pieces, count, total, 0);
    if (kCoalesce && total < kCoalesceLimit && loop_->inside()) {
      if ((flags_ & kFlushPending) == 0) {
        if (!loop_->sent_in_step(*this) && !loop_->holds_sends()) {
          loop_->mark_sent(*this);  // the first send of the step goes out at once
          return write_now(pieces, count, total);
        }
        // A second send in one step: hold, and from now on (every connection of this loop) hold
        // from the first.
        loop_->cork(*this);  // writes what another connection held (it calls no handler)
        loop_->learn_to_hold_sends();
        flags_ |= kFlushPending;
      }
      // Held bytes count against max_pending_output as queued ones do; past it, write now.
      if (total <= loop_->cork_room() && loop_->cork_size() + total <= max_pending_output_) {
        loop_->cork_append(pieces, count);
        return true;
      }
    }
    return write_now(pieces, count, total);
  }

  // Writes the bytes coalesced so far (if any) and then `pieces`, with one call, and ends the
  // coalescing; queues what the kernel does not take. Only while output_ is empty.
  [[gnu::noinline]] bool write_now(const iovec* pieces, int count, std::size_t total) noexcept {
    iovec vectors[kMaxGather + 1];
    int vector_count = 0;
    std::size_t corked = 0;
    const bool held = (flags_ & kFlushPending) != 0;  // the loop's cork buffer is this one's
    if (held) {
      flags_ &= ~kFlushPending;
      loop_->uncork(*this);
      corked = loop_->cork_size();
      if (corked > 0) vectors[vector_count++] = {const_cast<char*>(loop_->cork_data()), corked};
    }
    std::copy_n(pieces, count, vectors + vector_count);
    vector_count += count;
    ssize_t n = 0;
    do {
      n = vector_count == 1
              ? transport_.template send<Sys>(fd, static_cast<const char*>(vectors[0].iov_base),
                                              vectors[0].iov_len)
              : transport_.template sendv<Sys>(fd, vectors, vector_count);
    } while (n < 0 && errno == EINTR);
    // Emptied, not overwritten: the held bytes stay readable through `vectors` for enqueue below
    // (nothing between here and there holds bytes for another connection).
    if (held) loop_->reset_cork();
    if (n < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        fail(transport_.error());
        return false;
      }
      if (!rearm_after_full_write()) return false;
      n = 0;
    } else {
      last_write_ = loop_->activity_now();  // send() may run outside the loop
    }
    if (static_cast<std::size_t>(n) == corked + total) {
      if (held) update_interest();  // skipped while bytes were held (pause_reading(), say)
      return true;
    }
    // The socket is full: the rest waits for EPOLLOUT.
    return enqueue(vectors, vector_count, corked + total, static_cast<std::size_t>(n));
  }

  // The end of a loop step (kFlush): writes the coalesced bytes; what the kernel does not take
  // waits for EPOLLOUT. Then a close() or shutdown() made meanwhile goes on.
  void flush_coalesced() noexcept {
    flags_ &= ~kFlushPending;
    const iovec corked{const_cast<char*>(loop_->cork_data()), loop_->cork_size()};
    ssize_t n = 0;
    do {
      n = transport_.template send<Sys>(fd, loop_->cork_data(), corked.iov_len);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        loop_->reset_cork();
        fail(transport_.error());
        return;
      }
      if (!rearm_after_full_write()) {
        loop_->reset_cork();
        return;
      }
      n = 0;
    } else {
      last_write_ = loop_->cached_now();
    }
    if (static_cast<std::size_t>(n) < corked.iov_len) {
      enqueue(&corked, 1, corked.iov_len, static_cast<std::size_t>(n));  // failing, it closes
      loop_->reset_cork();
      return;
    }
    loop_->reset_cork();
    // A close() or shutdown() may have waited for these, and the interest for the flush (both
    // skipped while bytes were held).
    output_drained();
  }

  // The end of this connection's own callbacks: what they sent it goes out now, without waiting
  // for the loop's flush_corked() (one indirect call less per event).
  void flush_own_coalesced() noexcept {
    if (!kCoalesce || (flags_ & kFlushPending) == 0) return;
    loop_->uncork(*this);
    if (fd >= 0) flush_coalesced();
  }

  // A connection about to close: one best-effort write of its coalesced bytes (an abort() or a
  // throw after send() in the same step), as they would have been written without coalescing.
  void write_coalesced() noexcept {
    flags_ &= ~kFlushPending;
    loop_->uncork(*this);
    ssize_t n = 0;
    do {
      n = transport_.template send<Sys>(fd, loop_->cork_data(), loop_->cork_size());
    } while (n < 0 && errno == EINTR);
    loop_->reset_cork();
  }

  // Queues `pieces` but their first `skip` bytes (already written).
  bool enqueue(const iovec* pieces, int count, std::size_t total, std::size_t skip) noexcept {
    if (output_.size() + (total - skip) > max_pending_output_) {
      fail(make_error_code(Error::kOutputLimit));
      return false;
    }
    // The write timeout counts from here. The real clock outside the loop (before run(), between
    // run_once() calls) where the cached one can be arbitrarily old and the timeout would fire
    // early by that much. Only when output starts queueing, never per message.
    if (output_idle()) last_write_ = loop_->activity_now();
    for (int i = 0; i < count; ++i) {
      const char* bytes = static_cast<const char*>(pieces[i].iov_base);
      std::size_t size = pieces[i].iov_len;
      if (skip >= size) {
        skip -= size;
        continue;
      }
      bytes += skip;
      size -= skip;
      skip = 0;
      if (!output_.append(loop_->chunk_pool(), bytes, size)) {
        fail(std::make_error_code(std::errc::not_enough_memory));
        return false;
      }
    }
    if (output_.size() >= high_water_) flags_ |= kBackpressure;
    update_interest();
    return fd >= 0;  // arming EPOLLOUT can fail (ENOMEM), which closes the connection
  }

  // cork() ends (uncork(), close(), shutdown()): the held output is written.
  void release_cork() noexcept {
    if ((flags_ & kUserCorked) == 0) return;
    const bool timed_from_here = (flags_ & kCorkedEmpty) != 0;
    flags_ &= ~(kUserCorked | kCorkedEmpty);
    if (fd < 0 || output_idle()) return;
    if (timed_from_here) last_write_ = loop_->activity_now();  // held, not refused, until now
    flush();
  }

  void flush() noexcept {
    ChunkPool& pool = loop_->chunk_pool();
    while (true) {
      // A queued file goes out once the output ahead of it has.
      detail::FileQueue* const files = file_queue();
      detail::FileSend* file = files != nullptr ? files->front() : nullptr;
      if (file != nullptr && file->ahead == 0) {
        const FileProgress progress = write_file(*file);
        if (progress == FileProgress::kFailed) return;
        if (progress == FileProgress::kBlocked) break;
        continue;
      }
      if (output_.empty()) break;
      iovec vectors[kMaxIovecs];
      const int gathered = output_.gather(vectors, kMaxIovecs);
      // Only up to the next file, if one is queued.
      std::size_t limit = file != nullptr ? file->ahead : std::numeric_limits<std::size_t>::max();
      std::size_t wanted = 0;
      int count = 0;
      for (; count < gathered && limit > 0; ++count) {
        vectors[count].iov_len = std::min(vectors[count].iov_len, limit);
        limit -= vectors[count].iov_len;
        wanted += vectors[count].iov_len;
      }
      const ssize_t n = transport_.template sendv<Sys>(fd, vectors, count);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          if (!rearm_after_full_write()) return;
          break;
        }
        fail(transport_.error());
        return;
      }
      output_.consume(pool, static_cast<std::size_t>(n));
      if (file != nullptr) files->output_written(static_cast<std::size_t>(n));
      // The clock outside the loop: uncork(), close() and shutdown() flush from anywhere.
      last_write_ = loop_->activity_now();
      if (static_cast<std::size_t>(n) < wanted) break;  // socket buffer full
    }
    output_drained();
  }

  // True when no output is queued: no bytes, no file. (Coalesced bytes are the loop's, see
  // kFlushPending.)
  bool output_idle() const noexcept { return output_.empty() && (flags_ & kHasFiles) == 0; }

  // send_file()'s queue, kept by the loop (an 8-byte pointer here would cost every connection, for
  // the few that send files); nullptr when no file is queued.
  detail::FileQueue* file_queue() const noexcept {
    return (flags_ & kHasFiles) != 0 ? loop_->file_queue(this) : nullptr;
  }
  // The last file is out or dropped: the queue goes.
  void release_file_queue(detail::FileQueue& files) noexcept {
    loop_->detach_file_queue(this);
    flags_ &= ~kHasFiles;
    delete &files;
  }

  enum class FileProgress : std::uint8_t {
    kWritten,  // some bytes (or a whole file) were written: call again
    kBlocked,  // the socket is full: EPOLLOUT will tell
    kFailed,   // the connection closed
  };

  // The kernel can copy files to this connection's socket.
  static constexpr bool kKernelSendsFiles =
      detail::transport_sends_files<Transport>() && detail::has_sendfile<Sys>();

  // send_file() onto idle output: writes what the socket takes of the queued files now.
  void write_files() noexcept {
    while (detail::FileQueue* files = file_queue()) {
      if (write_file(*files->front()) != FileProgress::kWritten) return;
    }
  }

  // One write of the first queued file, which has no output ahead of it. A file that is done is
  // popped (and the queue freed with its last one). Unlike a short write of output_, a short
  // sendfile may mean the file ended (the next call returns 0) rather than a full socket. Level
  // mode waits for EPOLLOUT either way (a socket with room reports it at once, and the next call
  // finds the end); edge mode calls again at once, since a socket with room raises no new edge
  // (one EAGAIN per full buffer).
  FileProgress write_file(detail::FileSend& file) noexcept {
    if constexpr (detail::has_pread<Sys>()) {
      if constexpr (kKernelSendsFiles) {
        if (!file.copy) {
          // sendfile moves at most 0x7ffff000 bytes per call (sendfile(2), NOTES).
          const std::size_t count =
              static_cast<std::size_t>(std::min<std::uint64_t>(file.left, 0x7ffff000));
          ssize_t n = 0;
          if (!send_file_quietly(file, count, n)) {
            file.copy = true;  // SIGPIPE could not be blocked: copy, with MSG_NOSIGNAL
            return FileProgress::kWritten;
          }
          if (n > 0) {
            const FileProgress progress = file_written(static_cast<std::size_t>(n));
            return !kEdge && static_cast<std::size_t>(n) < count ? FileProgress::kBlocked
                                                                 : progress;
          }
          if (n == 0) {
            fail(make_error_code(Error::kFileTruncated));
            return FileProgress::kFailed;
          }
          if (errno == EINTR) return FileProgress::kWritten;
          if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return rearm_after_full_write() ? FileProgress::kBlocked : FileProgress::kFailed;
          }
          // EINVAL: the file cannot be mapped for sendfile (a file system without splice
          // support, say); ENOSYS: no sendfile at all (a seccomp filter, an emulator). Copying
          // works for any file pread can read.
          if (errno != EINVAL && errno != ENOSYS) {
            fail(detail::last_errno_code());
            return FileProgress::kFailed;
          }
          file.copy = true;
        }
      }
      detail::FileQueue& files = *file_queue();
      if (files.buffered() == 0) {
        char* buffer = files.buffer();
        if (buffer == nullptr) {
          fail(std::make_error_code(std::errc::not_enough_memory));
          return FileProgress::kFailed;
        }
        const std::size_t wanted = static_cast<std::size_t>(
            std::min<std::uint64_t>(file.left, detail::FileQueue::kBufferSize));
        ssize_t n = 0;
        do {
          n = Sys::pread(file.fd, buffer, wanted, static_cast<off_t>(file.offset));
        } while (n < 0 && errno == EINTR);
        if (n <= 0) {
          fail(n == 0 ? make_error_code(Error::kFileTruncated) : detail::last_errno_code());
          return FileProgress::kFailed;
        }
        files.filled(static_cast<std::size_t>(n));
      }
      const ssize_t n = transport_.template send<Sys>(fd, files.buffered_data(), files.buffered());
      if (n < 0) {
        if (errno == EINTR) return FileProgress::kWritten;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          return rearm_after_full_write() ? FileProgress::kBlocked : FileProgress::kFailed;
        }
        fail(transport_.error());
        return FileProgress::kFailed;
      }
      files.drained(static_cast<std::size_t>(n));
      return file_written(static_cast<std::size_t>(n));
    } else {
      return FileProgress::kFailed;  // unreachable: send_file() queues nothing without pread
    }
  }

  // One sendfile of `file` into `n` (its result; errno set when -1). sendfile(2) has no
  // MSG_NOSIGNAL: on a socket whose peer is gone (EPIPE: the peer's RST after its FIN, say) the
  // kernel raises SIGPIPE, whose default action ends the process, and the library changes no
  // signal disposition. So SIGPIPE is blocked in this thread for the call, and one it raised is
  // taken back (sigtimedwait with a zero timeout) before the old mask returns: two
  // pthread_sigmask calls per sendfile (one per socket buffer's worth), a third after EPIPE.
  // Where the thread blocks SIGPIPE already, a SIGPIPE pending after the call may be the
  // caller's, and is left alone. Returns false, with nothing sent, when the mask could not be
  // changed.
  bool send_file_quietly(detail::FileSend& file, std::size_t count, ssize_t& n) noexcept {
    if constexpr (kKernelSendsFiles) {
      sigset_t pipe;
      sigemptyset(&pipe);
      sigaddset(&pipe, SIGPIPE);
      sigset_t old;
      if (Sys::sigprocmask(SIG_BLOCK, &pipe, &old) != 0) return false;
      auto position = static_cast<off_t>(file.offset);
      n = Sys::sendfile(fd, file.fd, &position, count);
      const int error = errno;
      if (n < 0 && error == EPIPE && sigismember(&old, SIGPIPE) == 0) {
        const timespec zero{};
        while (Sys::sigtimedwait(&pipe, nullptr, &zero) < 0 && errno == EINTR) {
        }
      }
      Sys::sigprocmask(SIG_SETMASK, &old, nullptr);
      errno = error;
      return true;
    } else {
      static_cast<void>(file);
      static_cast<void>(count);
      n = -1;
      return false;
    }
  }

  // `size` bytes of the first file went out; pops it when it is done.
  FileProgress file_written(std::size_t size) noexcept {
    detail::FileQueue& files = *file_queue();
    files.file_written(size);
    last_write_ = loop_->activity_now();  // send_file() may run outside the loop
    if (files.front()->left == 0) {
      Sys::close(files.pop());
      if (files.empty()) release_file_queue(files);
    }
    return FileProgress::kWritten;
  }

  // Closing: the queued files are dropped, their fds closed.
  void drop_files() noexcept {
    detail::FileQueue* files = file_queue();
    if (files == nullptr) return;
    while (!files->empty()) Sys::close(files->pop());
    release_file_queue(*files);
  }

  // After output shrank: lift backpressure, report drain, finish a pending close or shutdown.
  void output_drained() noexcept {
    if ((flags_ & kBackpressure) != 0 && output_.size() <= low_water_) {
      flags_ &= ~kBackpressure;
      if constexpr (HasOnDrain<Handler, Connection>) {
        if (!guarded([this] { handler_.on_drain(*this); }) || fd < 0) return;
      }
      reading_resumed();
      if (fd < 0) return;
    }
    if (output_idle()) {
      if (phase_ == Phase::kClosing) {
        finish_close(false);
        return;
      }
      // What cork() found queued is out: from here on it holds what is sent.
      if ((flags_ & kUserCorked) != 0) flags_ |= kCorkedEmpty;
      if (phase_ == Phase::kShutdown) {
        send_fin();
        return;
      }
    }
    update_interest();
  }

  // kShutdown -> kFinSent, output flushed. Closes at once if the peer's EOF came already.
  void send_fin() noexcept {
    if (transport_.template shutdown_write<Sys>(fd) != 0) {
      fail(transport_.error());
      return;
    }
    phase_ = Phase::kFinSent;
    if ((flags_ & kEof) != 0) {
      close_now({});
    } else {
      update_interest();
    }
  }

  // kClosing, output flushed: the connection is to close. Unless the peer already sent its FIN,
  // half-close and drain its input until EOF (or linger_timeout) so that closing sends no RST.
  // fin_sent: shutdown() sent FIN already.
  void finish_close(bool fin_sent) noexcept {
    if ((flags_ & kEof) != 0 || linger_timeout_ms_ == 0) {
      if (!fin_sent) transport_.template before_close<Sys>(fd);
      close_now({});
      return;
    }
    if (!fin_sent && transport_.template shutdown_write<Sys>(fd) != 0) {
      // Reset under us: what was flushed may not have arrived. shutdown() then says ENOTCONN,
      // which hides the cause; SO_ERROR has it.
      const int error = errno;
      const int pending = pending_error();
      fail(detail::errno_code(pending != 0 ? pending : error));
      return;
    }
    phase_ = Phase::kLingering;
    // The clock, not the loop's cached one: close() may run outside the loop, where that is as
    // old as the last iteration and the linger would end early by that much.
    const auto due = detail::saturating_add(detail::clock_now<Sys>(),
                                            std::chrono::milliseconds(linger_timeout_ms_));
    if (const std::error_code ec = set_timer(due)) {
      // No timer (no fd for the timerfd, say), no lingering: close now. Unread input makes that
      // an RST, which drops what the kernel has not delivered: report why, if it holds any.
      close_now(undelivered() ? ec : std::error_code());
      return;
    }
    if constexpr (kEdge) {
      loop_->schedule_ready(*this);  // input that is already there raised its edge long ago
    } else {
      update_interest();
    }
  }

  // Edge mode: a write that took nothing (EAGAIN) waits for the EPOLLOUT edge of the buffer
  // draining. If the EAGAIN was not the kernel's last word (a layer under the syscall policy) no
  // edge may come; re-arming makes epoll look again. With the kernel this happens only when the
  // send buffer is exactly full, so it costs a syscall per full buffer, not per message. Returns
  // false when the connection failed.
  bool rearm_after_full_write() noexcept {
    if constexpr (kEdge) {
      if (const std::error_code ec = loop_->modify(*this, interest)) {
        fail(ec);
        return false;
      }
    }
    return true;
  }

  // Lingering: read and drop whatever the peer still sends, until its EOF or an error.
  void discard_input() noexcept {
    char* buffer = loop_->read_buffer();
    const std::size_t capacity = loop_->read_buffer_size();
    for (int budget = loop_->max_reads_per_wakeup(); budget > 0; --budget) {
      const ssize_t n = Sys::read(fd, buffer, capacity);
      if (n > 0) {
        // Level mode reads once per event; out of the epoll set (after EPOLLHUP while paused) no
        // event will come, so it reads on, to the EOF or through the ready list.
        if (!kEdge && registered) return;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        // Out of the epoll set, nothing would ever ask again: back in, so events drive the rest.
        if (!kEdge && !registered && rejoin(EPOLLIN | EPOLLRDHUP)) close_now({});
        return;
      }
      close_now({});  // EOF (or an error: the peer is gone either way)
      return;
    }
    loop_->schedule_ready(*this);
  }

  // Level-triggered mode keeps epoll's interest equal to what the connection can use now: EPOLLIN
  // while reading, EPOLLOUT while output is pending. Edge mode registers everything once.
  void update_interest() noexcept {
    if constexpr (!kEdge) {
      // Coalesced output is written at the end of the loop step, whose flush updates the interest.
      if (fd < 0 || (flags_ & kFlushPending) != 0) return;
      if constexpr (kHandshake) {
        if (phase_ == Phase::kHandshake) {
          const std::uint32_t wanted = (flags_ & kHandshakeWrite) != 0
                                           ? static_cast<std::uint32_t>(EPOLLOUT)
                                           : static_cast<std::uint32_t>(EPOLLIN | EPOLLRDHUP);
          if (wanted == interest) return;
          if (const std::error_code ec = loop_->modify(*this, wanted)) fail(ec);
          return;
        }
      }
      if (!registered) {       // out of the epoll set after EPOLLHUP while paused
        if (!output_idle()) {  // something to write after all: back in, for EPOLLOUT
          if (const std::error_code ec = rejoin(EPOLLOUT)) fail(ec);
          return;
        }
        // Closing from there: linger reads to the EOF (handle_resume), no event will ask.
        if (phase_ == Phase::kLingering) loop_->schedule_ready(*this);
        return;
      }
      const std::uint32_t wanted =
          (reading_enabled() || phase_ == Phase::kLingering ? EPOLLIN | EPOLLRDHUP : 0u) |
          (output_idle() || (flags_ & kCorkedEmpty) != 0 ? 0u
                                                         : static_cast<std::uint32_t>(EPOLLOUT));
      if (wanted == interest) return;
      if (const std::error_code ec = loop_->modify(*this, wanted)) fail(ec);
    }
  }

  void fail(const std::error_code& reason) noexcept { close_now(reason); }

  // While a draining connection still sends, the shortest wait before its quiet check looks again.
  static constexpr std::chrono::milliseconds kDrainRecheck{10};

  // Back into the epoll set after leaving it on EPOLLHUP while paused. Should that EPOLL_CTL_DEL
  // have failed (only an injected fault can make it), the fd is still there: modify it instead.
  std::error_code rejoin(std::uint32_t events) noexcept {
    std::error_code ec = loop_->add(*this, events);
    if (ec == std::errc::file_exists) ec = loop_->modify(*this, events);
    return ec;
  }

  // The socket's pending error (SO_ERROR: ECONNRESET after an RST, say), taken; 0 if none.
  int pending_error() noexcept {
    int error = 0;
    socklen_t length = sizeof error;
    if (Sys::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0) return 0;
    return error;
  }

  bool has_timeouts() const noexcept {
    return (idle_timeout_ms_ | read_timeout_ms_ | write_timeout_ms_) != 0;
  }

  // Starts the timeout clock; an error when no timer could be had (nothing else is done then).
  std::error_code arm_timeouts(Clock::time_point now) noexcept {
    last_read_ = last_write_ = now;
    if (!has_timeouts()) return {};
    std::uint32_t shortest = std::numeric_limits<std::uint32_t>::max();
    for (const std::uint32_t ms : {idle_timeout_ms_, read_timeout_ms_, write_timeout_ms_}) {
      if (ms != 0) shortest = std::min(shortest, ms);
    }
    return set_timer(now + std::chrono::milliseconds(shortest));
  }

  // Points the connection's one timer (its Deadline base, in the reactor's deadline heap) at `due`,
  // replacing whatever it was set to; moving it allocates nothing. It always calls on_timer(),
  // which acts on the phase it finds, so the caller needs no callback of its own. An error, with
  // no timer set, when the heap had no room for it and none could be allocated.
  std::error_code set_timer(Clock::time_point due) noexcept {
    if (!loop_->arm_deadline(*this, due)) return std::make_error_code(std::errc::not_enough_memory);
    return {};
  }

  // Lingering (our FIN sent): whether the kernel still holds bytes of ours the peer has not
  // received. SIOCOUTQ counts the FIN's sequence number until the peer acknowledges it, which
  // Linux delays (tcp_fin: 40 ms or more), so 1 means only the FIN is outstanding; ACKs are
  // cumulative, so any data byte still unacknowledged makes it 2 or more. TCP only: on a Unix
  // socket SIOCOUTQ also counts bytes queued at the receiver, which closing does not lose.
  bool undelivered() const noexcept {
    return (flags_ & kTcp) != 0 && detail::unsent_bytes<Sys>(fd) > 1;
  }

  void on_timer() noexcept {
    switch (phase_) {
      case Phase::kHandshake:
        fail(std::make_error_code(std::errc::timed_out));
        return;
      case Phase::kLingering:
        // The peer never sent its FIN: close anyway. Orderly if the kernel delivered everything;
        // bytes it still holds could be lost to an RST, so say that they were not confirmed.
        close_now(undelivered() ? std::make_error_code(std::errc::timed_out) : std::error_code());
        return;
      case Phase::kClosed:
        return;  // unreachable: closing cancels the timer
      default:
        check_timeouts();
        return;
    }
  }

  // The timeout check (phases kOpen to kClosing): act on whichever timeout has really passed, or
  // look again when the next one could. Traffic since the timer was set just moves the deadline;
  // nothing was rescheduled per byte. During a graceful shutdown it also closes the connection
  // once it is quiet.
  void check_timeouts() noexcept {
    if (phase_ > Phase::kClosing) return;
    const Clock::time_point now = loop_->cached_now();
    const auto timed_out = std::make_error_code(std::errc::timed_out);
    auto next = Clock::time_point::max();
    if (write_timeout_ms_ != 0 && !output_idle() && (flags_ & kCorkedEmpty) == 0) {
      const auto due = last_write_ + std::chrono::milliseconds(write_timeout_ms_);
      if (due <= now) return fail(timed_out);
      next = std::min(next, due);
    }
    if (read_timeout_ms_ != 0 && reading_enabled()) {
      const auto due = last_read_ + std::chrono::milliseconds(read_timeout_ms_);
      if (due <= now) return fail(timed_out);
      next = std::min(next, due);
    }
    if (idle_timeout_ms_ != 0) {
      const auto due =
          std::max(last_read_, last_write_) + std::chrono::milliseconds(idle_timeout_ms_);
      if (due <= now) {
        if (phase_ == Phase::kClosing) return fail(timed_out);  // a whole idle period unflushed
        reason_ = timed_out;
        close();
        if (phase_ != Phase::kClosing) return;  // lingering or closed: the timer is theirs now
        next = std::min(next, now + std::chrono::milliseconds(idle_timeout_ms_));
      } else {
        next = std::min(next, due);
      }
    }
    if constexpr (!HasOnShutdown<Handler, Connection>) {
      if ((flags_ & kDraining) != 0 && phase_ < Phase::kClosing) {
        const auto quiet = loop_->drain_quiet_period();
        const auto due = std::max(last_read_, loop_->drain_started()) + quiet;
        if (output_idle() && due <= now) {
          close();
          if (phase_ != Phase::kClosing) return;
          next = std::min(next, now + quiet);
        } else {
          // Still sending: look again a quiet period later, never sooner than kDrainRecheck (a
          // quiet period of 0 re-armed the timer at `now` on every iteration, spinning until the
          // output drained or the grace ran out: found by sim_fuzzer).
          next = std::min(next, output_idle() ? due : now + std::max(quiet, kDrainRecheck));
        }
      }
    }
    if (next == Clock::time_point::max()) {  // nothing running now (paused, say): look again later
      if (!has_timeouts()) return;
      next = now + std::chrono::milliseconds(std::max({read_timeout_ms_, write_timeout_ms_}));
    }
    if (const std::error_code ec = set_timer(next)) fail(ec);
  }

  // Reactor::shutdown() began: serve the connection out. With an on_shutdown hook the handler
  // decides when to close; without, the connection closes once quiet (check_timeouts).
  void begin_drain() noexcept {
    if (phase_ == Phase::kHandshake) return;  // handshake_done() serves it out once it is done
    if (phase_ >= Phase::kClosing || (flags_ & kDraining) != 0) return;
    flags_ |= kDraining;
    release_cork();  // serving out includes what cork() held (its on_drain may act here)
    if (phase_ >= Phase::kClosing) return;
    if constexpr (HasOnShutdown<Handler, Connection>) {
      guarded([this] { handler_.on_shutdown(*this); });
    } else {
      check_timeouts();
    }
  }

  // Closes the socket now and queues on_close for after the current dispatch.
  void close_now(const std::error_code& reason, bool send_reset = false) noexcept {
    if (fd < 0) return;
    // Bytes sent in this step before the close (an abort() or a throw after send()) go out if the
    // socket takes them, as they would have without coalescing.
    if ((flags_ & kFlushPending) != 0) write_coalesced();
    if (send_reset) {
      const linger option{1, 0};
      Sys::setsockopt(fd, SOL_SOCKET, SO_LINGER, &option, sizeof option);
    }
    // Always EPOLL_CTL_DEL before close: epoll watches the open file description, not the fd, so
    // if a dup of the socket lives on (a fork()ed child, an fd passed away), close() alone would
    // leave it in the set, reporting events whose data.ptr is this connection, freed by then
    // (epoll(7), "Q6"). One syscall per closed connection (docs/performance.md).
    loop_->deregister(*this);
    Sys::close(std::exchange(fd, -1));
    phase_ = Phase::kClosed;
    flags_ &= ~(kFlushPending | kUserCorked | kCorkedEmpty);
    loop_->uncork(*this);
    output_.clear(loop_->chunk_pool());
    drop_files();
    drop_input();
    loop_->disarm_deadline(*this);
    if (handle_index_ != detail::HandleTable::kNone) {
      loop_->handles().release(std::exchange(handle_index_, detail::HandleTable::kNone));
    }
    if (reason) reason_ = reason;
    loop_->schedule_finalize(*this);
  }

  // Deletes a connection that never opened (open() failed half-way): no hook runs.
  void discard() noexcept {
    loop_->disarm_deadline(*this);
    loop_->deregister(*this);
    Sys::close(std::exchange(fd, -1));
    delete this;
  }

  void finalize() noexcept {
    loop_->count_shutdown_close(reason_);
    if constexpr (kHandshake) {
      if ((flags_ & kNeverOpened) != 0) {
        if constexpr (HasOnHandshakeFailed<Handler, Connection>) {
          try {  // abort() leaves no reason: it cancelled the handshake
            handler_.on_handshake_failed(
                *this, reason_ ? reason_ : std::make_error_code(std::errc::operation_canceled));
          } catch (...) {
            // As for on_close: nothing is left to report to.
          }
        }
        delete this;
        return;
      }
    }
    if constexpr (HasOnClose<Handler, Connection>) {
      try {
        handler_.on_close(*this, reason_);
      } catch (...) {
        // Nothing is left to report to: the connection is gone either way.
      }
    }
    delete this;
  }

  // Runs a handler callback; an exception aborts the connection with Error::kHandlerException.
  // Returns false when the callback threw.
  template <class F>
  bool guarded(F&& callback) noexcept {
    try {
      callback();
      return true;
    } catch (...) {
      fail(make_error_code(Error::kHandlerException));
      return false;
    }
  }

  template <class Get>
  Endpoint address(Get get) const noexcept {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (fd < 0 || get(fd, reinterpret_cast<sockaddr*>(&storage), &length) != 0) return {};
    return Endpoint::from_sockaddr(reinterpret_cast<sockaddr*>(&storage), length);
  }

  // First: it fills the 4 bytes of the Deadline base's tail padding (Itanium C++ ABI), which keeps
  // sizeof(Connection) at 200, one malloc size class (208 B) below the next.
  std::uint32_t handle_index_ = detail::HandleTable::kNone;
  R* loop_;
  OutputQueue output_;
  InputBuffer input_;
  std::uint32_t high_water_;
  std::uint32_t low_water_;
  std::size_t max_pending_output_;
  std::uint32_t max_pending_input_;
  std::uint32_t idle_timeout_ms_;
  std::uint32_t read_timeout_ms_;
  std::uint32_t write_timeout_ms_;
  std::uint32_t linger_timeout_ms_;
  Phase phase_;
  std::uint16_t flags_ = 0;  // Flag bits
  Clock::time_point last_read_{};
  Clock::time_point last_write_{};
  std::error_code reason_;
  [[no_unique_address]] Transport transport_;
  [[no_unique_address]] Handler handler_;
};

// Hands a connected socket to `loop` as a Connection with `handler`; sets O_NONBLOCK on it and
// calls on_open. Returns nullptr with `ec` set on failure (the fd is closed then). The pointer is
// valid until on_close returns. transport: as for Connection::open (TlsTransport(context, peer
// name): the handshake runs first, and on_open, or on_handshake_failed, follows it).
template <class Handler, class R, class FdSys = typename R::syscalls,
          class Transport = PlainTransport>
Connection<Handler, R, Transport>* adopt(R& loop, BasicUniqueFd<FdSys> socket, Handler handler,
                                         const ConnectionOptions& options, std::error_code& ec,
                                         Transport transport = Transport()) noexcept {
  using Sys = typename R::syscalls;
  const int flags = Sys::fcntl(socket.get(), F_GETFL, 0);
  if (flags < 0 || Sys::fcntl(socket.get(), F_SETFL, flags | O_NONBLOCK) < 0) {
    ec = detail::last_errno_code();
    return nullptr;
  }
  int domain = AF_UNIX;
  socklen_t length = sizeof domain;
  Sys::getsockopt(socket.get(), SOL_SOCKET, SO_DOMAIN, &domain, &length);
  return Connection<Handler, R, Transport>::open(loop, socket.release(), std::move(handler),
                                                 options, domain != AF_UNIX, ec, false,
                                                 std::move(transport));
}

// Throwing overload: std::system_error naming "adopt".
template <class Handler, class R, class FdSys = typename R::syscalls,
          class Transport = PlainTransport>
Connection<Handler, R, Transport>& adopt(R& loop, BasicUniqueFd<FdSys> socket, Handler handler,
                                         const ConnectionOptions& options = {},
                                         Transport transport = Transport()) {
  std::error_code ec;
  Connection<Handler, R, Transport>* connection =
      adopt(loop, std::move(socket), std::move(handler), options, ec, std::move(transport));
  if (connection == nullptr) detail::throw_error(ec, "adopt");
  return *connection;
}

}  // namespace reactor
