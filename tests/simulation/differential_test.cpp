// Differential test, "trust but cross-check": every scripted scenario below runs twice, once on the
// real kernel (Reactor<Trigger> with LinuxSyscalls, peers are non-blocking client sockets of this
// process over loopback TCP 127.0.0.1) and once in the simulation (Reactor<Trigger,
// sim::SimSyscalls> on tests/support/sim_kernel.hpp, peers are sim::Kernel remote ends), in both
// trigger modes. What the peers and the server's handler observed must be the same, so a mismatch
// is a bug in one of them: in the simulator (it then tests the library against a kernel that does
// not exist) or in the library (a path that only one kernel's timing takes). Each scenario also
// states what Linux does (its expectation, checked on both runs), so the two cannot agree on a
// wrong answer, and the simulated run is repeated to prove it is a pure function of the script
// (same trace_hash()).
//
// Observed and compared, per scenario:
//   - each peer: whether connect() succeeded (or its errno), the bytes it sent, the exact bytes it
//     received (whole strings), whether a recv returned 0 (EOF) or which errno ended its reading
//     (ECONNRESET...), and the errno of every peer operation that failed (send, shutdown);
//   - the server's handler, per connection in accept order: the bytes on_data consumed (whole
//     strings), on_eof and on_shutdown calls, the on_close reason (category and value, "" when
//     orderly); connection_count() at the end; Reactor::shutdown()'s report; checkpoints the
//     script takes in the middle. (on_drain counts depend on buffer sizes, which differ on
//     purpose; only "at least once" is expected where backpressure is forced.)
//
// Determinism on the real side: loopback delivers a segment, and the ACK, FIN or RST it provokes,
// synchronously inside the sending syscall (one thread, softirq processed on the way out of
// dev_queue_xmit), so after a peer's send() returns its bytes are in the server's receive queue.
// settle() drives the loop until several iterations in a row handle no event, call no hook and
// give no peer anything to read (the last with a short timeout, for a window update the kernel
// defers). Timeouts are 30 ms against waits of 200 ms; no sleep is used to synchronise. Each
// scenario whose determinism is not obvious says why it holds. Kernel buffer sizes differ on
// purpose (several MiB on loopback, 64 KiB queues in the simulation): where a scenario needs the
// kernel to push back it shrinks both (Scenario::small_buffers), and where the bytes a peer
// receives depend on them only the rest is compared (Scenario::peer_bytes_comparable).
//
// A known mismatch is listed in kKnownDivergences with the side that is wrong (simulator or
// library); the other side must still meet the scenario's expectation, and the test fails once
// the two agree, so that the entry goes with the fix.
//
// Scenarios (each in LevelTriggered and EdgeTriggered; "P" is the peer, "S" the server handler):
//   echo: a small message, then P's half-close; 1 MiB through a 16 KiB high-water mark (on_drain
//     must run); 1 MiB then an immediate half-close; 500 small sends; a sink that never replies
//   frames: partial lines kept and completed, the tail dropped at EOF; 1 MiB of lines in one send;
//     a partial frame over max_pending_input (kInputLimit)
//   peer endings: P closes after reading; P closes with unread bytes (RST: ECONNRESET); P sends
//     then closes at once (level: EPIPE from the echo's RST, edge: the EOF is read first); P resets
//     with bytes in flight; P resets while S has 1 MiB queued; P resets or closes before accept;
//     P half-closes without sending; P half-closes, then closes with S's reply unread (RST in
//     CLOSE_WAIT: EPIPE); P resets while S lingers (orderly)
//   handler endings: close after N bytes (P gets exactly N, then EOF) with and without P's FIN
//     (linger timeout, also one shorter than the delayed ACK of the FIN); close from on_open
//     behind a 1 MiB greeting; a greeting then close from on_open; abort after N (FIN); abort
//     with RST after N (P reads the N bytes, then ECONNRESET); shutdown() after N and go on
//     receiving, with and without an on_eof hook; on_eof replying with 4 bytes or 256 KiB then
//     shutdown(); on_eof replying to a peer that closed entirely (the RST arrives in CLOSE_WAIT:
//     EPIPE), then shutdown() (ENOTCONN)
//   sends into a dead connection: P sends after S closed (EPIPE), while S lingers (discarded, no
//     RST), after S reset it (ECONNRESET read, then EPIPE)
//   flow control: pause_reading() then resume from a timer; the same with a partial frame kept
//     across the pause (redelivered on resume); P half-closes, or resets, while S is paused;
//     256 KiB sent while paused; max_pending_output (kOutputLimit)
//   timeouts (30 ms): idle with a silent peer, idle after traffic, read with a silent peer, write
//     with a peer that does not read
//   graceful shutdown: silent peer (closed once quiet), a peer that half-closed just before,
//     an on_shutdown hook that says goodbye, a grace period that runs out (operation_canceled),
//     a connection still in the accept queue (RST) and a connect afterwards (ECONNREFUSED)
//   several peers: four interleaving sends of different sizes; three with different fates
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <reactor.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "loopback.hpp"
#include "sim_kernel.hpp"

namespace {

using namespace std::chrono_literals;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr std::size_t kNever = static_cast<std::size_t>(-1);
constexpr milliseconds kTimeout{30};  // idle, read and write timeouts in the timeout scenarios
// linger_timeout where a scenario waits it out: longer than the peer's delayed ACK of the FIN
// (40 ms, TCP_DELACK_MIN), so that nothing else depends on how SIOCOUTQ counts the FIN.
constexpr milliseconds kLinger{80};
constexpr milliseconds kShortLinger{5};  // well under that delayed ACK
constexpr milliseconds kLongWait{200};   // comfortably past any timeout + linger above
constexpr milliseconds kPause{60};       // pause_reading() until a timer resumes it
constexpr milliseconds kQuiet{20};       // Reactor::shutdown()'s quiet period
constexpr milliseconds kGrace{1000};     // a grace period nothing should need
// Kernel buffers where a scenario needs the kernel to push back (Scenario::small_buffers).
constexpr std::size_t kSmallBuffer = 16 * 1024;

// --- text for reports ----------------------------------------------------------------------------

std::string errno_name(int error) {
  if (error == 0) return "0";
  const char* name = ::strerrorname_np(error);
  return name != nullptr ? name : std::to_string(error);
}

// An on_close reason as compared: "" when orderly, else "category:value" with errno names.
std::string reason_text(const std::error_code& reason) {
  if (!reason) return "";
  const std::string category = reason.category().name();
  if (category == "system" || category == "generic") {
    return category + ":" + errno_name(reason.value());
  }
  return category + ":" + std::to_string(reason.value());
}

std::string system_reason(int error) {
  return reason_text({error, std::system_category()});
}
std::string generic_reason(std::errc error) {
  return reason_text(std::make_error_code(error));
}
std::string library_reason(reactor::Error error) {
  return reason_text(make_error_code(error));
}

// Size and FNV-1a hash: equal for equal byte strings, short enough to print.
std::string fingerprint(std::string_view bytes) {
  std::uint64_t hash = 0xcbf29ce484222325ULL;
  for (const char c : bytes) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001b3ULL;
  }
  char text[64];
  std::snprintf(text, sizeof text, "%zu bytes #%016llx", bytes.size(),
                static_cast<unsigned long long>(hash));
  return text;
}

// --- what the server's handler saw ---------------------------------------------------------------

struct ConnLog {
  std::string input;  // the bytes on_data consumed, in order
  int eofs = 0;
  int shutdowns = 0;  // on_shutdown calls
  int drains = 0;     // on_drain calls: not compared (they depend on buffer sizes)
  bool closed = false;
  std::string close_reason;  // reason_text() of on_close's reason
};

struct Record {
  std::vector<ConnLog> conns;   // in on_open order, which is accept order, which is connect order
  std::uint64_t callbacks = 0;  // hook calls of every kind: settle() watches it for progress
};

// --- the server: one handler whose behaviour the scenario configures -----------------------------

enum class Hooks : std::uint8_t { kPlain, kOnEof, kOnShutdown };
enum class Act : std::uint8_t { kNone, kClose, kAbort, kAbortReset, kShutdown };
enum class EofThen : std::uint8_t { kNothing, kClose, kShutdown };

