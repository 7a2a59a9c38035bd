// Test-only (not part of reactor): FaultSyscalls, a syscall policy that injects faults, and
// FaultScript, the RAII guard that says which. Use it as `reactor::Reactor<Trigger,
// test::FaultSyscalls>`. Without an installed script every call goes straight to
// reactor::LinuxSyscalls; with one, each call of a scripted kind is counted and takes the first
// queued outcome that matches its fd ("fail with errno E", "transfer at most N bytes", "pass
// through"), then the standing outcome, if any, then the test's own chooser (a fuzz target's
// input, say), then a random outcome drawn from the script's seeded generator, if random faults
// were asked for. epoll_wait batches can also be reordered
// (shuffled, or by a test's own rule) before the reactor sees them. Scripts are thread_local: a
// reactor running on another thread sees none. Modelled on fmt's test/posix-mock.h.
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include <reactor/syscalls.hpp>

namespace test {

// The syscalls a script can target.
enum class Call : std::size_t {
  kEpollWait,
  kEpollCtl,
  kRead,
  kWrite,
  kSend,
  kSendmsg,
  kAccept4,
  kShutdown,
  kClose,
  kSendfile,  // matched by the socket (out_fd); kCap cuts the count
  kPread,     // matched by the file's fd; kCap cuts the size
  // Setup and helper calls: matched by their fd argument where they have one, else any fd (-1).
  kEpollCreate1,
  kEventfd,
  kSignalfd,  // matched by its fd argument: -1 for a new signalfd
  kTimerfdCreate,
  kTimerfdSettime,
  kSigprocmask,
  kSocket,
  kBind,
  kListen,
  kConnect,
  kPoll,  // matched by the first pollfd's fd
  kSetsockopt,
  kGetsockopt,
  kGetsockname,
  kGetpeername,
  kFcntl,
  kUnlink,
  kCount,  // the number of kinds, not a call
};

// What one scripted call does.
struct Outcome {
  // kRandomCap is resolved when the call is made: a kCap with a limit drawn from [1, limit].
  enum class Kind { kPass, kFail, kCap, kRandomCap };
  Kind kind = Kind::kPass;
  int error = 0;          // kFail: the errno, with -1 returned and nothing done
  std::size_t limit = 0;  // kCap: the most bytes moved (epoll_wait: the most events returned)
  int fd = -1;            // only calls on this fd match (epoll_ctl: the target fd); -1: any fd
};

// The call goes to the kernel unchanged (a placeholder in a queue).
inline Outcome pass(int fd = -1) {
  return {Outcome::Kind::kPass, 0, 0, fd};
}
// The call fails with `error` without reaching the kernel.
inline Outcome fail(int error, int fd = -1) {
  return {Outcome::Kind::kFail, error, 0, fd};
}
// The call reaches the kernel with its size cut to `limit` bytes (> 0): a short read or write.
inline Outcome at_most(std::size_t limit, int fd = -1) {
  assert(limit > 0 && "at_most(0) would read as EOF");
  return {Outcome::Kind::kCap, 0, limit, fd};
}

// The call reaches the kernel with its size cut to a random 1..max bytes, drawn per call.
inline Outcome at_most_random(std::size_t max, int fd = -1) {
  assert(max > 0 && "at_most_random(0) would read as EOF");
  return {Outcome::Kind::kRandomCap, 0, max, fd};
}

// One entry of a random fault mix: `outcome` is picked with probability weight / total weight.
struct Weighted {
  Outcome outcome;
  unsigned weight = 1;
};

// Installs a script for the current thread for its lifetime; one at a time.
class FaultScript {
 public:
  // Rewrites a batch epoll_wait returned, before the reactor sees it (reorder it, typically).
  using BatchRewrite = std::function<void(std::span<epoll_event>)>;
  // Picks the outcome of a call of `call` on `fd`; pass() leaves it to the random mix, if any.
  using Chooser = std::function<Outcome(Call call, int fd)>;

  // `seed` drives every random choice (random outcomes, shuffled batches): a failing run is
  // reproduced by its seed.
  explicit FaultScript(std::uint64_t seed = 1) noexcept : random_(seed) {
    assert(active() == nullptr && "one FaultScript per thread at a time");
    active() = this;
  }
  FaultScript(const FaultScript&) = delete;
  FaultScript& operator=(const FaultScript&) = delete;
  ~FaultScript() { active() = nullptr; }

