// Tests for include/reactor/pool.hpp: ReactorPool and PoolAcceptor over loopback TCP (and a Unix
// socket). Every Balance mode echoes every client's bytes and counts every accept; round-robin and
// least-connections keep the reactors within 1.2x of each other; a connection on one reactor sends
// to and closes one on another through its handle; a pool-wide graceful shutdown serves out the
// open connections and those still in the listen queue, and a stop() during it aborts the rest; a
// throwing handler takes only its connection down; run/stop/shutdown refuse misuse; and every test
// gives back every fd it took. Label `integration` and `threads` (run under the tsan preset too).
//
// Catch2 assertions are made on the test's own thread only (Catch2 v2 is not thread-safe): the
// reactors' threads and the client threads record what they saw, and the test checks it after
// joining them.
#include <reactor/pool.hpp>

#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <reactor.hpp>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using reactor::Balance;
using Loop = reactor::Reactor<>;

const char* name_of(Balance balance) {
  switch (balance) {
    case Balance::kReusePort:
      return "reuseport";
    case Balance::kRoundRobin:
      return "round-robin";
    case Balance::kLeastConnections:
      return "least-connections";
    case Balance::kExclusive:
      return "exclusive";
  }
  return "?";
}

// What the pool's handlers saw, written from every reactor's thread under one mutex; the test
// waits on `changed` for the counts it needs.
struct Board {
  struct Closed {
    std::size_t reactor;
    std::uint16_t port;
    std::error_code reason;
  };

  explicit Board(std::size_t reactors) : opened(reactors), open_now(reactors), closed(reactors) {}

  // Waits until `done()` holds (called with the mutex held) or `limit` passes; returns done().
  // The limit only keeps a broken test from hanging.
  template <class Done>
  bool wait(Done done, std::chrono::milliseconds limit = 20s) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, limit, [&] { return done(); });
  }

  static std::size_t sum(const std::vector<std::size_t>& counts) {
    std::size_t total = 0;
    for (const std::size_t n : counts) total += n;
    return total;
  }

  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::size_t> opened;                  // per reactor: connections opened there
  std::vector<std::size_t> open_now;                // per reactor: opened and not yet closed
  std::vector<std::size_t> closed;                  // per reactor: on_close calls
  std::map<std::uint16_t, std::size_t> reactor_of;  // TCP client port -> the reactor serving it
  std::map<std::uint16_t, std::size_t> received;    // TCP client port -> bytes on_data saw
  std::vector<Closed> closes;
  std::set<int> cpus;      // CPUs that on_data ran on
  std::size_t strays = 0;  // callbacks on another thread than the connection's reactor's
};

// Echoes everything and reports to the board. With `throw_on_boom`, input starting with "boom!"
// makes on_data throw, on reactor 1 only.
template <class R>
struct BasicEcho {
  Board* board;
  const reactor::ReactorPool<R>* pool;
  bool throw_on_boom = false;
  std::size_t reactor = 0;
  std::uint16_t port = 0;

  void on_open(auto& connection) {
    reactor = pool->current();
    port = connection.remote_endpoint().port();
    const std::lock_guard lock(board->mutex);
    if (reactor >= pool->size()) ++board->strays;
    ++board->opened[reactor % pool->size()];
    ++board->open_now[reactor % pool->size()];
    board->reactor_of[port] = reactor;
    board->changed.notify_all();
  }

  void on_data(auto& connection, std::string_view bytes) {
    if (throw_on_boom && reactor == 1 && bytes.starts_with("boom!")) {
      throw std::runtime_error("bad input");
    }
    {
      const std::lock_guard lock(board->mutex);
      if (pool->current() != reactor) ++board->strays;
      board->received[port] += bytes.size();
      board->cpus.insert(::sched_getcpu());
      board->changed.notify_all();
    }
    connection.send(bytes);
  }

  void on_close(auto&, std::error_code reason) {
    const std::lock_guard lock(board->mutex);
    if (pool->current() != reactor) ++board->strays;
    ++board->closed[reactor % pool->size()];
    --board->open_now[reactor % pool->size()];
    board->closes.push_back({reactor, port, reason});
    board->changed.notify_all();
  }
};

using Echo = BasicEcho<Loop>;
using EchoAcceptor = reactor::PoolAcceptor<Echo, Loop>;

// Runs pool.run() on a thread of its own for its lifetime; stop() (or the destructor) stops the
// pool and joins the thread.
template <class Pool>
class Running {
 public:
  explicit Running(Pool& pool)
      : pool_(pool), thread_([this] {
          try {
            pool_.run();
          } catch (const std::exception& e) {
            error_ = e.what();
          }
        }) {}
  Running(const Running&) = delete;
  Running& operator=(const Running&) = delete;
  ~Running() { stop(); }

  // Stops the pool, waits for run() to return, and returns what it threw ("" if nothing).
  std::string stop() {
    if (thread_.joinable()) {
      pool_.stop();
      thread_.join();
    }
    return error_;
  }

 private:
  Pool& pool_;
  std::string error_;
  std::thread thread_;
};

std::uint16_t local_port(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) return 0;
  return reactor::Endpoint::from_sockaddr(reinterpret_cast<sockaddr*>(&address), length).port();
}

// One client, played by the test: writes its stream (the first half at once, the rest once the
// driver's `go` is set), half-closes after it if `half_close`, and reads until EOF. A trickling
// client instead writes its stream 512 bytes per turn and never half-closes.
struct Client {
  explicit Client(reactor::UniqueFd socket)
      : peer(std::move(socket)), port(local_port(peer.fd.get())) {}

  bool finished() const { return peer.eof || peer.error != 0; }

  test::Peer peer;
  std::uint16_t port;
  std::string stream;
  bool half_close = true;
  bool trickle = false;
  bool half_closed = false;
};

// Blocking connects: each completes as soon as the kernel has the connection in the listen
// queue, whether or not the pool is running. The sockets are non-blocking.
std::vector<Client> connect_clients(const reactor::Endpoint& endpoint, std::size_t count) {
  std::vector<Client> clients;
  clients.reserve(count);
  for (std::size_t i = 0; i < count; ++i) clients.emplace_back(reactor::connect(endpoint));
  return clients;
}

// Connects to a running pool one client at a time, each waited for until it is open, until there
// are at least `count` and every reactor holds at least `each` of them (at most 400 clients).
// Back-to-back connects could all land on one reactor: kReusePort hashes, and with kExclusive the
// reactor still accepting takes what arrives meanwhile (its rivals are woken and get EAGAIN).
std::vector<Client> connect_spread(Board& board, const reactor::Endpoint& endpoint,
                                   std::size_t count, std::size_t each) {
  std::vector<Client> clients;
  const auto enough = [&] {
    return clients.size() >= count && std::all_of(board.opened.begin(), board.opened.end(),
                                                  [&](std::size_t n) { return n >= each; });
  };
  for (;;) {
    std::size_t opened_before = 0;
    {
      const std::lock_guard lock(board.mutex);
      if (enough() || clients.size() >= 400) return clients;
      opened_before = Board::sum(board.opened);
    }
    clients.emplace_back(reactor::connect(endpoint));
    if (!board.wait([&] { return Board::sum(board.opened) > opened_before; })) return clients;
  }
}

