// Fuzz target: whole scenarios in the simulated world (tests/support/sim_kernel.hpp). One input is
// a script: a reactor (either trigger mode) with an Acceptor, peers that connect, send random
// amounts, stop and resume reading, half-close, close and reset; handler actions (echo, send more,
// leave partial frames, close, abort, shutdown, pause/resume, throw, stop); timers scheduled and
// cancelled from outside and from their own and other callbacks; post()ed tasks and handle sends
// from "other threads" (world actions the simulated kernel runs at chosen virtual times, with the
// loop-thread marker cleared); run_once with timeouts from 0 to minutes of virtual time, run()
// until a stop() from another thread, shutdown(grace) with or without a stop() in the grace, and
// destroying the reactor with connections open. Faults come from a generator seeded by the input:
// EINTR at any call, short transfers, ECONNRESET/EPIPE, ENOMEM from epoll_ctl, accept4's
// EMFILE/ENOBUFS/ECONNABORTED, and a low fd limit. Time is virtual, so an input runs in
// milliseconds however long its timeouts, and the same input gives the same run (trace hash).
//
// Promises checked after every step (FUZZ_CHECK aborts, with the simulator's last calls):
//   - on_data sees exactly the peer's bytes in order, from the first unconsumed one;
//   - the peer receives a prefix of what send() accepted (plus at most the refused send that
//     failed mid-write), and by the end all of it when on_close reported no error and the peer
//     neither closed nor reset;
//   - on_open first and once, on_close exactly once and last, no hook after it, on_eof at most
//     once and only after the peer half-closed or went away;
//   - a handle to a closed connection reports not_connected;
//   - timers never fire early, nor more than 1 ms late (simulated time passes only while the loop
//     waits); a one-shot timer due before an iteration began has fired when that iteration
//     returns; a cancelled timer never fires; pending_timers() matches the model;
//   - posted tasks run once each, in order;
//   - the loop never spins (the simulator counts epoll_wait calls at one virtual instant with
//     nothing moving) and never blocks forever while a timer is pending (a lost timer);
//   - shutdown(grace) returns by its deadline (by the stop() when one came during the grace), with
//     no connection left and a report that counts each connection once by how it ended;
//   - connection_count() matches the model; no fd is left open once the reactor is gone.
// Replay a failure: build/dev/tests/fuzz/sim_fuzzer_replay <input> (REACTOR_SIM_TRACE=1 prints
// every simulated call); a seed of the fixed-seed run: build/dev/tests/fuzz/sim_scenarios --seed N.
#include <reactor.hpp>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "fuzz_input.hpp"
#include "sim_kernel.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr std::size_t kNoTrack = static_cast<std::size_t>(-1);
constexpr std::size_t kMaxTracks = 12;
constexpr std::size_t kMaxTimers = 40;
constexpr int kMaxSteps = 400;

char peer_byte(std::size_t track, std::size_t offset) {
  return static_cast<char>((offset * 131 + track * 17 + (offset >> 8)) & 0xff);
}
std::string peer_bytes(std::size_t track, std::size_t from, std::size_t n) {
  std::string bytes(n, '\0');
  for (std::size_t i = 0; i < n; ++i) bytes[i] = peer_byte(track, from + i);
  return bytes;
}

// xorshift64*: the fault generator, seeded from the input.
struct Random {
  std::uint64_t state;
  std::uint64_t next() {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1DULL;
  }
  std::size_t below(std::size_t bound) { return static_cast<std::size_t>(next() % bound); }
};

// How often each path was reached (REACTOR_FUZZ_STATS=1 prints them at exit).
// clang-format off
#define SIM_FUZZ_STATS(X) \
  X(scenarios) X(opened) X(bytes_in) X(bytes_out) X(eofs) X(drains) X(timers_fired) \
  X(closed_clean) X(closed_timed_out) X(closed_reset) X(closed_pipe) X(closed_canceled) \
  X(closed_handler_exception) X(closed_output_limit) X(closed_input_limit) X(closed_hangup) \
  X(closed_other) X(shutdowns) X(shutdown_stopped) X(runs_until_stop) X(destroyed) \
  X(world_actions) X(handle_sends_outside) X(posts) X(signals)
// clang-format on
struct Stats {
#define SIM_FUZZ_FIELD(name) std::size_t name = 0;
  SIM_FUZZ_STATS(SIM_FUZZ_FIELD)
#undef SIM_FUZZ_FIELD
  ~Stats() {
    if (std::getenv("REACTOR_FUZZ_STATS") == nullptr) return;
#define SIM_FUZZ_PRINT(name) std::fprintf(stderr, "sim_fuzzer %-26s %zu\n", #name, name);
    SIM_FUZZ_STATS(SIM_FUZZ_PRINT)
#undef SIM_FUZZ_PRINT
  }
};
Stats stats;

