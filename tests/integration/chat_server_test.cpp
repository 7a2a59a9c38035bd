// Integration tests for examples/chat_server.cpp: each test runs the real binary as a child
// process (CHAT_SERVER_PATH, set by tests/CMakeLists.txt) and plays several chat clients over
// loopback TCP with plain non-blocking sockets and poll().
//
// The protocol under test: each client gets "welcome, you are #N\n", the others "* #N joined\n";
// a line "text\n" from #N reaches every other client as "#N: text\n" and never its sender; a
// client that leaves produces "* #N left\n" (possibly with " (reason)" before the newline); a line
// longer than 4096 bytes closes its sender; a client with more than 1 MiB of unread output is
// dropped. Waits are bounded by generous limits that only stop a broken test from hanging; no
// result is decided by a sleep.
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

#include "catch.hpp"
#include "server_process.hpp"

#ifndef CHAT_SERVER_PATH
// tests/CMakeLists.txt defines it through reactor_add_test(... PROGRAMS chat_server).
#error "CHAT_SERVER_PATH must name the chat_server binary"
#endif

// ServerProcess, connect_to(), eventually(), kLimit, Clock and the other child-process and socket
// helpers; the chrono literals come with them.
using namespace test;

namespace {

// chat_server's limits (examples/chat_server.cpp).
constexpr std::size_t kLongestLine = 4096;
constexpr std::size_t kMaxUnreadOutput = kMiB;

// chat_server running as a child, and the endpoint it listens on.
struct ChatServer {
  ServerProcess process{CHAT_SERVER_PATH, {}};
  reactor::Endpoint endpoint = listening_endpoint(process, "listening on 127.0.0.1:");
};

// One chat participant: a connected non-blocking socket and what it has read but not yet taken
// as lines. `number` is what the server's welcome said (0 until join()).
class ChatClient {
 public:
  explicit ChatClient(const reactor::Endpoint& endpoint) : socket_(connect_to(endpoint)) {}

  int fd() const { return socket_.get(); }

  // Sends all of `text`; false if the socket failed or stayed full for kLimit.
  bool send(std::string_view text) {
    return send_without_reading(socket_.get(), text, kLimit) == text.size();
  }

  // The next complete line, with its '\n'; nullopt on EOF, error (see error()) or timeout.
  std::optional<std::string> read_line(Clock::duration limit = kLimit) {
    const auto deadline = Clock::now() + limit;
    for (;;) {
      if (std::optional<std::string> line = take_line()) return line;
      if (!read_some(deadline)) return std::nullopt;
    }
  }

  // A complete line already read, with its '\n', without waiting; nullopt if there is none.
  std::optional<std::string> take_line() {
    const auto newline = buffered_.find('\n');
    if (newline == std::string::npos) return std::nullopt;
    std::string line = buffered_.substr(0, newline + 1);
    buffered_.erase(0, newline + 1);
    return line;
  }

  // Reads whatever the socket holds now, without waiting; false on EOF or error.
  bool read_available() { return read_some(Clock::now()) || (!eof_ && error_ == 0); }

  // Reads until the server ends the stream: 0 for EOF, the errno of a failed read (ECONNRESET,
  // say), or nullopt if it is still open after `limit`. Bytes read on the way are kept
  // (buffered()).
  std::optional<int> read_to_end(Clock::duration limit = kLimit) {
    const auto deadline = Clock::now() + limit;
    while (read_some(deadline)) {
    }
    if (eof_) return 0;
    if (error_ != 0) return error_;
    return std::nullopt;
  }

  const std::string& buffered() const { return buffered_; }
  int error() const { return error_; }
  bool eof() const { return eof_; }

  int number = 0;

 private:
  // Reads what the socket has, waiting until `deadline` for something; false on EOF, error or
  // timeout.
  bool read_some(Clock::time_point deadline) {
    if (eof_ || error_ != 0) return false;
    for (;;) {
      char buffer[65536];
      const ssize_t n = ::read(socket_.get(), buffer, sizeof buffer);
      if (n > 0) {
        buffered_.append(buffer, static_cast<std::size_t>(n));
        return true;
      }
      if (n == 0) {
        eof_ = true;
        return false;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN) {
        error_ = errno;
        return false;
      }
      if (poll_one(socket_.get(), POLLIN, deadline) == 0) return false;
    }
  }

