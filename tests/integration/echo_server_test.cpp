// Integration tests for examples/echo_server.cpp: each test runs the real binary as a child
// process (ECHO_SERVER_PATH, set by tests/CMakeLists.txt) and talks to it over loopback TCP,
// IPv6 or a Unix socket, playing the client with plain non-blocking sockets and poll().
//
// REACTOR_ECHO_SERVER_ARGS (words split at spaces) is appended to every echo_server command line
// that start_echo_server() builds: tests/CMakeLists.txt runs the cases not tagged [pool] once more
// per balance mode with "--threads 2 --balance MODE". A case that cannot apply to a mode says so
// and asserts what echo_server does instead. The [pool] cases name their own --threads and
// --balance, run every mode themselves and ignore the variable.
//
// Waits are bounded by generous limits that only stop a broken test from hanging; no result is
// decided by a sleep, and only one by a clock: a second SIGTERM must end the 3 s grace period
// well before it would run out (2.5 s). The child is always killed and reaped when a test ends
// (ServerProcess). Which thread serves which connection is read from /proc (each reactor's epoll
// set), not guessed.
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "catch.hpp"
#include "loopback.hpp"
#include "server_process.hpp"

#ifndef ECHO_SERVER_PATH
// tests/CMakeLists.txt defines it through reactor_add_test(... PROGRAMS echo_server).
#error "ECHO_SERVER_PATH must name the echo_server binary"
#endif

// ServerProcess, exchange(), eventually(), kLimit, Clock and the other child-process and socket
// helpers; the chrono literals come with them.
using namespace test;

namespace {

// --- How this run starts echo_server -------------------------------------------------------------

// The extra arguments of this run (REACTOR_ECHO_SERVER_ARGS) and what they select.
struct RunMode {
  std::vector<std::string> extra_args;
  std::size_t threads = 1;            // the last --threads among them
  std::string balance = "reuseport";  // the last --balance among them