void count_reason(std::error_code reason) {
  if (!reason) {
    ++stats.closed_clean;
  } else if (reason == std::errc::timed_out) {
    ++stats.closed_timed_out;
  } else if (reason == std::errc::connection_reset) {
    ++stats.closed_reset;
  } else if (reason == std::errc::broken_pipe) {
    ++stats.closed_pipe;
  } else if (reason == std::errc::operation_canceled) {
    ++stats.closed_canceled;
  } else if (reason == reactor::Error::kHandlerException) {
    ++stats.closed_handler_exception;
  } else if (reason == reactor::Error::kOutputLimit) {
    ++stats.closed_output_limit;
  } else if (reason == reactor::Error::kInputLimit) {
    ++stats.closed_input_limit;
  } else if (reason == reactor::Error::kPeerHangup) {
    ++stats.closed_hangup;
  } else {
    ++stats.closed_other;
  }
}

template <class Trigger>
class Scenario {
 public:
  using Loop = reactor::Reactor<Trigger, sim::SimSyscalls>;
  struct Handler;
  using Conn = reactor::Connection<Handler, Loop>;
  using Acceptor = reactor::Acceptor<Handler, Loop>;
  using Handle = reactor::ConnectionHandle<Loop>;

  struct Handler {
    Scenario* s;
    std::size_t index;
    void on_open(Conn& c) { s->on_open(c, *this); }
    std::size_t on_data(Conn& c, std::string_view bytes) { return s->on_data(c, index, bytes); }
    void on_drain(Conn& c) { s->on_drain(c, index); }
    void on_eof(Conn& c) { s->on_eof(c, index); }
    void on_close(Conn& c, std::error_code reason) { s->on_close(c, index, reason); }
  };

  // SIGTERM through a SignalSet (signalfd): stops the loop, as echo_server's handler does.
  struct OnSignal {
    Scenario* s;
    void operator()(int signo) { s->on_signal(signo); }
  };
  using Signals = reactor::SignalSet<OnSignal, Loop>;

  struct Track {
    sim::PeerId peer = 0;
    Conn* conn = nullptr;  // from on_open until on_close
    Handle handle;
    bool had_handle = false;
    int fd = -1;
    int opens = 0, closes = 0, eofs = 0;
    std::error_code reason;
    std::size_t consumed = 0;  // peer bytes on_data consumed
    std::size_t sent = 0;      // peer bytes the peer's kernel accepted
    std::string accepted;      // bytes send() accepted, in order
    std::string refused;       // the first send() refused (it may have been written in part)
    std::size_t received = 0;  // bytes of `accepted` (+ refused) the peer has read
    bool peer_reading = true, peer_shut = false, peer_gone = false;  // gone: closed or reset
    bool peer_eof = false, peer_error = false;
    bool faulted = false;  // a fatal errno was injected on its fd
    bool threw = false;
    bool aborted = false;        // abort() was called: pending output dropped on request
    bool dropped_input = false;  // close()/abort() from on_data: the rest is dropped
    bool paused = false;
    bool handle_checked = false;
    Clock::time_point opened_at{};
    Clock::time_point active_at{};  // last send() accepted, on_data, on_drain or resume
  };

  struct TimerModel {
    reactor::TimerId id;
    Clock::time_point due;
    Clock::duration period{};
    bool pending = true;
    std::uint64_t scheduled_in_run = 0;  // the driver's run_once count when it was scheduled
    bool scheduled_outside = false;
    int fired = 0;
  };

  Scenario(fuzz::FuzzInput& input, sim::Kernel& kernel) : in_(input), kernel_(kernel) {}

  void run() {
    configure();
    {
      auto loop = std::make_unique<Loop>(reactor_options_);
      loop_ = loop.get();
      reactor::ListenOptions listen;
      listen.connection = options_;
      listen.backlog = 1 + static_cast<int>(in_.below(8));
      listen.accept_budget = 1 + static_cast<int>(in_.below(4));
      acceptor_ = std::make_unique<Acceptor>(*loop_, reactor::Endpoint::parse("127.0.0.1:0"),
                                             Handler{this, kNoTrack}, listen);
      port_ = acceptor_->local_endpoint().port();
      if (in_.flag())
        signals_ =
            std::make_unique<Signals>(*loop_, std::initializer_list<int>{SIGTERM}, OnSignal{this});
      faults_on_ = fault_rate_ > 0;
      for (int step = 0; step < kMaxSteps && !in_.empty() && !ended_; ++step) {
        kernel_.external_step();
        this->step();
        after_step();
      }
      faults_on_ = false;
      kernel_.set_fd_limit(1024);
      if (!ended_) drain();
      if (signals_ != nullptr && raised_ > 0) FUZZ_CHECK(handled_ > 0);
      signals_.reset();
      if (loop_ != nullptr) {
        acceptor_.reset();
        loop.reset();  // aborts what is left: on_close for each
        loop_ = nullptr;
      }
      acceptor_.reset();
    }
    final_checks();
  }

 private:
  // --- setup -------------------------------------------------------------------------------------

