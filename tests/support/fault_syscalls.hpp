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

#include <sys/epoll.h>
#include <sys/socket.h>
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
};

// The syscall policy: LinuxSyscalls, with the calls above routed through the current script.
struct FaultSyscalls : reactor::LinuxSyscalls {
  using Base = reactor::LinuxSyscalls;

  static int epoll_wait(int epfd, epoll_event* events, int max_events, int timeout_ms) noexcept {
    const Outcome o = FaultScript::take(Call::kEpollWait, epfd);
    if (o.kind == Outcome::Kind::kFail) return failed(o);
    if (o.kind == Outcome::Kind::kCap) max_events = static_cast<int>(capped(max_events, o));
    const int n = Base::epoll_wait(epfd, events, max_events, timeout_ms);
    FaultScript::reorder(events, n);
    return n;
  }
  static int epoll_ctl(int epfd, int op, int fd, epoll_event* event) noexcept {
    const Outcome o = FaultScript::take(Call::kEpollCtl, fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : Base::epoll_ctl(epfd, op, fd, event);
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
  // A scripted close failure still closes the fd, as Linux does (close(2): the fd is released
  // before the error is reported), so a retrying caller would close the wrong fd.
  static int close(int fd) noexcept {
    const Outcome o = FaultScript::take(Call::kClose, fd);
    const int result = Base::close(fd);
    return o.kind == Outcome::Kind::kFail ? failed(o) : result;
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
