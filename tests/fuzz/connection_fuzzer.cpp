// Fuzz target: the connection state machine, driven by fuzzed syscall outcomes and handler
// actions. One input sets up a reactor (either trigger mode, small watermarks and limits) with a
// few echo connections on socketpairs, then interleaves: peers writing, reading, half-closing and
// vanishing; run_once; handler actions (partial consume, shutdown, close itself, abort itself,
// close or abort another, pause, resume another, echo later from outside a callback); and, for
// every syscall the reactor makes on a connection's socket, an outcome (EINTR, EAGAIN, short
// transfers, ECONNRESET, EPIPE, ENOMEM from epoll_ctl, ENOTCONN from shutdown, truncated or
// reordered epoll batches). Then faults stop, peers half-close and read, and every connection
// must finish. Invariants (FUZZ_CHECK):
//   - no callback after on_close, and on_close exactly once per connection;
//   - input: the handler consumed a prefix of what its peer sent (all of it when nothing was
//     dropped on purpose);
//   - echo output equals input: the bytes send() accepted are a prefix of the bytes consumed,
//     and the peer received a prefix of them — all of them unless on_close names an error or the
//     connection was aborted (a send() that returned false may have written a prefix of its
//     bytes first; then on_close names the error);
//   - every on_close reason is explained for that connection: an errno injected on its own fd
//     while it was open, a limit its own traffic crossed (a refused send past
//     max_pending_output, a partial frame past max_pending_input), or a named consequence of
//     what its peer did (ECONNRESET/EPIPE after it vanished; kPeerHangup, level mode only, after
//     it half-closed or vanished) — no global allow-list;
//   - every socket the reactor owned is closed at the end.
// REACTOR_FUZZ_STATS=1 prints, at exit, how often the paths the seed corpus must reach were
// reached (corpus/README.md says which seed reaches which).
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <reactor.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "fault_syscalls.hpp"
#include "fuzz_input.hpp"

// Outside the syscall contract (syscalls.hpp): in edge mode an EAGAIN from read after bytes were
// read in the same wakeup means "drained", so spurious EAGAIN is injected on edge-mode reads only
// with REACTOR_FUZZ_EDGE_READ_EAGAIN=1 (level mode always gets it; writes get it in both modes).
// The handler reads the bytes given to on_data after closing, aborting or a failed send (they must
// stay valid until on_data returns); REACTOR_FUZZ_BYTES_AFTER_CLOSE=0 makes it copy them first.
#ifndef REACTOR_FUZZ_EDGE_READ_EAGAIN
#define REACTOR_FUZZ_EDGE_READ_EAGAIN 0
#endif
#ifndef REACTOR_FUZZ_BYTES_AFTER_CLOSE
#define REACTOR_FUZZ_BYTES_AFTER_CLOSE 1
#endif