// Gives client i a stream of `base + i * step` bytes, different for every client.
void give_streams(std::vector<Client>& clients, std::size_t base, std::size_t step,
                  std::uint32_t seed) {
  for (std::size_t i = 0; i < clients.size(); ++i) {
    clients[i].stream = test::pattern(base + i * step, seed + static_cast<std::uint32_t>(i));
  }
}

const std::atomic<bool> kAtOnce{true};

// Where `got` first differs from `want` (a length difference counts), or npos when equal: a
// number in a failed check instead of kilobytes of binary.
std::size_t first_difference(const std::string& got, const std::string& want) {
  const auto [g, w] = std::mismatch(got.begin(), got.end(), want.begin(), want.end());
  if (g == got.end() && w == want.end()) return std::string::npos;
  return static_cast<std::size_t>(g - got.begin());
}
constexpr std::size_t kSame = std::string::npos;

// Plays `clients` from the calling thread until every one has its EOF or an error (true), or
// `limit` passes or `cancel` is requested (false).
bool drive(std::vector<Client>& clients, const std::atomic<bool>& go,
           std::chrono::milliseconds limit, const std::stop_token& cancel = {}) {
  const auto deadline = Clock::now() + limit;
  std::vector<pollfd> waiting;
  for (;;) {
    const bool released = go.load();
    bool trickling = false;
    waiting.clear();
    for (Client& client : clients) {
      if (client.finished()) continue;
      std::string& to_send = client.peer.to_send;
      if (client.trickle) {
        trickling = true;
        if (client.peer.all_sent() && to_send.size() < client.stream.size()) {
          to_send.append(client.stream, to_send.size(), 512);
        }
      } else {
        const std::size_t allowed = released ? client.stream.size() : client.stream.size() / 2;
        if (to_send.size() < allowed) to_send.append(client.stream, to_send.size(), allowed);
      }
      client.peer.step();
      if (client.half_close && !client.trickle && !client.half_closed &&
          to_send.size() == client.stream.size() && client.peer.all_sent()) {
        client.peer.shutdown_write();
        client.half_closed = true;
      }
      if (client.finished()) continue;
      const short events = static_cast<short>(POLLIN | (client.peer.all_sent() ? 0 : POLLOUT));
      waiting.push_back({client.peer.fd.get(), events, 0});
    }
    if (waiting.empty()) return true;
    if (Clock::now() >= deadline || cancel.stop_requested()) return false;
    ::poll(waiting.data(), waiting.size(), trickling ? 5 : 50);
  }
}

// Blocking helpers for a single client socket (non-blocking fd, waits with poll).
bool send_all(int fd, std::string_view bytes, std::chrono::milliseconds limit = 20s) {
  const auto deadline = Clock::now() + limit;
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n > 0) {
      bytes.remove_prefix(static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR) return false;
    if (Clock::now() >= deadline) return false;
    pollfd waiting{fd, POLLOUT, 0};
    ::poll(&waiting, 1, 100);
  }
  return true;
}

// Reads until `size` bytes came, `stop_at` (if given) is seen, EOF, an error or `limit`.
// `eof` (if given) says whether the EOF was read; `error` gets errno for an error.
std::string receive(int fd, std::size_t size, char stop_at = '\0', bool* eof = nullptr,
                    int* error = nullptr, std::chrono::milliseconds limit = 20s) {
  const auto deadline = Clock::now() + limit;
  std::string bytes;
  if (eof != nullptr) *eof = false;
  if (error != nullptr) *error = 0;
  while (bytes.size() < size) {
    if (stop_at != '\0' && bytes.find(stop_at) != std::string::npos) break;
    char buffer[65536];
    const std::size_t wanted = stop_at != '\0' ? 1 : std::min(sizeof buffer, size - bytes.size());
    const ssize_t n = ::recv(fd, buffer, wanted, 0);
    if (n > 0) {
      bytes.append(buffer, static_cast<std::size_t>(n));
      continue;
    }
    if (n == 0) {
      if (eof != nullptr) *eof = true;
      break;
    }
    if (errno != EAGAIN && errno != EINTR) {
      if (error != nullptr) *error = errno;
      break;
    }
    if (Clock::now() >= deadline) break;
    pollfd waiting{fd, POLLIN, 0};
    ::poll(&waiting, 1, 100);
  }
  return bytes;
}

std::string read_line(int fd) {
  std::string line = receive(fd, 4096, '\n');
  if (!line.empty() && line.back() == '\n') line.pop_back();
  return line;
}

// Listening IPv4 TCP sockets of this process bound to `port` (/proc/net/tcp, filtered by the
// socket inodes among this process's fds).
std::size_t listeners_on(std::uint16_t port) {
  std::set<std::string> inodes;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const std::string target = std::filesystem::read_symlink(entry.path(), ec).string();
    if (!ec && target.starts_with("socket:[")) inodes.insert(target.substr(8, target.size() - 9));
  }
  std::ifstream table("/proc/net/tcp");
  std::string line;
  std::getline(table, line);  // the header
  std::size_t count = 0;
  while (std::getline(table, line)) {
    std::istringstream fields(line);
    std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
    fields >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >>
        timeout >> inode;
    const std::size_t colon = local.find(':');
    if (state != "0A" || colon == std::string::npos) continue;  // 0A: TCP_LISTEN
    if (std::stoul(local.substr(colon + 1), nullptr, 16) == port && inodes.count(inode) != 0) {
      ++count;
    }
  }
  return count;
}

std::vector<std::size_t> per_reactor(const EchoAcceptor& acceptor, std::size_t reactors) {
  std::vector<std::size_t> counts;
  for (std::size_t i = 0; i < reactors; ++i) counts.push_back(acceptor.accepted_count(i));
  return counts;
}

}  // namespace

// --- 1. Every mode serves every byte -------------------------------------------------------------

