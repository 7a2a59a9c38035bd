// Tests for include/reactor/resolver.hpp: system_lookup against the machine's own names
// ("localhost", and a name under .invalid that must not resolve), make_resolve_error's mapping, and
// a Resolver driven by a lookup function the test controls: lookups held on a gate the test opens,
// so it can see that no more than max_threads run at once, that every request completes exactly
// once, that an abandoned request is never completed (nor run, when still queued, and is dropped
// from the queue while every worker hangs), that a lookup that throws completes with an error, and
// that a Resolver destroyed while a lookup is still running returns at once and leaves the worker
// to finish alone. Label `unit` and `threads` (run under the tsan preset too).
//
// Catch2 assertions are made on the test's own thread only (Catch2 v2 is not thread-safe): the
// workers record what they saw in a Gate, under its mutex, and the test checks it after waiting.
#include <reactor/resolver.hpp>

#include <netdb.h>
#include <sys/socket.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using reactor::Endpoint;
using reactor::Resolver;
using reactor::ResolverOptions;
using reactor::detail::LookupRequest;

// What the lookups and completions saw, and the gate that holds the lookups until the test opens
// it. Shared (shared_ptr) with the lookup function, so it outlives every worker that may touch it.
struct Gate {
  struct Result {
    std::error_code error;
    std::vector<Endpoint> addresses;
  };

  // Waits until `done()` holds (called with the mutex held) or `limit` passes; returns done().
  // The limit only keeps a broken test from hanging.
  template <class Done>
  bool wait(Done done, std::chrono::milliseconds limit = 10s) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, limit, [&] { return done(); });
  }

  // Lets every held lookup (and every later one) return.
  void open() {
    const std::lock_guard lock(mutex);
    is_open = true;
    changed.notify_all();
  }

  std::mutex mutex;
  std::condition_variable changed;
  bool is_open = false;
  std::atomic<int> inside{0};             // lookups running now
  std::atomic<int> most_inside{0};        // the most that ever ran at once
  std::map<std::string, int> started;     // host -> lookups run for it
  std::map<std::string, int> completed;   // host -> complete() calls for it
  std::map<std::string, Result> results;  // host -> what complete() was handed
  bool lookup_freed = false;              // the Resolver's lookup function was destroyed
};

// Opens the gate when the test leaves its scope, so a failed assertion never leaves a worker held
// for ever.
struct OpenOnExit {
  std::shared_ptr<Gate> gate;
  ~OpenOnExit() { gate->open(); }
};

// Marks the gate when destroyed: it is captured by the lookup function, which the Resolver's shared
// state owns, so this runs once the last worker has let go of that state.
struct FreedMarker {
  explicit FreedMarker(std::shared_ptr<Gate> marked) : gate(std::move(marked)) {}
  FreedMarker(const FreedMarker&) = delete;
  FreedMarker& operator=(const FreedMarker&) = delete;
  ~FreedMarker() {
    const std::lock_guard lock(gate->mutex);
    gate->lookup_freed = true;
    gate->changed.notify_all();
  }

  std::shared_ptr<Gate> gate;
};

// A lookup that records its start, waits for the gate, then answers 127.0.0.1 and ::1 at the
// requested port. "throw" throws std::runtime_error, "bad_alloc" throws std::bad_alloc, and "none"
// answers nothing at all (a success without addresses).
reactor::LookupFunction gated_lookup(std::shared_ptr<Gate> gate,
                                     std::shared_ptr<FreedMarker> marker = nullptr) {
  return [gate = std::move(gate), marker = std::move(marker)](
             const std::string& host, std::uint16_t port, std::vector<Endpoint>& out) {
    const int now = gate->inside.fetch_add(1) + 1;
    int most = gate->most_inside.load();
    while (now > most && !gate->most_inside.compare_exchange_weak(most, now)) {
    }
    {
      std::unique_lock lock(gate->mutex);
      ++gate->started[host];
      gate->changed.notify_all();
      gate->changed.wait(lock, [&] { return gate->is_open; });
    }
    gate->inside.fetch_sub(1);
    if (host == "throw") throw std::runtime_error("lookup failed");
    if (host == "bad_alloc") throw std::bad_alloc();
    if (host == "none") return std::error_code();
    out.push_back(Endpoint::from_host_port("127.0.0.1", port));
    out.push_back(Endpoint::from_host_port("::1", port));
    return std::error_code();
  };
}