  // Queues `outcome` for the next `times` calls of `call` that match its fd.
  FaultScript& next(Call call, Outcome outcome, int times = 1) {
    for (int i = 0; i < times; ++i) at(call).queue.push_back(outcome);
    return *this;
  }
  // Applies `outcome` to every matching call of `call` once its queue is used up, until clear().
  FaultScript& always(Call call, Outcome outcome) {
    at(call).standing = outcome;
    return *this;
  }
  // Once queue and standing outcome have nothing for a call of `call`, draws its outcome from
  // `mix` (pass() entries included: give them the weight of the calls that should go through).
  // `applies(fd)` limits random faults to some fds (the test's own peers, say, are left alone).
  FaultScript& random(Call call, std::vector<Weighted> mix,
                      std::function<bool(int)> applies = nullptr) {
    at(call).mix = std::move(mix);
    at(call).applies = std::move(applies);
    return *this;
  }
  // Asks `chooser` for the outcome of every call that neither queue nor standing outcome
  // decides (an empty function: no chooser).
  FaultScript& choose(Chooser chooser) {
    chooser_ = std::move(chooser);
    return *this;
  }
  // Drops the queue, the standing outcome and the random mix of `call`: from now on it passes
  // through.
  void clear(Call call) {
    at(call).queue.clear();
    at(call).standing.reset();
    at(call).mix.clear();
    at(call).applies = nullptr;
  }
  // Drops every outcome of every kind (batch rewriting stays): the kernel's own behaviour from
  // now on, with calls still counted.
  void clear_all() {
    for (std::size_t i = 0; i < kinds_.size(); ++i) clear(static_cast<Call>(i));
  }

  // Reorders every non-empty epoll_wait batch at random (the kernel returns ready fds in the
  // order they became ready; nothing may depend on that order).
  FaultScript& shuffle_batches(bool on = true) {
    shuffle_ = on;
    return *this;
  }
  // Applies `rewrite` to every non-empty epoll_wait batch (after shuffling, if that is on too).
  FaultScript& rewrite_batches(BatchRewrite rewrite) {
    rewrite_ = std::move(rewrite);
    return *this;
  }

  // Calls of that kind so far, whatever their outcome.
  std::size_t calls(Call call) const { return at(call).calls; }
  // Calls of that kind that failed or were cut short by the script.
  std::size_t faults(Call call) const { return at(call).faults; }
  // Queued outcomes of that kind not used yet.
  std::size_t pending(Call call) const { return at(call).queue.size(); }

  // The outcome for one call of `call` on `fd`, counted; pass() without a script.
  static Outcome take(Call call, int fd) noexcept {
    FaultScript* script = active();
    if (script == nullptr) return pass();
    PerCall& kind = script->at(call);
    ++kind.calls;
    Outcome outcome = pass();
    const auto matches = [fd](const Outcome& o) { return o.fd < 0 || o.fd == fd; };
    auto it = kind.queue.begin();
    while (it != kind.queue.end() && !matches(*it)) ++it;
    if (it != kind.queue.end()) {
      outcome = *it;
      kind.queue.erase(it);
    } else if (kind.standing && matches(*kind.standing)) {
      outcome = *kind.standing;
    } else {
      if (script->chooser_) outcome = script->chooser_(call, fd);
      if (outcome.kind == Outcome::Kind::kPass && !kind.mix.empty() &&
          (!kind.applies || kind.applies(fd))) {
        outcome = script->draw(kind.mix);
        if (!matches(outcome)) outcome = pass();
      }
    }
    if (outcome.kind == Outcome::Kind::kRandomCap) {
      outcome.limit = std::uniform_int_distribution<std::size_t>(1, outcome.limit)(script->random_);
      outcome.kind = Outcome::Kind::kCap;
    }
    if (outcome.kind != Outcome::Kind::kPass) ++kind.faults;
    if (outcome.kind == Outcome::Kind::kFail) {
      try {
        script->failures_.push_back({call, fd, outcome.error});
      } catch (...) {
        // Out of memory: the log misses one entry.
      }
    }
    return outcome;
  }

  // Applies the shuffle and rewrite asked for to a batch of `count` events; no-op without a script.
  static void reorder(epoll_event* events, int count) noexcept {
    FaultScript* script = active();
    if (script == nullptr || count <= 0) return;
    const std::span<epoll_event> batch(events, static_cast<std::size_t>(count));
    if (script->shuffle_) {
      std::shuffle(batch.begin(), batch.end(), script->random_);
      ++script->shuffled_;
    }
    if (script->rewrite_) script->rewrite_(batch);
  }

  // Non-empty batches shuffled so far.
  std::size_t shuffled_batches() const { return shuffled_; }