namespace {

using test::Call;
using test::Outcome;

// How often each path the seed corpus promises was reached (REACTOR_FUZZ_STATS=1).
struct Stats {
  std::size_t output_limit = 0;        // on_close: Error::kOutputLimit
  std::size_t input_limit = 0;         // on_close: Error::kInputLimit
  std::size_t fin_after_flush = 0;     // shutdown(SHUT_WR) once output queued at shutdown() drained
  std::size_t shutdown_enotconn = 0;   // on_close: ENOTCONN injected on shutdown(2)
  std::size_t edge_rearm_failure = 0;  // edge mode: EPOLL_CTL_MOD after a write's EAGAIN failed
  std::size_t injected_close = 0;      // on_close: any injected errno
  std::size_t peer_consequence = 0;    // on_close: ECONNRESET/EPIPE/kPeerHangup from the peer
  std::size_t enomem_registration = 0;  // adopt() refused by an injected epoll_ctl ENOMEM
  ~Stats() {
    if (std::getenv("REACTOR_FUZZ_STATS") == nullptr) return;
    std::fprintf(stderr,
                 "connection_fuzzer output_limit=%zu input_limit=%zu fin_after_flush=%zu "
                 "shutdown_enotconn=%zu edge_rearm_failure=%zu injected_close=%zu "
                 "peer_consequence=%zu enomem_registration=%zu\n",
                 output_limit, input_limit, fin_after_flush, shutdown_enotconn, edge_rearm_failure,
                 injected_close, peer_consequence, enomem_registration);
  }
};
Stats stats;

// What the harness knows about one connection; outlives it.
struct Track {
  std::string peer_sent;  // bytes the peer's kernel accepted, in order
  std::string in;         // bytes the handler consumed, in order
  std::string out;        // bytes send() accepted, in order
  std::string deferred;   // consumed, to be echoed later from outside any callback
  // The bytes of the first send() that returned false. A refused send may still have written a
  // prefix of them directly before failing (then closing the connection with the reason), so
  // the peer may receive out + a prefix of refused.
  std::string refused;
  std::string peer_received;   // bytes the peer read
  void* connection = nullptr;  // the Connection while on_close has not run
  int server_fd = -1;
  int closes = 0;
  int late_calls = 0;
  bool input_dropped = false;  // close/abort, or a partial frame left behind: input may be cut
  bool aborted = false;        // pending output may have been dropped
  bool user_paused = false;
  bool peer_shut = false;
  bool peer_gone = false;
  bool peer_eof = false;
  int peer_error = 0;
  std::error_code reason;
  std::vector<int> injected;           // fatal errnos injected on its fd while it was open
  bool output_limit_possible = false;  // a send was refused with pending + size past the cap
  bool input_limit_possible = false;   // on_data left more than max_pending_input unconsumed
  bool shutdown_with_output = false;   // shutdown() was asked while output was pending
  bool write_eagain = false;           // the last write on its fd got an injected EAGAIN

  void echo(bool accepted, std::string_view bytes) {
    if (accepted) {
      out.append(bytes);
    } else if (refused.empty() && !bytes.empty()) {
      refused.assign(bytes);
    }
  }
};

// The byte a peer sends at `offset` on connection `index`.
char peer_byte(std::size_t index, std::size_t offset) {
  return static_cast<char>((offset * 7 + index * 13 + (offset >> 9)) & 0xff);
}

template <class Trigger>
class Harness {
 public:
  using Loop = reactor::Reactor<Trigger, test::FaultSyscalls>;

  struct Handler {
    Harness* harness;
    std::size_t index;

    std::size_t on_data(auto& connection, std::string_view bytes) {
      return harness->on_data(connection, index, bytes);
    }
    void on_drain(auto& connection) { harness->check_alive(connection, index); }
    void on_close(auto& connection, std::error_code reason) {
      Track& track = harness->tracks_[index];
      if (connection.is_open() || track.closes > 0) ++track.late_calls;
      ++track.closes;
      track.reason = reason;
      track.connection = nullptr;
    }
  };
  using Conn = reactor::Connection<Handler, Loop>;

  explicit Harness(fuzz::FuzzInput& input) : input_(input) {}

  void run() {
    test::FaultScript script;
    script.choose([this](Call call, int fd) { return choose(call, fd); });
    script.rewrite_batches([this](std::span<epoll_event> batch) { reorder(batch); });

    reactor::ReactorOptions reactor_options;
    reactor_options.read_buffer_size = 1024 * (1 + input_.below(8));
    reactor_options.max_reads_per_wakeup = 1 + static_cast<int>(input_.below(4));
    reactor_options.initial_events = 1 + static_cast<int>(input_.below(4));
    reactor::ConnectionOptions options;
    options.high_water = 1024 * (1 + input_.below(64));
    options.low_water = options.high_water / (1 + input_.below(4));
    options.max_pending_output = options.high_water * (1 + input_.below(16));
    options.max_pending_input = 1024 * (1 + input_.below(16));
    max_input_ = options.max_pending_input;
    max_output_ = std::max(options.max_pending_output, options.high_water);
    if (input_.flag()) options.linger_timeout = std::chrono::milliseconds(0);
    const std::size_t count = 1 + input_.below(4);

    {
      Loop loop(reactor_options);
      loop_ = &loop;
      tracks_.resize(count);
      peers_.resize(count);
      faults_on_ = true;
      for (std::size_t i = 0; i < count; ++i) open(i, options);
      for (int steps = 0; !input_.empty() && steps < 2000; ++steps) step();
      faults_on_ = false;
      drain();
      check_all();
      loop_ = nullptr;
    }  // the reactor would abort what is left; check_all() already proved nothing is
    for (auto& peer : peers_) peer.reset();
    for (const Track& track : tracks_) {
      if (track.server_fd >= 0) {
        FUZZ_CHECK(::fcntl(track.server_fd, F_GETFD) == -1 && errno == EBADF);
      }
    }
  }