// complete(): runs on the worker, under the request's mutex; records into the Gate (the target).
void record_completion(void* target, std::shared_ptr<LookupRequest> self) noexcept {
  auto& gate = *static_cast<Gate*>(target);
  const std::lock_guard lock(gate.mutex);
  ++gate.completed[self->host];
  gate.results[self->host] = {self->error, self->addresses};
  gate.changed.notify_all();
}

std::shared_ptr<LookupRequest> make_request(Gate& gate, std::string host, std::uint16_t port) {
  auto request = std::make_shared<LookupRequest>();
  request->target = &gate;
  request->complete = &record_completion;
  request->host = std::move(host);
  request->port = port;
  return request;
}

// Whether /etc/hosts maps "localhost" to ::1 (then getaddrinfo must return it too).
bool hosts_file_has_ipv6_localhost() {
  std::ifstream hosts("/etc/hosts");
  std::string line;
  while (std::getline(hosts, line)) {
    if (const auto hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    std::string address;
    std::string name;
    if (!(words >> address) || address != "::1") continue;
    while (words >> name) {
      if (name == "localhost") return true;
    }
  }
  return false;
}

}  // namespace

TEST_CASE("system_lookup resolves localhost to loopback addresses with the port set",
          "[resolver][system]") {
  std::vector<Endpoint> out;
  const std::error_code ec = reactor::system_lookup("localhost", 8080, out);
  REQUIRE_FALSE(ec);
  REQUIRE_FALSE(out.empty());

  bool has_v4 = false;
  bool has_v6 = false;
  for (std::size_t i = 0; i < out.size(); ++i) {
    INFO("address " << out[i].to_string());
    CHECK(out[i].port() == 8080);
    CHECK((out[i].family() == AF_INET || out[i].family() == AF_INET6));
    if (out[i].host() == "127.0.0.1") has_v4 = true;
    if (out[i].host() == "::1") has_v6 = true;
    for (std::size_t j = 0; j < i; ++j) CHECK_FALSE(out[j] == out[i]);  // no duplicates
  }
  CHECK(has_v4);
  if (hosts_file_has_ipv6_localhost()) CHECK(has_v6);
}

TEST_CASE("system_lookup appends to what the vector already holds", "[resolver][system]") {
  std::vector<Endpoint> out{Endpoint::from_host_port("10.0.0.1", 1)};
  REQUIRE_FALSE(reactor::system_lookup("localhost", 9, out));
  REQUIRE(out.size() >= 2);
  CHECK(out.front().to_string() == "10.0.0.1:1");
  CHECK(out.back().port() == 9);
}

TEST_CASE("system_lookup fails for a name under .invalid with a resolve error",
          "[resolver][system]") {
  std::vector<Endpoint> out;
  const std::error_code ec = reactor::system_lookup("nosuch.invalid", 80, out);
  REQUIRE(ec);
  INFO("error: " << ec.message());
  // RFC 6761: .invalid never resolves. Without a reachable DNS server getaddrinfo says EAI_AGAIN
  // instead of EAI_NONAME; both are resolve errors.
  CHECK(&ec.category() == &reactor::resolve_category());
  CHECK(out.empty());
}