TEMPLATE_TEST_CASE("every balance mode echoes each client's bytes and counts every accept",
                   "[pool][balance]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Pool = reactor::ReactorPool<reactor::Reactor<TestType>>;
  const Balance balance = GENERATE(Balance::kReusePort, Balance::kRoundRobin,
                                   Balance::kLeastConnections, Balance::kExclusive);
  const std::size_t reactors = GENERATE(std::size_t{2}, std::size_t{3});
  const std::string mode = name_of(balance);
  CAPTURE(mode, reactors);
  constexpr std::size_t kClients = 40;
  const std::size_t fds = test::open_fd_count();
  {
    Board board(reactors);
    Pool pool(reactors);
    using Handler = BasicEcho<reactor::Reactor<TestType>>;
    reactor::PoolAcceptor<Handler, reactor::Reactor<TestType>> acceptor(
        pool, reactor::Endpoint::parse("127.0.0.1:0"), Handler{&board, &pool}, {}, balance);
    CHECK(acceptor.balance() == balance);
    std::vector<Client> clients;
    bool all_finished = false;
    std::string run_error;
    {
      Running running(pool);
      clients = connect_clients(acceptor.local_endpoint(), kClients);
      give_streams(clients, 4096, 512, 1);  // 4 KiB to 23.5 KiB each
      all_finished = drive(clients, kAtOnce, 30s);
      CHECK(board.wait([&] { return Board::sum(board.closed) == kClients; }));
      run_error = running.stop();
    }
    CHECK(run_error.empty());
    REQUIRE(all_finished);
    for (std::size_t i = 0; i < kClients; ++i) {
      CAPTURE(i);
      CHECK(clients[i].peer.error == 0);
      CHECK(clients[i].peer.eof);
      CHECK(clients[i].peer.received.size() == clients[i].stream.size());
      CHECK(first_difference(clients[i].peer.received, clients[i].stream) == kSame);
    }
    CHECK(acceptor.accepted_count() == kClients);
    CHECK(acceptor.failed_count() == 0);
    std::uint64_t sum = 0;
    for (std::size_t i = 0; i < reactors; ++i) {
      CAPTURE(i);
      CHECK(acceptor.accepted_count(i) == board.opened[i]);
      sum += acceptor.accepted_count(i);
      if (balance == Balance::kRoundRobin) {  // reactor 0 first, then in turn
        CHECK(acceptor.accepted_count(i) == kClients / reactors + (i < kClients % reactors));
      }
      // The first connections go to reactors with nothing yet: every reactor gets some.
      if (balance == Balance::kLeastConnections) CHECK(acceptor.accepted_count(i) > 0);
    }
    CHECK(sum == kClients);
    CHECK(board.strays == 0);
    CHECK(board.closes.size() == kClients);
    for (const auto& closed : board.closes) CHECK_FALSE(closed.reason);
    CHECK(pool.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == fds);
}

// --- 2. Dispatch keeps the reactors balanced -----------------------------------------------------

TEST_CASE("round-robin and least-connections keep the busiest reactor within 1.2x of the idlest",
          "[pool][balance]") {
  const Balance balance = GENERATE(Balance::kRoundRobin, Balance::kLeastConnections);
  const std::size_t reactors = GENERATE(std::size_t{2}, std::size_t{3}, std::size_t{4});
  const std::string mode = name_of(balance);
  CAPTURE(mode, reactors);
  constexpr std::size_t kConnections = 200;
  const std::size_t fds = test::open_fd_count();
  {
    Board board(reactors);
    reactor::ReactorPool<Loop> pool(reactors);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          balance);
    Running running(pool);
    // Held open, all at once.
    std::vector<Client> clients = connect_clients(acceptor.local_endpoint(), kConnections);
    REQUIRE(board.wait([&] { return Board::sum(board.open_now) == kConnections; }));
    std::vector<std::size_t> held;
    {
      const std::lock_guard lock(board.mutex);
      held = board.open_now;
    }
    CAPTURE(held);
    const std::size_t most = *std::max_element(held.begin(), held.end());
    const std::size_t least = *std::min_element(held.begin(), held.end());
    CHECK(least > 0);
    CHECK(most * 5 <= least * 6);  // most <= 1.2 * least
    if (balance == Balance::kRoundRobin) {
      for (std::size_t i = 0; i < reactors; ++i) {
        CHECK(held[i] == kConnections / reactors + (i < kConnections % reactors));
      }
    }
    clients.clear();  // FIN from every client: each server side closes on EOF
    CHECK(board.wait([&] { return Board::sum(board.closed) == kConnections; }));
    CHECK(running.stop().empty());
    CHECK(acceptor.accepted_count() == kConnections);
    CHECK(per_reactor(acceptor, reactors) == board.opened);
    CHECK(board.strays == 0);
  }
  CHECK(test::open_fd_count() == fds);
}

TEST_CASE("least-connections sends new connections to the reactor whose connections closed",
          "[pool][balance]") {
  const std::size_t reactors = GENERATE(std::size_t{2}, std::size_t{3});
  CAPTURE(reactors);
  constexpr std::size_t kFirst = 120;
  constexpr std::size_t kLater = 20;
  const std::size_t fds = test::open_fd_count();
  {
    Board board(reactors);
    reactor::ReactorPool<Loop> pool(reactors);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          Balance::kLeastConnections);
    Running running(pool);
    std::vector<Client> clients = connect_clients(acceptor.local_endpoint(), kFirst);
    REQUIRE(board.wait([&] { return Board::sum(board.open_now) == kFirst; }));
    // Close every connection of reactor 1, client side first.
    std::vector<std::size_t> before;
    std::size_t on_one = 0;
    {
      const std::lock_guard lock(board.mutex);
      before = board.open_now;
      for (Client& client : clients) {
        if (board.reactor_of.at(client.port) == 1) {
          client.peer.fd.reset();
          ++on_one;
        }
      }
    }
    CAPTURE(before);
    REQUIRE(on_one > 0);
    REQUIRE(board.wait([&] { return board.open_now[1] == 0; }));
    // Every other reactor still holds ~kFirst / reactors: far more than kLater, so each of the
    // new connections finds reactor 1 the least loaded.
    for (std::size_t i = 0; i < reactors; ++i) {
      if (i != 1) REQUIRE(before[i] > kLater + 2);
    }
    std::vector<Client> later = connect_clients(acceptor.local_endpoint(), kLater);
    REQUIRE(board.wait([&] { return Board::sum(board.open_now) == kFirst - on_one + kLater; }));
    {
      const std::lock_guard lock(board.mutex);
      CHECK(board.open_now[1] == kLater);
      for (std::size_t i = 0; i < reactors; ++i) {
        if (i != 1) CHECK(board.open_now[i] == before[i]);
      }
      for (const Client& client : later) CHECK(board.reactor_of.at(client.port) == 1);
    }
    clients.clear();
    later.clear();
    CHECK(board.wait([&] { return Board::sum(board.closed) == kFirst + kLater; }));
    CHECK(running.stop().empty());
    CHECK(acceptor.accepted_count() == kFirst + kLater);
    CHECK(acceptor.accepted_count(1) == before[1] + kLater);
    CHECK(per_reactor(acceptor, reactors) == board.opened);
  }
  CHECK(test::open_fd_count() == fds);
}

// --- 3. Handles across reactors ------------------------------------------------------------------

namespace {

// Every connection of the pool, by client port, with its handle.
struct Directory {
  struct Entry {
    reactor::ConnectionHandle<Loop> handle;
    std::size_t reactor = 0;
    bool closed = false;
    std::error_code reason;
  };

  template <class Done>
  bool wait(Done done, std::chrono::milliseconds limit = 20s) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, limit, [&] { return done(); });
  }

  std::mutex mutex;
  std::condition_variable changed;
  std::map<std::uint16_t, Entry> entries;
};

// A line protocol that acts on other connections through their handles, from this connection's
// reactor thread:
//   "send PORT SIZE SEED"  sends test::pattern(SIZE, SEED) to client PORT's connection, in 16 KiB
//                          pieces (one posted task each when it lives on another reactor);
//   "close PORT"           closes it;
//   "current PORT"         asks whether its handle is current (not_connected if not).
// Each line is answered "ERROR FROM TO": the first error's value (0: none), the reactor that ran
// the command and the target's reactor.
struct Relay {
  Directory* directory;
  const reactor::ReactorPool<Loop>* pool;
  std::size_t reactor = 0;
  std::uint16_t port = 0;

  void on_open(auto& connection) {
    reactor = pool->current();
    port = connection.remote_endpoint().port();
    const std::lock_guard lock(directory->mutex);
    directory->entries[port] = {connection.handle(), reactor, false, {}};
    directory->changed.notify_all();
  }