 private:
  // --- setup ---------------------------------------------------------------------------------

  void open(std::size_t i, const reactor::ConnectionOptions& options) {
    int fds[2];
    FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0);
    peers_[i].reset(fds[1]);
    tracks_[i].server_fd = fds[0];
    std::error_code ec;
    opening_fd_ = fds[0];  // faults apply to its registration too
    Conn* connection =
        reactor::adopt(*loop_, reactor::UniqueFd(fds[0]), Handler{this, i}, options, ec);
    opening_fd_ = -1;
    const bool refused = std::exchange(opening_enomem_, false);
    if (connection == nullptr) {  // only an injected epoll_ctl failure can do this
      FUZZ_CHECK(ec == std::errc::not_enough_memory && refused);
      ++stats.enomem_registration;
      tracks_[i].closes = 1;  // never opened: nothing to close
      tracks_[i].reason = ec;
      tracks_[i].injected.push_back(ENOMEM);
      tracks_[i].peer_gone = true;
      return;
    }
    tracks_[i].connection = connection;
  }

  // --- syscall outcomes ------------------------------------------------------------------------

  // The open connection whose socket is `fd` (its number may have been reused by a newer one).
  Track* track_of(int fd) {
    for (std::size_t i = 0; i < tracks_.size(); ++i) {
      if (Conn* c = connection(i); c != nullptr && c->native_handle() == fd) return &tracks_[i];
    }
    return nullptr;
  }

  // A fatal errno for `t`'s fd, remembered as one its on_close may report.
  Outcome inject(Track* t, int error) {
    if (t != nullptr) t->injected.push_back(error);
    return test::fail(error);
  }

  Outcome choose(Call call, int fd) {
    if (!faults_on_) return test::pass();
    const bool edge_eagain =
        !Trigger::kEdge || REACTOR_FUZZ_EDGE_READ_EAGAIN || call != Call::kRead;
    switch (call) {
      case Call::kEpollWait: {
        const std::uint8_t b = input_.byte();
        if (b < 40) return test::at_most(1 + input_.below(3));
        if (b < 55) return test::fail(EINTR);
        return test::pass();
      }
      case Call::kRead:
      case Call::kSend:
      case Call::kSendmsg: {
        Track* t = track_of(fd);
        if (t == nullptr) return test::pass();
        const bool write = call != Call::kRead;
        if (write) t->write_eagain = false;
        const std::uint8_t b = input_.byte();
        if (b < 60) return test::at_most(1 + input_.below(4096));
        if (b < 75) return test::fail(EINTR);
        if (b < 90 && edge_eagain) {
          if (write) t->write_eagain = true;
          return test::fail(EAGAIN);
        }
        if (b == 255) return inject(t, write ? EPIPE : ECONNRESET);
        return test::pass();
      }
      case Call::kEpollCtl: {
        Track* t = track_of(fd);
        if ((t == nullptr && fd != opening_fd_) || input_.byte() != 255) return test::pass();
        if (t == nullptr) opening_enomem_ = true;
        if (t != nullptr && Trigger::kEdge && t->write_eagain) ++stats.edge_rearm_failure;
        return inject(t, ENOMEM);
      }
      case Call::kShutdown: {
        Track* t = track_of(fd);
        if (t == nullptr) return test::pass();
        if (t->shutdown_with_output && connection_of(*t)->pending_output_bytes() == 0) {
          ++stats.fin_after_flush;
        }
        if (input_.byte() == 255) return inject(t, ENOTCONN);
        return test::pass();
      }
      default:
        return test::pass();
    }
  }