TEST_CASE("make_resolve_error maps getaddrinfo results to error codes", "[resolver]") {
  CHECK_FALSE(reactor::make_resolve_error(0, 0));
  CHECK_FALSE(reactor::make_resolve_error(0, ECONNREFUSED));  // errno is ignored on success

  const std::error_code system = reactor::make_resolve_error(EAI_SYSTEM, EMFILE);
  CHECK(system == std::errc::too_many_files_open);
  CHECK(&system.category() == &std::system_category());
  CHECK(system.value() == EMFILE);
  // EAI_SYSTEM without an errno still reports a failure.
  const std::error_code unknown = reactor::make_resolve_error(EAI_SYSTEM, 0);
  CHECK(unknown);
  CHECK(unknown.value() == EIO);

  const std::error_code noname = reactor::make_resolve_error(EAI_NONAME, 0);
  CHECK(&noname.category() == &reactor::resolve_category());
  CHECK(noname.value() == EAI_NONAME);
  CHECK(noname.message() == ::gai_strerror(EAI_NONAME));
  CHECK(std::string(reactor::resolve_category().name()) == "resolve");
  CHECK(reactor::make_resolve_error(EAI_AGAIN, ENOENT).value() == EAI_AGAIN);
}

TEST_CASE("never more than max_threads lookups run at once and each completes once",
          "[resolver][threads]") {
  auto gate = std::make_shared<Gate>();
  const OpenOnExit open_on_exit{gate};
  constexpr unsigned kThreads = 3;
  constexpr int kRequests = 8;
  Resolver resolver(ResolverOptions{.max_threads = kThreads, .lookup = gated_lookup(gate)});
  CHECK(resolver.threads() == 0);

  for (int i = 0; i < kRequests; ++i) {
    resolver.submit(
        make_request(*gate, "host" + std::to_string(i), static_cast<std::uint16_t>(1000 + i)));
  }
  // Three lookups start and hold; the other five wait in the queue.
  REQUIRE(gate->wait([&] { return gate->started.size() == kThreads; }));
  CHECK(resolver.threads() == kThreads);
  CHECK(gate->inside.load() == static_cast<int>(kThreads));
  {
    const std::lock_guard lock(gate->mutex);
    CHECK(gate->completed.empty());
  }

  gate->open();
  REQUIRE(gate->wait([&] { return gate->completed.size() == kRequests; }));
  REQUIRE(resolver.wait_idle(10s));
  CHECK(resolver.threads() == 0);
  CHECK(gate->most_inside.load() == static_cast<int>(kThreads));
  CHECK(gate->inside.load() == 0);

  const std::lock_guard lock(gate->mutex);
  for (int i = 0; i < kRequests; ++i) {
    const std::string host = "host" + std::to_string(i);
    INFO(host);
    CHECK(gate->started[host] == 1);
    CHECK(gate->completed[host] == 1);
    const Gate::Result& result = gate->results[host];
    CHECK_FALSE(result.error);
    REQUIRE(result.addresses.size() == 2);
    CHECK(result.addresses[0].to_string() == "127.0.0.1:" + std::to_string(1000 + i));
    CHECK(result.addresses[1].to_string() == "[::1]:" + std::to_string(1000 + i));
  }
}

TEST_CASE("max_threads of 0 still runs one lookup at a time", "[resolver][threads]") {
  auto gate = std::make_shared<Gate>();
  const OpenOnExit open_on_exit{gate};
  Resolver resolver(ResolverOptions{.max_threads = 0, .lookup = gated_lookup(gate)});
  resolver.submit(make_request(*gate, "a", 1));
  resolver.submit(make_request(*gate, "b", 2));
  REQUIRE(gate->wait([&] { return gate->started.size() == 1; }));
  CHECK(resolver.threads() == 1);
  gate->open();
  REQUIRE(gate->wait([&] { return gate->completed.size() == 2; }));
  REQUIRE(resolver.wait_idle(10s));
  CHECK(gate->most_inside.load() == 1);
}

TEST_CASE("workers exit when the queue is empty and start again for new lookups",
          "[resolver][threads]") {
  auto gate = std::make_shared<Gate>();
  gate->open();
  Resolver resolver(ResolverOptions{.max_threads = 2, .lookup = gated_lookup(gate)});
  for (int round = 0; round < 3; ++round) {
    const std::string host = "round" + std::to_string(round);
    resolver.submit(make_request(*gate, host, 80));
    REQUIRE(gate->wait([&] { return gate->completed[host] == 1; }));
    REQUIRE(resolver.wait_idle(10s));
    CHECK(resolver.threads() == 0);
  }
  const std::lock_guard lock(gate->mutex);
  CHECK(gate->completed.size() == 3);
}