  std::size_t on_data(auto& connection, std::string_view bytes) {
    std::size_t consumed = 0;
    for (std::size_t end = bytes.find('\n'); end != std::string_view::npos;
         end = bytes.find('\n', consumed)) {
      const std::string reply = run(std::string(bytes.substr(consumed, end - consumed))) + '\n';
      connection.send(reply);
      consumed = end + 1;
    }
    return consumed;  // a partial line waits for the rest
  }

  std::string run(const std::string& line) const {
    std::istringstream words(line);
    std::string verb;
    std::uint16_t target = 0;
    words >> verb >> target;
    Directory::Entry entry;
    {
      const std::lock_guard lock(directory->mutex);
      const auto found = directory->entries.find(target);
      if (found == directory->entries.end()) return "unknown";
      entry = found->second;
    }
    std::error_code ec;
    if (verb == "send") {
      std::size_t size = 0;
      std::uint32_t seed = 0;
      words >> size >> seed;
      const std::string payload = test::pattern(size, seed);
      for (std::size_t offset = 0; offset < size && !ec; offset += 16384) {
        ec = entry.handle.send(std::string_view(payload).substr(offset, 16384));
      }
    } else if (verb == "close") {
      ec = entry.handle.close();
    } else if (verb == "current") {
      if (!entry.handle.is_current()) ec = std::make_error_code(std::errc::not_connected);
    } else {
      return "bad verb";
    }
    return std::to_string(ec.value()) + ' ' + std::to_string(pool->current()) + ' ' +
           std::to_string(entry.reactor);
  }

  void on_close(auto&, std::error_code reason) {
    const std::lock_guard lock(directory->mutex);
    Directory::Entry& entry = directory->entries[port];
    entry.closed = true;
    entry.reason = reason;
    directory->changed.notify_all();
  }
};

}  // namespace

TEST_CASE("a connection on one reactor sends to and closes one on another through its handle",
          "[pool][handle][threads]") {
  const std::size_t fds = test::open_fd_count();
  {
    Directory directory;
    reactor::ReactorPool<Loop> pool(2);
    reactor::PoolAcceptor<Relay, Loop> acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"),
                                                Relay{&directory, &pool}, {}, Balance::kRoundRobin);
    Running running(pool);
    // Round-robin: the first connection lives on reactor 0, the second on reactor 1, the third
    // on reactor 0 again.
    reactor::UniqueFd target = reactor::connect(acceptor.local_endpoint());
    reactor::UniqueFd relay = reactor::connect(acceptor.local_endpoint());
    reactor::UniqueFd back = reactor::connect(acceptor.local_endpoint());
    const std::uint16_t target_port = local_port(target.get());
    const std::uint16_t relay_port = local_port(relay.get());
    const std::string target_text = std::to_string(target_port);
    const std::string relay_text = std::to_string(relay_port);
    REQUIRE(directory.wait([&] { return directory.entries.size() == 3; }));
    {
      const std::lock_guard lock(directory.mutex);
      REQUIRE(directory.entries.at(target_port).reactor == 0);
      REQUIRE(directory.entries.at(relay_port).reactor == 1);
      REQUIRE(directory.entries.at(local_port(back.get())).reactor == 0);
    }

    // From reactor 1's thread to a connection of reactor 0: 16 posted pieces, in order.
    constexpr std::size_t kBytes = std::size_t{256} * 1024;
    REQUIRE(send_all(relay.get(), "send " + target_text + " " + std::to_string(kBytes) + " 7\n"));
    CHECK(read_line(relay.get()) == "0 1 0");
    const std::string arrived = receive(target.get(), kBytes);
    CHECK(arrived.size() == kBytes);
    CHECK(first_difference(arrived, test::pattern(kBytes, 7)) == kSame);

    // And back, from reactor 0's thread to the connection on reactor 1.
    REQUIRE(send_all(back.get(), "send " + relay_text + " 100000 9\n"));
    CHECK(read_line(back.get()) == "0 0 1");
    const std::string returned = receive(relay.get(), 100000);
    CHECK(first_difference(returned, test::pattern(100000, 9)) == kSame);

    REQUIRE(send_all(relay.get(), "current " + target_text + "\n"));
    CHECK(read_line(relay.get()) == "0 1 0");
    REQUIRE(send_all(relay.get(), "close " + target_text + "\n"));
    CHECK(read_line(relay.get()) == "0 1 0");
    // The close flushes (nothing left), sends FIN, and lingers for ours.
    bool eof = false;
    int error = 0;
    CHECK(receive(target.get(), 1, '\0', &eof, &error).empty());
    CHECK(eof);
    CHECK(error == 0);
    target.reset();
    REQUIRE(directory.wait([&] { return directory.entries.at(target_port).closed; }));
    {
      const std::lock_guard lock(directory.mutex);
      CHECK_FALSE(directory.entries.at(target_port).reason);
    }

    // The handle is stale now: every use from reactor 1 says not_connected and touches nothing.
    const std::string stale = std::to_string(ENOTCONN) + " 1 0";
    REQUIRE(send_all(relay.get(), "send " + target_text + " 10 1\n"));
    CHECK(read_line(relay.get()) == stale);
    REQUIRE(send_all(relay.get(), "close " + target_text + "\n"));
    CHECK(read_line(relay.get()) == stale);
    REQUIRE(send_all(relay.get(), "current " + target_text + "\n"));
    CHECK(read_line(relay.get()) == stale);

    relay.reset();
    back.reset();
    CHECK(directory.wait([&] {
      for (const auto& [port, entry] : directory.entries) {
        if (!entry.closed) return false;
      }
      return true;
    }));
    CHECK(running.stop().empty());
    CHECK(acceptor.accepted_count() == 3);
    CHECK(pool.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == fds);
}

// --- 4. Pool-wide graceful shutdown --------------------------------------------------------------