  // One failure the script made (a kFail outcome applied to a call).
  struct Failure {
    Call call;
    int fd;
    int error;
  };
  // Every failure made so far, in order: lets a test tie an error it sees to a fault injected on
  // that fd (random mixes included).
  const std::vector<Failure>& failures() const { return failures_; }

  // Makes the next epoll_wait report `events` (EPOLLERR, EPOLLHUP, EPOLLIN...) for `fd`, ORed into
  // the kernel's own entry for it, or as an entry of its own (pointing where the last successful
  // EPOLL_CTL_ADD/MOD of `fd` under this script pointed). That epoll_wait does not block. An
  // injection for an fd not registered under this script stays queued.
  FaultScript& inject_events(int fd, std::uint32_t events) {
    injections_.push_back({fd, events});
    return *this;
  }
  // Injected entries delivered so far.
  std::size_t injected_events() const { return injected_; }
  // Injections still queued.
  std::size_t pending_injections() const { return injections_.size(); }

  // Makes the next getsockopt(fd, SOL_SOCKET, SO_ERROR) succeed reporting `error` (as the kernel
  // does for a socket with a pending error), without asking the kernel.
  FaultScript& socket_error(int fd, int error) {
    socket_errors_[fd] = error;
    return *this;
  }

  // Used by FaultSyscalls: the registrations seen, and the batch hooks.
  static void registered(int op, int fd, const epoll_event* event) noexcept {
    FaultScript* script = active();
    if (script == nullptr) return;
    try {
      if (op == EPOLL_CTL_DEL) {
        script->registrations_.erase(fd);
      } else if (event != nullptr) {
        script->registrations_[fd] = event->data;
      }
    } catch (...) {
      // Out of memory in a test: the fd just cannot be injected into.
    }
  }
  // True when events are queued for injection (the coming epoll_wait should not block).
  static bool injecting() noexcept {
    FaultScript* script = active();
    return script != nullptr && !script->injections_.empty();
  }
  // Merges queued injections into a batch of `count` events (capacity `capacity`); returns the
  // new count.
  static int inject(epoll_event* events, int count, int capacity) noexcept {
    FaultScript* script = active();
    if (script == nullptr || script->injections_.empty()) return count;
    auto& queue = script->injections_;
    for (auto it = queue.begin(); it != queue.end();) {
      const auto registration = script->registrations_.find(it->fd);
      if (registration == script->registrations_.end()) {
        ++it;
        continue;
      }
      bool merged = false;
      for (int i = 0; i < count; ++i) {
        if (events[i].data.u64 == registration->second.u64) {
          events[i].events |= it->events;
          merged = true;
          break;
        }
      }
      if (!merged) {
        if (count == capacity) break;  // the next epoll_wait takes it
        events[count].events = it->events;
        events[count].data = registration->second;
        ++count;
      }
      ++script->injected_;
      it = queue.erase(it);
    }
    return count;
  }
  // The scripted SO_ERROR for `fd`, consumed; nullopt when none is queued.
  static std::optional<int> take_socket_error(int fd) noexcept {
    FaultScript* script = active();
    if (script == nullptr) return std::nullopt;
    const auto it = script->socket_errors_.find(fd);
    if (it == script->socket_errors_.end()) return std::nullopt;
    const int error = it->second;
    script->socket_errors_.erase(it);
    return error;
  }

 private:
  struct PerCall {
    std::deque<Outcome> queue;
    std::optional<Outcome> standing;
    std::vector<Weighted> mix;
    std::function<bool(int)> applies;
    std::size_t calls = 0;
    std::size_t faults = 0;
  };

  Outcome draw(const std::vector<Weighted>& mix) {
    unsigned total = 0;
    for (const Weighted& w : mix) total += w.weight;
    if (total == 0) return pass();
    unsigned pick = std::uniform_int_distribution<unsigned>(0, total - 1)(random_);
    for (const Weighted& w : mix) {
      if (pick < w.weight) return w.outcome;
      pick -= w.weight;
    }
    return pass();
  }

  static FaultScript*& active() noexcept {
    static thread_local FaultScript* script = nullptr;
    return script;
  }
  PerCall& at(Call call) { return kinds_[static_cast<std::size_t>(call)]; }
  const PerCall& at(Call call) const { return kinds_[static_cast<std::size_t>(call)]; }