  void configure() {
    reactor_options_.read_buffer_size = 256 << in_.below(8);
    reactor_options_.max_reads_per_wakeup = 1 + static_cast<int>(in_.below(4));
    reactor_options_.initial_events = 1 + static_cast<int>(in_.below(8));
    options_.high_water = 256 << in_.below(10);
    options_.low_water = options_.high_water / (1 + in_.below(4));
    options_.max_pending_output = options_.high_water * (1 + in_.below(16));
    options_.max_pending_input = 256 << in_.below(8);
    const auto timeout = [this] {
      const std::size_t b = in_.below(8);
      return b < 5 ? milliseconds(0) : milliseconds(1 + in_.below(b == 5 ? 50 : 60000));
    };
    options_.idle_timeout = timeout();
    options_.read_timeout = timeout();
    options_.write_timeout = timeout();
    switch (in_.below(3)) {
      case 0:
        options_.linger_timeout = milliseconds(0);
        break;
      case 1:
        options_.linger_timeout = milliseconds(1 + in_.below(500));
        break;
      default:
        break;
    }
    kernel_.set_stream_capacity(512 << in_.below(8));
    const std::uint8_t rate = in_.byte();
    fault_rate_ = rate < 150 ? 0 : rate - 149;  // out of 1024 calls
    random_.state = 0x9E3779B97F4A7C15ULL ^ (static_cast<std::uint64_t>(in_.u16()) << 17) ^ rate;
    kernel_.set_faults([this](sim::Op op, int fd) { return choose_fault(op, fd); });
  }

  Track* track_of_fd(int fd) {
    for (Track& t : tracks_) {
      if (t.conn != nullptr && t.fd == fd) return &t;
    }
    return nullptr;
  }

  sim::Fault choose_fault(sim::Op op, int fd) {
    if (!faults_on_ || random_.below(1024) >= fault_rate_) return {};
    const std::size_t r = random_.below(100);
    switch (op) {
      case sim::Op::kEpollWait:
        if (r < 50) return {EINTR};
        return {0, 1 + random_.below(3)};
      case sim::Op::kRead:
      case sim::Op::kSend:
      case sim::Op::kSendmsg: {
        Track* t = track_of_fd(fd);
        if (t == nullptr) return r < 50 ? sim::Fault{EINTR} : sim::Fault{};
        if (r < 40) return {EINTR};
        // Edge mode takes a short transfer on TCP for "empty"/"full" and trusts EAGAIN on reads
        // (the syscall contract): those faults are level-mode only.
        if (r < 80 && !Trigger::kEdge) return {0, 1 + random_.below(2048)};
        if (r < 90 && !Trigger::kEdge && op == sim::Op::kRead) return {EAGAIN};
        if (r >= 97) {
          t->faulted = true;
          return {op == sim::Op::kRead ? ECONNRESET : EPIPE};
        }
        return {};
      }
      case sim::Op::kEpollCtl: {
        Track* t = track_of_fd(fd);
        if (t == nullptr || r < 90) return {};
        t->faulted = true;
        return {ENOMEM};
      }
      case sim::Op::kAccept4: {
        static constexpr int kErrors[] = {EINTR, EMFILE, ENOBUFS, ECONNABORTED, EAGAIN};
        if (backoff_faults_ >= 4) return {EINTR};
        ++backoff_faults_;
        return {kErrors[r % 5]};
      }
      case sim::Op::kShutdown: {
        Track* t = track_of_fd(fd);
        if (t == nullptr || r < 80) return {};
        t->faulted = true;
        return {ENOTCONN};
      }
      default:
        return {};
    }
  }

  // --- hooks -------------------------------------------------------------------------------------

  void check_alive(Track& t, Conn& c) { FUZZ_CHECK(t.opens == 1 && t.closes == 0 && t.conn == &c); }

  void on_signal(int signo) {
    FUZZ_CHECK(signo == SIGTERM);
    FUZZ_CHECK(++handled_ <= raised_);  // pending signals coalesce: never more than raised
    ++stats.signals;
    if (in_.flag()) loop_->stop();
  }

  void on_open(Conn& c, Handler& handler) {
    if (handler.index == kNoTrack) {  // accepted: find the peer by the fd the kernel gave it
      for (std::size_t i = 0; i < tracks_.size(); ++i) {
        if (tracks_[i].opens == 0 && kernel_.peer_server_fd(tracks_[i].peer) == c.native_handle()) {
          handler.index = i;
        }
      }
      FUZZ_CHECK(handler.index != kNoTrack);
    }
    Track& t = tracks_[handler.index];
    FUZZ_CHECK(t.opens == 0 && t.closes == 0);
    ++t.opens;
    if (shutting_down_) ++opened_in_shutdown_;  // accepted from the queue of a closing listener
    ++stats.opened;
    t.conn = &c;
    t.fd = c.native_handle();
    t.opened_at = t.active_at = kernel_.now();
    ++open_count_;
    if (in_.below(4) == 0) {
      t.handle = c.handle();
      t.had_handle = true;
    }
    const std::uint8_t b = in_.byte();
    if (b < 20) send(t, c, std::string(1 + in_.below(64), 'g'));
    if (b >= 250) {
      t.threw = true;
      throw std::runtime_error("sim_fuzzer: on_open throws");
    }
  }