TEST_CASE("a request abandoned while its lookup runs is never completed", "[resolver][threads]") {
  auto gate = std::make_shared<Gate>();
  const OpenOnExit open_on_exit{gate};
  Resolver resolver(ResolverOptions{.max_threads = 1, .lookup = gated_lookup(gate)});
  auto abandoned = make_request(*gate, "abandoned", 80);
  resolver.submit(abandoned);
  REQUIRE(gate->wait([&] { return gate->started["abandoned"] == 1; }));

  abandoned->abandon();
  CHECK(abandoned->abandoned());
  gate->open();
  REQUIRE(resolver.wait_idle(10s));
  CHECK(resolver.threads() == 0);

  const std::lock_guard lock(gate->mutex);
  CHECK(gate->started["abandoned"] == 1);
  CHECK(gate->completed.count("abandoned") == 0);
  CHECK(abandoned->addresses.empty());  // the result was dropped, not handed over
  CHECK_FALSE(abandoned->error);
}

TEST_CASE("a queued request abandoned before it starts never runs its lookup",
          "[resolver][threads]") {
  auto gate = std::make_shared<Gate>();
  const OpenOnExit open_on_exit{gate};
  Resolver resolver(ResolverOptions{.max_threads = 1, .lookup = gated_lookup(gate)});
  auto first = make_request(*gate, "first", 80);
  auto queued = make_request(*gate, "queued", 81);
  auto last = make_request(*gate, "last", 82);
  resolver.submit(first);
  REQUIRE(gate->wait([&] { return gate->started["first"] == 1; }));
  resolver.submit(queued);
  resolver.submit(last);
  CHECK(resolver.threads() == 1);  // max_threads: the other two wait in the queue

  queued->abandon();
  gate->open();
  REQUIRE(
      gate->wait([&] { return gate->completed["first"] == 1 && gate->completed["last"] == 1; }));
  REQUIRE(resolver.wait_idle(10s));

  const std::lock_guard lock(gate->mutex);
  CHECK(gate->started.count("queued") == 0);
  CHECK(gate->completed.count("queued") == 0);
  CHECK(gate->started["last"] == 1);
  CHECK(gate->completed.size() == 2);
}

// Requests abandoned while every worker hangs in a lookup must not pile up in the queue: submit()
// drops them once the queue has grown enough. Fails on the resolver of 4a86263: the queue kept all
// 400 requests (none of the abandoned ones freed) until the worker got back to it.
TEST_CASE("abandoned requests do not pile up in the queue while every worker hangs",
          "[resolver][threads]") {
  auto gate = std::make_shared<Gate>();
  const OpenOnExit open_on_exit{gate};
  Resolver resolver(ResolverOptions{.max_threads = 1, .lookup = gated_lookup(gate)});
  resolver.submit(make_request(*gate, "hanging", 80));
  REQUIRE(gate->wait([&] { return gate->started["hanging"] == 1; }));

  constexpr int kAbandoned = 200;
  std::vector<std::weak_ptr<LookupRequest>> abandoned;
  for (int i = 0; i < kAbandoned; ++i) {
    auto request = make_request(*gate, "abandoned" + std::to_string(i), 81);
    resolver.submit(request);
    request->abandon();  // as a connector that timed out or was cancelled does
    abandoned.push_back(request);
  }
  constexpr int kLive = 200;
  for (int i = 0; i < kLive; ++i)
    resolver.submit(make_request(*gate, "live" + std::to_string(i), 82));
  CHECK(resolver.threads() == 1);

  // Still before the worker comes back: most of the abandoned requests are gone already.
  int freed = 0;
  for (const auto& request : abandoned) freed += request.expired() ? 1 : 0;
  INFO("abandoned requests freed while the worker hangs: " << freed);
  CHECK(freed >= kAbandoned * 3 / 4);
  {
    const std::lock_guard lock(gate->mutex);
    CHECK(gate->started.size() == 1);
    CHECK(gate->completed.empty());
  }

  // The worker comes back: every live request completes once, no abandoned one runs.
  gate->open();
  REQUIRE(gate->wait([&] { return gate->completed.size() == kLive + 1; }));
  REQUIRE(resolver.wait_idle(10s));
  for (const auto& request : abandoned) CHECK(request.expired());
  const std::lock_guard lock(gate->mutex);
  CHECK(gate->started.size() == kLive + 1);
  for (const auto& [host, count] : gate->completed) {
    INFO(host);
    CHECK(count == 1);
    CHECK(host.rfind("abandoned", 0) == std::string::npos);
  }
}