  reactor::UniqueFd socket_;
  std::string buffered_;
  bool eof_ = false;
  int error_ = 0;
};

std::string tag(int number) {
  // Not "#" + std::to_string(number): GCC 12 at -O2 reports a false -Wrestrict for it (PR 105329).
  std::string text = std::to_string(number);
  text.insert(text.begin(), '#');
  return text;
}

// Whether `line` is the departure notice of client `number`: "* #N left\n" or
// "* #N left (reason)\n".
bool is_left_notice(std::string_view line, int number) {
  const std::string head = "* " + tag(number) + " left";
  if (line.rfind(head, 0) != 0) return false;
  const std::string_view rest = line.substr(head.size());
  return rest == "\n" ||
         (rest.size() > 4 && rest.substr(0, 2) == " (" && rest.substr(rest.size() - 2) == ")\n");
}

// Reads `newcomer`'s welcome and records its number, then checks that every client in `present`
// is told it joined. Returns the number.
int join(ChatClient& newcomer, std::initializer_list<ChatClient*> present) {
  const std::optional<std::string> welcome = newcomer.read_line();
  REQUIRE(welcome.has_value());
  INFO("welcome: " << *welcome);
  const std::string_view prefix = "welcome, you are #";
  REQUIRE(welcome->rfind(prefix, 0) == 0);
  const std::string digits = welcome->substr(prefix.size(), welcome->size() - prefix.size() - 1);
  REQUIRE(!digits.empty());
  REQUIRE(digits.find_first_not_of("0123456789") == std::string::npos);
  newcomer.number = std::stoi(digits);
  REQUIRE(*welcome == std::string(prefix) + digits + "\n");
  for (ChatClient* member : present) {
    CHECK(member->read_line() == "* " + tag(newcomer.number) + " joined\n");
  }
  return newcomer.number;
}

}  // namespace

// --- Tests ---------------------------------------------------------------------------------------

TEST_CASE("chat_server delivers a line to the other client exactly and not back to its sender",
          "[chat_server][integration]") {
  ChatServer chat;
  ChatClient a(chat.endpoint);
  join(a, {});
  ChatClient b(chat.endpoint);
  join(b, {&a});
  REQUIRE(a.number != b.number);

  REQUIRE(a.send("hello from a\n"));
  CHECK(b.read_line() == tag(a.number) + ": hello from a\n");

  // The server wrote anything it had for a before it read b's reply (b sent that only after
  // receiving a's line), and a connection's output stays in order: so if a's next line is b's,
  // a's own line never came back to it.
  REQUIRE(b.send("hello from b\n"));
  CHECK(a.read_line() == tag(b.number) + ": hello from b\n");
  CHECK(a.buffered().empty());
  CHECK(b.buffered().empty());
}

TEST_CASE("chat_server numbers clients and tells the others when one joins or leaves",
          "[chat_server][integration][join]") {
  ChatServer chat;
  ChatClient a(chat.endpoint);
  CHECK(join(a, {}) == 1);
  ChatClient b(chat.endpoint);
  CHECK(join(b, {&a}) == 2);
  {
    ChatClient c(chat.endpoint);
    CHECK(join(c, {&a, &b}) == 3);
    // c leaves (closes its socket) at the end of this scope.
  }
  for (ChatClient* member : {&a, &b}) {
    const std::optional<std::string> line = member->read_line();
    REQUIRE(line.has_value());
    INFO("notice: " << *line);
    CHECK(is_left_notice(*line, 3));
  }

  // The room goes on without c, and a newcomer gets a fresh number.
  REQUIRE(a.send("still two of us\n"));
  CHECK(b.read_line() == tag(a.number) + ": still two of us\n");
  ChatClient d(chat.endpoint);
  CHECK(join(d, {&a, &b}) == 4);
}