  // A Unix socket has no SO_REUSEPORT: with more than one thread, reuseport refuses --unix.
  bool serves_unix() const { return threads == 1 || balance != "reuseport"; }
};

const RunMode& run_mode() {
  static const RunMode kMode = [] {
    RunMode parsed;
    const char* text = std::getenv("REACTOR_ECHO_SERVER_ARGS");
    std::istringstream words(text != nullptr ? text : "");
    for (std::string word; words >> word;) parsed.extra_args.push_back(word);
    for (std::size_t i = 0; i + 1 < parsed.extra_args.size(); ++i) {
      const std::string& value = parsed.extra_args[i + 1];
      if (parsed.extra_args[i] == "--threads")
        parsed.threads = std::strtoul(value.c_str(), nullptr, 10);
      if (parsed.extra_args[i] == "--balance") parsed.balance = value;
    }
    return parsed;
  }();
  return kMode;
}

// Starts echo_server with `args` followed by this run's extra arguments.
ServerProcess start_echo_server(std::vector<std::string> args, rlim_t fd_limit = 0,
                                StderrMode stderr_mode = StderrMode::kInherit) {
  const RunMode& mode = run_mode();
  args.insert(args.end(), mode.extra_args.begin(), mode.extra_args.end());
  return ServerProcess(ECHO_SERVER_PATH, args, fd_limit, stderr_mode);
}

// "--threads 2 --balance `balance`" and then `more`: the command line of a [pool] case.
std::vector<std::string> pool_args(std::string_view balance, std::vector<std::string> more = {}) {
  std::vector<std::string> args{"--threads", "2", "--balance", std::string(balance)};
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

// Asserts that `server` (started with --unix `path` under reuseport with two threads or more)
// refused to start: no "listening on" line, one line on stderr saying why, exit status 1, and no
// socket file left behind.
void check_refuses_unix_under_reuseport(ServerProcess& server, const std::string& path) {
  const std::optional<std::string> out = server.read_to_eof();
  REQUIRE(out.has_value());
  CHECK(*out == "");
  const std::optional<std::string> err = server.read_stderr_to_eof();
  REQUIRE(err.has_value());
  INFO("stderr: " << *err);
  CHECK(*err ==
        "echo_server: --balance reuseport needs TCP (SO_REUSEPORT); with --unix use dispatch,"
        " round-robin or exclusive\n");
  CHECK(std::count(err->begin(), err->end(), '\n') == 1);
  const std::optional<int> status = server.wait_exit();
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 1);
  CHECK_FALSE(std::filesystem::exists(path));
}

// --- The server's threads, seen from /proc -------------------------------------------------------

// The inode of the socket that `link` (a /proc/PID/fd entry) refers to; 0 for any other file.
unsigned long socket_inode(const std::filesystem::path& link) {
  std::error_code ec;
  const std::string target = std::filesystem::read_symlink(link, ec).string();
  unsigned long inode = 0;
  if (ec || std::sscanf(target.c_str(), "socket:[%lu]", &inode) != 1) return 0;
  return inode;
}

// The sockets process `pid` has open, by inode. Taken when echo_server has just said "listening
// on", before any client connects, these are its listening sockets.
std::set<unsigned long> open_sockets(pid_t pid) {
  std::set<unsigned long> inodes;
  std::error_code ec;
  for (std::filesystem::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", ec), end;
       !ec && it != end; it.increment(ec)) {
    if (const unsigned long inode = socket_inode(it->path()); inode != 0) inodes.insert(inode);
  }
  return inodes;
}

// Whether process `pid` still has any of the sockets `inodes` open.
bool any_open(pid_t pid, const std::set<unsigned long>& inodes) {
  const std::set<unsigned long> open = open_sockets(pid);
  return std::any_of(inodes.begin(), inodes.end(),
                     [&](unsigned long inode) { return open.count(inode) != 0; });
}

// For each epoll set of process `pid` (echo_server has one per reactor, so one per thread): how
// many sockets other than `listeners` it watches, which are the connections that thread serves. A
// connection handed to a reactor that has not opened it yet is in none. (Each epoll fd's fdinfo
// names what it watches in its "tfd: FD" lines: proc(5).)
std::vector<std::size_t> connections_per_reactor(pid_t pid,
                                                 const std::set<unsigned long>& listeners) {
  const std::filesystem::path fds = "/proc/" + std::to_string(pid) + "/fd";
  const std::filesystem::path fdinfo = "/proc/" + std::to_string(pid) + "/fdinfo";
  std::vector<std::size_t> counts;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(fds, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code link_ec;
    if (std::filesystem::read_symlink(it->path(), link_ec) != "anon_inode:[eventpoll]") continue;
    std::ifstream info(fdinfo / it->path().filename());
    std::size_t count = 0;
    for (std::string line; std::getline(info, line);) {
      int target = -1;
      if (std::sscanf(line.c_str(), "tfd: %d", &target) != 1) continue;
      const unsigned long inode = socket_inode(fds / std::to_string(target));
      if (inode != 0 && listeners.count(inode) == 0) ++count;
    }
    counts.push_back(count);
  }
  return counts;
}

std::size_t total(const std::vector<std::size_t>& counts) {
  return std::accumulate(counts.begin(), counts.end(), std::size_t{0});
}

// Whether there are two reactors and each serves a connection.
bool both_serve(const std::vector<std::size_t>& counts) {
  return counts.size() == 2 && counts[0] > 0 && counts[1] > 0;
}

// "12 + 5": connections per reactor.
std::string describe(const std::vector<std::size_t>& counts) {
  std::string text;
  for (const std::size_t count : counts) {
    text += (text.empty() ? "" : " + ") + std::to_string(count);
  }
  return text.empty() ? "no epoll set" : text;
}

// --- Many clients at once ------------------------------------------------------------------------

// One of the clients that exchange_all() plays together.
struct Client {
  reactor::UniqueFd fd;  // closed once the server's EOF arrived
  std::string data;
  std::size_t sent = 0;     // bytes of `data` sent so far
  bool half_close = false;  // shut down writing once all of `data` is sent
  bool shut = false;        // ...and it has
  std::string received;
  bool eof = false;
  int error = 0;            // errno of a failed send, shutdown or read
  std::size_t reactor = 0;  // which of the server's reactors serves it, where the test knows
};

// Plays every client at once with one poll(): each sends the rest of its data (then half-closes,
// if asked) while reading whatever comes back, until the server's EOF (then it closes its socket,
// so that the server does not linger waiting for its FIN) or an error. False if `limit` passed
// first.
bool exchange_all(std::vector<Client>& clients, Clock::duration limit = kLimit) {
  const auto deadline = Clock::now() + limit;
  std::vector<pollfd> fds;
  std::vector<Client*> owners;
  for (;;) {
    fds.clear();
    owners.clear();
    for (Client& client : clients) {
      if (client.eof || client.error != 0) continue;
      if (client.half_close && !client.shut && client.sent == client.data.size()) {
        if (::shutdown(client.fd.get(), SHUT_WR) != 0) {
          client.error = errno;
          continue;
        }
        client.shut = true;
      }
      const short events = client.sent < client.data.size() ? POLLIN | POLLOUT : POLLIN;
      fds.push_back(pollfd{client.fd.get(), events, 0});
      owners.push_back(&client);
    }
    if (fds.empty()) return true;
    if (Clock::now() >= deadline) return false;
    const int ready = ::poll(fds.data(), fds.size(), ms_until(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) return false;
    for (std::size_t i = 0; i < fds.size(); ++i) {
      Client& client = *owners[i];
      const short revents = fds[i].revents;
      if ((revents & (POLLOUT | POLLERR)) != 0 && client.sent < client.data.size()) {
        const std::size_t chunk = std::min<std::size_t>(client.data.size() - client.sent, 65536);
        const ssize_t n =
            ::send(client.fd.get(), client.data.data() + client.sent, chunk, MSG_NOSIGNAL);
        if (n > 0) {
          client.sent += static_cast<std::size_t>(n);
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
          client.error = errno;
          continue;
        }
      }
      if ((revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
        char buffer[65536];
        const ssize_t n = ::read(client.fd.get(), buffer, sizeof buffer);
        if (n > 0) {
          client.received.append(buffer, static_cast<std::size_t>(n));
        } else if (n == 0) {
          client.eof = true;
          client.fd.reset();
        } else if (errno != EAGAIN && errno != EINTR) {
          client.error = errno;
        }
      }
    }
  }
}

// Asserts that every client got exactly its data back, then EOF.
void check_all_echoed(const std::vector<Client>& clients) {
  std::size_t good = 0;
  for (std::size_t i = 0; i < clients.size(); ++i) {
    const Client& client = clients[i];
    const std::size_t differs = first_difference(client.received, client.data);
    if (client.error == 0 && client.eof && differs == std::string_view::npos) {
      ++good;
    } else {
      FAIL_CHECK("client " << i << ": error " << client.error << ", eof " << client.eof << ", sent "
                           << client.sent << " of " << client.data.size() << ", received "
                           << client.received.size() << ", first difference at " << differs);
    }
  }
  CHECK(good == clients.size());
}

// The most clients connect_to_both_reactors() tries: an idle EPOLLEXCLUSIVE acceptor takes 16
// connections in a row (PoolAcceptor requeues it after 16), and the kernel's reuseport hash could
// put a few in a row on one listener.
constexpr std::size_t kMaxSpreadClients = 40;

// Connects clients to `server` (two reactors; `listeners`: its listening sockets) one after
// another, noting which reactor took each before the next connects, until there are at least
// `at_least` and each reactor serves one. Their socket buffers are small (64 KiB asked), so that
// what they do not read stays in the server's queues rather than in the kernel's.
std::vector<Client> connect_to_both_reactors(const ServerProcess& server,
                                             const reactor::Endpoint& endpoint,
                                             const std::set<unsigned long>& listeners,
                                             std::size_t at_least) {
  std::vector<Client> clients;
  std::vector<std::size_t> before(2, 0);
  std::vector<std::size_t> after;
  while (clients.size() < kMaxSpreadClients) {
    Client& client = clients.emplace_back();
    client.fd = connect_to(endpoint);
    const int size = 65536;
    REQUIRE(::setsockopt(client.fd.get(), SOL_SOCKET, SO_RCVBUF, &size, sizeof size) == 0);
    REQUIRE(::setsockopt(client.fd.get(), SOL_SOCKET, SO_SNDBUF, &size, sizeof size) == 0);
    const bool watched = eventually([&] {
      after = connections_per_reactor(server.pid(), listeners);
      return total(after) == clients.size();
    });
    INFO("connections per reactor: " << describe(after));
    REQUIRE(watched);
    REQUIRE(after.size() == 2);
    client.reactor = after[0] > before[0] ? 0 : 1;
    before = after;
    if (clients.size() >= at_least && both_serve(after)) return clients;
  }
  FAIL("after " << clients.size() << " clients, connections per reactor: " << describe(after));
  return clients;
}

// A lower bound on the echo of `client` (which reads nothing) that waits in the server's own
// output queue: what the server has read of what the client sent, less what the kernel holds on
// the way back. A byte that both ends' queues count at once (received, not acknowledged yet) only
// lowers the bound.
long long echo_held_by_server(unsigned server_port, const Client& client) {
  const unsigned client_port = local_port_of(client.fd.get());
  const auto server_side = tcp_queues(server_port, client_port);  // (send queue, receive queue)
  const auto client_side = tcp_queues(client_port, server_port);
  if (!server_side.has_value() || !client_side.has_value()) return 0;
  const auto read_by_server = static_cast<long long>(client.sent) -
                              static_cast<long long>(client_side->first + server_side->second);
  return read_by_server - static_cast<long long>(server_side->first + client_side->second);
}

// The report echo_server writes to stderr when it exits after a stop.
std::string shutdown_report(std::size_t flushed, std::size_t aborted) {
  return "echo_server: shut down: " + std::to_string(flushed) + " connections flushed, " +
         std::to_string(aborted) + " aborted\n";
}

// Asserts that `server` exits with status 0 and the stderr report `report`.
void check_exit_with_report(ServerProcess& server, const std::string& report) {
  const std::optional<std::string> err = server.read_stderr_to_eof();
  REQUIRE(err.has_value());
  CHECK(*err == report);
  const std::optional<int> status = server.wait_exit();
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

// Sends SIGTERM while `client` is connected and idle: the server closes it once it is quiet (the
// client reads EOF and nothing else), the client closes too, and the server exits 0. (Closing
// spares the 2 s the server would linger for the client's FIN.)
void stop_with_idle_client(ServerProcess& server, reactor::UniqueFd& client) {
  server.signal(SIGTERM);
  ExchangeOptions options;
  options.until_eof = true;
  const Exchange result = exchange(client.get(), "", options);
  CHECK_FALSE(result.timed_out);
  CHECK(result.error == 0);
  CHECK(result.received == "");
  CHECK(result.eof);
  client.reset();
  const std::optional<int> status = server.wait_exit();
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

// Asserts that `result` holds exactly `data`, echoed in order.
void check_echoed(const Exchange& result, std::string_view data) {
  CHECK_FALSE(result.timed_out);
  CHECK(result.error == 0);
  CHECK(result.sent == data.size());
  CHECK(result.received.size() == data.size());
  CHECK(first_difference(result.received, data) == std::string_view::npos);
}

}  // namespace

// --- Tests ---------------------------------------------------------------------------------------

TEST_CASE("echo_server prints exactly one line naming its address and port",
          "[echo_server][integration]") {
  ServerProcess server = start_echo_server({});
  const std::optional<std::string> line = server.read_line();
  REQUIRE(line.has_value());
  INFO("server said: " << *line);
  const std::string_view prefix = "listening on 127.0.0.1:";
  REQUIRE(line->rfind(prefix, 0) == 0);
  CHECK(parse_port(std::string_view(*line).substr(prefix.size())) != 0);

  // Its whole life long, nothing else reaches stdout.
  server.signal(SIGTERM);
  const std::optional<std::string> rest = server.read_to_eof();
  REQUIRE(rest.has_value());
  CHECK(*rest == "");
  const std::optional<int> status = server.wait_exit();
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("echo_server echoes 1 MiB byte for byte and in order",
          "[echo_server][integration][echo]") {
  ServerProcess server = start_echo_server({});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 11);
  check_echoed(exchange(client.get(), data), data);
  stop_with_idle_client(server, client);
}

TEST_CASE("echo_server flushes every echoed byte and then closes after the client half-closes",
          "[echo_server][integration][close]") {
  ServerProcess server = start_echo_server({});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 12);
  ExchangeOptions options;
  options.shutdown_after_sending = true;
  options.until_eof = true;
  const Exchange result = exchange(client.get(), data, options);
  check_echoed(result, data);
  CHECK(result.eof);
}

TEST_CASE("echo_server in edge-triggered mode echoes 1 MiB byte for byte and in order",
          "[echo_server][integration][echo][edge]") {
  ServerProcess server = start_echo_server({"--edge"});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 13);
  ExchangeOptions options;
  options.shutdown_after_sending = true;
  options.until_eof = true;
  const Exchange result = exchange(client.get(), data, options);
  check_echoed(result, data);
  CHECK(result.eof);
  stop_and_check_exit(server);
}

TEST_CASE("echo_server serves a Unix socket given with --unix and removes it on exit",
          "[echo_server][integration][unix]") {
  const TempDir dir("echo_server_test");
  const std::string path = (dir.path() / "echo.sock").string();
  if (!run_mode().serves_unix()) {
    // Not in this run: SO_REUSEPORT, which --balance reuseport needs with two threads or more,
    // is TCP's. echo_server must say so and fail rather than serve something else.
    ServerProcess server = start_echo_server({"--unix", path}, 0, StderrMode::kCapture);
    check_refuses_unix_under_reuseport(server, path);
    return;
  }
  ServerProcess server = start_echo_server({"--unix", path});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on unix:" + path);
  CHECK(endpoint.is_unix());
  CHECK(endpoint.host() == path);
  reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 14);
  check_echoed(exchange(client.get(), data), data);
  stop_with_idle_client(server, client);
  CHECK_FALSE(std::filesystem::exists(path));
}

TEST_CASE("echo_server serves IPv6 loopback given with --host ::1",
          "[echo_server][integration][ipv6]") {
  ServerProcess server = start_echo_server({"--host", "::1"});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on [::1]:");
  CHECK(endpoint.family() == AF_INET6);
  CHECK(endpoint.port() != 0);
  reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 15);
  check_echoed(exchange(client.get(), data), data);
  stop_with_idle_client(server, client);
}