struct Behaviour {
  Hooks hooks = Hooks::kPlain;  // which optional hooks the handler type has (they change behaviour)
  bool echo = true;             // send back what on_data consumed
  bool lines = false;           // consume complete '\n'-terminated lines only
  std::string greeting;         // sent from on_open
  bool close_on_open = false;   // close() from on_open, after the greeting
  std::size_t act_after = kNever;  // after consuming this many bytes in all, do `act` (once)
  Act act = Act::kNone;
  milliseconds pause_for{0};  // on the first on_data: pause_reading(), resume after this long
  std::string eof_reply;      // Hooks::kOnEof: on_eof sends this, then does `eof_then`
  EofThen eof_then = EofThen::kNothing;
  std::string shutdown_reply;     // Hooks::kOnShutdown: on_shutdown sends this,
  bool close_on_shutdown = true;  // then closes (or leaves the connection to the grace deadline)
};

struct Server {
  Record* record;
  const Behaviour* behaviour;
  std::size_t index = 0;
  std::size_t consumed = 0;
  bool acted = false;
  bool paused_once = false;
  reactor::TimerId resume_timer{};

  ConnLog& log() { return record->conns[index]; }

  void on_open(auto& connection) {
    ++record->callbacks;
    index = record->conns.size();
    record->conns.emplace_back();
    if (!behaviour->greeting.empty()) connection.send(behaviour->greeting);
    if (behaviour->close_on_open) connection.close();
  }

  std::size_t on_data(auto& connection, std::string_view bytes) {
    ++record->callbacks;
    std::string_view take = bytes;
    if (behaviour->lines) {
      const std::size_t end = bytes.rfind('\n');
      take = bytes.substr(0, end == std::string_view::npos ? 0 : end + 1);
    }
    bool act_now = false;
    if (!acted && behaviour->act != Act::kNone && take.size() >= behaviour->act_after - consumed) {
      take = take.substr(0, behaviour->act_after - consumed);
      act_now = acted = true;
    }
    log().input.append(take);
    consumed += take.size();
    if (behaviour->echo && !take.empty() && connection.state() == reactor::ConnectionState::kOpen) {
      connection.send(take);
    }
    if (behaviour->pause_for > 0ms && !paused_once) {
      paused_once = true;
      connection.pause_reading();
      resume_timer = connection.reactor().schedule_after(behaviour->pause_for, [this, &connection] {
        resume_timer = {};
        connection.resume_reading();
      });
    }
    if (act_now) {
      switch (behaviour->act) {
        case Act::kClose:
          connection.close();
          break;
        case Act::kAbort:
          connection.abort();
          break;
        case Act::kAbortReset:
          connection.abort(true);
          break;
        case Act::kShutdown:
          connection.shutdown();
          break;
        case Act::kNone:
          break;
      }
    }
    return take.size();
  }

  void on_drain(auto& /*connection*/) {
    ++record->callbacks;
    ++log().drains;
  }

  void on_close(auto& connection, std::error_code reason) {
    ++record->callbacks;
    if (resume_timer) connection.reactor().cancel(std::exchange(resume_timer, {}));
    log().closed = true;
    log().close_reason = reason_text(reason);
  }
};

struct ServerWithEof : Server {
  void on_eof(auto& connection) {
    ++record->callbacks;
    ++log().eofs;
    if (!behaviour->eof_reply.empty()) connection.send(behaviour->eof_reply);
    if (behaviour->eof_then == EofThen::kClose) connection.close();
    if (behaviour->eof_then == EofThen::kShutdown) connection.shutdown();
  }
};

struct ServerWithShutdown : Server {
  void on_shutdown(auto& connection) {
    ++record->callbacks;
    ++log().shutdowns;
    if (!behaviour->shutdown_reply.empty()) connection.send(behaviour->shutdown_reply);
    if (behaviour->close_on_shutdown) connection.close();
  }
};

// An Acceptor of any handler type, behind one interface.
struct Listener {
  virtual ~Listener() = default;
  virtual std::uint16_t port() const = 0;
  virtual int native_handle() const = 0;
};

template <class Handler, class Loop>
struct ListenerOf final : Listener {
  ListenerOf(Loop& loop, Handler handler, const reactor::ListenOptions& options)
      : acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"), std::move(handler), options) {}
  std::uint16_t port() const override { return acceptor.local_endpoint().port(); }
  int native_handle() const override { return acceptor.native_handle(); }
  reactor::Acceptor<Handler, Loop> acceptor;
};

template <class Loop>
std::unique_ptr<Listener> make_listener(Loop& loop, Record& record, const Behaviour& behaviour,
                                        const reactor::ConnectionOptions& options) {
  reactor::ListenOptions listen;
  listen.connection = options;
  const Server server{&record, &behaviour};
  switch (behaviour.hooks) {
    case Hooks::kOnEof:
      return std::make_unique<ListenerOf<ServerWithEof, Loop>>(loop, ServerWithEof{server}, listen);
    case Hooks::kOnShutdown:
      return std::make_unique<ListenerOf<ServerWithShutdown, Loop>>(
          loop, ServerWithShutdown{server}, listen);
    case Hooks::kPlain:
      break;
  }
  return std::make_unique<ListenerOf<Server, Loop>>(loop, server, listen);
}

// --- what a scenario observed --------------------------------------------------------------------

struct PeerView {
  bool connected = false;
  int connect_error = 0;
  std::size_t sent = 0;
  std::string received;
  bool eof = false;                 // a recv returned 0
  int recv_error = 0;               // the errno that ended its reading (ECONNRESET, ...), 0 if none
  std::vector<std::string> errors;  // "send: EPIPE", ...: each failed operation, in order
};

struct ShutdownCounts {
  std::size_t flushed = 0, failed = 0, aborted = 0;
  bool error = false;
};

struct Observation {
  std::vector<PeerView> peers;
  std::vector<ConnLog> conns;
  std::size_t connection_count = 0;
  std::optional<ShutdownCounts> shutdown;
  std::vector<std::string> checkpoints;
  std::string stuck;  // which driver step ran out of its bounds, if any
};

// Everything compared, as text (byte strings as fingerprints): what a mismatch report prints.
// peer_bytes: whether the peers' received bytes are part of it.
std::string describe(const Observation& o, bool peer_bytes) {
  std::ostringstream out;
  for (std::size_t i = 0; i < o.peers.size(); ++i) {
    const PeerView& p = o.peers[i];
    out << "peer " << i << ": ";
    if (p.connected) {
      out << "connected";
    } else {
      out << "connect failed " << errno_name(p.connect_error);
    }
    out << ", sent " << p.sent << ", received "
        << (peer_bytes ? fingerprint(p.received) : std::string("(not compared)"));
    if (p.eof) out << ", EOF";
    if (p.recv_error != 0) out << ", recv " << errno_name(p.recv_error);
    for (const std::string& e : p.errors) out << ", " << e;
    out << '\n';
  }
  for (std::size_t i = 0; i < o.conns.size(); ++i) {
    const ConnLog& c = o.conns[i];
    out << "connection " << i << ": consumed " << fingerprint(c.input) << ", on_eof " << c.eofs
        << ", on_shutdown " << c.shutdowns << ", "
        << (c.closed ? "closed (" + c.close_reason + ")" : std::string("open")) << '\n';
  }
  out << "connection_count " << o.connection_count << '\n';
  if (o.shutdown) {
    out << "shutdown report: flushed " << o.shutdown->flushed << ", failed " << o.shutdown->failed
        << ", aborted " << o.shutdown->aborted << (o.shutdown->error ? ", error" : "") << '\n';
  }
  for (const std::string& c : o.checkpoints) out << "checkpoint " << c << '\n';
  if (!o.stuck.empty()) out << "STUCK in " << o.stuck << '\n';
  return out.str();
}

// The whole byte strings, beyond describe()'s fingerprints.
bool same_bytes(const Observation& a, const Observation& b, bool peer_bytes) {
  if (a.peers.size() != b.peers.size() || a.conns.size() != b.conns.size()) return false;
  for (std::size_t i = 0; i < a.peers.size(); ++i) {
    if (peer_bytes && a.peers[i].received != b.peers[i].received) return false;
  }
  for (std::size_t i = 0; i < a.conns.size(); ++i) {
    if (a.conns[i].input != b.conns[i].input) return false;
  }
  return true;
}

// --- the world: a loop, its listener, and peers the script drives --------------------------------

// When a peer reads what arrives for it.
enum class Reading : std::uint8_t {
  kAlways,     // in every driver step (settle, wait, a send waiting for room)
  kWhenStuck,  // only when its own send can make no progress otherwise (a client that writes a
               // whole request before it reads), and never in settle() or wait()
  kOff,
};

// One run of a scenario: a reactor listening on 127.0.0.1 with the scenario's handler, and the
// peers the script creates. The peer operations and the loop drivers are the same code for both
// worlds; subclasses supply the raw calls. Every driver step is bounded (world time and
// iterations); running out marks the observation stuck instead of hanging.
class World {
 public:
  World() = default;
  World(const World&) = delete;
  World& operator=(const World&) = delete;
  virtual ~World() = default;