  void reorder(std::span<epoll_event> batch) {
    if (!faults_on_ || batch.size() < 2) return;
    const std::uint8_t b = input_.byte();
    if (b < 64) {
      std::reverse(batch.begin(), batch.end());
    } else if (b < 128) {
      std::rotate(batch.begin(), batch.begin() + static_cast<std::ptrdiff_t>(b % batch.size()),
                  batch.end());
    }
  }

  // --- handler ---------------------------------------------------------------------------------

  template <class C>
  void check_alive(C& connection, std::size_t index) {
    if (!connection.is_open() || tracks_[index].closes > 0) ++tracks_[index].late_calls;
  }

  template <class C>
  std::size_t on_data(C& connection, std::size_t index, std::string_view bytes) {
    Track& track = tracks_[index];
    check_alive(connection, index);
    const std::uint8_t action = faults_on_ ? input_.byte() : 0;
    std::size_t consumed = bytes.size();
    if (action % 16 == 1) {  // leave a partial frame for the next call
      consumed = input_.below(bytes.size() + 1);
      if (consumed < bytes.size()) track.input_dropped = true;  // EOF may cut it off
      if (bytes.size() - consumed > max_input_) track.input_limit_possible = true;
    }
#if REACTOR_FUZZ_BYTES_AFTER_CLOSE
    const std::string_view taken = bytes.substr(0, consumed);
#else
    const std::string taken(bytes.substr(0, consumed));
#endif
    track.in.append(taken);
    if (action % 16 == 9 || !track.deferred.empty()) {
      track.deferred.append(taken);  // echoed later, in order, by send_deferred()
    } else {
      send(index, connection, taken);
    }
    switch (action % 16) {
      case 2:
        shutdown_connection(index);
        break;
      case 3:
        track.input_dropped = true;
        connection.close();
        break;
      case 4:
        abort_connection(index);
        break;
      case 5:
        close_connection(input_.below(tracks_.size()));
        break;
      case 6:
        abort_connection(input_.below(tracks_.size()));
        break;
      case 7:
        track.user_paused = true;
        connection.pause_reading();
        break;
      case 8:
        resume_connection(input_.below(tracks_.size()));
        break;
      default:
        break;
    }
    return consumed;
  }

  Conn* connection(std::size_t i) {
    return static_cast<Conn*>(tracks_[i].connection);
  }
  Conn* connection_of(const Track& t) {
    return static_cast<Conn*>(t.connection);
  }

  // Echoes `bytes`; a refusal with pending output plus these bytes past the cap may be the
  // output limit.
  template <class C>
  void send(std::size_t i, C& c, std::string_view bytes) {
    Track& track = tracks_[i];
    const std::size_t pending = c.pending_output_bytes();
    const bool accepted = c.send(bytes);
    if (!accepted && pending + bytes.size() > max_output_) track.output_limit_possible = true;
    track.echo(accepted, bytes);
  }

  void shutdown_connection(std::size_t i) {
    if (Conn* c = connection(i)) {
      if (c->pending_output_bytes() > 0) tracks_[i].shutdown_with_output = true;
      c->shutdown();
    }
  }

  void close_connection(std::size_t i) {
    if (Conn* c = connection(i)) {
      tracks_[i].input_dropped = true;
      c->close();
    }
  }
  void abort_connection(std::size_t i) {
    if (Conn* c = connection(i)) {
      tracks_[i].input_dropped = true;
      tracks_[i].aborted = true;
      c->abort(input_.flag());
    }
  }
  // Echoes what a handler deferred, from outside any callback. Once a send is refused the
  // connection is closing or closed, and every later send is refused too, so `out` stays a
  // prefix of `in`.
  void send_deferred(std::size_t i) {
    Track& track = tracks_[i];
    if (Conn* c = connection(i); c != nullptr && !track.deferred.empty()) {
      const std::string bytes = std::exchange(track.deferred, {});
      send(i, *c, bytes);
    }
  }
  void resume_connection(std::size_t i) {
    if (Conn* c = connection(i)) {
      tracks_[i].user_paused = false;
      c->resume_reading();
    }
  }