TEST_CASE("on SIGTERM echo_server flushes echoed bytes the client has not read yet and exits 0",
          "[echo_server][integration][signal]") {
  // The client sends more than the kernel's socket buffers hold without reading any echo, under a
  // high watermark above that: the server reads everything and queues what the kernel refuses.
  const std::string data = test::pattern(16 * kMiB, 16);
  ServerProcess server = start_echo_server({"--high-water", std::to_string(4 * data.size())});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  reactor::UniqueFd client = connect_to(endpoint);
  REQUIRE(send_without_reading(client.get(), data, kLimit) == data.size());

  // Signal only once the server has read every byte: bytes still unread when it closes would
  // make the kernel reset the connection (RFC 1122 4.2.2.13) instead of delivering the echo.
  const unsigned server_port = endpoint.port();
  const unsigned client_port = local_port_of(client.get());
  unsigned long server_send_queue = 0;
  REQUIRE(eventually([&] {
    const auto queues = tcp_queues(server_port, client_port);
    if (queues.has_value()) server_send_queue = queues->first;
    return queues.has_value() && queues->second == 0;
  }));
  int unread = 0;
  REQUIRE(::ioctl(client.get(), FIONREAD, &unread) == 0);
  CHECK(unread > 0);
  // What neither the client's receive queue nor the server's send queue holds waits in the
  // server's own output queue: that is what SIGTERM must not drop.
  const std::size_t in_kernel = static_cast<std::size_t>(unread) + server_send_queue;
  INFO("client unread " << unread << ", server send queue " << server_send_queue);
  REQUIRE(in_kernel < data.size());

  server.signal(SIGTERM);
  ExchangeOptions options;
  options.already_sent = data.size();
  options.until_eof = true;
  const Exchange result = exchange(client.get(), data, options);
  check_echoed(result, data);
  CHECK(result.eof);
  client.reset();  // the server lingers for this FIN (up to 2 s) before it counts it flushed

  const std::optional<int> status = server.wait_exit();
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("echo_server keeps its memory bounded while a client sends 8 MiB without reading",
          "[echo_server][integration][backpressure]") {
  ServerProcess server = start_echo_server({"--high-water", "65536"});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  reactor::UniqueFd client = connect_to(endpoint);

  // Warm up first, so the baseline includes the read buffer and the output chunks in use.
  const std::string warm_up = test::pattern(256 * 1024, 17);
  check_echoed(exchange(client.get(), warm_up), warm_up);
  const std::size_t before = server.resident_bytes();
  REQUIRE(before > 0);

  // Send until the server stops taking bytes (its reading paused, every buffer full) or all is
  // sent, whichever comes first.
  const std::string data = test::pattern(8 * kMiB, 18);
  const std::size_t sent = send_without_reading(client.get(), data, 500ms);
  // The server may still be catching up on what the kernel buffered: watch its peak for 0.5 s.
  std::size_t peak = server.resident_bytes();
  const auto watch_end = Clock::now() + 500ms;
  while (Clock::now() < watch_end) {
    ::poll(nullptr, 0, 10);
    peak = std::max(peak, server.resident_bytes());
  }
  INFO("sent " << sent << " bytes before stalling; VmRSS " << before << " -> peak " << peak);
  CHECK(peak < before + 16 * kMiB);
  // Tighter, and what actually tells backpressure from none (the loose bound above cannot fail
  // with 8 MiB sent): the server's own buffers hold at most the high watermark plus one 64 KiB
  // read, plus up to 1 MiB of cached output chunks; the rest waits in kernel socket buffers, which
  // RSS does not count. A server without backpressure holds what the kernel could not take.
  CHECK(peak < before + 2 * kMiB);

  // Reading resumes the flow: every byte comes back, in order.
  ExchangeOptions options;
  options.already_sent = sent;
  check_echoed(exchange(client.get(), data, options), data);
  stop_with_idle_client(server, client);
}

TEST_CASE("echo_server out of fds waits without spinning and recovers when clients leave",
          "[echo_server][integration][fd_limit]") {
  constexpr rlim_t kFdLimit = 32;
  constexpr std::size_t kClients = 60;
  ServerProcess server = start_echo_server({}, kFdLimit);
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");

  // The first clients connect while fds are left, and are served. (Each gets its echo before the
  // next connects: with --threads 2 --balance reuseport every thread has its own listen queue, so
  // which waiting clients the last fds go to is not their order of arrival.)
  constexpr std::size_t kServed = 10;
  std::vector<reactor::UniqueFd> clients;
  for (std::size_t i = 0; i < kServed; ++i) {
    INFO("client " << i);
    clients.push_back(connect_to(endpoint));
    const std::string message = "client " + std::to_string(i) + "\n";
    check_echoed(exchange(clients.back().get(), message), message);
  }

  // The kernel completes every handshake (the listen backlog is large), so all connects succeed;
  // the server accepts until it has no fd left and the rest wait in the backlog.
  for (std::size_t i = kServed; i < kClients; ++i) {
    clients.push_back(connect_to(endpoint));
    const std::string message = "client " + std::to_string(i) + "\n";
    REQUIRE(send_without_reading(clients.back().get(), message, kLimit) == message.size());
  }
  REQUIRE(eventually([&] { return server.open_fds() == kFdLimit; }));

  // Out of fds, it still serves the clients it holds.
  for (std::size_t i = 0; i < kServed; ++i) {
    INFO("client " << i);
    const std::string message = "client " + std::to_string(i) + " again\n";
    check_echoed(exchange(clients[i].get(), message), message);
  }

  // At the limit, with clients waiting in the backlog, the server must not spin on accept.
  const auto cpu_before = server.cpu_time();
  ::poll(nullptr, 0, 1000);  // a measuring interval, not a synchronisation
  const auto cpu_used = server.cpu_time() - cpu_before;
  INFO("server CPU time over 1 s at the fd limit: " << cpu_used.count() << " s");
  CHECK(cpu_used.count() < 0.3);

  // Once the clients leave, fds come back and a new client is served again.
  clients.clear();
  reactor::UniqueFd late = connect_to(endpoint);
  const std::string data = "after the limit\n";
  check_echoed(exchange(late.get(), data), data);
  stop_with_idle_client(server, late);
}

// --- Two threads: the four balance modes ---------------------------------------------------------

TEST_CASE(
    "echo_server --threads 2 echoes 200 concurrent clients byte for byte in every balance mode",
    "[echo_server][integration][pool][echo]") {
  const std::string balance =
      GENERATE(as<std::string>{}, "reuseport", "dispatch", "round-robin", "exclusive");
  INFO("--balance " << balance);
  ServerProcess server(ECHO_SERVER_PATH, pool_args(balance), 0, StderrMode::kCapture);
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const std::set<unsigned long> listeners = open_sockets(server.pid());

  constexpr std::size_t kClients = 200;
  std::vector<Client> clients(kClients);
  for (std::size_t i = 0; i < kClients; ++i) {
    clients[i].fd = connect_to(endpoint);
    clients[i].data = test::pattern(std::size_t{32} * 1024, static_cast<std::uint32_t>(100 + i));
    clients[i].half_close = true;
  }
  // All 200 are open at once, spread over both threads (round-robin: exactly in turn).
  std::vector<std::size_t> per_reactor;
  const bool all_watched = eventually([&] {
    per_reactor = connections_per_reactor(server.pid(), listeners);
    return total(per_reactor) == kClients;
  });
  INFO("connections per reactor: " << describe(per_reactor));
  REQUIRE(all_watched);
  CHECK(both_serve(per_reactor));
  if (balance == "round-robin") CHECK(per_reactor[0] == kClients / 2);

  REQUIRE(exchange_all(clients));
  check_all_echoed(clients);

  // The server closed each connection after its client's EOF: once they are gone, a stop finds
  // nothing to flush or abort on either thread.
  REQUIRE(eventually([&] { return total(connections_per_reactor(server.pid(), listeners)) == 0; }));
  server.signal(SIGTERM);
  check_exit_with_report(server, shutdown_report(0, 0));
}

TEST_CASE(
    "on SIGTERM echo_server --threads 2 flushes every client on both threads, then reports them",
    "[echo_server][integration][pool][signal]") {
  const std::string balance =
      GENERATE(as<std::string>{}, "reuseport", "dispatch", "round-robin", "exclusive");
  INFO("--balance " << balance);
  // A high watermark above what any client sends: the server reads everything, and queues the
  // echo that the clients (not reading yet) leave it no room to send.
  constexpr std::size_t kLarge = 8 * kMiB;
  constexpr std::size_t kSmall = std::size_t{256} * 1024;
  ServerProcess server(ECHO_SERVER_PATH,
                       pool_args(balance, {"--high-water", std::to_string(4 * kLarge)}), 0,
                       StderrMode::kCapture);
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const std::set<unsigned long> listeners = open_sockets(server.pid());
  std::vector<Client> clients = connect_to_both_reactors(server, endpoint, listeners, 4);
  INFO(clients.size() << " clients");

  // The first client of each thread sends more than the kernel's buffers hold, the others less;
  // none reads anything yet.
  std::vector<std::size_t> large;
  for (std::size_t i = 0; i < clients.size(); ++i) {
    Client& client = clients[i];
    const bool first_on_its_thread = std::none_of(large.begin(), large.end(), [&](std::size_t j) {
      return clients[j].reactor == client.reactor;
    });
    if (first_on_its_thread) large.push_back(i);
    client.data =
        test::pattern(first_on_its_thread ? kLarge : kSmall, static_cast<std::uint32_t>(300 + i));
    client.sent = send_without_reading(client.fd.get(), client.data, kLimit);
    REQUIRE(client.sent == client.data.size());
  }
  REQUIRE(large.size() == 2);

  // Signal only once the server has read every byte (see the single-threaded SIGTERM case), and
  // check that part of each large client's echo still waits in the server's own queue.
  for (std::size_t i = 0; i < clients.size(); ++i) {
    INFO("client " << i);
    const unsigned client_port = local_port_of(clients[i].fd.get());
    unsigned long server_send_queue = 0;
    REQUIRE(eventually([&] {
      const auto queues = tcp_queues(endpoint.port(), client_port);
      if (queues.has_value()) server_send_queue = queues->first;
      return queues.has_value() && queues->second == 0;
    }));
    if (std::find(large.begin(), large.end(), i) == large.end()) continue;
    int unread = 0;
    REQUIRE(::ioctl(clients[i].fd.get(), FIONREAD, &unread) == 0);
    INFO("client unread " << unread << ", server send queue " << server_send_queue);
    REQUIRE(static_cast<std::size_t>(unread) + server_send_queue < kLarge);
  }

  server.signal(SIGTERM);
  REQUIRE(exchange_all(clients));
  check_all_echoed(clients);
  check_exit_with_report(server, shutdown_report(clients.size(), 0));
}

TEST_CASE("a second SIGTERM ends echo_server --threads 2's grace period at once on both threads",
          "[echo_server][integration][pool][signal]") {
  const std::string balance =
      GENERATE(as<std::string>{}, "reuseport", "dispatch", "round-robin", "exclusive");
  INFO("--balance " << balance);
  ServerProcess server(ECHO_SERVER_PATH, pool_args(balance, {"--high-water", "65536"}), 0,
                       StderrMode::kCapture);
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const std::set<unsigned long> listeners = open_sockets(server.pid());
  std::vector<Client> clients = connect_to_both_reactors(server, endpoint, listeners, 2);

  // One client per thread stays; the others leave, and the server closes their connections.
  std::vector<Client> senders;
  for (Client& client : clients) {
    const bool first_on_its_thread =
        std::none_of(senders.begin(), senders.end(),
                     [&](const Client& sender) { return sender.reactor == client.reactor; });
    if (first_on_its_thread) senders.push_back(std::move(client));
  }
  clients.clear();
  REQUIRE(senders.size() == 2);
  REQUIRE(eventually([&] { return total(connections_per_reactor(server.pid(), listeners)) == 2; }));

  // Each keeps sending and reads nothing, until the server holds part of its echo in its own
  // queue (at least the high watermark, so its reading is paused too): with something to send,
  // no stop can find it quiet.
  const std::string data = test::pattern(32 * kMiB, 19);
  const auto deadline = Clock::now() + kLimit;
  for (;;) {
    std::vector<pollfd> fds;
    fds.reserve(senders.size());
    for (const Client& sender : senders) fds.push_back(pollfd{sender.fd.get(), POLLOUT, 0});
    const int ready = ::poll(fds.data(), fds.size(), 50);
    REQUIRE(ready >= 0);
    if (ready == 0) {
      const bool held = std::all_of(senders.begin(), senders.end(), [&](const Client& sender) {
        return echo_held_by_server(endpoint.port(), sender) >= 65536;
      });
      if (held) break;
      REQUIRE(Clock::now() < deadline);
      continue;
    }
    for (std::size_t i = 0; i < fds.size(); ++i) {
      Client& sender = senders[i];
      if ((fds[i].revents & POLLOUT) == 0) continue;
      REQUIRE(sender.sent < data.size());
      const ssize_t n =
          ::send(sender.fd.get(), data.data() + sender.sent,
                 std::min<std::size_t>(data.size() - sender.sent, 65536), MSG_NOSIGNAL);
      REQUIRE((n > 0 || errno == EAGAIN || errno == EINTR));
      if (n > 0) sender.sent += static_cast<std::size_t>(n);
    }
  }
  INFO("sent " << senders[0].sent << " and " << senders[1].sent << " bytes");

  // The first SIGTERM starts the grace period: the listeners close, the senders are still served.
  const auto first = Clock::now();
  server.signal(SIGTERM);
  REQUIRE(eventually([&] { return !any_open(server.pid(), listeners); }));
  REQUIRE_FALSE(server.wait_exit(200ms).has_value());

  // The second ends it at once, not when the 3 s run out: both threads abort what they hold.
  const auto second = Clock::now();
  REQUIRE(second - first < 1500ms);
  server.signal(SIGTERM);
  const std::optional<int> status = server.wait_exit();
  const auto exited = Clock::now();
  REQUIRE(status.has_value());
  INFO("exit " << std::chrono::duration<double>(exited - second).count()
               << " s after the second SIGTERM");
  CHECK(exited - first < 2500ms);
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
  const std::optional<std::string> err = server.read_stderr_to_eof();
  REQUIRE(err.has_value());
  CHECK(*err == shutdown_report(0, senders.size()));
}

TEST_CASE("echo_server --threads 2 --balance reuseport refuses --unix with exit status 1",
          "[echo_server][integration][pool][unix]") {
  const TempDir dir("echo_server_test");
  const std::string path = (dir.path() / "echo.sock").string();
  ServerProcess server(ECHO_SERVER_PATH, pool_args("reuseport", {"--unix", path}), 0,
                       StderrMode::kCapture);
  check_refuses_unix_under_reuseport(server, path);
}

TEST_CASE("echo_server --threads 2 --unix without --balance dispatches and serves",
          "[echo_server][integration][pool][unix]") {
  const TempDir dir("echo_server_test");
  const std::string path = (dir.path() / "echo.sock").string();
  ServerProcess server(ECHO_SERVER_PATH, {"--threads", "2", "--unix", path});
  listening_endpoint(server, "listening on unix:" + path);
  reactor::UniqueFd client = connect_to(reactor::Endpoint::unix_path(path));
  const std::string data = test::pattern(kMiB, 21);
  check_echoed(exchange(client.get(), data), data);
  stop_with_idle_client(server, client);
  CHECK_FALSE(std::filesystem::exists(path));
}

TEST_CASE("echo_server rejects a bad --threads or --balance with usage and exit status 2",
          "[echo_server][integration][pool][usage]") {
  struct Bad {
    std::vector<std::string> args;
    std::string complaint;
  };
  const std::string program = ECHO_SERVER_PATH;
  const Bad bad = GENERATE_COPY(values<Bad>({
      {{"--threads", "0"}, program + ": bad number '0'"},
      {{"--threads", "x"}, program + ": bad number 'x'"},
      {{"--threads", "1.5"}, program + ": bad number '1.5'"},
      {{"--port", "80.5"}, program + ": bad number '80.5'"},
      {{"--balance", "nope"}, program + ": unknown balance 'nope'"},
  }));
  INFO("arguments: " << bad.args[0] << " " << bad.args[1]);
  ServerProcess server(program, bad.args, 0, StderrMode::kCapture);
  const std::optional<std::string> out = server.read_to_eof();
  REQUIRE(out.has_value());
  CHECK(*out == "");
  const std::optional<std::string> err = server.read_stderr_to_eof();
  REQUIRE(err.has_value());
  const std::string usage = "usage: " + program +
                            " [--host ADDR] [--port N] [--unix PATH] [--edge] [--high-water BYTES]"
                            " [--idle-timeout SECONDS] [--threads N]"
                            " [--balance reuseport|dispatch|round-robin|exclusive]";
  CHECK(*err == bad.complaint + "\n" + usage + "\n");
  const std::optional<int> status = server.wait_exit();
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 2);
}