TEST_CASE("a pool's graceful shutdown serves out open and queued connections in every mode",
          "[pool][shutdown]") {
  const Balance balance = GENERATE(Balance::kReusePort, Balance::kRoundRobin,
                                   Balance::kLeastConnections, Balance::kExclusive);
  const std::string mode = name_of(balance);
  CAPTURE(mode);
  constexpr std::size_t kReactors = 2;
  constexpr std::size_t kQueued = 8;  // completed by the kernel, not accepted yet
  const std::size_t fds = test::open_fd_count();
  {
    Board board(kReactors);
    reactor::ReactorPool<Loop> pool(kReactors);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          balance);
    std::vector<Client> open;  // open on the reactors, data in flight
    std::atomic<bool> go{false};
    bool open_finished = false;
    std::jthread open_driver;
    {
      Running running(pool);
      open = connect_spread(board, acceptor.local_endpoint(), 32, 2);
      give_streams(open, std::size_t{48} * 1024, 1024, 100);
      open_driver = std::jthread(
          [&](const std::stop_token& cancel) { open_finished = drive(open, go, 60s, cancel); });
      // Every connection has been read from; the second half of each stream is sent only once
      // the shutdown has begun.
      REQUIRE(board.wait([&] {
        if (board.received.size() < open.size()) return false;
        for (const auto& [port, bytes] : board.received) {
          if (bytes < 1024) return false;
        }
        return true;
      }));
      REQUIRE(running.stop().empty());
    }
    const std::size_t open_count = open.size();
    const std::size_t all = open_count + kQueued;
    {
      const std::lock_guard lock(board.mutex);
      CAPTURE(board.open_now);
      for (std::size_t i = 0; i < kReactors; ++i) CHECK(board.open_now[i] > 0);
      CHECK(Board::sum(board.open_now) == open_count);
    }
    // The pool is not running, but its listeners are open: these connect into the listen
    // queue(s), send everything and half-close.
    std::vector<Client> queued = connect_clients(acceptor.local_endpoint(), kQueued);
    give_streams(queued, std::size_t{16} * 1024, 512, 200);
    bool queued_finished = false;
    std::jthread queued_driver([&](const std::stop_token& cancel) {
      queued_finished = drive(queued, kAtOnce, 60s, cancel);
    });

    pool.post(0, [&] { go = true; });  // runs inside the shutdown
    const auto start = Clock::now();
    // The quiet period outlasts any stall of the client threads: every connection closes on its
    // client's half-close, with all its echo flushed.
    const reactor::ShutdownReport report = pool.shutdown(60s, 30s);
    const auto took = Clock::now() - start;
    open_driver.join();
    queued_driver.join();
    CHECK_FALSE(report.error);
    CHECK(report.flushed == all);
    CHECK(report.failed == 0);
    CHECK(report.aborted == 0);
    CHECK(report.flushed + report.failed + report.aborted == all);
    CHECK(took < 30s);
    CHECK(open_finished);
    CHECK(queued_finished);
    for (const auto* group : {&open, &queued}) {
      for (const Client& client : *group) {
        CAPTURE(client.port);
        CHECK(client.peer.error == 0);  // none reset
        CHECK(client.peer.eof);
        CHECK(client.peer.received.size() == client.stream.size());
        CHECK(first_difference(client.peer.received, client.stream) == kSame);  // none lost
      }
    }
    CHECK(acceptor.accepted_count() == all);
    CHECK(per_reactor(acceptor, kReactors) == board.opened);
    CHECK(Board::sum(board.opened) == all);
    CHECK(board.closes.size() == all);
    for (const auto& closed : board.closes) CHECK_FALSE(closed.reason);
    CHECK(board.strays == 0);
    CHECK_FALSE(acceptor.is_open());
    CHECK(pool.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == fds);
}