  std::size_t on_data(Conn& c, std::size_t index, std::string_view bytes) {
    Track& t = tracks_[index];
    check_alive(t, c);
    FUZZ_CHECK(!t.dropped_input);
    FUZZ_CHECK(!bytes.empty());
    FUZZ_CHECK(t.consumed + bytes.size() <= t.sent);
    FUZZ_CHECK(bytes == peer_bytes(index, t.consumed, bytes.size()));
    t.active_at = kernel_.now();
    stats.bytes_in += bytes.size();
    std::size_t taken = bytes.size();
    const std::uint8_t b = in_.byte();
    if (b < 110) {
      send(t, c, bytes);
    } else if (b < 140) {
      taken = in_.below(bytes.size() + 1);  // leave a partial frame
    } else if (b < 160) {
      send(t, c, std::string(1 + in_.below(4096) * (1 + in_.below(16)), 'o'));
    } else if (b < 170) {
      send(t, c, bytes);
      c.close();
      t.dropped_input = true;
    } else if (b < 174) {
      c.abort(in_.flag());  // drops pending output by request: on_close reports no error
      t.aborted = true;
      t.dropped_input = true;
    } else if (b < 182) {
      send(t, c, bytes);
      c.shutdown();
    } else if (b < 192) {
      c.pause_reading();
      t.paused = true;
      schedule(milliseconds(in_.below(200)), false, false, index);
    } else if (b < 200) {
      schedule(milliseconds(in_.below(100)), in_.below(4) == 0, false, kNoTrack);
    } else if (b < 204) {
      cancel_some();
    } else if (b < 208) {
      t.threw = true;
      t.dropped_input = true;
      throw std::runtime_error("sim_fuzzer: on_data throws");
    } else if (b < 210) {
      loop_->stop();
    } else {
      send(t, c, bytes);
    }
    if (!t.dropped_input) t.consumed += taken;
    return taken;
  }

  void on_drain(Conn& c, std::size_t index) {
    Track& t = tracks_[index];
    check_alive(t, c);
    t.active_at = kernel_.now();
    ++stats.drains;
    const std::uint8_t b = in_.byte();
    if (b < 30) send(t, c, std::string(1 + in_.below(8192), 'd'));
    if (b >= 30 && b < 40) c.close();
  }

  void on_eof(Conn& c, std::size_t index) {
    Track& t = tracks_[index];
    check_alive(t, c);
    FUZZ_CHECK(++t.eofs == 1);
    ++stats.eofs;
    FUZZ_CHECK(t.peer_shut || t.peer_gone);
    const std::uint8_t b = in_.byte();
    if (b < 40) send(t, c, std::string(1 + in_.below(512), 'e'));
    if (b >= 40 && b < 60) c.close();
  }

  void on_close(Conn& c, std::size_t index, std::error_code reason) {
    Track& t = tracks_[index];
    FUZZ_CHECK(t.opens == 1 && t.closes == 0 && t.conn == &c);
    ++t.closes;
    t.reason = reason;
    t.conn = nullptr;
    --open_count_;
    count_reason(reason);
    if (reason ==
        std::errc::timed_out) {  // never before the shortest timeout (or linger) could pass
      FUZZ_CHECK(kernel_.now() - t.opened_at >= shortest_timeout());
    }
    if (shutting_down_) {
      if (!reason) {
        ++closed_flushed_;
      } else if (reason == std::errc::operation_canceled) {
        ++closed_aborted_;
      } else {
        ++closed_failed_;
      }
    }
  }

  bool send(Track& t, Conn& c, std::string_view bytes) {
    const bool ok = c.send(bytes);
    if (ok) {
      FUZZ_CHECK(t.refused.empty());  // nothing is accepted after a refusal
      t.accepted.append(bytes);
      t.active_at = kernel_.now();
    } else if (t.refused.empty()) {
      t.refused.assign(bytes);
      if (t.refused.empty()) t.refused.push_back('\0');  // remember that one was refused
    }
    return ok;
  }

  // --- timers and posted work -------------------------------------------------------------------

  std::size_t pending_model_timers() const {
    return static_cast<std::size_t>(std::count_if(timers_.begin(), timers_.end(),
                                                  [](const TimerModel& m) { return m.pending; }));
  }

  void schedule(milliseconds delay, bool periodic, bool outside, std::size_t resume_track) {
    if (timers_.size() >= kMaxTimers) return;
    const std::size_t index = timers_.size();
    timers_.push_back({});
    TimerModel& m = timers_.back();
    m.scheduled_in_run = runs_;
    m.scheduled_outside = outside;
    const auto callback = [this, index, resume_track] { fire(index, resume_track); };
    m.due = kernel_.now() + delay;
    try {
      if (periodic) {
        m.period = std::max<Clock::duration>(delay, std::chrono::microseconds(1));
        m.due = kernel_.now() + m.period;
        m.id = loop_->schedule_every(delay, callback);
      } else {
        m.id = loop_->schedule_after(delay, callback);
      }
    } catch (const std::system_error& e) {  // the first timer's timerfd: EMFILE under a low limit
      FUZZ_CHECK(e.code() == std::errc::too_many_files_open);
      timers_.pop_back();
    }
  }