// The sweep threshold grows with the queue during a burst, and must fall back once the burst is
// over: otherwise, after one burst of live lookups, abandoned requests pile up again until the
// queue reaches the burst's size. Fails on the resolver of 1b164b1: after a burst of 5000 the
// threshold stayed at 8192, and none of the 300 abandoned requests was freed while the worker hung.
TEST_CASE("the sweep of abandoned requests starts early again after a burst of lookups",
          "[resolver][threads]") {
  auto gate = std::make_shared<Gate>();
  const OpenOnExit open_on_exit{gate};
  Resolver resolver(ResolverOptions{.max_threads = 1, .lookup = gated_lookup(gate)});

  // A burst of live lookups queued behind a held one (the queue grows to 5000, and the threshold
  // with it), then run at once, every one completed.
  constexpr int kBurst = 5000;
  resolver.submit(make_request(*gate, "burst0", 80));
  REQUIRE(gate->wait([&] { return gate->started["burst0"] == 1; }));
  for (int i = 1; i < kBurst; ++i)
    resolver.submit(make_request(*gate, "burst" + std::to_string(i), 80));
  gate->open();
  REQUIRE(gate->wait([&] { return gate->completed.size() == kBurst; }));
  REQUIRE(resolver.wait_idle(10s));
  {
    const std::lock_guard lock(gate->mutex);
    gate->is_open = false;  // hold the next lookup again
  }

  resolver.submit(make_request(*gate, "hanging", 81));
  REQUIRE(gate->wait([&] { return gate->started["hanging"] == 1; }));
  constexpr int kAbandoned = 300;
  std::vector<std::weak_ptr<LookupRequest>> abandoned;
  for (int i = 0; i < kAbandoned; ++i) {
    auto request = make_request(*gate, "abandoned" + std::to_string(i), 82);
    resolver.submit(request);
    request->abandon();
    abandoned.push_back(request);
  }
  constexpr int kLive = 300;
  for (int i = 0; i < kLive; ++i)
    resolver.submit(make_request(*gate, "live" + std::to_string(i), 83));
  CHECK(resolver.threads() == 1);

  // Still before the worker comes back: most of the abandoned requests are gone already.
  int freed = 0;
  for (const auto& request : abandoned) freed += request.expired() ? 1 : 0;
  INFO("abandoned requests freed while the worker hangs: " << freed);
  CHECK(freed >= kAbandoned * 3 / 4);

  gate->open();
  REQUIRE(gate->wait([&] { return gate->completed.size() == kBurst + 1 + kLive; }));
  REQUIRE(resolver.wait_idle(10s));
  for (const auto& request : abandoned) CHECK(request.expired());
  const std::lock_guard lock(gate->mutex);
  CHECK(gate->started.size() == kBurst + 1 + kLive);
  for (const auto& [host, count] : gate->completed) {
    INFO(host);
    CHECK(count == 1);
    CHECK(host.rfind("abandoned", 0) == std::string::npos);
  }
}