  std::array<PerCall, static_cast<std::size_t>(Call::kCount)> kinds_;
  std::mt19937_64 random_;
  bool shuffle_ = false;
  BatchRewrite rewrite_;
  Chooser chooser_;
  std::size_t shuffled_ = 0;
  std::vector<Failure> failures_;
  struct Injection {
    int fd;
    std::uint32_t events;
  };
  std::deque<Injection> injections_;
  std::size_t injected_ = 0;
  std::map<int, epoll_data_t> registrations_;
  std::map<int, int> socket_errors_;
};

// The syscall policy: LinuxSyscalls, with every call routed through the current script.
struct FaultSyscalls : reactor::LinuxSyscalls {
  using Base = reactor::LinuxSyscalls;

  static int epoll_wait(int epfd, epoll_event* events, int max_events, int timeout_ms) noexcept {
    const Outcome o = FaultScript::take(Call::kEpollWait, epfd);
    if (o.kind == Outcome::Kind::kFail) return failed(o);
    if (o.kind == Outcome::Kind::kCap) max_events = static_cast<int>(capped(max_events, o));
    const bool injecting = FaultScript::injecting();
    int n = Base::epoll_wait(epfd, events, max_events, injecting ? 0 : timeout_ms);
    if (injecting && n >= 0) n = FaultScript::inject(events, n, max_events);
    FaultScript::reorder(events, n);
    return n;
  }
  static int epoll_ctl(int epfd, int op, int fd, epoll_event* event) noexcept {
    const Outcome o = FaultScript::take(Call::kEpollCtl, fd);
    if (o.kind == Outcome::Kind::kFail) return failed(o);
    const int result = Base::epoll_ctl(epfd, op, fd, event);
    if (result == 0) FaultScript::registered(op, fd, event);
    return result;
  }
  static ssize_t read(int fd, void* buffer, std::size_t size) noexcept {
    const Outcome o = FaultScript::take(Call::kRead, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::read(fd, buffer, capped(size, o));
  }
  static ssize_t write(int fd, const void* buffer, std::size_t size) noexcept {
    const Outcome o = FaultScript::take(Call::kWrite, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::write(fd, buffer, capped(size, o));
  }
  static ssize_t send(int fd, const void* buffer, std::size_t size, int flags) noexcept {
    const Outcome o = FaultScript::take(Call::kSend, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o)
                                          : Base::send(fd, buffer, capped(size, o), flags);
  }
  static ssize_t sendmsg(int fd, const msghdr* message, int flags) noexcept {
    const Outcome o = FaultScript::take(Call::kSendmsg, fd);
    if (o.kind == Outcome::Kind::kFail) return failed(o);
    if (o.kind == Outcome::Kind::kPass) return Base::sendmsg(fd, message, flags);
    // Cut the iovec list to `limit` bytes; the caller's message is left untouched.
    iovec vectors[IOV_MAX];
    std::size_t count = 0;
    for (std::size_t left = o.limit; count < message->msg_iovlen && count < IOV_MAX && left > 0;
         ++count) {
      vectors[count] = message->msg_iov[count];
      if (vectors[count].iov_len > left) vectors[count].iov_len = left;
      left -= vectors[count].iov_len;
    }
    msghdr cut = *message;
    cut.msg_iov = vectors;
    cut.msg_iovlen = count;
    return Base::sendmsg(fd, &cut, flags);
  }
  static int accept4(int fd, sockaddr* address, socklen_t* length, int flags) noexcept {
    const Outcome o = FaultScript::take(Call::kAccept4, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::accept4(fd, address, length, flags);
  }
  static int shutdown(int fd, int how) noexcept {
    const Outcome o = FaultScript::take(Call::kShutdown, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::shutdown(fd, how);
  }
  static ssize_t sendfile(int out_fd, int in_fd, off_t* offset, std::size_t count) noexcept {
    const Outcome o = FaultScript::take(Call::kSendfile, out_fd);
    return o.kind == Outcome::Kind::kFail ? failed(o)
                                          : Base::sendfile(out_fd, in_fd, offset, capped(count, o));
  }
  static ssize_t pread(int fd, void* buffer, std::size_t size, off_t offset) noexcept {
    const Outcome o = FaultScript::take(Call::kPread, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o)
                                          : Base::pread(fd, buffer, capped(size, o), offset);
  }
  // A scripted close failure still closes the fd, as Linux does (close(2): the fd is released
  // before the error is reported), so a retrying caller would close the wrong fd.
  static int close(int fd) noexcept {
    const Outcome o = FaultScript::take(Call::kClose, fd);
    FaultScript::registered(EPOLL_CTL_DEL, fd, nullptr);  // closing leaves every epoll set
    const int result = Base::close(fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : result;
  }

  // Setup and helper calls: a kFail outcome fails them without reaching the kernel (nothing is
  // created), any other outcome passes through.
  static int epoll_create1(int flags) noexcept {
    const Outcome o = FaultScript::take(Call::kEpollCreate1, -1);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::epoll_create1(flags);
  }
  static int eventfd(unsigned initial, int flags) noexcept {
    const Outcome o = FaultScript::take(Call::kEventfd, -1);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::eventfd(initial, flags);
  }
  static int signalfd(int fd, const sigset_t* mask, int flags) noexcept {
    const Outcome o = FaultScript::take(Call::kSignalfd, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::signalfd(fd, mask, flags);
  }
  static int timerfd_create(int clock, int flags) noexcept {
    const Outcome o = FaultScript::take(Call::kTimerfdCreate, -1);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::timerfd_create(clock, flags);
  }
  static int timerfd_settime(int fd, int flags, const itimerspec* value, itimerspec* old) noexcept {
    const Outcome o = FaultScript::take(Call::kTimerfdSettime, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o)
                                          : Base::timerfd_settime(fd, flags, value, old);
  }
  static int sigprocmask(int how, const sigset_t* set, sigset_t* old) noexcept {
    const Outcome o = FaultScript::take(Call::kSigprocmask, -1);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::sigprocmask(how, set, old);
  }
  static int socket(int domain, int type, int protocol) noexcept {
    const Outcome o = FaultScript::take(Call::kSocket, -1);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::socket(domain, type, protocol);
  }
  static int bind(int fd, const sockaddr* address, socklen_t length) noexcept {
    const Outcome o = FaultScript::take(Call::kBind, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::bind(fd, address, length);
  }
  static int listen(int fd, int backlog) noexcept {
    const Outcome o = FaultScript::take(Call::kListen, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::listen(fd, backlog);
  }
  // EINTR and EINPROGRESS mean the connection attempt goes on without the caller (connect(2)), so
  // a scripted one of those starts the real connect first and then reports the error; any other
  // scripted error fails the call without reaching the kernel.
  static int connect(int fd, const sockaddr* address, socklen_t length) noexcept {
    const Outcome o = FaultScript::take(Call::kConnect, fd);
    if (o.kind != Outcome::Kind::kFail) return Base::connect(fd, address, length);
    if (o.error == EINTR || o.error == EINPROGRESS) {
      if (Base::connect(fd, address, length) != 0 && errno != EINPROGRESS) return -1;
    }
    return failed(o);
  }
  static int poll(pollfd* fds, nfds_t count, int timeout_ms) noexcept {
    const Outcome o = FaultScript::take(Call::kPoll, count > 0 ? fds[0].fd : -1);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::poll(fds, count, timeout_ms);
  }
  static int setsockopt(int fd, int level, int name, const void* value, socklen_t length) noexcept {
    const Outcome o = FaultScript::take(Call::kSetsockopt, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o)
                                          : Base::setsockopt(fd, level, name, value, length);
  }
  // A socket error queued with FaultScript::socket_error() answers the next SO_ERROR query.
  static int getsockopt(int fd, int level, int name, void* value, socklen_t* length) noexcept {
    const Outcome o = FaultScript::take(Call::kGetsockopt, fd);
    if (o.kind == Outcome::Kind::kFail) return failed(o);
    if (level == SOL_SOCKET && name == SO_ERROR && *length >= sizeof(int)) {
      if (const std::optional<int> error = FaultScript::take_socket_error(fd)) {
        *static_cast<int*>(value) = *error;
        *length = sizeof(int);
        return 0;
      }
    }
    return Base::getsockopt(fd, level, name, value, length);
  }
  static int getsockname(int fd, sockaddr* address, socklen_t* length) noexcept {
    const Outcome o = FaultScript::take(Call::kGetsockname, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::getsockname(fd, address, length);
  }
  static int getpeername(int fd, sockaddr* address, socklen_t* length) noexcept {
    const Outcome o = FaultScript::take(Call::kGetpeername, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::getpeername(fd, address, length);
  }
  static int fcntl(int fd, int command, int argument) noexcept {
    const Outcome o = FaultScript::take(Call::kFcntl, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::fcntl(fd, command, argument);
  }
  static int unlink(const char* path) noexcept {
    const Outcome o = FaultScript::take(Call::kUnlink, -1);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::unlink(path);
  }

 private:
  static int failed(const Outcome& o) noexcept {
    errno = o.error;
    return -1;
  }
  template <class Size>
  static Size capped(Size size, const Outcome& o) noexcept {
    if (o.kind != Outcome::Kind::kCap || static_cast<std::size_t>(size) <= o.limit) return size;
    return static_cast<Size>(o.limit);
  }
};

}  // namespace test