  void fire(std::size_t index, std::size_t resume_track) {
    TimerModel& m = timers_[index];
    FUZZ_CHECK(m.pending);
    FUZZ_CHECK(kernel_.now() >= m.due);  // never early
    // Never late either: simulated time passes only while the loop waits in epoll_wait, and the
    // timerfd must end that wait at the deadline (1 ms: the rounding of epoll_wait's timeout,
    // should the reactor fall back to it).
    if (kernel_.now() > m.due + milliseconds(1)) {
      std::fprintf(stderr, "sim_fuzzer: a timer due at %lld ns ran at %lld ns\n",
                   static_cast<long long>(m.due.time_since_epoch().count()),
                   static_cast<long long>(kernel_.now().time_since_epoch().count()));
      FUZZ_CHECK(!"timer late");
    }
    ++m.fired;
    if (m.period == Clock::duration::zero()) {
      m.pending = false;
    } else {
      m.due += m.period;  // a lower bound of the next run: periods missed are skipped
    }
    if (resume_track != kNoTrack) {
      Track& t = tracks_[resume_track];
      if (t.conn != nullptr && t.paused) {
        t.paused = false;
        t.active_at = kernel_.now();
        t.conn->resume_reading();
      }
    }
    ++stats.timers_fired;
    const std::uint8_t b = in_.byte();
    if (b < 20) {
      const bool was_pending = loop_->cancel(m.id);
      FUZZ_CHECK(was_pending == (m.period != Clock::duration::zero()));  // a one-shot has run
      m.pending = false;
    } else if (b < 40) {
      cancel_some();
    } else if (b < 60) {
      schedule(milliseconds(in_.below(300)), false, false, kNoTrack);
    } else if (b < 80) {
      handle_send_on_loop();
    } else if (b < 84) {
      loop_->stop();
    } else if (b < 88) {
      post_task();
    }
  }

  void cancel_some() {
    if (timers_.empty()) return;
    TimerModel& m = timers_[in_.below(timers_.size())];
    const bool was_pending = loop_->cancel(m.id);
    FUZZ_CHECK(was_pending == m.pending);
    m.pending = false;
  }

  void post_task() {
    const std::uint64_t serial = posted_++;
    ++stats.posts;
    loop_->post([this, serial] {
      FUZZ_CHECK(serial == ran_);  // FIFO, once each
      ++ran_;
      if (in_.below(2) == 0) handle_send_on_loop();
    });
  }

  Track* pick_track() {
    if (tracks_.empty()) return nullptr;
    return &tracks_[in_.below(tracks_.size())];
  }

  void handle_send_on_loop() {
    Track* t = pick_track();
    if (t == nullptr || !t->had_handle) return;
    const std::string bytes(1 + in_.below(300), 'h');
    const std::error_code ec = t->handle.send(bytes);
    if (!ec) {
      FUZZ_CHECK(t->conn != nullptr && t->refused.empty());
      t->accepted.append(bytes);
      t->active_at = kernel_.now();
    } else {
      FUZZ_CHECK(ec == std::errc::not_connected);
      if (t->conn != nullptr && t->refused.empty()) t->refused = bytes;
    }
  }

  // A handle goes stale when the socket closes, before on_close runs.
  static bool socket_closed(const Track& t) {
    return t.conn == nullptr || t.conn->state() == reactor::ConnectionState::kClosed;
  }

  // From outside the loop (the driver, or a world action standing for another thread): the handle
  // posts the bytes; a task posted right after learns whether the connection took them (it is
  // still open then exactly when it did).
  void handle_send_outside(std::size_t index) {
    Track& t = tracks_[index];
    if (!t.had_handle) return;
    FUZZ_CHECK(!reactor::detail::running_in_this_thread(loop_));
    const std::string bytes(1 + in_.below(300), 'x');
    ++stats.handle_sends_outside;
    const std::error_code ec = t.handle.send(bytes);
    FUZZ_CHECK(socket_closed(t) ? ec == std::errc::not_connected : !ec);
    if (ec) return;
    const std::uint64_t serial = posted_++;
    loop_->post([this, serial, index, bytes] {
      FUZZ_CHECK(serial == ran_);
      ++ran_;
      Track& tr = tracks_[index];
      if (tr.conn != nullptr && tr.conn->state() == reactor::ConnectionState::kOpen) {
        FUZZ_CHECK(tr.refused.empty());
        tr.accepted.append(bytes);
        tr.active_at = kernel_.now();
      } else if (tr.conn != nullptr && tr.refused.empty()) {
        tr.refused = bytes;
      }
    });
  }

  // --- peers -------------------------------------------------------------------------------------