namespace {

// Connects `count` clients to a running pool and waits until all are open; then makes the first
// `busy_each` clients of every reactor trickle forever (never half-closing) and the others send
// `polite_bytes` and half-close. Returns false if the connections did not all open, or some
// reactor got fewer than `busy_each + 1`.
bool split_clients(Board& board, std::vector<Client>& clients, std::size_t reactors,
                   std::size_t busy_each, std::size_t polite_bytes) {
  if (!board.wait([&] { return Board::sum(board.opened) == clients.size(); })) return false;
  const std::lock_guard lock(board.mutex);
  std::vector<std::size_t> busy(reactors, 0);
  std::vector<std::size_t> polite(reactors, 0);
  for (std::size_t i = 0; i < clients.size(); ++i) {
    Client& client = clients[i];
    const std::size_t reactor = board.reactor_of.at(client.port);
    if (busy[reactor] < busy_each) {
      ++busy[reactor];
      client.trickle = true;
      client.half_close = false;
      client.stream = test::pattern(4 << 20, static_cast<std::uint32_t>(300 + i));
    } else {
      ++polite[reactor];
      client.stream = test::pattern(polite_bytes, static_cast<std::uint32_t>(300 + i));
    }
  }
  for (std::size_t i = 0; i < reactors; ++i) {
    if (polite[i] == 0) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("a stop from another thread during a pool's shutdown aborts what is left everywhere",
          "[pool][shutdown][threads]") {
  const Balance balance = GENERATE(Balance::kReusePort, Balance::kRoundRobin,
                                   Balance::kLeastConnections, Balance::kExclusive);
  const std::string mode = name_of(balance);
  CAPTURE(mode);
  constexpr std::size_t kReactors = 2;
  constexpr std::size_t kBusyEach = 2;
  constexpr std::size_t kBusy = kBusyEach * kReactors;
  const std::size_t fds = test::open_fd_count();
  {
    Board board(kReactors);
    reactor::ReactorPool<Loop> pool(kReactors);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          balance);
    std::vector<Client> clients;
    {
      Running running(pool);
      clients = connect_spread(board, acceptor.local_endpoint(), 24, kBusyEach + 1);
      REQUIRE(split_clients(board, clients, kReactors, kBusyEach, std::size_t{32} * 1024));
      REQUIRE(running.stop().empty());
    }
    const std::size_t client_count = clients.size();
    std::set<std::uint16_t> busy_ports;
    for (const Client& client : clients) {
      if (client.trickle) busy_ports.insert(client.port);
    }
    REQUIRE(busy_ports.size() == kBusy);

    // The clients start only now: every byte is served during the shutdown.
    bool clients_finished = false;
    std::jthread driver([&](const std::stop_token& cancel) {
      clients_finished = drive(clients, kAtOnce, 60s, cancel);
    });
    std::vector<bool> draining(kReactors, false);
    for (std::size_t i = 0; i < kReactors; ++i) {
      pool.post(i, [&board, &draining, i] {  // runs inside reactor i's shutdown
        const std::lock_guard lock(board.mutex);
        draining[i] = true;
        board.changed.notify_all();
      });
    }
    // Once every polite client is served out (the busy ones never will be): the second signal.
    bool stopper_saw_it = false;
    std::jthread stopper([&] {
      stopper_saw_it = board.wait(
          [&] {
            return std::all_of(draining.begin(), draining.end(), [](bool d) { return d; }) &&
                   Board::sum(board.closed) == client_count - kBusy;
          },
          60s);
      pool.stop();
    });
    const auto start = Clock::now();
    const reactor::ShutdownReport report = pool.shutdown(120s, 60s);
    const auto took = Clock::now() - start;
    stopper.join();
    driver.join();
    CHECK(stopper_saw_it);
    CHECK(took < 60s);  // ended by the stop, not by the grace or the quiet period
    CHECK_FALSE(report.error);
    CHECK(report.flushed == client_count - kBusy);
    CHECK(report.failed == 0);
    CHECK(report.aborted == kBusy);
    CHECK(report.flushed + report.failed + report.aborted == client_count);
    CHECK(clients_finished);
    std::vector<std::size_t> aborted_on(kReactors, 0);
    for (const auto& closed : board.closes) {
      CAPTURE(closed.port, closed.reactor);
      if (busy_ports.count(closed.port) != 0) {
        CHECK(closed.reason == std::errc::operation_canceled);
        ++aborted_on[closed.reactor];
      } else {
        CHECK_FALSE(closed.reason);
      }
    }
    CHECK(aborted_on == std::vector<std::size_t>(kReactors, kBusyEach));
    for (const Client& client : clients) {
      CAPTURE(client.port, client.trickle);
      const std::string& got = client.peer.received;
      if (client.trickle) {
        // Cut off: FIN, or RST for the bytes it was still sending; what came is an exact prefix.
        CHECK((client.peer.eof || client.peer.error == ECONNRESET || client.peer.error == EPIPE));
        CHECK(first_difference(got, client.stream.substr(0, got.size())) == kSame);
      } else {
        CHECK(client.peer.error == 0);
        CHECK(client.peer.eof);
        CHECK(first_difference(got, client.stream) == kSame);
      }
    }
    CHECK(pool.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == fds);
}

// Reactor::shutdown() consumes a stop() made during its grace period ("it must not make the next
// run() return at once"). In a pool, a reactor with nothing left to serve finishes its part of
// the shutdown early; a stop() that comes after that, while another reactor still serves, must not
// stay pending on the finished one either.
TEST_CASE("a stop during a pool's shutdown does not make the next run return at once",
          "[pool][shutdown][threads]") {
  const std::size_t fds = test::open_fd_count();
  {
    constexpr std::size_t kReactors = 2;
    Board board(kReactors);
    reactor::ReactorPool<Loop> pool(kReactors);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          Balance::kRoundRobin);
    // One connection: round-robin puts it on reactor 0; reactor 1 has nothing to serve.
    std::vector<Client> clients = connect_clients(acceptor.local_endpoint(), 1);
    clients[0].trickle = true;
    clients[0].half_close = false;
    clients[0].stream = test::pattern(4 << 20, 5);
    {
      Running running(pool);
      REQUIRE(board.wait([&] { return board.opened[0] == 1; }));
      REQUIRE(running.stop().empty());
    }
    bool draining = false;
    pool.post(0, [&] {
      const std::lock_guard lock(board.mutex);
      draining = true;
      board.changed.notify_all();
    });
    std::jthread driver(
        [&](const std::stop_token& cancel) { drive(clients, kAtOnce, 60s, cancel); });
    bool stopper_saw_it = false;
    std::jthread stopper([&] {
      // Reactor 0 is serving out its busy connection: wait until it has echoed another 8 KiB
      // during the shutdown (reactor 1, with nothing to serve, has long finished by then).
      const std::uint16_t port = clients[0].port;
      std::optional<std::size_t> at_start;
      stopper_saw_it = board.wait(
          [&] {
            if (!draining) return false;
            if (!at_start) at_start = board.received[port];
            return board.received[port] >= *at_start + 8192;
          },
          60s);
      pool.stop();
    });
    const reactor::ShutdownReport report = pool.shutdown(120s, 60s);
    stopper.join();
    driver.join();
    CHECK(stopper_saw_it);
    CHECK(report.aborted == 1);
    CHECK(report.flushed + report.failed + report.aborted == 1);
    for (std::size_t i = 0; i < kReactors; ++i) {
      CAPTURE(i);
      CHECK_FALSE(pool[i].stop_requested());  // the stop was the shutdown's to consume
    }
    // So the pool runs again: run() must not return by itself. Work posted to every reactor runs
    // only while it does.
    std::size_t ran = 0;
    bool returned = false;
    std::string run_error;
    std::thread runner([&] {
      try {
        pool.run();
      } catch (const std::exception& e) {
        run_error = e.what();
      }
      const std::lock_guard lock(board.mutex);
      returned = true;
      board.changed.notify_all();
    });
    for (std::size_t i = 0; i < kReactors; ++i) {
      pool.post(i, [&] {
        const std::lock_guard lock(board.mutex);
        ++ran;
        board.changed.notify_all();
      });
    }
    CHECK(board.wait([&] { return ran == kReactors || returned; }));
    bool returned_by_itself = false;
    {
      const std::lock_guard lock(board.mutex);
      returned_by_itself = returned;
    }
    pool.stop();
    runner.join();
    CHECK(run_error.empty());
    CHECK_FALSE(returned_by_itself);
    CHECK(ran == kReactors);
  }
  CHECK(test::open_fd_count() == fds);
}

// Review finding: a reactor left its shutdown loop as soon as its own connections were gone, so
// its signalfd (the README puts the SignalSet on reactor 0), timers and posted work went unserved
// while other reactors still served: a second SIGTERM did nothing until the grace ran out. A timer
// on reactor 0 stands in for the signal here.
TEST_CASE("a reactor with nothing left to serve keeps its loop running while the others serve",
          "[pool][shutdown][threads]") {
  const std::size_t fds = test::open_fd_count();
  {
    constexpr std::size_t kReactors = 2;
    Board board(kReactors);
    reactor::ReactorPool<Loop> pool(kReactors);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          Balance::kRoundRobin);
    // Round-robin: client 0 on reactor 0 (half-closes, so it is done at once), client 1 on
    // reactor 1 (keeps sending and never half-closes).
    std::vector<Client> clients = connect_clients(acceptor.local_endpoint(), 2);
    clients[1].trickle = true;
    clients[1].half_close = false;
    clients[1].stream = test::pattern(4 << 20, 7);
    {
      Running running(pool);
      REQUIRE(board.wait([&] { return board.opened[0] == 1 && board.opened[1] == 1; }));
      REQUIRE(running.stop().empty());
    }
    bool fired = false;
    pool.post(0, [&] {
      pool[0].schedule_after(300ms, [&] {
        fired = true;
        pool.stop();
      });
    });
    std::jthread driver(
        [&](const std::stop_token& cancel) { drive(clients, kAtOnce, 60s, cancel); });
    const auto start = std::chrono::steady_clock::now();
    const reactor::ShutdownReport report = pool.shutdown(120s, 60s);
    const auto took = std::chrono::steady_clock::now() - start;
    driver.join();
    CHECK(fired);
    CHECK(took < 30s);  // the 120 s grace was cut short by the timer's stop, not waited out
    CHECK(report.flushed == 1);
    CHECK(report.aborted == 1);
    CHECK(report.failed == 0);
    CHECK_FALSE(report.error);
  }
  CHECK(test::open_fd_count() == fds);
}

// New-user finding: the pool's reactors were destroyed one by one, each aborting its connections
// as it went, so an on_close on reactor 1 that posted to reactor 0 (or asked pool.current(), or
// used a handle of one of its connections) touched a freed reactor (ASan: heap-use-after-free).
struct PostsOnClose {
  reactor::ReactorPool<Loop>* pool;
  std::atomic<std::size_t>* canceled;
  void on_data(auto& c, std::string_view bytes) { c.send(bytes); }
  void on_close(auto&, std::error_code reason) {
    if (reason != std::errc::operation_canceled) return;
    pool->post(0, [] {});
    if (pool->current() < pool->size()) canceled->fetch_add(1);
  }
};

TEST_CASE("a pool destroyed with connections open aborts them all while every reactor exists",
          "[pool][lifecycle][threads]") {
  const std::size_t fds = test::open_fd_count();
  std::atomic<std::size_t> canceled{0};
  {
    std::vector<reactor::UniqueFd> clients;
    reactor::ReactorPool<Loop> pool(2);
    reactor::PoolAcceptor<PostsOnClose, Loop> acceptor(
        pool, reactor::Endpoint::parse("127.0.0.1:0"), PostsOnClose{&pool, &canceled}, {},
        Balance::kRoundRobin);
    for (int i = 0; i < 4; ++i) clients.push_back(reactor::connect(acceptor.local_endpoint()));
    {
      Running running(pool);
      const auto deadline = Clock::now() + 20s;
      // (No event to wait on from outside: the count is read from another thread, bounded.)
      while (pool.connection_count() < 4 && Clock::now() < deadline) std::this_thread::yield();
      REQUIRE(pool.connection_count() == 4);
      REQUIRE(running.stop().empty());
    }
    acceptor.close();
  }  // the pool goes here, with its four connections open (two on each reactor)
  CHECK(canceled == 4);
  CHECK(test::open_fd_count() == fds);
}

// --- 5. A throwing handler -----------------------------------------------------------------------

TEST_CASE(
    "a handler that throws on reactor 1 closes only its connection, and the pool keeps serving",
    "[pool][errors]") {
  const Balance balance = GENERATE(Balance::kReusePort, Balance::kRoundRobin,
                                   Balance::kLeastConnections, Balance::kExclusive);
  const std::string mode = name_of(balance);
  CAPTURE(mode);
  constexpr std::size_t kReactors = 2;
  const std::size_t fds = test::open_fd_count();
  {
    Board board(kReactors);
    reactor::ReactorPool<Loop> pool(kReactors);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"),
                          Echo{&board, &pool, /*throw_on_boom=*/true}, {}, balance);
    // This time the pool runs on the test thread, the clients on another. The client thread
    // records; the test thread checks after joining it.
    std::vector<Client> clients;
    std::size_t client_count = 0;
    std::size_t victim = SIZE_MAX;
    bool victim_eof = false;
    int victim_error = 0;
    std::string victim_received;
    bool victim_closed = false;
    bool others_finished = false;
    std::vector<std::size_t> others_on(kReactors, 0);
    std::thread client_thread([&] {
      struct StopAtExit {
        reactor::ReactorPool<Loop>& pool;
        ~StopAtExit() { pool.stop(); }
      } stop_at_exit{pool};
      // At least two on reactor 1 (the victim and another) and one on reactor 0.
      clients = connect_spread(board, acceptor.local_endpoint(), 16, 2);
      client_count = clients.size();
      {
        const std::lock_guard lock(board.mutex);
        for (std::size_t i = 0; i < client_count; ++i) {
          const std::size_t reactor = board.reactor_of.at(clients[i].port);
          if (reactor == 1 && victim == SIZE_MAX) {
            victim = i;
          } else {
            ++others_on[reactor];
          }
        }
      }
      if (victim == SIZE_MAX) return;
      Client& bad = clients[victim];
      if (!send_all(bad.peer.fd.get(), "boom!")) return;
      victim_received = receive(bad.peer.fd.get(), 1, '\0', &victim_eof, &victim_error);
      victim_closed = board.wait([&] {
        return std::any_of(board.closes.begin(), board.closes.end(),
                           [&](const Board::Closed& c) { return c.port == bad.port; });
      });
      bad.peer.fd.reset();
      std::vector<Client> others;
      for (std::size_t i = 0; i < client_count; ++i) {
        if (i != victim) others.push_back(std::move(clients[i]));
      }
      give_streams(others, 8192, 1024, 400);
      others_finished = drive(others, kAtOnce, 30s);
      board.wait([&] { return Board::sum(board.closed) == client_count; });
      clients = std::move(others);  // for the checks
    });
    std::string run_error;
    try {
      pool.run();  // returns at the client thread's stop()
    } catch (const std::exception& e) {
      run_error = e.what();
    }
    client_thread.join();
    CHECK(run_error.empty());
    REQUIRE(victim < client_count);
    CAPTURE(others_on);
    for (std::size_t i = 0; i < kReactors; ++i) CHECK(others_on[i] > 0);
    CHECK(victim_received.empty());  // nothing echoed: on_data threw before sending
    CHECK((victim_eof || victim_error == ECONNRESET));
    CHECK(victim_closed);
    CHECK(others_finished);
    REQUIRE(clients.size() == client_count - 1);
    for (const Client& client : clients) {
      CAPTURE(client.port);
      CHECK(client.peer.error == 0);
      CHECK(client.peer.eof);
      CHECK(first_difference(client.peer.received, client.stream) == kSame);
    }
    std::size_t thrown = 0;
    for (const auto& closed : board.closes) {
      CAPTURE(closed.port, closed.reactor);
      if (closed.reason == reactor::Error::kHandlerException) {
        ++thrown;
        CHECK(closed.reactor == 1);
      } else {
        CHECK_FALSE(closed.reason);
      }
    }
    CHECK(thrown == 1);
    CHECK(board.closes.size() == client_count);
    CHECK(acceptor.accepted_count() == client_count);
  }
  CHECK(test::open_fd_count() == fds);
}