TEST_CASE("chat_server delivers a partial line only once its newline arrives",
          "[chat_server][integration][partial]") {
  ChatServer chat;
  ChatClient a(chat.endpoint);
  join(a, {});
  ChatClient b(chat.endpoint);
  join(b, {&a});
  ChatClient c(chat.endpoint);
  join(c, {&a, &b});

  REQUIRE(a.send("hel"));
  // The server has read the three bytes once its receive queue for a is empty again.
  const unsigned server_port = chat.endpoint.port();
  const unsigned a_port = local_port_of(a.fd());
  REQUIRE(eventually([&] {
    const auto queues = tcp_queues(server_port, a_port);
    return queues.has_value() && queues->second == 0;
  }));
  // c's line is read after a's partial one, and b's output stays in order: so if b's next line
  // is c's, with nothing before it, the server held "hel" back instead of passing it on.
  REQUIRE(c.send("marker\n"));
  CHECK(b.read_line() == tag(c.number) + ": marker\n");
  CHECK(b.buffered().empty());
  CHECK(a.read_line() == tag(c.number) + ": marker\n");

  REQUIRE(a.send("lo\n"));
  CHECK(b.read_line() == tag(a.number) + ": hello\n");
  CHECK(c.read_line() == tag(a.number) + ": hello\n");
  CHECK(b.buffered().empty());
}

TEST_CASE("chat_server closes a client whose line grows past 4096 bytes and the others chat on",
          "[chat_server][integration][limits]") {
  ChatServer chat;
  ChatClient a(chat.endpoint);
  join(a, {});
  ChatClient b(chat.endpoint);
  join(b, {&a});
  ChatClient c(chat.endpoint);
  join(c, {&a, &b});

  // 5000 printable bytes without a newline.
  std::string long_line(5000, '\0');
  for (std::size_t i = 0; i < long_line.size(); ++i)
    long_line[i] = "abcdefghijklmnopqrstuvwxyz"[i % 26];
  REQUIRE(long_line.size() > kLongestLine);
  REQUIRE(a.send(long_line));

  // a's stream ends: EOF, or ECONNRESET if the server closed with some of the line unread.
  const std::optional<int> end = a.read_to_end();
  REQUIRE(end.has_value());
  INFO("a's read ended with errno " << *end << ", after " << a.buffered().size() << " bytes");
  CHECK((*end == 0 || *end == ECONNRESET));
  CHECK(a.buffered().empty());  // nobody else spoke

  // The others are told, and nothing of the long line reached them.
  for (ChatClient* member : {&b, &c}) {
    const std::optional<std::string> line = member->read_line();
    REQUIRE(line.has_value());
    INFO("notice: " << *line);
    CHECK(is_left_notice(*line, a.number));
  }

  REQUIRE(b.send("still here\n"));
  CHECK(c.read_line() == tag(b.number) + ": still here\n");
  REQUIRE(c.send("me too\n"));
  CHECK(b.read_line() == tag(c.number) + ": me too\n");
}