  void connect() {
    if (tracks_.size() >= kMaxTracks) return;
    if (in_.below(4) == 0) {  // a connected socket handed to adopt()
      const auto [fd, peer] = kernel_.open_connected();
      if (fd < 0) return;
      tracks_.emplace_back();
      const std::size_t index = tracks_.size() - 1;
      tracks_[index].peer = peer;
      std::error_code ec;
      Conn* c = reactor::adopt(*loop_, reactor::BasicUniqueFd<sim::SimSyscalls>(fd),
                               Handler{this, index}, options_, ec);
      if (c == nullptr) {  // registration failed (an injected ENOMEM): no hook ran, fd closed
        FUZZ_CHECK(tracks_[index].opens == 0 && !kernel_.fd_open(fd));
        tracks_[index].peer_gone = true;
        kernel_.peer_close(peer);
      }
      return;
    }
    if (acceptor_ == nullptr || !acceptor_->is_open()) return;
    const auto peer = kernel_.connect(port_);
    if (!peer) return;
    tracks_.emplace_back();
    tracks_.back().peer = *peer;
  }

  void peer_send(Track& t, std::size_t index) {
    if (t.peer_gone || t.peer_shut) return;
    const std::size_t n = in_.below(4) == 0 ? 1 + in_.below(65536) * 4 : 1 + in_.below(2048);
    const ssize_t r = kernel_.peer_send(t.peer, peer_bytes(index, t.sent, n));
    if (r > 0) t.sent += static_cast<std::size_t>(r);
  }

  // The peer reads what is there, checking it against what send() accepted.
  void pump(Track& t) {
    if (t.peer_gone || !t.peer_reading) return;
    while (true) {
      std::string chunk;
      const ssize_t r = kernel_.peer_recv(t.peer, chunk, 1 << 16);
      if (r > 0) {
        const std::size_t n = static_cast<std::size_t>(r);
        FUZZ_CHECK(t.received + n <= t.accepted.size() + t.refused.size());
        for (std::size_t i = 0; i < n; ++i) {
          const std::size_t at = t.received + i;
          const char expected =
              at < t.accepted.size() ? t.accepted[at] : t.refused[at - t.accepted.size()];
          FUZZ_CHECK(chunk[i] == expected);
        }
        t.received += n;
        stats.bytes_out += n;
        continue;
      }
      if (r == 0) t.peer_eof = true;
      if (r < 0 && errno != EAGAIN) t.peer_error = true;
      return;
    }
  }

  void pump_all() {
    for (Track& t : tracks_) pump(t);
  }

  // --- the driver --------------------------------------------------------------------------------

  void step() {
    const std::uint8_t b = in_.byte();
    const std::size_t index = tracks_.empty() ? 0 : in_.below(tracks_.size());
    Track* t = tracks_.empty() ? nullptr : &tracks_[index];
    if (b < 24) {
      connect();
    } else if (b < 70) {
      if (t != nullptr) peer_send(*t, index);
    } else if (b < 86) {
      if (t != nullptr) t->peer_reading = !t->peer_reading;
    } else if (b < 91) {
      if (t != nullptr && !t->peer_gone && !t->peer_shut) {
        t->peer_shut = true;
        kernel_.peer_shutdown(t->peer);
      }
    } else if (b < 95) {
      if (t != nullptr && !t->peer_gone) {
        t->peer_gone = true;
        kernel_.peer_close(t->peer);
      }
    } else if (b < 98) {
      if (t != nullptr && !t->peer_gone) {
        t->peer_gone = true;
        kernel_.peer_reset(t->peer);
      }
    } else if (b < 112) {
      schedule(milliseconds(in_.below(4) == 0 ? in_.below(60000) : in_.below(100)),
               in_.below(5) == 0, true, kNoTrack);
    } else if (b < 118) {
      cancel_some();
    } else if (b < 126) {
      post_task();
    } else if (b < 134) {
      if (t != nullptr) {
        if (in_.below(4) == 0) {
          if (t->had_handle) {
            const std::error_code ec = t->handle.close();
            FUZZ_CHECK(socket_closed(*t) ? ec == std::errc::not_connected : !ec);
          }
        } else {
          handle_send_outside(index);
        }
      }
    } else if (b < 142) {
      world_action(index);
    } else if (b < 146) {
      run_until_stop();
    } else if (b < 149) {
      shutdown();
    } else if (b < 150) {
      destroy();
    } else if (b < 153) {
      kernel_.set_fd_limit(in_.below(2) == 0 ? 1024 : 3 + kernel_.open_fds() + in_.below(3));
    } else {
      const std::uint8_t w = in_.byte();
      const milliseconds timeout(w < 64 ? 0 : w < 192 ? in_.below(50) : in_.below(120000));
      run_once(timeout);
    }
  }

  // Something another thread does at a virtual time: it runs inside the blocked epoll_wait.
  void world_action(std::size_t index) {
    const milliseconds delay(in_.below(300));
    const std::uint8_t what = in_.byte();
    ++stats.world_actions;
    kernel_.after(delay, [this, what, index] {
      if (loop_ == nullptr) return;
      FUZZ_CHECK(!reactor::detail::running_in_this_thread(loop_));
      if (what < 90) {
        post_task();
      } else if (what < 110 && signals_ != nullptr) {
        ++raised_;
        kernel_.raise_signal(SIGTERM);
      } else if (what < 200) {
        if (index < tracks_.size()) handle_send_outside(index);
      } else {
        loop_->stop();
      }
    });
  }