// --- 6. run, stop, shutdown and pinning ----------------------------------------------------------

namespace {

// Connects `count` clients, echoes a stream through each (half-closing), and says whether every
// one got exactly its bytes back and then EOF.
bool echoes(const reactor::Endpoint& endpoint, std::size_t count, std::uint32_t seed) {
  std::vector<Client> clients = connect_clients(endpoint, count);
  give_streams(clients, 10000, 1000, seed);
  if (!drive(clients, kAtOnce, 30s)) return false;
  return std::all_of(clients.begin(), clients.end(), [](const Client& client) {
    return client.peer.error == 0 && client.peer.eof && client.peer.received == client.stream;
  });
}

}  // namespace

TEST_CASE("a stop before run makes run return at once, and the pool runs again afterwards",
          "[pool][run]") {
  const std::size_t fds = test::open_fd_count();
  {
    Board board(2);
    reactor::ReactorPool<Loop> pool(2);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          Balance::kRoundRobin);
    pool.stop();
    auto first = std::async(std::launch::async, [&] { pool.run(); });
    const bool at_once = first.wait_for(10s) == std::future_status::ready;
    if (!at_once) pool.stop();
    first.get();
    REQUIRE(at_once);
    for (std::size_t i = 0; i < pool.size(); ++i) {
      CAPTURE(i);
      CHECK(pool[i].loop_iterations() == 0);  // not a single epoll_wait
      CHECK_FALSE(pool[i].stop_requested());
    }
    bool served = false;
    {
      Running running(pool);
      served = echoes(acceptor.local_endpoint(), 6, 10);
      CHECK(running.stop().empty());
    }
    CHECK(served);
    CHECK(acceptor.accepted_count() == 6);
    CHECK(per_reactor(acceptor, 2) == std::vector<std::size_t>{3, 3});
  }
  CHECK(test::open_fd_count() == fds);
}

TEST_CASE("run from a second thread while the pool runs is refused, and so is shutdown",
          "[pool][run][threads]") {
  const std::size_t fds = test::open_fd_count();
  {
    Board board(2);
    reactor::ReactorPool<Loop> pool(2);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          Balance::kReusePort);
    Running running(pool);
    std::vector<Client> held = connect_clients(acceptor.local_endpoint(), 4);
    REQUIRE(board.wait([&] { return Board::sum(board.open_now) == 4; }));  // it runs
    std::error_code refused;
    std::string what;
    try {
      pool.run();
    } catch (const std::system_error& e) {
      refused = e.code();
      what = e.what();
    }
    CHECK(refused == std::errc::device_or_resource_busy);
    CHECK(what.find("ReactorPool::run") != std::string::npos);
    const reactor::ShutdownReport report = pool.shutdown(1s);
    CHECK(report.error == std::errc::device_or_resource_busy);
    CHECK(report.flushed + report.failed + report.aborted == 0);
    // Neither touched the running pool: it still holds and serves its connections.
    CHECK(pool.connection_count() == 4);
    CHECK(echoes(acceptor.local_endpoint(), 4, 20));
    held.clear();
    CHECK(board.wait([&] { return Board::sum(board.closed) == 8; }));
    CHECK(running.stop().empty());
  }
  CHECK(test::open_fd_count() == fds);
}