  // Connects a new peer to the listener (blocking on loopback: the handshake needs no accept());
  // returns its index. A refused connect is recorded, not thrown.
  std::size_t connect() {
    const std::size_t index = peers_.size();
    peers_.emplace_back();
    int error = 0;
    const bool connected = open_peer(index, error);
    peers_[index].view.connected = connected;
    peers_[index].view.connect_error = error;
    peers_[index].open = connected;
    external_step();
    return index;
  }

  // Sends all of `bytes`, running the loop (and letting reading peers read) whenever the peer's
  // socket is full. Stops at the first error, which is recorded.
  void send(std::size_t index, std::string_view bytes) {
    std::size_t offset = 0;
    Bound bound(*this, "send");
    while (offset < bytes.size()) {
      const ssize_t n = peer_send(index, bytes.substr(offset));
      const int error = errno;
      if (n > 0) {
        offset += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && error == EINTR) continue;
      if (n < 0 && (error == EAGAIN || error == EWOULDBLOCK)) {
        if (!bound.next()) break;
        const std::uint64_t callbacks = record_.callbacks;
        if (drive(kStepTimeout) == 0 && record_.callbacks == callbacks &&
            peers_[index].reading == Reading::kWhenStuck) {
          drain(index);
        }
        continue;
      }
      peers_[index].view.errors.push_back("send: " + errno_name(n < 0 ? error : 0));
      break;
    }
    peers_[index].view.sent += offset;
    external_step();
  }

  // Reads everything the peer can read now (also when its automatic reading is off).
  void receive(std::size_t index) { drain(index); }

  void shutdown_write(std::size_t index) {
    if (peer_shutdown(index) != 0) {
      peers_[index].view.errors.push_back("shutdown: " + errno_name(errno));
    }
    external_step();
  }

  // close(): FIN, or RST if the peer left bytes unread (tcp(7)).
  void close(std::size_t index) { finish(index, false); }
  // SO_LINGER {1, 0}, then close(): RST.
  void reset(std::size_t index) { finish(index, true); }

  // When this peer reads its input (Reading::kAlways by default).
  void set_reading(std::size_t index, Reading when) { peers_[index].reading = when; }

  // Runs the loop until nothing more happens: several iterations in a row with no event, no hook
  // call and nothing for a reading peer to read.
  void settle() {
    Bound bound(*this, "settle");
    int quiet = 0;
    while (quiet < 3 && bound.next()) {
      const std::uint64_t callbacks = record_.callbacks;
      const std::size_t events = run_loop(quiet == 2 ? confirm_timeout() : 0ms);
      const std::size_t moved = read_all();
      quiet = events == 0 && moved == 0 && record_.callbacks == callbacks ? quiet + 1 : 0;
    }
    external_step();
  }

  // Lets `span` of the world's time pass with the loop running (and reading peers reading).
  void wait(milliseconds span) {
    Bound bound(*this, "wait");
    const Clock::time_point deadline = now() + span;
    while (now() < deadline && bound.next()) {
      drive(std::chrono::ceil<milliseconds>(deadline - now()));
    }
    external_step();
  }

  // Reactor::shutdown(grace, quiet); the peers act again only once it returned.
  void shutdown_loop(milliseconds grace, milliseconds quiet) {
    const reactor::ShutdownReport report = loop_shutdown(grace, quiet);
    shutdown_ = ShutdownCounts{report.flushed, report.failed, report.aborted,
                               static_cast<bool>(report.error)};
    read_all();
    external_step();
  }

  // Records the state now (bytes each peer received, bytes each connection consumed, which are
  // closed, how many the loop owns) as part of the observation.
  void checkpoint(const std::string& label) {
    std::string text = label + ":";
    for (std::size_t i = 0; i < peers_.size(); ++i) {
      const PeerView& p = peers_[i].view;
      text += " p" + std::to_string(i) + "=" + std::to_string(p.received.size());
      if (p.eof) text += "+EOF";
      if (p.recv_error != 0) text += "+" + errno_name(p.recv_error);
    }
    for (std::size_t i = 0; i < record_.conns.size(); ++i) {
      const ConnLog& c = record_.conns[i];
      text += " c" + std::to_string(i) + "=" + std::to_string(c.input.size());
      if (c.closed) text += "+closed(" + c.close_reason + ")";
    }
    text += " count=" + std::to_string(connection_count());
    checkpoints_.push_back(std::move(text));
  }

  Observation observe() {
    Observation o;
    for (const Peer& p : peers_) o.peers.push_back(p.view);
    o.conns = record_.conns;
    o.connection_count = connection_count();
    o.shutdown = shutdown_;
    o.checkpoints = checkpoints_;
    o.stuck = stuck_;
    return o;
  }

  // The simulation's trace hash (0 for the real kernel).
  virtual std::uint64_t trace_hash() const { return 0; }

 protected:
  Record& record() { return record_; }

  // The raw peer calls, with the errno convention of the syscalls they stand for.
  virtual bool open_peer(std::size_t index, int& error) = 0;
  virtual ssize_t peer_send(std::size_t index, std::string_view bytes) = 0;
  virtual ssize_t peer_recv(std::size_t index, std::string& out) = 0;  // appends to `out`
  virtual int peer_shutdown(std::size_t index) = 0;
  virtual void peer_close(std::size_t index, bool reset) = 0;
  // The loop.
  virtual std::size_t run_loop(milliseconds timeout) = 0;
  virtual reactor::ShutdownReport loop_shutdown(milliseconds grace, milliseconds quiet) = 0;
  virtual std::size_t connection_count() const = 0;
  // The world's clock, and the timeout of settle()'s last, confirming iteration.
  virtual Clock::time_point now() const = 0;
  virtual milliseconds confirm_timeout() const = 0;
  // The test did something: tells the simulation's spin detector.
  virtual void external_step() {}

 private:
  static constexpr milliseconds kStepTimeout{5};
  static constexpr milliseconds kStepLimit{10'000};  // world time one driver step may take
  static constexpr std::size_t kIterationLimit = 200'000;

  struct Peer {
    PeerView view;
    bool open = false;
    Reading reading = Reading::kAlways;
    bool done_reading = false;  // EOF or an error ended its reading
  };

  // Bounds one driver step: world time and iterations.
  class Bound {
   public:
    Bound(World& world, const char* what)
        : world_(world), what_(what), deadline_(world.now() + kStepLimit) {}
    bool next() {
      if (++iterations_ <= kIterationLimit && world_.now() < deadline_) return true;
      if (world_.stuck_.empty()) world_.stuck_ = what_;
      return false;
    }

   private:
    World& world_;
    const char* what_;
    Clock::time_point deadline_;
    std::size_t iterations_ = 0;
  };

  std::size_t drive(milliseconds timeout) {
    const std::size_t events = run_loop(timeout);
    return events + read_all();
  }

  std::size_t read_all() {
    std::size_t moved = 0;
    for (std::size_t i = 0; i < peers_.size(); ++i) {
      if (peers_[i].reading == Reading::kAlways) moved += drain(i);
    }
    return moved;
  }

  // Reads until EAGAIN, EOF or an error; returns the bytes read plus one for an ending.
  std::size_t drain(std::size_t index) {
    Peer& peer = peers_[index];
    if (!peer.open || peer.done_reading) return 0;
    std::size_t moved = 0;
    while (true) {
      const ssize_t n = peer_recv(index, peer.view.received);
      const int error = errno;
      if (n > 0) {
        moved += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && error == EINTR) continue;
      if (n == 0) {
        peer.view.eof = true;
      } else if (error != EAGAIN && error != EWOULDBLOCK) {
        peer.view.recv_error = error;
      } else {
        break;
      }
      peer.done_reading = true;
      ++moved;
      break;
    }
    if (moved > 0) external_step();
    return moved;
  }

  void finish(std::size_t index, bool reset) {
    peer_close(index, reset);
    peers_[index].open = false;
    external_step();
  }

  Record record_;  // before the subclasses' loops: their handlers write here until destroyed
  std::vector<Peer> peers_;
  std::optional<ShutdownCounts> shutdown_;
  std::vector<std::string> checkpoints_;
  std::string stuck_;
};

// The real kernel: loopback TCP, peers are non-blocking client sockets (TCP_NODELAY, as
// reactor::connect sets it).
template <class Trigger>
class RealWorld final : public World {
 public:
  RealWorld(const Behaviour& behaviour, const reactor::ConnectionOptions& options,
            bool small_buffers)
      : listener_(make_listener(loop_, record(), behaviour, options)),
        small_buffers_(small_buffers) {
    // Accepted sockets inherit the listener's SO_SNDBUF, and the lock that keeps
    // tcp_init_buffer_space() from growing it (sk_clone_lock() copies sk_userlocks).
    if (small_buffers_) set_buffer(listener_->native_handle(), SO_SNDBUF);
  }