TEST_CASE("a Resolver destroyed during a lookup returns at once and the worker finishes alone",
          "[resolver][threads]") {
  auto gate = std::make_shared<Gate>();
  const OpenOnExit open_on_exit{gate};
  auto resolver = std::make_unique<Resolver>(ResolverOptions{
      .max_threads = 2, .lookup = gated_lookup(gate, std::make_shared<FreedMarker>(gate))});
  // Both workers held on the gate, and a third request queued behind them.
  resolver->submit(make_request(*gate, "running", 80));
  resolver->submit(make_request(*gate, "second", 81));
  REQUIRE(
      gate->wait([&] { return gate->started["running"] == 1 && gate->started["second"] == 1; }));
  resolver->submit(make_request(*gate, "queued", 82));
  CHECK(resolver->threads() == 2);

  const auto before = Clock::now();
  resolver.reset();  // two lookups still held on the gate
  const auto took = Clock::now() - before;
  CHECK(took < 1s);  // it did not wait for the workers
  {
    const std::lock_guard lock(gate->mutex);
    CHECK_FALSE(gate->lookup_freed);  // the workers still share the state
  }

  gate->open();
  // The running lookups still hand their results to their (not abandoned) requests; the queued
  // one was dropped with the Resolver. Once the last worker exits, the shared state (and with it
  // the lookup function) is freed.
  REQUIRE(gate->wait([&] { return gate->lookup_freed; }));
  const std::lock_guard lock(gate->mutex);
  CHECK(gate->completed["running"] == 1);
  CHECK(gate->completed["second"] == 1);
  CHECK(gate->started.count("queued") == 0);
  CHECK(gate->completed.count("queued") == 0);
}

TEST_CASE("a lookup that throws completes its request with an error", "[resolver][threads]") {
  auto gate = std::make_shared<Gate>();
  gate->open();
  Resolver resolver(ResolverOptions{.max_threads = 2, .lookup = gated_lookup(gate)});
  resolver.submit(make_request(*gate, "throw", 80));
  resolver.submit(make_request(*gate, "bad_alloc", 80));
  resolver.submit(make_request(*gate, "none", 80));
  resolver.submit(make_request(*gate, "fine", 80));
  REQUIRE(gate->wait([&] { return gate->completed.size() == 4; }));
  REQUIRE(resolver.wait_idle(10s));

  const std::lock_guard lock(gate->mutex);
  for (const auto& [host, count] : gate->completed) {
    INFO(host);
    CHECK(count == 1);
  }
  const Gate::Result& thrown = gate->results["throw"];
  CHECK(thrown.error);
  CHECK(&thrown.error.category() == &reactor::resolve_category());
  CHECK(thrown.addresses.empty());

  const Gate::Result& no_memory = gate->results["bad_alloc"];
  CHECK(no_memory.error == std::errc::not_enough_memory);
  CHECK(no_memory.addresses.empty());

  // Success without a single address is no success: "Name or service not known".
  const Gate::Result& none = gate->results["none"];
  CHECK(none.error.value() == EAI_NONAME);
  CHECK(&none.error.category() == &reactor::resolve_category());

  // The failures did not take the worker down: the next lookup still ran.
  const Gate::Result& fine = gate->results["fine"];
  CHECK_FALSE(fine.error);
  CHECK(fine.addresses.size() == 2);
}

TEST_CASE("a Resolver with the default options resolves through getaddrinfo",
          "[resolver][threads][system]") {
  auto gate = std::make_shared<Gate>();
  Resolver resolver;  // system_lookup on up to 4 threads
  resolver.submit(make_request(*gate, "localhost", 443));
  resolver.submit(make_request(*gate, "nosuch.invalid", 443));
  REQUIRE(gate->wait([&] { return gate->completed.size() == 2; }, 30s));
  REQUIRE(resolver.wait_idle(10s));

  const std::lock_guard lock(gate->mutex);
  const Gate::Result& local = gate->results["localhost"];
  CHECK_FALSE(local.error);
  REQUIRE_FALSE(local.addresses.empty());
  for (const Endpoint& address : local.addresses) {
    CHECK(address.port() == 443);
    CHECK((address.host() == "127.0.0.1" || address.host() == "::1"));
  }
  const Gate::Result& invalid = gate->results["nosuch.invalid"];
  CHECK(invalid.error);
  CHECK(&invalid.error.category() == &reactor::resolve_category());
  CHECK(invalid.addresses.empty());
}