TEST_CASE("pinned reactors run on the CPU asked for, and the calling thread gets its affinity back",
          "[pool][run][threads]") {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  REQUIRE(::sched_getaffinity(0, sizeof allowed, &allowed) == 0);
  int cpu = 0;  // CPU 0 if this process may run there
  while (cpu < CPU_SETSIZE && !CPU_ISSET(cpu, &allowed)) ++cpu;
  REQUIRE(cpu < CPU_SETSIZE);
  if (cpu != 0) WARN("CPU 0 is not available to this process; pinning to CPU " << cpu);
  const std::size_t fds = test::open_fd_count();
  {
    reactor::PoolOptions options;
    options.pin_threads = true;
    options.cpus = {cpu};
    Board board(2);
    reactor::ReactorPool<Loop> pool(2, options);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          Balance::kRoundRobin);
    cpu_set_t before;
    REQUIRE(::pthread_getaffinity_np(::pthread_self(), sizeof before, &before) == 0);
    bool served = false;
    std::thread client_thread([&] {
      served = echoes(acceptor.local_endpoint(), 8, 30);
      pool.stop();
    });
    std::string run_error;
    try {
      pool.run();  // reactor 0 on this thread, pinned while it runs
    } catch (const std::exception& e) {
      run_error = e.what();
    }
    client_thread.join();
    cpu_set_t after;
    REQUIRE(::pthread_getaffinity_np(::pthread_self(), sizeof after, &after) == 0);
    CHECK(run_error.empty());
    CHECK(served);
    CHECK(CPU_EQUAL(&before, &after));
    CHECK(board.opened == std::vector<std::size_t>{4, 4});
    CHECK(board.cpus == std::set<int>{cpu});  // every on_data of both reactors
  }
  CHECK(test::open_fd_count() == fds);
}

TEST_CASE("a CPU this process may not run on is refused", "[pool][run]") {
  const int cpu = GENERATE(99999, -1, CPU_SETSIZE);
  CAPTURE(cpu);
  const std::size_t fds = test::open_fd_count();
  reactor::PoolOptions options;
  options.pin_threads = true;
  options.cpus = {0, cpu};
  std::error_code refused;
  std::string what;
  try {
    reactor::ReactorPool<Loop> pool(2, options);
  } catch (const std::system_error& e) {
    refused = e.code();
    what = e.what();
  }
  CHECK(refused == std::errc::invalid_argument);
  CHECK(what.find("ReactorPool cpus") != std::string::npos);
  CHECK(test::open_fd_count() == fds);  // the reactors made before the check are gone
}

// --- 7. Endpoints --------------------------------------------------------------------------------

namespace {

// A fresh directory for Unix sockets, removed with everything in it.
struct TempDirectory {
  TempDirectory()
      : path(std::filesystem::temp_directory_path() /
             ("reactor-pool-test-" + std::to_string(::getpid()))) {
    std::filesystem::create_directories(path);
  }
  ~TempDirectory() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::filesystem::path path;
};

}  // namespace

TEST_CASE("kReusePort refuses a Unix socket", "[pool][unix]") {
  const TempDirectory directory;
  const std::string path = (directory.path / "reuseport.sock").string();
  const std::size_t fds = test::open_fd_count();
  {
    Board board(2);
    reactor::ReactorPool<Loop> pool(2);
    std::error_code refused;
    try {
      EchoAcceptor acceptor(pool, reactor::Endpoint::unix_path(path), Echo{&board, &pool}, {},
                            Balance::kReusePort);
    } catch (const std::system_error& e) {
      refused = e.code();
    }
    CHECK(refused == std::errc::invalid_argument);
    CHECK_FALSE(std::filesystem::exists(path));
  }
  CHECK(test::open_fd_count() == fds);
}

TEST_CASE("a pool serves a Unix socket and removes its file when the acceptor goes",
          "[pool][unix]") {
  const Balance balance =
      GENERATE(Balance::kExclusive, Balance::kRoundRobin, Balance::kLeastConnections);
  const std::string mode = name_of(balance);
  CAPTURE(mode);
  const TempDirectory directory;
  const std::string path = (directory.path / "pool.sock").string();
  const std::size_t fds = test::open_fd_count();
  {
    Board board(2);
    reactor::ReactorPool<Loop> pool(2);
    {
      EchoAcceptor acceptor(pool, reactor::Endpoint::unix_path(path), Echo{&board, &pool}, {},
                            balance);
      CHECK(acceptor.local_endpoint().to_string() == "unix:" + path);
      CHECK(std::filesystem::is_socket(path));
      bool served = false;
      {
        Running running(pool);
        served = echoes(acceptor.local_endpoint(), 8, 40);
        CHECK(board.wait([&] { return Board::sum(board.closed) == 8; }));
        CHECK(running.stop().empty());
      }
      CHECK(served);
      CHECK(acceptor.accepted_count() == 8);
      CHECK(per_reactor(acceptor, 2) == board.opened);
      CHECK(std::filesystem::is_socket(path));  // stopping the pool closes nothing
    }
    CHECK_FALSE(std::filesystem::exists(path));
  }
  CHECK(test::open_fd_count() == fds);
}

TEST_CASE("port 0 gives every listener of the server one port", "[pool][balance]") {
  const Balance balance = GENERATE(Balance::kReusePort, Balance::kRoundRobin,
                                   Balance::kLeastConnections, Balance::kExclusive);
  const std::string mode = name_of(balance);
  CAPTURE(mode);
  constexpr std::size_t kReactors = 3;
  constexpr std::size_t kClients = 60;
  const std::size_t fds = test::open_fd_count();
  {
    Board board(kReactors);
    reactor::ReactorPool<Loop> pool(kReactors);
    EchoAcceptor acceptor(pool, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&board, &pool}, {},
                          balance);
    const std::uint16_t port = acceptor.local_endpoint().port();
    REQUIRE(port != 0);
    // One listening socket per reactor with SO_REUSEPORT, one shared or dispatching one else.
    CHECK(listeners_on(port) == (balance == Balance::kReusePort ? kReactors : 1));
    bool served = false;
    {
      Running running(pool);
      served = echoes(acceptor.local_endpoint(), kClients, 50);
      CHECK(board.wait([&] { return Board::sum(board.closed) == kClients; }));
      CHECK(running.stop().empty());
    }
    CHECK(served);
    CHECK(acceptor.accepted_count() == kClients);
    CHECK(per_reactor(acceptor, kReactors) == board.opened);
    if (balance == Balance::kReusePort) {
      // Each listener took connections: all of them listen on that one port (60 connections
      // hashed to 3 listeners leave one empty with probability ~1e-10).
      for (std::size_t i = 0; i < kReactors; ++i) CHECK(acceptor.accepted_count(i) > 0);
    }
    acceptor.close();
    CHECK(listeners_on(port) == 0);
  }
  CHECK(test::open_fd_count() == fds);
}