 private:
  static void set_buffer(int fd, int option) {
    const int size = static_cast<int>(kSmallBuffer);
    REQUIRE(::setsockopt(fd, SOL_SOCKET, option, &size, sizeof size) == 0);
  }

  // reactor::connect(), but with SO_RCVBUF set before the handshake, which fixes the window
  // the peer advertises (tcp_select_initial_window()).
  bool open_peer(std::size_t index, int& error) override {
    fds_.resize(index + 1);
    reactor::UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(fd);
    if (small_buffers_) set_buffer(fd.get(), SO_RCVBUF);
    const reactor::Endpoint server =
        reactor::Endpoint::parse("127.0.0.1:" + std::to_string(listener_->port()));
    if (::connect(fd.get(), server.data(), server.size()) != 0) {
      error = errno;
      return false;
    }
    const int on = 1;
    REQUIRE(::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) == 0);
    REQUIRE(::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) | O_NONBLOCK) == 0);
    fds_[index] = std::move(fd);
    return true;
  }
  ssize_t peer_send(std::size_t index, std::string_view bytes) override {
    return ::send(fds_[index].get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
  }
  ssize_t peer_recv(std::size_t index, std::string& out) override {
    const ssize_t n = ::recv(fds_[index].get(), buffer_.data(), buffer_.size(), 0);
    if (n > 0) out.append(buffer_.data(), static_cast<std::size_t>(n));
    return n;
  }
  int peer_shutdown(std::size_t index) override { return ::shutdown(fds_[index].get(), SHUT_WR); }
  void peer_close(std::size_t index, bool reset) override {
    if (reset) {
      const linger option{1, 0};
      REQUIRE(::setsockopt(fds_[index].get(), SOL_SOCKET, SO_LINGER, &option, sizeof option) == 0);
    }
    fds_[index].reset();
  }
  std::size_t run_loop(milliseconds timeout) override { return loop_.run_once(timeout); }
  reactor::ShutdownReport loop_shutdown(milliseconds grace, milliseconds quiet) override {
    return loop_.shutdown(grace, quiet);
  }
  std::size_t connection_count() const override { return loop_.connection_count(); }
  Clock::time_point now() const override { return Clock::now(); }
  // A window update the receiver defers, or a delayed ACK, gets this long to show up.
  milliseconds confirm_timeout() const override { return 2ms; }

  reactor::Reactor<Trigger> loop_;
  std::unique_ptr<Listener> listener_;  // after loop_: destroyed before it
  bool small_buffers_;
  std::vector<reactor::UniqueFd> fds_;
  std::vector<char> buffer_ = std::vector<char>(64 * 1024);
};

// The simulation: a sim::Kernel installed for the world's lifetime, virtual time.
template <class Trigger>
class SimWorld final : public World {
 public:
  SimWorld(const Behaviour& behaviour, const reactor::ConnectionOptions& options,
           bool small_buffers)
      : listener_(make_listener(loop_, record(), behaviour, options)) {
    if (small_buffers) kernel_.set_stream_capacity(kSmallBuffer);
  }

  std::uint64_t trace_hash() const override { return kernel_.trace_hash(); }

 private:
  bool open_peer(std::size_t index, int& error) override {
    ids_.resize(index + 1);
    const std::optional<sim::PeerId> id = kernel_.connect(listener_->port());
    error = id ? 0 : errno;
    if (id) ids_[index] = *id;
    return id.has_value();
  }
  ssize_t peer_send(std::size_t index, std::string_view bytes) override {
    return kernel_.peer_send(ids_[index], bytes);
  }
  ssize_t peer_recv(std::size_t index, std::string& out) override {
    return kernel_.peer_recv(ids_[index], out);
  }
  int peer_shutdown(std::size_t index) override { return kernel_.peer_shutdown(ids_[index]); }
  void peer_close(std::size_t index, bool reset) override {
    if (reset) {
      kernel_.peer_reset(ids_[index]);
    } else {
      kernel_.peer_close(ids_[index]);
    }
  }
  std::size_t run_loop(milliseconds timeout) override { return loop_.run_once(timeout); }
  reactor::ShutdownReport loop_shutdown(milliseconds grace, milliseconds quiet) override {
    return loop_.shutdown(grace, quiet);
  }
  std::size_t connection_count() const override { return loop_.connection_count(); }
  Clock::time_point now() const override { return kernel_.now(); }
  milliseconds confirm_timeout() const override { return 0ms; }
  void external_step() override { kernel_.external_step(); }

  sim::Kernel kernel_;  // first: the loop's syscalls go to it, until the loop is destroyed
  reactor::Reactor<Trigger, sim::SimSyscalls> loop_;
  std::unique_ptr<Listener> listener_;
  std::vector<sim::PeerId> ids_;
};

// --- scenarios -----------------------------------------------------------------------------------

struct Scenario {
  explicit Scenario(std::string scenario_name) : name(std::move(scenario_name)) {}

  std::string name;
  Behaviour behaviour;
  reactor::ConnectionOptions options;
  std::function<void(World&)> script;
  // What Linux does, checked on both runs; `edge`: the run was edge-triggered.
  std::function<void(const Observation&, bool edge)> expect;
  // False where the bytes a peer receives depend on kernel buffer sizes (a connection that dies
  // with output still queued): the peers' received bytes are then left out of the comparison.
  bool peer_bytes_comparable = true;
  // Small kernel buffers, so that output queues in the library: SO_SNDBUF on the server's
  // sockets and SO_RCVBUF on the peers' (Linux doubles both), 16 KiB queues in the simulation.
  // Loopback's defaults take several MiB before a send comes up short.
  bool small_buffers = false;
};

void check_bytes(const std::string& actual, std::string_view expected) {
  CHECK(fingerprint(actual) == fingerprint(expected));
  CHECK((actual == expected));
}

// One peer's outcome: its bytes, then EOF, a recv error, or neither (it stopped reading).
void expect_peer(const Observation& o, std::size_t index, std::string_view received, bool eof,
                 int recv_error = 0, const std::vector<std::string>& errors = {}) {
  INFO("peer " << index);
  REQUIRE(o.peers.size() > index);
  const PeerView& p = o.peers[index];
  CHECK(p.connected);
  check_bytes(p.received, received);
  CHECK(p.eof == eof);
  CHECK(errno_name(p.recv_error) == errno_name(recv_error));
  CHECK(p.errors == errors);
}

// One connection's outcome: the bytes consumed, on_eof calls and the on_close reason
// (std::nullopt: still open).
void expect_conn(const Observation& o, std::size_t index, std::string_view input,
                 std::optional<std::string> reason, int eofs = 0) {
  INFO("connection " << index);
  REQUIRE(o.conns.size() > index);
  const ConnLog& c = o.conns[index];
  check_bytes(c.input, input);
  CHECK(c.eofs == eofs);
  CHECK(c.closed == reason.has_value());
  if (reason) CHECK(c.close_reason == *reason);
}

void expect_report(const Observation& o, std::size_t flushed, std::size_t failed,
                   std::size_t aborted) {
  REQUIRE(o.shutdown.has_value());
  CHECK(o.shutdown->flushed == flushed);
  CHECK(o.shutdown->failed == failed);
  CHECK(o.shutdown->aborted == aborted);
  CHECK_FALSE(o.shutdown->error);
}

using Bytes = std::shared_ptr<const std::string>;

Bytes bytes_of(std::string s) {
  return std::make_shared<const std::string>(std::move(s));
}

// Lines of 1 to 300 bytes, `size` bytes in all, the last one complete.
std::string lines(std::size_t size, std::uint32_t seed) {
  std::string text = test::pattern(size, seed);
  std::uint32_t state = seed;
  std::size_t next = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\n') text[i] = ' ';
    if (i == next) {
      text[i] = '\n';
      state = state * 1103515245u + 12345u;
      next = i + 1 + (state >> 16) % 300;
    }
  }
  text.back() = '\n';
  return text;
}

const std::string kOrderly;  // the on_close reason of an orderly close