  void run_once(milliseconds timeout) {
    const Clock::time_point before = kernel_.now();
    const std::uint64_t run = runs_++;
    std::error_code ec;
    loop_->run_once(timeout, ec);
    FUZZ_CHECK(!ec);
    check_timers_fired(before, run);
    check_idle_timeouts(before);
  }

  // The shortest of the timeouts and the linger time: nothing times out sooner after open.
  milliseconds shortest_timeout() const {
    milliseconds shortest = milliseconds::max();
    for (const milliseconds m : {options_.idle_timeout, options_.read_timeout,
                                 options_.write_timeout, options_.linger_timeout}) {
      if (m.count() > 0) shortest = std::min(shortest, m);
    }
    return shortest;
  }

  // The idle timeout acts in time: a connection still open (or shutting down) after an iteration
  // that began a whole idle period after its last activity is a missed timeout. Activity is over-
  // estimated (the latest of the socket's last read or write, a send() accepted, on_data, on_drain,
  // a resume), so only a real miss trips this.
  void check_idle_timeouts(Clock::time_point before) {
    if (options_.idle_timeout.count() == 0) return;
    for (Track& t : tracks_) {
      if (t.conn == nullptr) continue;
      const auto state = t.conn->state();
      if (state != reactor::ConnectionState::kOpen &&
          state != reactor::ConnectionState::kShuttingDown) {
        continue;
      }
      const Clock::time_point active = std::max(t.active_at, kernel_.process_io_at(t.peer));
      if (before >= active + options_.idle_timeout) {
        std::fprintf(stderr, "sim_fuzzer: idle since %lld ns, still open at %lld ns\n",
                     static_cast<long long>(active.time_since_epoch().count()),
                     static_cast<long long>(before.time_since_epoch().count()));
        FUZZ_CHECK(!"idle timeout missed");
      }
    }
  }

  // A one-shot timer that was due when an iteration began, scheduled before it, has run by the
  // time that iteration returns.
  void check_timers_fired(Clock::time_point before, std::uint64_t run) {
    for (const TimerModel& m : timers_) {
      if (m.pending && m.period == Clock::duration::zero() && m.due <= before &&
          m.scheduled_in_run <= run) {
        std::fprintf(stderr, "sim_fuzzer: a timer due at %lld ns was not run by %lld ns\n",
                     static_cast<long long>(m.due.time_since_epoch().count()),
                     static_cast<long long>(kernel_.now().time_since_epoch().count()));
        FUZZ_CHECK(!"timer late");
      }
    }
  }

  void run_until_stop() {
    ++stats.runs_until_stop;
    kernel_.after(milliseconds(in_.below(5000)), [this] {
      if (loop_ != nullptr) loop_->stop();
    });
    std::error_code ec;
    loop_->run(ec);
    FUZZ_CHECK(!ec);
  }

  void shutdown() {
    const milliseconds grace(in_.below(4) == 0 ? in_.below(10) : in_.below(30000));
    const milliseconds quiet(in_.below(300));
    const bool stop_during = in_.below(3) == 0;
    ++stats.shutdowns;
    if (stop_during) ++stats.shutdown_stopped;
    const milliseconds stop_at(in_.below(static_cast<std::size_t>(grace.count()) + 1));
    if (stop_during) {
      kernel_.after(stop_at, [this] {
        if (loop_ != nullptr) loop_->stop();
      });
    }
    const std::size_t open = loop_->connection_count();
    FUZZ_CHECK(open == open_count_);
    shutting_down_ = true;
    opened_in_shutdown_ = 0;
    const Clock::time_point start = kernel_.now();
    const reactor::ShutdownReport report = loop_->shutdown(grace, quiet);
    shutting_down_ = false;
    FUZZ_CHECK(!report.error);
    FUZZ_CHECK(loop_->connection_count() == 0);
    FUZZ_CHECK(report.flushed + report.failed + report.aborted == open + opened_in_shutdown_);
    if (report.flushed != closed_flushed_ || report.aborted != closed_aborted_ ||
        report.failed != closed_failed_)
      std::fprintf(stderr, "report %zu/%zu/%zu model %zu/%zu/%zu\n", report.flushed, report.failed,
                   report.aborted, closed_flushed_, closed_failed_, closed_aborted_);
    FUZZ_CHECK(report.flushed == closed_flushed_ && report.aborted == closed_aborted_ &&
               report.failed == closed_failed_);
    const Clock::time_point end = kernel_.now();
    FUZZ_CHECK(end - start <= grace + milliseconds(1));
    if (stop_during) FUZZ_CHECK(end - start <= stop_at + milliseconds(1));
    FUZZ_CHECK(acceptor_ == nullptr || !acceptor_->is_open());
    ended_ = true;
    finish();
  }

  void destroy() {
    ++stats.destroyed;
    acceptor_.reset();
    ended_ = true;
    finish();
  }