TEST_CASE("chat_server drops a client that stops reading and keeps its memory bounded",
          "[chat_server][integration][limits][backpressure]") {
  ChatServer chat;
  ChatClient fast(chat.endpoint);
  join(fast, {});
  // slow never reads: its welcome and everything after it stay unread. Its number comes from the
  // notice fast gets.
  ChatClient slow(chat.endpoint);
  const std::optional<std::string> joined = fast.read_line();
  REQUIRE(joined.has_value());
  REQUIRE(joined->rfind("* #", 0) == 0);
  slow.number = std::stoi(joined->substr(3));
  REQUIRE(*joined == "* " + tag(slow.number) + " joined\n");
  // observer reads everything, so that only slow falls behind.
  ChatClient observer(chat.endpoint);
  join(observer, {&fast});

  const std::size_t rss_start = chat.process.resident_bytes();
  REQUIRE(rss_start > 0);
  std::size_t rss_peak = rss_start;
  auto next_sample = Clock::now();
  const auto sample_rss = [&] {
    if (Clock::now() < next_sample) return;
    rss_peak = std::max(rss_peak, chat.process.resident_bytes());
    next_sample = Clock::now() + 10ms;
  };

  // fast sends 1000-byte lines, 4 at a time, each batch only once observer has every line before
  // it, until both see slow leave. So observer never gets near the output cap, and the server
  // never holds more than 4000 bytes of fast's input (under chat_server's 4096-byte line limit
  // even if a read ends inside a line: see the known-bug test below for what more would do).
  std::string text(999, '\0');
  for (std::size_t i = 0; i < text.size(); ++i) text[i] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[i % 26];
  text += '\n';
  const std::string delivered = tag(fast.number) + ": " + text;  // what each reader gets
  std::string batch;
  for (int i = 0; i < 4; ++i) batch += text;
  REQUIRE(batch.size() < kLongestLine);
  constexpr std::size_t kMaxSent = 256 * kMiB;  // the drop is due after a few MiB

  std::size_t sent = 0;  // bytes fast sent
  std::size_t observed_lines = 0;
  std::size_t wrong_lines = 0;
  std::string first_wrong_line;
  bool fast_saw_slow_leave = false;
  bool observer_saw_slow_leave = false;
  const auto check_line = [&](const std::string& line, bool& saw_leave, bool is_observer) {
    if (is_left_notice(line, slow.number) && !saw_leave) {
      saw_leave = true;
    } else if (is_observer && line == delivered) {
      ++observed_lines;
    } else if (++wrong_lines == 1) {
      first_wrong_line = line.substr(0, 100);
    }
  };
  const auto read_both = [&] {
    bool ok = fast.read_available();
    while (const std::optional<std::string> line = fast.take_line()) {
      check_line(*line, fast_saw_slow_leave, false);
    }
    ok = observer.read_available() && ok;
    while (const std::optional<std::string> line = observer.take_line()) {
      check_line(*line, observer_saw_slow_leave, true);
    }
    return ok;
  };

  const auto deadline = Clock::now() + 6 * kLimit;
  bool streams_ok = true;
  while (!(fast_saw_slow_leave && observer_saw_slow_leave) && streams_ok && sent < kMaxSent &&
         Clock::now() < deadline) {
    // Sending: a batch is half sent, or observer has everything sent so far.
    const bool may_send = sent % batch.size() != 0 || sent == observed_lines * text.size();
    pollfd fds[2] = {{fast.fd(), static_cast<short>(POLLIN | (may_send ? POLLOUT : 0)), 0},
                     {observer.fd(), POLLIN, 0}};
    const int n = ::poll(fds, 2, std::min(ms_until(deadline), 10));
    if (n < 0 && errno != EINTR) break;
    if (may_send && (fds[0].revents & POLLOUT) != 0) {
      const std::size_t offset = sent % batch.size();
      const ssize_t written =
          ::send(fast.fd(), batch.data() + offset, batch.size() - offset, MSG_NOSIGNAL);
      if (written > 0) {
        sent += static_cast<std::size_t>(written);
      } else if (written < 0 && errno != EAGAIN && errno != EINTR) {
        streams_ok = false;
      }
    }
    streams_ok = read_both() && streams_ok;
    sample_rss();
  }
  INFO("fast sent " << sent << " bytes; observer got " << observed_lines << " lines; VmRSS "
                    << rss_start << " -> peak " << rss_peak);
  INFO(wrong_lines << " unexpected lines, the first: " << first_wrong_line);
  INFO("fast: errno " << fast.error() << ", eof " << fast.eof() << "; observer: errno "
                      << observer.error() << ", eof " << observer.eof());
  REQUIRE(streams_ok);
  REQUIRE(fast_saw_slow_leave);
  REQUIRE(observer_saw_slow_leave);

  // fast finishes its last line; observer gets every line, in order and intact.
  const std::size_t partial = sent % text.size();
  if (partial != 0) {
    REQUIRE(fast.send(std::string_view(text).substr(partial)));
    sent += text.size() - partial;
  }
  const std::size_t lines_sent = sent / text.size();
  CHECK(eventually(
      [&] {
        read_both();
        sample_rss();
        return observed_lines >= lines_sent;
      },
      kLimit));
  CHECK(observed_lines == lines_sent);
  CHECK(wrong_lines == 0);
  // What the cap implies: slow's queue in the server never passes kMaxUnreadOutput (the send that
  // would pass it drops slow instead), held in 16 KiB chunks, so at most 65 chunks; observer and
  // fast hold a few KiB (fast waits for observer's echo, lines are under 4 KiB); the server makes
  // no allocation per message. Its kernel buffers are not in the RSS. The other MiB is slack for
  // the allocator's rounding and sanitizer redzones (peak growth seen: 1.0 MiB in a Debug build,
  // 1.0-1.5 MiB under clang's ASan). A cap that let twice its size pile up fails here.
  CHECK(rss_peak < rss_start + kMaxUnreadOutput + kMiB);

  // The two who stayed can still chat.
  REQUIRE(observer.send("still here\n"));
  CHECK(fast.read_line() == tag(observer.number) + ": still here\n");

  // slow's stream ends (EOF once it reads what the kernel still holds for it, or a reset), and
  // what it got is an intact prefix of what it was sent, in order (it may end inside a message:
  // the kernel took the head of one whose tail was queued when slow was dropped).
  const std::optional<int> end = slow.read_to_end();
  REQUIRE(end.has_value());
  CHECK((*end == 0 || *end == ECONNRESET));
  const std::string& got = slow.buffered();
  const std::string header =
      "welcome, you are " + tag(slow.number) + "\n* " + tag(observer.number) + " joined\n";
  INFO("slow read " << got.size() << " bytes before its stream ended with errno " << *end);
  REQUIRE(got.size() >= header.size());
  CHECK(got.compare(0, header.size(), header) == 0);
  std::size_t bad_offset = std::string::npos;
  for (std::size_t at = header.size(); at < got.size() && bad_offset == std::string::npos;
       at += delivered.size()) {
    const std::string_view piece = std::string_view(got).substr(at, delivered.size());
    if (piece != std::string_view(delivered).substr(0, piece.size())) bad_offset = at;
  }
  CHECK(bad_offset == std::string::npos);
  // It was dropped, so it got less than everyone else.
  CHECK(got.size() - header.size() < lines_sent * delivered.size());
  // More than the cap was sent its way before it was dropped.
  CHECK(lines_sent * delivered.size() > kMaxUnreadOutput);
}