std::vector<Scenario> make_scenarios() {
  std::vector<Scenario> list;
  const auto add = [&list](std::string name) -> Scenario& { return list.emplace_back(name); };

  // --- echo --------------------------------------------------------------------------------------
  {
    Scenario& s = add("echo: a small message comes back, the peer's half-close closes");
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "hello, reactor\n");
      w.settle();
      w.checkpoint("echoed");
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "hello, reactor\n", true);
      expect_conn(o, 0, "hello, reactor\n", kOrderly);
      CHECK(o.checkpoints == std::vector<std::string>{"echoed: p0=15 c0=15 count=1"});
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Deterministic: the bytes, not the chunking, are compared. The peer reads only when its send
    // is stuck, which happens only once the server stopped reading: the echo has then piled up in
    // the library past the high-water mark (kernel buffers are small), on either kernel.
    Scenario& s = add("echo: 1 MiB through a 16 KiB high-water mark arrives intact");
    s.small_buffers = true;
    s.options.high_water = 16 * 1024;
    s.options.low_water = 4 * 1024;
    const Bytes data = bytes_of(test::pattern(1 << 20, 11));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.set_reading(p, Reading::kWhenStuck);
      w.send(p, *data);
      w.set_reading(p, Reading::kAlways);
      w.settle();
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, *data, true);
      expect_conn(o, 0, *data, kOrderly);
      CHECK(o.conns[0].drains > 0);
      CHECK(o.connection_count == 0);
    };
  }
  {
    // The half-close is queued behind the last byte, so the server can read the EOF while echo is
    // still queued (small buffers make that likely): it must flush it all before closing.
    Scenario& s = add("echo: 1 MiB then an immediate half-close is flushed before the close");
    s.small_buffers = true;
    s.options.high_water = 64 * 1024;
    s.options.low_water = 16 * 1024;
    const Bytes data = bytes_of(test::pattern(1 << 20, 12));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, *data);
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, *data, true);
      expect_conn(o, 0, *data, kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("echo: 500 small sends come back byte for byte");
    const Bytes data = bytes_of(test::pattern(500 * 7, 13));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      for (std::size_t i = 0; i < data->size(); i += 7) w.send(p, data->substr(i, 7));
      w.settle();
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, *data, true);
      expect_conn(o, 0, *data, kOrderly);
    };
  }
  {
    Scenario& s = add("sink: 1 MiB is consumed without reply, the half-close ends it");
    s.behaviour.echo = false;
    const Bytes data = bytes_of(test::pattern(1 << 20, 14));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, *data);
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, "", true);
      expect_conn(o, 0, *data, kOrderly);
    };
  }

  // --- frames ------------------------------------------------------------------------------------
  {
    // Deterministic: each piece is its own send, consumed (or kept) before the next arrives.
    Scenario& s = add("lines: partial frames are kept until complete, the tail dropped at EOF");
    s.behaviour.lines = true;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "ab");
      w.settle();
      w.checkpoint("partial");
      w.send(p, "c\nde");
      w.settle();
      w.send(p, "f\ng\nh");
      w.settle();
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "abc\ndef\ng\n", true);
      expect_conn(o, 0, "abc\ndef\ng\n", kOrderly);
      CHECK(o.checkpoints == std::vector<std::string>{"partial: p0=0 c0=0 count=1"});
    };
  }
  {
    Scenario& s = add("lines: 1 MiB of lines in one send is echoed line for line");
    s.behaviour.lines = true;
    const Bytes data = bytes_of(lines(1 << 20, 15));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, *data + "unterminated");
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, *data, true);
      expect_conn(o, 0, *data, kOrderly);
    };
  }
  {
    // Deterministic: 4 KiB in one send is one segment on loopback (MSS 65483) and one read.
    Scenario& s = add("lines: a partial frame over max_pending_input closes with kInputLimit");
    s.behaviour.lines = true;
    s.options.max_pending_input = 1024;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, std::string(4096, 'x'));
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "", true);
      expect_conn(o, 0, "", library_reason(reactor::Error::kInputLimit));
      CHECK(o.connection_count == 0);
    };
  }

  // --- peer endings ------------------------------------------------------------------------------
  {
    Scenario& s = add("peer closes after reading its echo: orderly on both sides");
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "abc");
      w.settle();
      w.close(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "abc", false);
      expect_conn(o, 0, "abc", kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Deterministic: close() with unread input sends RST (tcp(7), tcp_close()); the server is
    // ESTABLISHED, so tcp_reset() reports ECONNRESET.
    Scenario& s = add("peer closes with unread bytes: its RST fails the server with ECONNRESET");
    s.behaviour.greeting = "welcome\n";
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.set_reading(p, Reading::kOff);
      w.settle();
      w.send(p, "x");
      w.settle();
      w.receive(p);
      w.send(p, "y");
      w.settle();
      w.close(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "welcome\nx", false);
      expect_conn(o, 0, "xy", system_reason(ECONNRESET));
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Deterministic: the data and the FIN are both queued before the loop runs, and the echo
    // provokes the closed peer's RST inside the send. Level-triggered reads once per event, so the
    // next event carries EPOLLERR, whose SO_ERROR is EPIPE: the RST arrived in CLOSE_WAIT
    // (tcp_reset()). Edge-triggered reads on to the EOF (EPOLLRDHUP was in the event) in the same
    // wakeup, and a read after FIN returns 0 before any error (tcp_recvmsg() checks SOCK_DONE
    // first): an orderly close.
    Scenario& s = add("peer sends then closes at once: the echo's RST is seen or the EOF first");
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "x");
      w.close(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool edge) {
      expect_peer(o, 0, "", false);
      expect_conn(o, 0, "x", edge ? kOrderly : system_reason(EPIPE));
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Deterministic: the 256 KiB round trip completes before the tail is sent; the tail and the
    // RST arrive together, and EPOLLERR is handled before any read.
    Scenario& s = add("peer resets with bytes in flight: they are dropped, ECONNRESET");
    const Bytes data = bytes_of(test::pattern(256 * 1024, 16));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, *data);
      w.settle();
      w.send(p, "tail");
      w.reset(p);
      w.settle();
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, *data, false);
      expect_conn(o, 0, *data, system_reason(ECONNRESET));
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Whether the greeting still sits in the library's queue or all in kernel buffers, the RST
    // reports ECONNRESET.
    Scenario& s = add("peer resets while the server has 1 MiB to write: ECONNRESET");
    s.behaviour.greeting = test::pattern(1 << 20, 17);
    s.small_buffers = true;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.set_reading(p, Reading::kOff);
      w.settle();
      w.reset(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "", false);
      expect_conn(o, 0, "", system_reason(ECONNRESET));
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Linux still hands out a connection reset in the accept queue; its first event is EPOLLERR.
    Scenario& s = add("peer resets before the accept: on_open, then ECONNRESET");
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.reset(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_conn(o, 0, "", system_reason(ECONNRESET));
      CHECK(o.conns.size() == 1);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("peer closes before the accept: the server reads EOF and closes");
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.close(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_conn(o, 0, "", kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("peer half-closes without sending: the server closes at once");
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "", true);
      expect_conn(o, 0, "", kOrderly);
      CHECK(o.connection_count == 0);
    };
  }

  // --- handler endings ---------------------------------------------------------------------------
  {
    // Deterministic: 3000 bytes in one send are one read; close() from on_data drops the rest
    // and lingers (FIN sent, reading and discarding) until the peer's FIN.
    Scenario& s = add("handler closes after 1000 bytes: the peer gets exactly those, then EOF");
    s.behaviour.act_after = 1000;
    s.behaviour.act = Act::kClose;
    const Bytes data = bytes_of(test::pattern(3000, 18));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, *data);
      w.settle();
      w.checkpoint("lingering");
      w.close(p);
      w.settle();
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, data->substr(0, 1000), true);
      expect_conn(o, 0, data->substr(0, 1000), kOrderly);
      CHECK(o.checkpoints == std::vector<std::string>{"lingering: p0=1000+EOF c0=1000 count=1"});
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("handler closes and the peer never sends FIN: the linger timeout ends it");
    s.behaviour.act_after = 1000;
    s.behaviour.act = Act::kClose;
    s.options.linger_timeout = kLinger;
    const Bytes data = bytes_of(test::pattern(3000, 19));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, *data);
      w.settle();
      w.wait(kLongWait);
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, data->substr(0, 1000), true);
      expect_conn(o, 0, data->substr(0, 1000), kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Every byte and the FIN were delivered (the peer read them and EOF), but the peer's kernel
    // delays its ACK of a FIN (tcp_fin() enters pingpong mode: a delayed ACK, 40 ms at least), so
    // when a linger timeout shorter than that fires, SIOCOUTQ (write_seq - snd_una) still counts
    // the FIN's sequence number: 1. Nothing is lost whatever comes next, since Linux keeps
    // acknowledged bytes readable after an RST, so the close is orderly. Listed in
    // Was a known divergence (reactor reported timed_out here on Linux): keeps the fix honest.
    Scenario& s = add("linger timeout before the delayed ACK of the FIN: orderly, all delivered");
    s.behaviour.act_after = 1000;
    s.behaviour.act = Act::kClose;
    s.options.linger_timeout = kShortLinger;
    const Bytes data = bytes_of(test::pattern(3000, 28));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, *data);
      w.settle();
      w.wait(kLongWait);
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, data->substr(0, 1000), true);
      expect_conn(o, 0, data->substr(0, 1000), kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("handler closes from on_open behind a 1 MiB greeting: all of it, then EOF");
    s.behaviour.greeting = test::pattern(1 << 20, 20);
    s.small_buffers = true;
    s.behaviour.close_on_open = true;
    const Bytes greeting = bytes_of(s.behaviour.greeting);
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.close(p);
      w.settle();
    };
    s.expect = [greeting](const Observation& o, bool) {
      expect_peer(o, 0, *greeting, true);
      expect_conn(o, 0, "", kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("handler greets and closes from on_open: greeting, then EOF");
    s.behaviour.greeting = "bye\n";
    s.behaviour.close_on_open = true;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.close(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "bye\n", true);
      expect_conn(o, 0, "", kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Deterministic: the echo was written before abort(), and the library had read all 3000
    // bytes, so closing leaves nothing unread: FIN, not RST.
    Scenario& s = add("handler aborts after 1000 bytes: the written echo arrives, then EOF");
    s.behaviour.act_after = 1000;
    s.behaviour.act = Act::kAbort;
    const Bytes data = bytes_of(test::pattern(3000, 21));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, *data);
      w.settle();
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, data->substr(0, 1000), true);
      expect_conn(o, 0, data->substr(0, 1000), kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Linux keeps received bytes readable after an RST: recv returns them, then ECONNRESET
    // (tcp_recvmsg() walks the receive queue before looking at sk_err).
    Scenario& s =
        add("handler aborts with RST after 1000 bytes: the peer reads them, then "
            "ECONNRESET");
    s.behaviour.act_after = 1000;
    s.behaviour.act = Act::kAbortReset;
    const Bytes data = bytes_of(test::pattern(3000, 22));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, *data);
      w.settle();
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, data->substr(0, 1000), false, ECONNRESET);
      expect_conn(o, 0, data->substr(0, 1000), kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("handler half-closes after 5 bytes and keeps receiving to the peer's EOF");
    s.behaviour.act_after = 5;
    s.behaviour.act = Act::kShutdown;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "hello");
      w.settle();
      w.checkpoint("half-closed");
      w.send(p, " world");
      w.settle();
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "hello", true);
      expect_conn(o, 0, "hello world", kOrderly);
      CHECK(o.checkpoints == std::vector<std::string>{"half-closed: p0=5+EOF c0=5 count=1"});
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("handler half-closes, then on_eof runs and the connection closes");
    s.behaviour.hooks = Hooks::kOnEof;
    s.behaviour.act_after = 5;
    s.behaviour.act = Act::kShutdown;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "hello");
      w.settle();
      w.send(p, " world");
      w.settle();
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "hello", true);
      expect_conn(o, 0, "hello world", kOrderly, 1);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("on_eof replies and shuts down: echo, reply, then EOF");
    s.behaviour.hooks = Hooks::kOnEof;
    s.behaviour.eof_reply = "bye\n";
    s.behaviour.eof_then = EofThen::kShutdown;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "request\n");
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "request\nbye\n", true);
      expect_conn(o, 0, "request\n", kOrderly, 1);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("on_eof sends 256 KiB after the peer's half-close: all of it arrives");
    s.behaviour.hooks = Hooks::kOnEof;
    s.behaviour.eof_reply = test::pattern(256 * 1024, 23);
    s.small_buffers = true;
    s.behaviour.eof_then = EofThen::kShutdown;
    const Bytes reply = bytes_of(s.behaviour.eof_reply);
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "request\n");
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [reply](const Observation& o, bool) {
      expect_peer(o, 0, "request\n" + *reply, true);
      expect_conn(o, 0, "request\n", kOrderly, 1);
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Deterministic: the peer's close() leaves an orphan (FIN_WAIT2) that answers the reply with
    // RST inside the send. The server had the peer's FIN, so it is in CLOSE_WAIT, where
    // tcp_reset() sets sk_err to EPIPE, not ECONNRESET. With nothing to read or write the
    // level-triggered interest is empty, but EPOLLERR is always reported; edge mode gets its edge.
    Scenario& s = add("on_eof replies to a peer that closed entirely: EPIPE (RST in CLOSE_WAIT)");
    s.behaviour.hooks = Hooks::kOnEof;
    s.behaviour.eof_reply = "late\n";
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "x");
      w.settle();
      w.close(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "x", false);
      expect_conn(o, 0, "x", system_reason(EPIPE), 1);
      CHECK(o.connection_count == 0);
    };
  }
  {
    // As above, then shutdown(): the RST left the socket in TCP_CLOSE, where shutdown(2) fails
    // with ENOTCONN (inet_shutdown()), and that failure closes the connection.
    Scenario& s = add("on_eof replies and shuts down after the peer closed: ENOTCONN");
    s.behaviour.hooks = Hooks::kOnEof;
    s.behaviour.eof_reply = "late\n";
    s.behaviour.eof_then = EofThen::kShutdown;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "x");
      w.settle();
      w.close(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "x", false);
      expect_conn(o, 0, "x", system_reason(ENOTCONN), 1);
      CHECK(o.connection_count == 0);
    };
  }

  {
    // Deterministic: the reply is queued (small buffers) when the peer closes with it unread,
    // which sends RST; the server had the peer's FIN, so it is in CLOSE_WAIT: EPIPE (tcp_reset()).
    Scenario& s = add("peer half-closes, then closes with the reply unread: EPIPE (CLOSE_WAIT)");
    s.behaviour.hooks = Hooks::kOnEof;
    s.behaviour.eof_reply = test::pattern(256 * 1024, 26);
    s.small_buffers = true;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.set_reading(p, Reading::kOff);
      w.settle();
      w.send(p, "request\n");
      w.shutdown_write(p);
      w.settle();
      w.checkpoint("replying");
      w.close(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "", false);
      expect_conn(o, 0, "request\n", system_reason(EPIPE), 1);
      CHECK(o.checkpoints == std::vector<std::string>{"replying: p0=0 c0=8 count=1"});
      CHECK(o.connection_count == 0);
    };
  }
  {
    // A lingering connection has delivered everything and sent its FIN: an RST now only ends the
    // wait, as the peer's EOF would (the read that reports it closes with an empty reason).
    Scenario& s = add("peer resets while the server lingers: an orderly close all the same");
    s.behaviour.act_after = 3;
    s.behaviour.act = Act::kClose;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "abc");
      w.settle();
      w.checkpoint("lingering");
      w.reset(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "abc", true);
      expect_conn(o, 0, "abc", kOrderly);
      CHECK(o.checkpoints == std::vector<std::string>{"lingering: p0=3+EOF c0=3 count=1"});
      CHECK(o.connection_count == 0);
    };
  }

  // --- sends into a dead connection --------------------------------------------------------------
  {
    // Deterministic: with linger_timeout 0 the server's socket is closed at once (an orphan in
    // FIN_WAIT2), which answers "more" with RST inside that send. The peer had the server's FIN,
    // so it is in CLOSE_WAIT: tcp_reset() sets EPIPE, the next send reports it, and the one after
    // finds the socket shut down: EPIPE again.
    Scenario& s = add("peer sends after the server closed: EPIPE (RST in CLOSE_WAIT), twice");
    s.behaviour.act_after = 3;
    s.behaviour.act = Act::kClose;
    s.options.linger_timeout = 0ms;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "abc");
      w.settle();
      w.send(p, "more");
      w.settle();
      w.send(p, "again");
      w.send(p, "third");
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "abc", true, 0, {"send: EPIPE", "send: EPIPE"});
      expect_conn(o, 0, "abc", kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("peer sends while the server lingers: discarded, no RST, orderly close");
    s.behaviour.act_after = 3;
    s.behaviour.act = Act::kClose;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "abc");
      w.settle();
      w.send(p, "more");
      w.settle();
      w.close(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "abc", true);
      expect_conn(o, 0, "abc", kOrderly);
      CHECK(o.connection_count == 0);
    };
  }
  {
    // recv consumed the pending ECONNRESET; after tcp_done() the socket is shut down both ways,
    // so send fails with EPIPE.
    Scenario& s = add("peer sends after the server reset it: ECONNRESET read, then EPIPE");
    s.behaviour.act_after = 3;
    s.behaviour.act = Act::kAbortReset;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "abc");
      w.settle();
      w.send(p, "more");
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "abc", false, ECONNRESET, {"send: EPIPE"});
      expect_conn(o, 0, "abc", kOrderly);
    };
  }

  // --- flow control ------------------------------------------------------------------------------
  {
    // Deterministic with generous bounds: two settles take far less than the 60 ms pause, and
    // the wait far more.
    Scenario& s = add("pause_reading, resumed by a timer: bytes sent meanwhile wait, then return");
    s.behaviour.pause_for = kPause;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "first");
      w.settle();
      w.send(p, "second");
      w.settle();
      w.checkpoint("paused");
      w.wait(kLongWait);
      w.checkpoint("resumed");
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "firstsecond", true);
      expect_conn(o, 0, "firstsecond", kOrderly);
      CHECK(o.checkpoints ==
            std::vector<std::string>{"paused: p0=5 c0=5 count=1", "resumed: p0=11 c0=11 count=1"});
    };
  }
  {
    Scenario& s = add("pause with a partial frame kept: resume redelivers it with the new bytes");
    s.behaviour.lines = true;
    s.behaviour.pause_for = kPause;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "ab\ncd");
      w.settle();
      w.send(p, "e\n");
      w.settle();
      w.checkpoint("paused");
      w.wait(kLongWait);
      w.shutdown_write(p);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "ab\ncde\n", true);
      expect_conn(o, 0, "ab\ncde\n", kOrderly);
      CHECK(o.checkpoints == std::vector<std::string>{"paused: p0=3 c0=3 count=1"});
    };
  }
  {
    // Not byte-comparable: the kernel takes as much of the greeting as its buffers hold before
    // the rest is refused, and the peer receives that much.
    Scenario& s = add("a 1 MiB greeting over a 64 KiB max_pending_output closes with kOutputLimit");
    s.behaviour.greeting = test::pattern(1 << 20, 24);
    s.small_buffers = true;
    s.options.high_water = 16 * 1024;
    s.options.max_pending_output = 64 * 1024;
    s.peer_bytes_comparable = false;
    const Bytes greeting = bytes_of(s.behaviour.greeting);
    s.script = [](World& w) {
      w.connect();
      w.settle();
    };
    s.expect = [greeting](const Observation& o, bool) {
      REQUIRE(o.peers.size() == 1);
      const std::string& got = o.peers[0].received;
      CHECK(!got.empty());
      CHECK(got.size() < greeting->size());
      CHECK((greeting->compare(0, got.size(), got) == 0));
      CHECK(o.peers[0].eof);
      expect_conn(o, 0, "", library_reason(reactor::Error::kOutputLimit));
    };
  }

  {
    // Level-triggered, a paused connection with nothing to send has an empty interest set; a
    // half-close raises neither EPOLLHUP nor EPOLLERR (only RCV_SHUTDOWN is set), so nothing
    // happens until the resume reads the rest and the EOF.
    Scenario& s = add("peer half-closes while reading is paused: read after the resume");
    s.behaviour.pause_for = kPause;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "x");
      w.settle();
      w.send(p, "y");
      w.shutdown_write(p);
      w.settle();
      w.checkpoint("paused");
      w.wait(kLongWait);
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "xy", true);
      expect_conn(o, 0, "xy", kOrderly);
      CHECK(o.checkpoints == std::vector<std::string>{"paused: p0=1 c0=1 count=1"});
      CHECK(o.connection_count == 0);
    };
  }
  {
    // EPOLLERR is reported whatever the interest: the paused connection fails at once, and its
    // resume timer is cancelled.
    Scenario& s = add("peer resets while reading is paused: ECONNRESET at once");
    s.behaviour.pause_for = kPause;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "x");
      w.settle();
      w.send(p, "y");
      w.reset(p);
      w.settle();
      w.checkpoint("reset");
      w.wait(kLongWait);
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "x", false);
      expect_conn(o, 0, "x", system_reason(ECONNRESET));
      CHECK(o.checkpoints ==
            std::vector<std::string>{"reset: p0=1 c0=1+closed(system:ECONNRESET) count=0"});
    };
  }
  {
    // 256 KiB sent while the server is paused: the simulation's 16 KiB queues make the send wait
    // for the resume, Linux takes it all into the peer's send buffer (which SO_RCVBUF leaves
    // alone); either way nothing is consumed before the timer resumes reading.
    Scenario& s = add("pause_reading holds back 256 KiB until the resume");
    s.behaviour.pause_for = kPause;
    s.small_buffers = true;
    const Bytes data = bytes_of(test::pattern(256 * 1024, 27));
    s.script = [data](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "x");
      w.settle();
      w.send(p, *data);
      w.shutdown_write(p);
      w.settle();
      w.wait(kLongWait);
    };
    s.expect = [data](const Observation& o, bool) {
      expect_peer(o, 0, "x" + *data, true);
      expect_conn(o, 0, "x" + *data, kOrderly);
      CHECK(o.connection_count == 0);
    };
  }

  // --- timeouts ----------------------------------------------------------------------------------
  {
    Scenario& s = add("idle timeout with a silent peer: graceful close with timed_out");
    s.options.idle_timeout = kTimeout;
    s.options.linger_timeout = kLinger;
    s.script = [](World& w) {
      w.connect();
      w.settle();
      w.wait(kLongWait);
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "", true);
      expect_conn(o, 0, "", generic_reason(std::errc::timed_out));
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("idle timeout after traffic: the echo arrives, then the timed_out close");
    s.options.idle_timeout = kTimeout;
    s.options.linger_timeout = kLinger;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "ping");
      w.settle();
      w.wait(kLongWait);
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "ping", true);
      expect_conn(o, 0, "ping", generic_reason(std::errc::timed_out));
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("read timeout with a silent peer: abort with timed_out, the peer reads EOF");
    s.options.read_timeout = kTimeout;
    s.script = [](World& w) {
      w.connect();
      w.settle();
      w.wait(kLongWait);
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "", true);
      expect_conn(o, 0, "", generic_reason(std::errc::timed_out));
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Not byte-comparable: what the kernel had taken before the abort still reaches the peer.
    Scenario& s = add("write timeout with a peer that does not read: abort with timed_out");
    s.behaviour.greeting = test::pattern(1 << 20, 25);
    s.small_buffers = true;
    s.options.write_timeout = kTimeout;
    s.peer_bytes_comparable = false;
    const Bytes greeting = bytes_of(s.behaviour.greeting);
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.set_reading(p, Reading::kOff);
      w.settle();
      w.wait(kLongWait);
      w.checkpoint("timed out");
      w.set_reading(p, Reading::kAlways);
      w.settle();
    };
    s.expect = [greeting](const Observation& o, bool) {
      REQUIRE(o.peers.size() == 1);
      const std::string& got = o.peers[0].received;
      CHECK(!got.empty());
      CHECK(got.size() < greeting->size());
      CHECK((greeting->compare(0, got.size(), got) == 0));
      CHECK(o.peers[0].eof);
      expect_conn(o, 0, "", generic_reason(std::errc::timed_out));
      CHECK(o.checkpoints ==
            std::vector<std::string>{"timed out: p0=0 c0=0+closed(generic:ETIMEDOUT) count=0"});
    };
  }

  // --- graceful shutdown -------------------------------------------------------------------------
  {
    // The peer cannot act while shutdown() runs: the server half-closes once quiet, lingers,
    // and the linger timeout closes it, which still counts as flushed.
    Scenario& s = add("graceful shutdown with a silent peer: closed once quiet, flushed");
    s.options.linger_timeout = kLinger;
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "hi");
      w.settle();
      w.shutdown_loop(kGrace, kQuiet);
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "hi", true);
      expect_conn(o, 0, "hi", kOrderly);
      expect_report(o, 1, 0, 0);
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("graceful shutdown serves out what a peer sent just before half-closing");
    s.script = [](World& w) {
      const std::size_t p = w.connect();
      w.settle();
      w.send(p, "last words\n");
      w.shutdown_write(p);
      w.shutdown_loop(kGrace, kQuiet);
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "last words\n", true);
      expect_conn(o, 0, "last words\n", kOrderly);
      expect_report(o, 1, 0, 0);
    };
  }
  {
    Scenario& s = add("graceful shutdown with an on_shutdown hook: its goodbye, then EOF");
    s.behaviour.hooks = Hooks::kOnShutdown;
    s.behaviour.shutdown_reply = "going away\n";
    s.options.linger_timeout = kLinger;
    s.script = [](World& w) {
      w.connect();
      w.settle();
      w.shutdown_loop(kGrace, kQuiet);
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "going away\n", true);
      expect_conn(o, 0, "", kOrderly);
      CHECK(o.conns[0].shutdowns == 1);
      expect_report(o, 1, 0, 0);
    };
  }
  {
    Scenario& s = add("graceful shutdown past its grace: aborted with operation_canceled");
    s.behaviour.hooks = Hooks::kOnShutdown;
    s.behaviour.close_on_shutdown = false;
    s.script = [](World& w) {
      w.connect();
      w.settle();
      w.shutdown_loop(3 * kQuiet, kQuiet);
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "", true);
      expect_conn(o, 0, "", generic_reason(std::errc::operation_canceled));
      expect_report(o, 0, 0, 1);
      CHECK(o.connection_count == 0);
    };
  }
  {
    // Deterministic: shutdown() accepts what waits in the listener's queue before closing it
    // (closing would reset it: inet_csk_listen_stop()), so the second connection is served out
    // like the first; a connect to a port nobody listens on any more is refused.
    Scenario& s =
        add("graceful shutdown serves a connection still in the accept queue and refuses new ones");
    s.options.linger_timeout = kLinger;
    s.script = [](World& w) {
      w.connect();
      w.settle();
      w.connect();
      w.shutdown_loop(kGrace, kQuiet);
      w.connect();
    };
    s.expect = [](const Observation& o, bool) {
      REQUIRE(o.peers.size() == 3);
      expect_peer(o, 0, "", true);
      expect_peer(o, 1, "", true);
      CHECK_FALSE(o.peers[2].connected);
      CHECK(errno_name(o.peers[2].connect_error) == "ECONNREFUSED");
      CHECK(o.conns.size() == 2);
      expect_conn(o, 0, "", kOrderly);
      expect_conn(o, 1, "", kOrderly);
      expect_report(o, 2, 0, 0);
    };
  }

  // --- several peers -----------------------------------------------------------------------------
  {
    Scenario& s = add("four peers interleave sends of different sizes: each gets its own bytes");
    s.script = [](World& w) {
      constexpr std::size_t kSizes[] = {1, 1000, 70'000, 300'000};
      std::size_t peers[4];
      for (std::size_t& p : peers) p = w.connect();
      w.settle();
      for (std::size_t round = 0; round < 3; ++round) {
        for (std::size_t i = 0; i < 4; ++i) {
          const std::size_t size = kSizes[(i + round) % 4];
          w.send(peers[i], test::pattern(size, static_cast<std::uint32_t>(100 + 10 * i + round)));
        }
        w.settle();
      }
      for (std::size_t i = 4; i-- > 0;) w.shutdown_write(peers[i]);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      constexpr std::size_t kSizes[] = {1, 1000, 70'000, 300'000};
      REQUIRE(o.conns.size() == 4);
      for (std::size_t i = 0; i < 4; ++i) {
        std::string sent;
        for (std::size_t round = 0; round < 3; ++round) {
          sent += test::pattern(kSizes[(i + round) % 4],
                                static_cast<std::uint32_t>(100 + 10 * i + round));
        }
        expect_peer(o, i, sent, true);
        expect_conn(o, i, sent, kOrderly);
      }
      CHECK(o.connection_count == 0);
    };
  }
  {
    Scenario& s = add("three peers with different fates: orderly, reset, unread close");
    s.script = [](World& w) {
      const std::size_t orderly = w.connect();
      const std::size_t resetting = w.connect();
      const std::size_t unread = w.connect();
      w.set_reading(unread, Reading::kOff);
      w.settle();
      w.send(orderly, "zero");
      w.send(resetting, "one");
      w.send(unread, "two");
      w.settle();
      w.send(resetting, "extra");
      w.reset(resetting);
      w.close(unread);
      w.shutdown_write(orderly);
      w.settle();
    };
    s.expect = [](const Observation& o, bool) {
      expect_peer(o, 0, "zero", true);
      expect_peer(o, 1, "one", false);
      expect_peer(o, 2, "", false);
      expect_conn(o, 0, "zero", kOrderly);
      expect_conn(o, 1, "one", system_reason(ECONNRESET));
      expect_conn(o, 2, "two", system_reason(ECONNRESET));
      CHECK(o.connection_count == 0);
    };
  }
  return list;
}

