// Public: Resolver, host name lookups (getaddrinfo) on a small, bounded set of worker threads, so
// that a slow or hanging DNS server never blocks a reactor's thread; and resolve_category(), the
// error category of getaddrinfo's EAI_* codes.
//
// A lookup cannot be interrupted (getaddrinfo has no cancel), so a cancelled or timed-out one is
// abandoned instead: a request still queued is skipped, one already running finishes on its
// worker and its result is dropped. Nothing ever waits for a worker: threads are started on
// demand, up to max_threads, run queued lookups until the queue is empty, then exit. They are
// detached and share their state with the Resolver by reference count, so a Resolver may be
// destroyed, and the process may exit, while a lookup is still running.
//
// Connector (connector.hpp) is the user of this header; it skips the resolver for numeric
// addresses. Tests replace the lookup function (ResolverOptions::lookup) so they do not depend on
// the machine's DNS.
#pragma once

#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "endpoint.hpp"

namespace reactor {

namespace detail {

class ResolveCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "resolve"; }
  std::string message(int value) const override { return ::gai_strerror(value); }
};

}  // namespace detail

// The category of getaddrinfo's EAI_* codes ("Name or service not known", ...): an error_code in
// it says that resolving the host name failed. Thread-safe; lives for the whole program.
inline const std::error_category& resolve_category() noexcept {
  static const detail::ResolveCategory category;
  return category;
}

// The error_code for a getaddrinfo return value: EAI_SYSTEM becomes the errno it stands for.
inline std::error_code make_resolve_error(int eai, int saved_errno) noexcept {
  if (eai == 0) return {};
  if (eai == EAI_SYSTEM) return detail::errno_code(saved_errno != 0 ? saved_errno : EIO);
  return {eai, resolve_category()};
}

// What a lookup runs on a worker thread: fills `out` with the addresses of `host` (stream sockets,
// `port` set in each) in the order to try them, or returns why not. Must be thread-safe.
using LookupFunction = std::function<std::error_code(const std::string& host, std::uint16_t port,
                                                     std::vector<Endpoint>& out)>;

// The default LookupFunction: getaddrinfo(host, port, {AF_UNSPEC, SOCK_STREAM}), duplicates
// removed, in the order getaddrinfo sorted them (RFC 6724). No AI_ADDRCONFIG: a family the host
// cannot reach fails fast (ENETUNREACH) and Happy Eyeballs moves on, while AI_ADDRCONFIG would drop
// ::1 for "localhost" on a machine whose only IPv6 address is the loopback one.
inline std::error_code system_lookup(const std::string& host, std::uint16_t port,
                                     std::vector<Endpoint>& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  const std::string service = std::to_string(port);
  addrinfo* first = nullptr;
  errno = 0;
  const int eai = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &first);
  if (eai != 0) return make_resolve_error(eai, errno);
  const std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> list(first, &::freeaddrinfo);
  for (const addrinfo* ai = list.get(); ai != nullptr; ai = ai->ai_next) {
    if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
    const Endpoint endpoint = Endpoint::from_sockaddr(ai->ai_addr, ai->ai_addrlen);
    if (!endpoint.empty() && std::find(out.begin(), out.end(), endpoint) == out.end()) {
      out.push_back(endpoint);
    }
  }
  if (out.empty()) return {EAI_NONAME, resolve_category()};
  return {};
}

struct ResolverOptions {
  // Worker threads at most (at least 1): lookups beyond that wait in a queue.
  unsigned max_threads = 4;
  // What a worker runs for each lookup; the default asks getaddrinfo. Workers are detached and a
  // lookup may still run after the Resolver is destroyed: whatever the function refers to must
  // outlive every lookup (wait_idle() says when none runs).
  LookupFunction lookup = system_lookup;
};

namespace detail {

// One lookup, shared by its requester (on a loop thread) and the worker that runs it. The
// requester abandons it by clearing `target` under the mutex; the worker hands the result over
// under the same mutex, through `complete`, which must only queue work for the loop (post), so
// that abandon() never waits for more than that.
struct LookupRequest {
  std::mutex mutex;
  void* target = nullptr;  // the requester's context; null once abandoned
  void (*complete)(void* target, std::shared_ptr<LookupRequest> self) noexcept = nullptr;
  std::string host;
  std::uint16_t port = 0;
  // Written by the worker before complete(), read on the loop thread after it.
  std::error_code error;
  std::vector<Endpoint> addresses;