TEST_CASE("chat_server exits 0 within 5 s of SIGTERM with clients connected",
          "[chat_server][integration][signal]") {
  ChatServer chat;
  ChatClient a(chat.endpoint);
  join(a, {});
  ChatClient b(chat.endpoint);
  join(b, {&a});
  REQUIRE(a.send("bye\n"));
  CHECK(b.read_line() == tag(a.number) + ": bye\n");

  // The clients stay connected and silent: the server's grace period has to end on its own.
  chat.process.signal(SIGTERM);
  const std::optional<int> status = chat.process.wait_exit(5s);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);

  // Both connections are closed by the server: EOF (or a reset).
  for (ChatClient* client : {&a, &b}) {
    const std::optional<int> end = client->read_to_end();
    REQUIRE(end.has_value());
    CHECK((*end == 0 || *end == ECONNRESET));
  }
}

// --- Limits on lines ----------------------------------------------------------------------------
// Both found as bugs and fixed: max_pending_input was once checked against the pending partial
// line plus the whole next read, and a long line that arrived whole was broadcast.

TEST_CASE("chat_server delivers complete lines that arrive behind the end of a partial line",
          "[chat_server][integration][partial]") {
  ChatServer chat;
  ChatClient a(chat.endpoint);
  join(a, {});
  ChatClient b(chat.endpoint);
  join(b, {&a});

  REQUIRE(a.send("hel"));
  const unsigned server_port = chat.endpoint.port();
  const unsigned a_port = local_port_of(a.fd());
  REQUIRE(eventually([&] {
    const auto queues = tcp_queues(server_port, a_port);
    return queues.has_value() && queues->second == 0;
  }));
  // The end of that line and 50 short lines in one send: 10 KiB, every line under 200 bytes.
  const std::string line(199, 'x');
  std::string rest = "lo\n";
  for (int i = 0; i < 50; ++i) rest += line + "\n";
  REQUIRE(a.send(rest));

  REQUIRE(b.read_line() == tag(a.number) + ": hello\n");
  for (int i = 0; i < 50; ++i) {
    INFO("line " << i);
    REQUIRE(b.read_line() == tag(a.number) + ": " + line + "\n");
  }
}

TEST_CASE(
    "chat_server closes a client whose line is longer than 4096 bytes even if it arrives whole",
    "[chat_server][integration][limits]") {
  ChatServer chat;
  ChatClient a(chat.endpoint);
  join(a, {});
  ChatClient b(chat.endpoint);
  join(b, {&a});

  REQUIRE(a.send(std::string(5000, 'y') + "\n"));
  const std::optional<std::string> line = b.read_line();
  REQUIRE(line.has_value());
  INFO("b got: " << line->substr(0, 60));
  REQUIRE(is_left_notice(*line, a.number));
  const std::optional<int> end = a.read_to_end();
  REQUIRE(end.has_value());
  CHECK((*end == 0 || *end == ECONNRESET));
}