  // The end of a scenario that is still running: faults off, every peer reads; peers still
  // connected half-close, so that each connection can finish in an orderly way.
  void drain() {
    for (Track& t : tracks_) t.peer_reading = true;
    for (Track& t : tracks_) {
      if (!t.peer_gone && !t.peer_shut && kernel_.peer_established(t.peer)) {
        t.peer_shut = true;
        kernel_.peer_shutdown(t.peer);
      }
    }
    for (int i = 0; i < 400 && loop_->connection_count() > 0; ++i) {
      kernel_.external_step();
      for (Track& t : tracks_) {
        if (t.conn != nullptr && t.paused) {
          t.paused = false;
          t.active_at = kernel_.now();
          t.conn->resume_reading();
        }
      }
      run_once(milliseconds(1000));
      pump_all();
    }
    finish();
  }

  // Runs what is posted and pending in the world, then hands the peers what is left.
  void finish() {
    faults_on_ = false;
    // The scenario's timers end here (a periodic one may post on every tick); then what was posted
    // and what the world still had planned runs out.
    for (TimerModel& m : timers_) {
      if (m.pending) FUZZ_CHECK(loop_->cancel(m.id));
      m.pending = false;
    }
    for (int i = 0; i < 1000 && (ran_ < posted_ || kernel_.pending_actions() > 0); ++i) {
      kernel_.external_step();
      std::error_code ec;
      loop_->run_once(milliseconds(kernel_.pending_actions() > 0 ? 10000 : 0), ec);
    }
    FUZZ_CHECK(ran_ == posted_);
    // Connections keep their timeouts in timers of their own: compare once they are gone.
    if (loop_->connection_count() == 0) {
      FUZZ_CHECK(loop_->pending_timers() == pending_model_timers());
    }
  }

  void after_step() {
    pump_all();
    if (loop_ != nullptr) FUZZ_CHECK(loop_->connection_count() == open_count_);
    for (Track& t : tracks_) {
      if (t.closes > 0 && t.had_handle && !t.handle_checked) {
        FUZZ_CHECK(t.handle.send("late") == std::errc::not_connected);
        FUZZ_CHECK(t.handle.close() == std::errc::not_connected);
        t.handle_checked = true;
      }
    }
  }

  void final_checks() {
    for (Track& t : tracks_) {
      t.peer_reading = true;
      pump(t);
    }
    FUZZ_CHECK(kernel_.open_fds() == 0);  // the reactor and acceptor are gone: nothing leaked
    for (std::size_t i = 0; i < tracks_.size(); ++i) {
      const Track& t = tracks_[i];
      if (t.opens == 0) continue;
      FUZZ_CHECK(t.closes == 1);
      // Every byte send() accepted reached the peer unless on_close reported an error, abort()
      // dropped it, the peer itself went away (dropping what its kernel held), or lingering was
      // turned off.
      // linger_timeout 0 opts out: the socket closes at once, and an RST may drop the rest.
      if (!t.reason && !t.peer_gone && !t.faulted && !t.threw && !t.aborted &&
          options_.linger_timeout.count() != 0) {
        if (t.received != t.accepted.size()) {
          std::fprintf(stderr,
                       "sim_fuzzer: track %zu (peer %zu, fd %d): peer read %zu of %zu accepted "
                       "bytes; on_close '%s'; peer shut %d eof %d error %d; refused %zu\n",
                       i, t.peer, t.fd, t.received, t.accepted.size(), t.reason.message().c_str(),
                       t.peer_shut, t.peer_eof, t.peer_error, t.refused.size());
        }
        FUZZ_CHECK(t.received == t.accepted.size());
      }
    }
  }

  fuzz::FuzzInput& in_;
  sim::Kernel& kernel_;
  Random random_{1};
  std::size_t fault_rate_ = 0;
  bool faults_on_ = false;
  int backoff_faults_ = 0;
  reactor::ReactorOptions reactor_options_;
  reactor::ConnectionOptions options_;
  Loop* loop_ = nullptr;
  std::unique_ptr<Acceptor> acceptor_;
  std::unique_ptr<Signals> signals_;
  std::size_t raised_ = 0, handled_ = 0;
  std::uint16_t port_ = 0;
  std::deque<Track> tracks_;
  std::vector<TimerModel> timers_;
  std::uint64_t posted_ = 0, ran_ = 0;
  std::uint64_t runs_ = 0;  // run_once calls made by the driver
  std::size_t open_count_ = 0;
  std::size_t opened_in_shutdown_ = 0;
  bool shutting_down_ = false, ended_ = false;
  std::size_t closed_flushed_ = 0, closed_aborted_ = 0, closed_failed_ = 0;
};

}  // namespace

// The trace hash of the last scenario run (for the determinism check of sim_scenarios).
std::uint64_t sim_fuzzer_last_hash = 0;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::FuzzInput input(data, size);
  sim::Kernel kernel;
  kernel.set_spin_limit(2000);
  ++stats.scenarios;
  if (input.flag()) {
    Scenario<reactor::EdgeTriggered>(input, kernel).run();
  } else {
    Scenario<reactor::LevelTriggered>(input, kernel).run();
  }
  sim_fuzzer_last_hash = kernel.trace_hash();
  return 0;
}
