// Tests for Connection::send_file() (include/reactor/connection.hpp): file ranges arrive byte for
// byte and in order with send()'s bytes (coalesced and cork()ed ones included), through partial
// writes to a slow reader, with close() waiting for them; a file shorter than its range closes
// the connection with Error::kFileTruncated; short sendfile writes, EAGAIN and EINVAL/ENOSYS
// (the pread fallback) are injected through the syscall seam (test::FaultSyscalls). Both trigger
// modes throughout. Files are temporary files under /tmp, removed by each test.
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <reactor/connection.hpp>

#include "catch.hpp"
#include "fault_syscalls.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;
using test::Call;

template <class Mode>
using Loop = reactor::Reactor<Mode, test::FaultSyscalls>;

// A policy without sendfile (as the simulated kernel's): send_file() copies through pread.
struct NoSendfileSyscalls : test::FaultSyscalls {
  static void sendfile() = delete;  // hides LinuxSyscalls::sendfile from the detection
};

// A transport that may not hand bytes to sendfile (as TLS may not): send_file() copies through
// pread and the transport's send().
struct CopyingTransport : reactor::PlainTransport {
  static constexpr bool kSendFile = false;
};

// A temporary file holding `bytes`; removed (and its fd closed) on destruction.
class TempFile {
 public:
  explicit TempFile(std::string_view bytes) {
    char name[] = "/tmp/reactor_file_send_XXXXXX";
    fd_ = ::mkstemp(name);
    if (fd_ < 0) throw std::system_error(errno, std::system_category(), "mkstemp");
    ::unlink(name);  // gone from the file system already; the fd keeps it alive
    std::size_t written = 0;
    while (written < bytes.size()) {
      const ssize_t n = ::write(fd_, bytes.data() + written, bytes.size() - written);
      if (n <= 0) throw std::system_error(errno, std::system_category(), "write");
      written += static_cast<std::size_t>(n);
    }
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() { ::close(fd_); }

  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

struct Record {
  std::string data;
  int closes = 0;
  std::error_code reason;
};

// Runs `respond(connection, bytes)` for each on_data; records on_close.
template <class Respond>
struct Responder {
  Record* record;
  Respond respond;

  void on_data(auto& connection, std::string_view bytes) {
    record->data += bytes;
    respond(connection, bytes);
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

template <class Respond>
Responder<Respond> responder(Record& record, Respond respond) {
  return {&record, std::move(respond)};
}

constexpr auto kIgnore = [](auto& /*connection*/, std::string_view /*bytes*/) {};

template <class Transport = reactor::PlainTransport, class L, class Handler>
auto& open_connection(L& loop, reactor::UniqueFd socket, Handler handler,
                      const reactor::ConnectionOptions& options = {}) {
  return reactor::adopt(loop, reactor::BasicUniqueFd<typename L::syscalls>(std::move(socket)),
                        std::move(handler), options, Transport());
}

// Runs the loop until the peer has `size` bytes (or an error, or its EOF), reading at most
// `per_step` bytes between iterations: a slow reader keeps the connection's socket full.
template <class L>
bool receive(L& loop, test::Peer& peer, std::size_t size,
             std::size_t per_step = std::numeric_limits<std::size_t>::max()) {
  peer.reading = false;
  return test::run_until(
      loop,
      [&] {
        std::size_t taken = 0;
        char buffer[65536];
        while (taken < per_step && peer.received.size() < size) {
          const std::size_t want = std::min({sizeof buffer, per_step - taken});
          const ssize_t n = ::read(peer.fd.get(), buffer, want);
          if (n > 0) {
            peer.received.append(buffer, static_cast<std::size_t>(n));
            taken += static_cast<std::size_t>(n);
          } else {
            if (n == 0) peer.eof = true;
            if (n < 0 && errno != EAGAIN) peer.error = errno;
            break;
          }
        }
        return peer.received.size() >= size || peer.eof || peer.error != 0;
      },
      60s);
}

// Reads until the peer's EOF.
template <class L>
bool receive_to_eof(L& loop, test::Peer& peer) {
  return receive(loop, peer, std::numeric_limits<std::size_t>::max()) && peer.eof;
}

// "" when equal, else where they first differ (Catch would print megabytes).
std::string mismatch(std::string_view got, std::string_view expected) {
  if (got == expected) return {};
  const std::size_t common = std::min(got.size(), expected.size());
  std::size_t at = 0;
  while (at < common && got[at] == expected[at]) ++at;
  return "got " + std::to_string(got.size()) + " bytes, expected " +
         std::to_string(expected.size()) + ", first difference at byte " + std::to_string(at);
}

}  // namespace

TEMPLATE_TEST_CASE("a whole file arrives byte for byte and its fd is closed after",
                   "[connection][file]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::string content = test::pattern(1 << 20, 3);
  const std::size_t fds_before = test::open_fd_count();
  {
    TempFile file(content);
    Record record;  // before the loop: its destructor runs on_close
    Loop<TestType> loop;
    test::FaultScript script;  // counts the calls
    auto [mine, theirs] = test::socket_pair();
    test::Peer peer(std::move(theirs));
    auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
    REQUIRE(!connection.send_file(file.fd(), 0, content.size()));
    // The first sendfile filled the socket: the rest is pending.
    CHECK(connection.pending_output_bytes() > 0);
    CHECK(connection.pending_output_bytes() < content.size());
    REQUIRE(receive(loop, peer, content.size()));
    CHECK(mismatch(peer.received, content).empty());
    CHECK(connection.pending_output_bytes() == 0);
    CHECK(script.calls(Call::kSendfile) >= 2);
    CHECK(script.calls(Call::kPread) == 0);
    CHECK(record.closes == 0);
  }
  CHECK(test::open_fd_count() == fds_before);
}

TEMPLATE_TEST_CASE("sends and file sends from one on_data arrive in call order",
                   "[connection][file][coalesce]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  const std::string first = test::pattern(300000, 5);
  const std::string second = test::pattern(5000, 6);
  TempFile file1(first);
  TempFile file2(second);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  std::error_code results[2];
  open_connection(
      loop, std::move(mine), responder(record, [&](auto& connection, std::string_view) {
        // Two small sends in one step: the loop holds them (coalescing); the file must wait
        // for them, and the sends after it for the file.
        connection.send("A1");
        connection.send("A2");
        results[0] = connection.send_file(file1.fd(), 0, first.size());
        connection.send("B");
        results[1] = connection.send_file(file2.fd(), 100, 4000);
        connection.send(std::string(10000, 'C'));  // a large send goes out at once otherwise
        connection.send("D");
      }));
  peer.to_send = "go";
  peer.step();
  const std::string expected =
      "A1A2" + first + "B" + second.substr(100, 4000) + std::string(10000, 'C') + "D";
  REQUIRE(receive(loop, peer, expected.size()));
  CHECK(!results[0]);
  CHECK(!results[1]);
  CHECK(mismatch(peer.received, expected).empty());
  CHECK(record.closes == 0);
}

TEMPLATE_TEST_CASE("cork holds a file send and pending_output_bytes counts its bytes",
                   "[connection][file][cork]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::string content = test::pattern(1000, 8);
  TempFile file(content);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  test::FaultScript script;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  connection.cork();
  REQUIRE(connection.send("head"));
  REQUIRE(!connection.send_file(file.fd(), 0, content.size()));
  REQUIRE(connection.send("tail"));
  CHECK(connection.pending_output_bytes() == 4 + content.size() + 4);
  CHECK(script.calls(Call::kSendfile) == 0);
  connection.uncork();
  REQUIRE(receive(loop, peer, 4 + content.size() + 4));
  CHECK(mismatch(peer.received, "head" + content + "tail").empty());
  CHECK(connection.pending_output_bytes() == 0);
}

TEMPLATE_TEST_CASE("a 6 MiB file reaches a slow reader through many partial writes",
                   "[connection][file][partial]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::string content = test::pattern(6 << 20, 9);
  TempFile file(content);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  test::FaultScript script;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  REQUIRE(connection.send("before"));
  REQUIRE(!connection.send_file(file.fd(), 0, content.size()));
  REQUIRE(connection.send("after"));
  REQUIRE(receive(loop, peer, content.size() + 11, 48 * 1024));
  CHECK(mismatch(peer.received, "before" + content + "after").empty());
  // Far more calls than one: the socket (a few hundred KiB) filled again and again.
  CHECK(script.calls(Call::kSendfile) > 10);
  CHECK(record.closes == 0);
}

TEMPLATE_TEST_CASE(
    "a range in the middle of a file is sent and the caller may close its fd at once",
    "[connection][file]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::string content = test::pattern(100000, 10);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  {
    TempFile file(content);
    REQUIRE(!connection.send_file(file.fd(), 12345, 54321));
  }  // the caller's fd is closed; the connection sent from its own dup
  REQUIRE(receive(loop, peer, 54321));
  CHECK(mismatch(peer.received, content.substr(12345, 54321)).empty());
}

TEMPLATE_TEST_CASE("a file shorter than its range closes the connection with kFileTruncated",
                   "[connection][file][error]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::string content = test::pattern(1000, 11);
  const bool copying = GENERATE(false, true);  // sendfile, or the pread fallback after EINVAL
  INFO((copying ? "pread fallback" : "sendfile"));
  TempFile file(content);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  test::FaultScript script;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  if (copying) script.always(Call::kSendfile, test::fail(EINVAL));
  REQUIRE(connection.send("before"));
  // Nothing was queued ahead: the range is written at once. Where that reaches the file's end
  // in the call (edge mode, the pread path) the call reports what closed the connection; level
  // mode waits for EPOLLOUT after a short sendfile and finds the end there.
  const std::error_code queued = connection.send_file(file.fd(), 200, 5000);
  CHECK((!queued || queued == reactor::Error::kFileTruncated));
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  CHECK(record.reason == reactor::Error::kFileTruncated);
  REQUIRE(receive_to_eof(loop, peer));
  // What the file had went out before the connection closed.
  CHECK(mismatch(peer.received, "before" + content.substr(200)).empty());
  CHECK(script.calls(Call::kPread) == (copying ? 2u : 0u));
}

TEMPLATE_TEST_CASE("close after send_file delivers the whole file before the EOF",
                   "[connection][file][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::string content = test::pattern(3 << 20, 12);
  TempFile file(content);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  REQUIRE(!connection.send_file(file.fd(), 0, content.size()));
  connection.close();
  CHECK(connection.state() == reactor::ConnectionState::kClosing);
  REQUIRE(receive_to_eof(loop, peer));
  CHECK(mismatch(peer.received, content).empty());
  peer.fd.reset();  // ends the linger
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  CHECK(!record.reason);
}

TEMPLATE_TEST_CASE("shutdown after send_file sends FIN only after the file",
                   "[connection][file][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::string content = test::pattern(2 << 20, 13);
  TempFile file(content);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  REQUIRE(!connection.send_file(file.fd(), 0, content.size()));
  connection.shutdown();
  REQUIRE(receive_to_eof(loop, peer));
  CHECK(mismatch(peer.received, content).empty());
  CHECK(record.closes == 0);
}

TEMPLATE_TEST_CASE("short sendfile writes and injected EAGAIN still deliver every byte",
                   "[connection][file][fault]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::string content = test::pattern(500000, 14);
  TempFile file(content);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  test::FaultScript script(42);
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  const int fd = connection.native_handle();
  script.random(Call::kSendfile, {{test::at_most_random(7000, fd), 6},
                                  {test::fail(EAGAIN, fd), 2},
                                  {test::fail(EINTR, fd), 1}});
  REQUIRE(connection.send("x"));
  REQUIRE(!connection.send_file(file.fd(), 0, content.size()));
  REQUIRE(connection.send("y"));
  REQUIRE(receive(loop, peer, content.size() + 2));
  CHECK(mismatch(peer.received, "x" + content + "y").empty());
  CHECK(script.faults(Call::kSendfile) > 20);
  CHECK(record.closes == 0);
}

TEMPLATE_TEST_CASE("sendfile refused with EINVAL or ENOSYS falls back to pread and writes",
                   "[connection][file][fault]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const int error = GENERATE(EINVAL, ENOSYS);
  INFO("errno " << error);
  const std::string content = test::pattern(700000, 15);
  TempFile file(content);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  test::FaultScript script;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  script.always(Call::kSendfile, test::fail(error));
  script.random(Call::kSend, {{test::at_most_random(9000), 1}});  // partial writes of the buffer
  REQUIRE(!connection.send_file(file.fd(), 7, content.size() - 7));
  REQUIRE(connection.send("end"));
  REQUIRE(receive(loop, peer, content.size() - 7 + 3, 32 * 1024));
  CHECK(mismatch(peer.received, content.substr(7) + "end").empty());
  CHECK(script.calls(Call::kSendfile) == 1);  // refused once: that file copies from then on
  CHECK(script.calls(Call::kPread) >= content.size() / reactor::detail::FileQueue::kBufferSize);
  CHECK(record.closes == 0);
}

TEMPLATE_TEST_CASE("a sendfile error other than EINVAL closes the connection with it",
                   "[connection][file][fault]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  TempFile file(test::pattern(1000, 16));
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  test::FaultScript script;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  script.next(Call::kSendfile, test::fail(EIO));
  CHECK(connection.send_file(file.fd(), 0, 1000) == std::errc::io_error);  // written at once
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  CHECK(record.reason == std::errc::io_error);
  CHECK(script.calls(Call::kPread) == 0);
}

TEMPLATE_TEST_CASE("a policy without sendfile and a transport that forbids it copy through pread",
                   "[connection][file]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::string content = test::pattern(300000, 17);
  TempFile file(content);
  test::FaultScript script;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  Record record;
  SECTION("policy") {
    reactor::Reactor<TestType, NoSendfileSyscalls> loop;
    auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
    REQUIRE(!connection.send_file(file.fd(), 0, content.size()));
    REQUIRE(receive(loop, peer, content.size(), 20000));
  }
  SECTION("transport") {
    Loop<TestType> loop;
    auto& connection =
        open_connection<CopyingTransport>(loop, std::move(mine), responder(record, kIgnore));
    REQUIRE(!connection.send_file(file.fd(), 0, content.size()));
    REQUIRE(receive(loop, peer, content.size(), 20000));
  }
  CHECK(mismatch(peer.received, content).empty());
  CHECK(script.calls(Call::kSendfile) == 0);
  CHECK(script.calls(Call::kPread) >= content.size() / reactor::detail::FileQueue::kBufferSize);
}

TEMPLATE_TEST_CASE("send_file refusals leave the connection as it was", "[connection][file][error]",
                   reactor::LevelTriggered, reactor::EdgeTriggered) {
  TempFile file("0123456789");
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  test::FaultScript script;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  // The fd cannot be duplicated (out of fds).
  script.next(Call::kFcntl, test::fail(EMFILE));
  CHECK(connection.send_file(file.fd(), 0, 10) == std::errc::too_many_files_open);
  // An offset past what off_t can hold.
  CHECK(connection.send_file(file.fd(), std::numeric_limits<std::uint64_t>::max() - 1, 2) ==
        std::errc::invalid_argument);
  CHECK(!connection.send_file(file.fd(), 3, 0));  // nothing to send
  CHECK(connection.pending_output_bytes() == 0);
  REQUIRE(!connection.send_file(file.fd(), 2, 5));
  REQUIRE(receive(loop, peer, 5));
  CHECK(peer.received == "23456");
  connection.close();
  CHECK(connection.send_file(file.fd(), 0, 10) == std::errc::not_connected);
  CHECK(record.closes == 0);
}

TEMPLATE_TEST_CASE("the write timeout covers a file the peer does not read",
                   "[connection][file][timeout]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  TempFile file(test::pattern(4 << 20, 18));
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  reactor::ConnectionOptions options;
  options.write_timeout = 100ms;
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore), options);
  REQUIRE(!connection.send_file(file.fd(), 0, 4 << 20));
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  CHECK(record.reason == std::errc::timed_out);
}