  // --- the peers -------------------------------------------------------------------------------

  void peer_write(std::size_t i, std::size_t size) {
    Track& track = tracks_[i];
    if (track.peer_gone || track.peer_shut) return;
    std::string bytes(size, '\0');
    for (std::size_t k = 0; k < size; ++k) bytes[k] = peer_byte(i, track.peer_sent.size() + k);
    const ssize_t n = ::send(peers_[i].get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n > 0) track.peer_sent.append(bytes.data(), static_cast<std::size_t>(n));
  }

  void peer_read(std::size_t i, std::size_t limit) {
    Track& track = tracks_[i];
    if (track.peer_gone) return;
    char buffer[16384];
    while (limit > 0 && !track.peer_eof && track.peer_error == 0) {
      const ssize_t n = ::read(peers_[i].get(), buffer, std::min(limit, sizeof buffer));
      if (n > 0) {
        track.peer_received.append(buffer, static_cast<std::size_t>(n));
        limit -= static_cast<std::size_t>(n);
      } else if (n == 0) {
        track.peer_eof = true;
      } else {
        if (errno != EAGAIN && errno != EINTR) track.peer_error = errno;
        break;
      }
    }
  }

  void step() {
    const std::size_t i = input_.below(tracks_.size());
    switch (input_.below(12)) {
      case 0:
      case 1:
      case 2:
        peer_write(i, 1 + input_.below(9000));
        break;
      case 3:
      case 4:
        peer_read(i, 1 + input_.below(40000));
        break;
      case 5:
      case 6:
      case 7:
        loop_->run_once(std::chrono::milliseconds(0));
        break;
      case 8:
        if (!tracks_[i].peer_gone && !tracks_[i].peer_shut && input_.below(4) == 0) {
          ::shutdown(peers_[i].get(), SHUT_WR);
          tracks_[i].peer_shut = true;
        }
        break;
      case 9:
        if (!tracks_[i].peer_gone && input_.below(16) == 0) {
          peers_[i].reset();  // vanishes, unread bytes and all
          tracks_[i].peer_gone = true;
        }
        break;
      case 10:
        switch (input_.below(5)) {
          case 0:
            close_connection(i);
            break;
          case 1:
            abort_connection(i);
            break;
          case 2:
            shutdown_connection(i);
            break;
          case 3:
            if (Conn* c = connection(i)) {
              tracks_[i].user_paused = true;
              c->pause_reading();
            }
            break;
          default:
            resume_connection(i);
            break;
        }
        break;
      default:
        send_deferred(i);
        break;
    }
  }

  // --- the end -----------------------------------------------------------------------------------

  // No more faults: every paused connection resumes, every peer half-closes and reads until EOF.
  void drain() {
    for (std::size_t i = 0; i < tracks_.size(); ++i) {
      send_deferred(i);
      resume_connection(i);
      if (!tracks_[i].peer_gone && !tracks_[i].peer_shut) {
        ::shutdown(peers_[i].get(), SHUT_WR);
        tracks_[i].peer_shut = true;
      }
    }
    for (int round = 0; round < 20000; ++round) {
      loop_->run_once(std::chrono::milliseconds(0));
      bool done = true;
      for (std::size_t i = 0; i < tracks_.size(); ++i) {
        peer_read(i, SIZE_MAX);
        const Track& t = tracks_[i];
        done = done && t.closes > 0 && (t.peer_gone || t.peer_eof || t.peer_error != 0);
      }
      if (done) return;
    }
  }

  static bool is_prefix(std::string_view prefix, std::string_view of) {
    return prefix.size() <= of.size() && of.substr(0, prefix.size()) == prefix;
  }