  bool abandoned() {
    const std::lock_guard lock(mutex);
    return target == nullptr;
  }
  void abandon() {
    const std::lock_guard lock(mutex);
    target = nullptr;
  }
};

struct ResolverState {
  std::mutex mutex;
  std::deque<std::shared_ptr<LookupRequest>> queue;
  unsigned running = 0;  // workers started and not yet exited
  unsigned max_threads = 1;
  std::size_t sweep_at = 64;  // queue length at which submit() drops abandoned requests
  LookupFunction lookup;
  std::condition_variable idle;  // notified when `running` drops to 0
};

}  // namespace detail

class Resolver {
 public:
  explicit Resolver(ResolverOptions options = {})
      : state_(std::make_shared<detail::ResolverState>()) {
    state_->max_threads = std::max(options.max_threads, 1u);
    state_->lookup = std::move(options.lookup);
    if (!state_->lookup) state_->lookup = system_lookup;
  }

  Resolver(const Resolver&) = delete;
  Resolver& operator=(const Resolver&) = delete;

  // Queued lookups that have not started are dropped; running ones finish on their workers and
  // their results are dropped. Never waits for a worker. Connectors using this resolver must be
  // destroyed (or idle) first.
  ~Resolver() {
    const std::lock_guard lock(state_->mutex);
    state_->queue.clear();
  }

  // The process-wide resolver Connector uses by default (4 threads, getaddrinfo). Thread-safe.
  static Resolver& shared() {
    static Resolver resolver;
    return resolver;
  }

  // Worker threads running now (0 once every lookup has finished). Any thread.
  unsigned threads() const {
    const std::lock_guard lock(state_->mutex);
    return state_->running;
  }

  // Blocks until no worker runs or `timeout` passes; true if none runs. For tests and orderly
  // exits that want every thread gone; a reactor's thread must never call it.
  template <class Rep, class Period>
  bool wait_idle(std::chrono::duration<Rep, Period> timeout) const {
    std::unique_lock lock(state_->mutex);
    return state_->idle.wait_for(lock, timeout, [&] { return state_->running == 0; });
  }

  // Queues `request` and starts a worker if fewer than max_threads run. When no thread can be
  // started and none runs, completes the request at once with resource_unavailable_try_again
  // (through its complete(), which posts). Any thread.
  void submit(std::shared_ptr<detail::LookupRequest> request) {
    std::unique_lock lock(state_->mutex);
    // Abandoned requests wait in the queue until a worker skips them; while every worker hangs in
    // a lookup, drop them here instead, whenever the queue has doubled since the last sweep (so
    // the sweeps cost O(1) per request, amortized).
    if (state_->queue.size() >= state_->sweep_at) {
      std::erase_if(state_->queue, [](const auto& queued) { return queued->abandoned(); });
      state_->sweep_at = std::max<std::size_t>(64, 2 * state_->queue.size());
    }
    state_->queue.push_back(request);
    if (state_->running >= state_->max_threads) return;
    ++state_->running;
    try {
      std::thread(&Resolver::work, state_).detach();
    } catch (...) {  // std::system_error (EAGAIN), or bad_alloc for the thread's state
      if (--state_->running > 0) return;  // a running worker will get to it
      state_->queue.pop_back();
      lock.unlock();
      request->error = std::make_error_code(std::errc::resource_unavailable_try_again);
      deliver(std::move(request));
    }
  }

 private:
  // A worker: runs queued lookups until none is left, then exits.
  static void work(std::shared_ptr<detail::ResolverState> state) {
    for (;;) {
      std::shared_ptr<detail::LookupRequest> request;
      {
        const std::lock_guard lock(state->mutex);
        if (state->queue.empty()) {
          state->sweep_at = 64;  // a burst that raised it is over
          if (--state->running == 0) state->idle.notify_all();
          return;
        }
        request = std::move(state->queue.front());
        state->queue.pop_front();
      }
      if (request->abandoned()) continue;
      std::vector<Endpoint> addresses;
      std::error_code error;
      try {
        error = state->lookup(request->host, request->port, addresses);
        if (!error && addresses.empty()) error = {EAI_NONAME, resolve_category()};
      } catch (const std::bad_alloc&) {
        error = std::make_error_code(std::errc::not_enough_memory);
      } catch (...) {
        error = {EAI_FAIL, resolve_category()};
      }
      {
        const std::lock_guard lock(request->mutex);
        if (request->target == nullptr) continue;
        request->error = error;
        request->addresses = std::move(addresses);
      }
      deliver(std::move(request));
    }
  }

  static void deliver(std::shared_ptr<detail::LookupRequest> request) {
    const std::lock_guard lock(request->mutex);
    if (request->target != nullptr) request->complete(request->target, request);
  }

  std::shared_ptr<detail::ResolverState> state_;
};

}  // namespace reactor