TEMPLATE_TEST_CASE("a peer gone before the file closes the connection with EPIPE and no SIGPIPE",
                   "[connection][file][error]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  // sendfile has no MSG_NOSIGNAL: with SIGPIPE's default action, a SIGPIPE would end this process.
  struct sigaction saved {};
  struct sigaction fatal {};
  fatal.sa_handler = SIG_DFL;
  REQUIRE(::sigaction(SIGPIPE, &fatal, &saved) == 0);
  TempFile file(test::pattern(100000, 19));
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  theirs.reset();  // the peer is gone: writing raises EPIPE (and, unasked, SIGPIPE)
  CHECK(connection.send_file(file.fd(), 0, 100000) == std::errc::broken_pipe);  // written at once
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  CHECK(record.reason == std::errc::broken_pipe);
  sigset_t pending;
  REQUIRE(::sigpending(&pending) == 0);
  CHECK(::sigismember(&pending, SIGPIPE) == 0);
  ::sigaction(SIGPIPE, &saved, nullptr);
}

// Guards (second break-it pass): send_file() onto idle output writes at once, and when that write
// fails and closes the connection it says so, as send() returns false. It returned success for a
// pipe (ESPIPE), a directory (EISDIR) or a range past the file's end, with the connection already
// closed.
TEMPLATE_TEST_CASE("send_file reports the error of its first write when that closed the connection",
                   "[connection][file][error]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  int pipe_fds[2];
  REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
  REQUIRE(::write(pipe_fds[1], "abc", 3) == 3);
  Record record;  // before the loop: its destructor runs on_close
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  test::Peer peer(std::move(theirs));
  auto& connection = open_connection(loop, std::move(mine), responder(record, kIgnore));
  const std::error_code ec = connection.send_file(pipe_fds[0], 0, 3);
  CHECK(ec == std::errc::invalid_seek);  // was success
  CHECK_FALSE(connection.is_open());
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  CHECK(record.reason == ec);
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);
}