  // REACTOR_FUZZ_VERBOSE=1 in the environment prints each connection's story before the checks.
  void dump() const {
    static const bool verbose = std::getenv("REACTOR_FUZZ_VERBOSE") != nullptr;
    if (!verbose) return;
    std::fprintf(stderr, "%s, %zu connections open\n", Trigger::kEdge ? "edge" : "level",
                 loop_->connection_count());
    for (std::size_t i = 0; i < tracks_.size(); ++i) {
      const Track& t = tracks_[i];
      const auto differs = [](std::string_view a, std::string_view b) {
        const std::size_t n = std::min(a.size(), b.size());
        return static_cast<long>(std::mismatch(a.begin(), a.begin() + n, b.begin()).first -
                                 a.begin());
      };
      std::fprintf(stderr,
                   "  #%zu closes=%d late=%d reason='%s' peer_sent=%zu in=%zu out=%zu "
                   "deferred=%zu peer_received=%zu (received/out differ at %ld) dropped=%d "
                   "aborted=%d paused=%d peer_shut=%d gone=%d eof=%d error=%d\n",
                   i, t.closes, t.late_calls, t.reason.message().c_str(), t.peer_sent.size(),
                   t.in.size(), t.out.size(), t.deferred.size(), t.peer_received.size(),
                   differs(t.peer_received, t.out), t.input_dropped, t.aborted, t.user_paused,
                   t.peer_shut, t.peer_gone, t.peer_eof, t.peer_error);
    }
  }

  // Whether `reason` is explained for this connection (see the top of the file).
  static bool explained(const Track& t, const std::error_code& reason) {
    using reactor::Error;
    if (!reason) return true;
    if (reason == Error::kOutputLimit) return t.output_limit_possible;
    if (reason == Error::kInputLimit) return t.input_limit_possible;
    if (reason == Error::kPeerHangup) return !Trigger::kEdge && (t.peer_shut || t.peer_gone);
    if (reason.category() != std::system_category() &&
        reason.category() != std::generic_category()) {
      return false;
    }
    const int error = reason.value();
    if (std::find(t.injected.begin(), t.injected.end(), error) != t.injected.end()) return true;
    // The peer vanished, unread bytes and all: its socket reset ours.
    return (error == ECONNRESET || error == EPIPE) && t.peer_gone;
  }

  static void count(const Track& t) {
    const std::error_code& r = t.reason;
    if (r == reactor::Error::kOutputLimit) ++stats.output_limit;
    if (r == reactor::Error::kInputLimit) ++stats.input_limit;
    const bool injected =
        r && std::find(t.injected.begin(), t.injected.end(), r.value()) != t.injected.end();
    if (injected) ++stats.injected_close;
    if (injected && r == std::errc::not_connected) ++stats.shutdown_enotconn;
    if (!injected && (r == std::errc::connection_reset || r == std::errc::broken_pipe ||
                      r == reactor::Error::kPeerHangup)) {
      ++stats.peer_consequence;
    }
  }

  void check_all() {
    dump();
    for (const Track& t : tracks_) count(t);
    FUZZ_CHECK(loop_->connection_count() == 0);  // every connection finished
    for (const Track& t : tracks_) {
      FUZZ_CHECK(t.closes == 1);
      FUZZ_CHECK(t.late_calls == 0);
      FUZZ_CHECK(is_prefix(t.in, t.peer_sent));
      FUZZ_CHECK(is_prefix(t.out, t.in));
      if (!t.peer_gone) FUZZ_CHECK(is_prefix(t.peer_received, t.out + t.refused));
      if (!t.peer_gone && t.peer_received.size() > t.out.size()) FUZZ_CHECK(t.reason);
      if (!t.reason && !t.aborted && !t.peer_gone) FUZZ_CHECK(t.peer_received == t.out);
      if (!t.reason && !t.input_dropped && !t.peer_gone) FUZZ_CHECK(t.in == t.peer_sent);
      FUZZ_CHECK(explained(t, t.reason));
    }
  }

  fuzz::FuzzInput& input_;
  Loop* loop_ = nullptr;
  std::vector<Track> tracks_;
  std::vector<reactor::UniqueFd> peers_;
  bool faults_on_ = false;
  int opening_fd_ = -1;
  bool opening_enomem_ = false;
  std::size_t max_input_ = 0;
  std::size_t max_output_ = 0;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::FuzzInput input(data, size);
  if (input.flag()) {
    Harness<reactor::EdgeTriggered>(input).run();
  } else {
    Harness<reactor::LevelTriggered>(input).run();
  }
  return 0;
}