const std::vector<Scenario>& scenarios() {
  static const std::vector<Scenario> list = make_scenarios();
  return list;
}

// --- known divergences ---------------------------------------------------------------------------

// Scenarios where the two worlds are known to differ, and which side is wrong: the simulator
// (a bug in tests/support/sim_kernel.hpp) or reactor (a bug that only Linux's timing shows).
// Each is still run in both worlds: the side that is right must meet the scenario's expectation,
// and the other must still differ from it, so that a fix fails this test until its entry is
// removed.
enum class Culprit : std::uint8_t { kSimulator, kLibrary };

struct Divergence {
  std::string_view scenario;
  bool level;  // diverges when level-triggered
  bool edge;   // diverges when edge-triggered
  Culprit culprit;
  std::string_view why;
};

// Empty: the one entry it had, a library bug (a linger_timeout shorter than the peer's delayed ACK
// of our FIN reported timed_out because SIOCOUTQ counts the FIN), was fixed in
// Connection::undelivered().
const std::vector<Divergence> kKnownDivergences = {};

const Divergence* known_divergence(std::string_view scenario, bool edge) {
  for (const Divergence& d : kKnownDivergences) {
    if (d.scenario == scenario && (edge ? d.edge : d.level)) return &d;
  }
  return nullptr;
}

// --- the runner ----------------------------------------------------------------------------------

template <class Trigger>
void run_differential(const Scenario& s) {
  constexpr bool kEdge = Trigger::kEdge;
  Observation real;
  Observation simulated;
  Observation replayed;
  std::uint64_t hash = 0;
  std::uint64_t replay_hash = 0;
  {
    RealWorld<Trigger> world(s.behaviour, s.options, s.small_buffers);
    s.script(world);
    real = world.observe();
  }
  {
    SimWorld<Trigger> world(s.behaviour, s.options, s.small_buffers);
    s.script(world);
    simulated = world.observe();
    hash = world.trace_hash();
  }
  {
    SimWorld<Trigger> world(s.behaviour, s.options, s.small_buffers);
    s.script(world);
    replayed = world.observe();
    replay_hash = world.trace_hash();
  }
  const std::string real_text = describe(real, s.peer_bytes_comparable);
  const std::string sim_text = describe(simulated, s.peer_bytes_comparable);
  INFO("real kernel (loopback):\n" << real_text);
  INFO("simulated kernel:\n" << sim_text);
  CHECK(real.stuck.empty());
  CHECK(simulated.stuck.empty());
  {
    INFO("the simulation is a pure function of the script");
    CHECK(replay_hash == hash);
    CHECK(describe(replayed, true) == describe(simulated, true));
  }
  const Divergence* known = known_divergence(s.name, kEdge);
  if (known == nullptr || known->culprit == Culprit::kSimulator) {
    INFO("the real kernel against the scenario's expectation (Linux semantics)");
    s.expect(real, kEdge);
  }
  if (known == nullptr || known->culprit == Culprit::kLibrary) {
    INFO("the simulation against the scenario's expectation (Linux semantics)");
    s.expect(simulated, kEdge);
  }
  if (known != nullptr) {
    INFO("known divergence, listed in kKnownDivergences: " << known->why);
    INFO("the two worlds agree now: the bug was fixed, remove the entry");
    CHECK(sim_text != real_text);
    return;
  }
  CHECK(sim_text == real_text);
  CHECK(same_bytes(simulated, real, s.peer_bytes_comparable));
}

}  // namespace

TEMPLATE_TEST_CASE("loopback TCP and the simulated kernel agree on every scripted scenario",
                   "[simulation][differential]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  for (const Scenario& s : scenarios()) {
    DYNAMIC_SECTION(s.name) {
      run_differential<TestType>(s);
    }
  }
}

TEST_CASE("every known divergence names a scenario and says why", "[simulation][differential]") {
  const auto valid = [](const Divergence& d) {
    return (d.level || d.edge) && !d.why.empty() &&
           std::any_of(scenarios().begin(), scenarios().end(),
                       [&](const Scenario& s) { return s.name == d.scenario; });
  };
  CHECK(std::all_of(kKnownDivergences.begin(), kKnownDivergences.end(), valid));
}
