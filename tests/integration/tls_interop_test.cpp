// Interoperability tests for the TLS of examples/echo_server.cpp and examples/echo_load.cpp: real
// TLS implementations nobody here wrote (openssl s_client, Python's ssl module, curl) talk to
// `echo_server --tls-cert --tls-key`, and echo_load --tls talks to it, each as a child process
// (ECHO_SERVER_PATH, ECHO_LOAD_PATH: tests/CMakeLists.txt, PROGRAMS echo_server echo_load).
//
// The certificates are made at test time (tests/support/tls_certs.hpp): a test CA and a leaf for
// localhost and 127.0.0.1, written to a temporary directory; no key is committed. A case whose
// tool (openssl, python3, curl) is not installed says so and succeeds; CI installs them.
//
// Every wait is bounded by a generous limit that only stops a broken test from hanging; nothing
// is decided by timing. Every child is killed (if still running) and reaped when a case ends.
#include <fcntl.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "catch.hpp"
#include "server_process.hpp"
#include "tls_certs.hpp"

#ifndef ECHO_SERVER_PATH
// tests/CMakeLists.txt defines both through reactor_add_test(... PROGRAMS echo_server echo_load).
#error "ECHO_SERVER_PATH must name the echo_server binary"
#endif
#ifndef ECHO_LOAD_PATH
#error "ECHO_LOAD_PATH must name the echo_load binary"
#endif

using namespace test;

namespace {

constexpr std::size_t kBig = 16 * kMiB;  // bytes each way through the real clients
constexpr Clock::duration kToolLimit = 90s;

bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

// Whether `name` is an executable in $PATH.
bool have_tool(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string_view dirs = path != nullptr ? path : "/usr/bin:/bin";
  while (!dirs.empty()) {
    const std::size_t colon = dirs.find(':');
    const std::string dir(dirs.substr(0, colon));
    dirs = colon == std::string_view::npos ? std::string_view() : dirs.substr(colon + 1);
    const std::string file = (dir.empty() ? std::string(".") : dir) + "/" + name;
    if (::access(file.c_str(), X_OK) == 0) return true;
  }
  return false;
}

// Skips the calling case (WARN + SUCCEED) when `tool` is missing; true when it may go on.
#define REQUIRE_TOOL_OR_SKIP(tool)                               \
  if (!have_tool(tool)) {                                        \
    WARN("skipped: " tool " is not installed (CI installs it)"); \
    SUCCEED();                                                   \
    return;                                                      \
  }

// What a tool run left behind.
struct ToolRun {
  std::string out;
  std::string err;
  int exit_status = -1;  // -1: killed by a signal, or still running at the limit (then killed)
  bool timed_out = false;
  std::size_t written = 0;  // bytes of the input taken by its stdin
};

// Runs argv[0] (looked up in $PATH) with `input` on its stdin (a socket, so that a child that
// exits early costs EPIPE, not SIGPIPE); its stdin is closed once all of `input` went in and
// `close_stdin_after` bytes came out of its stdout. Reads stdout and stderr until both close,
// then reaps it; at `limit` it is killed and reaped, and timed_out is set.
ToolRun run_tool(const std::vector<std::string>& args, std::string_view input = {},
                 std::size_t close_stdin_after = 0, Clock::duration limit = kToolLimit) {
  std::vector<std::string> words = args;
  std::vector<char*> argv;
  for (std::string& word : words) argv.push_back(word.data());
  argv.push_back(nullptr);

  int in_fds[2];
  int out_fds[2];
  int err_fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, in_fds) == 0);
  reactor::UniqueFd in_ours(in_fds[0]);
  reactor::UniqueFd in_theirs(in_fds[1]);
  REQUIRE(::pipe2(out_fds, O_CLOEXEC) == 0);
  reactor::UniqueFd out_ours(out_fds[0]);
  reactor::UniqueFd out_theirs(out_fds[1]);
  REQUIRE(::pipe2(err_fds, O_CLOEXEC) == 0);
  reactor::UniqueFd err_ours(err_fds[0]);
  reactor::UniqueFd err_theirs(err_fds[1]);

  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // Async-signal-safe calls only, up to exec; the child dies with the test process.
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) ::_exit(126);
    if (::dup2(in_theirs.get(), STDIN_FILENO) < 0 || ::dup2(out_theirs.get(), STDOUT_FILENO) < 0 ||
        ::dup2(err_theirs.get(), STDERR_FILENO) < 0) {
      ::_exit(126);
    }
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  in_theirs.reset();
  out_theirs.reset();
  err_theirs.reset();
  for (const int fd : {in_ours.get(), out_ours.get(), err_ours.get()}) {
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  }

  ToolRun run;
  const auto deadline = Clock::now() + limit;
  bool out_open = true;
  bool err_open = true;
  const auto drain = [](int fd, std::string& into, bool& open) {
    char buffer[65536];
    for (;;) {
      const ssize_t n = ::read(fd, buffer, sizeof buffer);
      if (n > 0) {
        into.append(buffer, static_cast<std::size_t>(n));
        continue;
      }
      if (n == 0 || (errno != EAGAIN && errno != EINTR)) open = false;
      if (n == 0 || errno != EINTR) return;
    }
  };
  while (out_open || err_open) {
    if (in_ours && run.written == input.size() && run.out.size() >= close_stdin_after) {
      in_ours.reset();
    }
    pollfd fds[3] = {{out_open ? out_ours.get() : -1, POLLIN, 0},
                     {err_open ? err_ours.get() : -1, POLLIN, 0},
                     {in_ours && run.written < input.size() ? in_ours.get() : -1, POLLOUT, 0}};
    const int n = ::poll(fds, 3, ms_until(deadline));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      run.timed_out = true;
      break;
    }
    if (fds[0].revents != 0) drain(out_ours.get(), run.out, out_open);
    if (fds[1].revents != 0) drain(err_ours.get(), run.err, err_open);
    if (fds[2].revents != 0) {
      const ssize_t sent =
          ::send(in_ours.get(), input.data() + run.written,
                 std::min<std::size_t>(input.size() - run.written, 1 << 20), MSG_NOSIGNAL);
      if (sent > 0) {
        run.written += static_cast<std::size_t>(sent);
      } else if (sent < 0 && errno != EAGAIN && errno != EINTR) {
        in_ours.reset();  // it stopped reading (exited): what it did is in its output
      }
    }
  }
  std::optional<int> status = reap(pid, run.timed_out ? Clock::now() : deadline);
  if (!status) {
    run.timed_out = true;
    ::kill(pid, SIGKILL);
    status = reap(pid, Clock::now() + kLimit);
  }
  if (status && WIFEXITED(*status) && !run.timed_out) run.exit_status = WEXITSTATUS(*status);
  return run;
}

// `size` bytes that are not a repetition of anything shorter than 8 bytes.
std::string random_bytes(std::size_t size, std::uint64_t seed) {
  std::mt19937_64 generator(seed);
  std::string bytes(size, '\0');
  for (std::size_t i = 0; i < size; i += 8) {
    const std::uint64_t word = generator();
    std::memcpy(bytes.data() + i, &word, std::min<std::size_t>(8, size - i));
  }
  return bytes;
}

// A CA and a leaf for localhost and 127.0.0.1, as PEM files in a temporary directory.
struct Certificates {
  reactor_test::TestCa ca;
  reactor_test::TempDir dir;
  std::string ca_file;
  std::string cert_file;
  std::string key_file;

  Certificates() {
    const reactor_test::Pem leaf = ca.issue({"localhost"}, {"127.0.0.1"});
    ca_file = dir.write("ca.pem", ca.certificate_pem());
    cert_file = dir.write("cert.pem", leaf.certificate);
    key_file = dir.write("key.pem", leaf.key);
  }
};

// echo_server --tls-cert --tls-key (and `extra`), its stderr captured; `port` is where it listens.
struct TlsServer {
  ServerProcess process;
  unsigned port = 0;

  TlsServer(const Certificates& certificates, std::vector<std::string> extra = {})
      : process(ECHO_SERVER_PATH, with_tls(certificates, std::move(extra)), 0,
                StderrMode::kCapture) {
    port = listening_endpoint(process, "listening on 127.0.0.1:").port();
    REQUIRE(port != 0);
  }

  // SIGTERM: exits 0 with its usual report line.
  void stop() {
    stop_and_check_exit(process);
    const std::optional<std::string> err = process.read_stderr_to_eof();
    REQUIRE(err.has_value());
    CHECK(contains(*err, "echo_server: shut down: "));
  }

  // Still running (not exited).
  bool running() const {
    int status = 0;
    return ::waitpid(process.pid(), &status, WNOHANG) == 0;
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port); }

 private:
  static std::vector<std::string> with_tls(const Certificates& certificates,
                                           std::vector<std::string> extra) {
    std::vector<std::string> args{"--tls-cert", certificates.cert_file, "--tls-key",
                                  certificates.key_file};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }
};

// openssl s_client: sends `data`, reads as much back, then closes its stdin so that it ends.
// `extra`: more options (-quiet or -brief, -tls1_2, ...).
ToolRun s_client_echo(const TlsServer& server, const std::string& ca_file, std::string_view data,
                      std::vector<std::string> extra) {
  std::vector<std::string> args{"openssl",
                                "s_client",
                                "-connect",
                                server.address(),
                                "-CAfile",
                                ca_file,
                                "-verify_return_error",
                                "-servername",
                                "localhost"};
  args.insert(args.end(), extra.begin(), extra.end());
  // After -quiet (which implies -ign_eof): end at stdin's EOF; and no command letters ("Q" at the
  // start of a read would quit, "R" renegotiate).
  args.insert(args.end(), {"-no_ign_eof", "-nocommands"});
  return run_tool(args, data, data.size());
}

void check_echo(const ToolRun& run, std::string_view data) {
  INFO("stderr: " << run.err);
  CHECK_FALSE(run.timed_out);
  CHECK(run.written == data.size());
  REQUIRE(run.out.size() == data.size());
  CHECK(first_difference(run.out, data) == std::string_view::npos);
  CHECK(run.exit_status == 0);
}

// Echoes 16 MiB each way through Python's ssl module (verifying the server against the CA, for
// localhost), then unwrap()s: close_notify both ways. Prints "BYTES SENT_SHA256 RECEIVED_SHA256
// unwrapped eof".
constexpr const char* kPythonEcho = R"PY(
import hashlib, select, socket, ssl, sys, time
port, ca, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
data = memoryview(hashlib.shake_256(b"reactor tls interop").digest(n))
context = ssl.create_default_context(cafile=ca)
raw = socket.create_connection(("127.0.0.1", port), timeout=30)
s = context.wrap_socket(raw, server_hostname="localhost")
s.setblocking(False)
sent, got = 0, bytearray()
deadline = time.monotonic() + 60
while len(got) < n:
    if time.monotonic() > deadline:
        sys.exit("timed out: %d of %d bytes back" % (len(got), n))
    if not s.pending():
        select.select([s], [s] if sent < n else [], [], 1)
    if sent < n:
        try:
            sent += s.send(data[sent:sent + 65536])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
    try:
        chunk = s.recv(1 << 18)
        if not chunk:
            sys.exit("EOF after %d bytes" % len(got))
        got += chunk
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass
s.setblocking(True)
s.settimeout(30)
plain = s.unwrap()
rest = plain.recv(1)
print(len(got), hashlib.sha256(data).hexdigest(), hashlib.sha256(got).hexdigest(), "unwrapped",
      "eof" if rest == b"" else "data")
)PY";

// A ClientHello as OpenSSL's client writes it (for peers that stop in the middle of one).
std::string client_hello() {
  const std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_client_method()),
                                                              &SSL_CTX_free);
  REQUIRE(ctx);
  SSL* ssl = SSL_new(ctx.get());
  REQUIRE(ssl != nullptr);
  const std::unique_ptr<SSL, decltype(&SSL_free)> owner(ssl, &SSL_free);
  BIO* in = BIO_new(BIO_s_mem());
  BIO* out = BIO_new(BIO_s_mem());
  SSL_set_bio(ssl, in, out);  // the SSL owns both
  SSL_set_tlsext_host_name(ssl, "localhost");
  SSL_set_connect_state(ssl);
  CHECK(SSL_do_handshake(ssl) != 1);  // wants the ServerHello
  char* data = nullptr;
  const long size = BIO_get_mem_data(out, &data);
  REQUIRE(size > 5);
  return std::string(data, static_cast<std::size_t>(size));
}

// Closes `fd` with a reset (SO_LINGER 0) instead of a FIN.
void reset(reactor::UniqueFd& fd) {
  const linger abort_on_close{1, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &abort_on_close, sizeof abort_on_close);
  fd.reset();
}

// Reads until the peer closes (EOF or reset); false if it is still open at the limit.
bool wait_closed(int fd) {
  const auto deadline = Clock::now() + kLimit;
  for (;;) {
    if (poll_one(fd, POLLIN, deadline) == 0) return false;
    char buffer[4096];
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return true;
  }
}

}  // namespace

// --- openssl s_client
// -----------------------------------------------------------------------------

TEST_CASE("openssl s_client echoes 16 MiB each way through echo_server --tls-cert",
          "[tls][interop][openssl]") {
  REQUIRE_TOOL_OR_SKIP("openssl");
  const bool edge = GENERATE(false, true);
  INFO((edge ? "--edge" : "level-triggered"));
  const Certificates certificates;
  TlsServer server(certificates,
                   edge ? std::vector<std::string>{"--edge"} : std::vector<std::string>{});
  const std::string data = random_bytes(kBig, edge ? 2 : 1);
  check_echo(s_client_echo(server, certificates.ca_file, data, {"-quiet"}), data);
  server.stop();
}

TEST_CASE("openssl s_client negotiates TLS 1.2 and TLS 1.3 with echo_server as it asks",
          "[tls][interop][openssl]") {
  REQUIRE_TOOL_OR_SKIP("openssl");
  const Certificates certificates;
  TlsServer server(certificates);
  for (const std::string version : {"1_2", "1_3"}) {
    INFO("-tls" << version);
    const std::string data = "hello over TLS " + version + "\n";
    const ToolRun run =
        s_client_echo(server, certificates.ca_file, data, {"-brief", "-tls" + version});
    check_echo(run, data);
    std::string expected = "Protocol version: TLSv" + version + "\n";
    expected[expected.find('_')] = '.';
    CHECK(contains(run.err, expected));
    CHECK(contains(run.err, "Verification: OK"));
  }
  server.stop();
}

// --- Python's ssl module
// --------------------------------------------------------------------------

TEST_CASE("Python's ssl module echoes 16 MiB each way through echo_server and unwraps cleanly",
          "[tls][interop][python]") {
  REQUIRE_TOOL_OR_SKIP("python3");
  const bool edge = GENERATE(false, true);
  INFO((edge ? "--edge" : "level-triggered"));
  const Certificates certificates;
  TlsServer server(certificates,
                   edge ? std::vector<std::string>{"--edge"} : std::vector<std::string>{});
  const ToolRun run = run_tool({"python3", "-c", kPythonEcho, std::to_string(server.port),
                                certificates.ca_file, std::to_string(kBig)});
  INFO("stdout: " << run.out << "stderr: " << run.err);
  CHECK_FALSE(run.timed_out);
  REQUIRE(run.exit_status == 0);
  std::istringstream words(run.out);
  std::size_t count = 0;
  std::string sent_digest, received_digest, unwrapped, eof;
  words >> count >> sent_digest >> received_digest >> unwrapped >> eof;
  CHECK(count == kBig);
  CHECK(sent_digest.size() == 64);
  CHECK(received_digest == sent_digest);
  CHECK(unwrapped == "unwrapped");
  CHECK(eof == "eof");  // after its close_notify, the server closed the connection
  server.stop();
}

// --- curl
// -------------------------------------------------------------------------------------------

TEST_CASE("curl completes a verified TLS 1.3 and TLS 1.2 handshake with echo_server",
          "[tls][interop][curl]") {
  REQUIRE_TOOL_OR_SKIP("curl");
  const Certificates certificates;
  TlsServer server(certificates);
  const std::string url = "https://localhost:" + std::to_string(server.port) + "/";
  const std::string resolve = "localhost:" + std::to_string(server.port) + ":127.0.0.1";
  for (const bool tls12 : {false, true}) {
    INFO((tls12 ? "--tls-max 1.2" : "default"));
    std::vector<std::string> args{"curl",      "-v",    "--cacert",   certificates.ca_file,
                                  "--resolve", resolve, "--max-time", "5"};
    if (tls12) args.insert(args.end(), {"--tls-max", "1.2"});
    args.push_back(url);
    // The echoed request is no HTTP response: curl fails after the handshake, as it should.
    const ToolRun run = run_tool(args);
    INFO("stderr: " << run.err);
    CHECK_FALSE(run.timed_out);
    CHECK(run.exit_status != 0);
    CHECK(
        contains(run.err, tls12 ? "SSL connection using TLSv1.2" : "SSL connection using TLSv1.3"));
    CHECK(contains(run.err, "SSL certificate verify ok"));
  }
  server.stop();
}

TEST_CASE("curl --http0.9 gets its own request echoed over TLS by echo_server",
          "[tls][interop][curl]") {
  REQUIRE_TOOL_OR_SKIP("curl");
  const ToolRun help = run_tool({"curl", "--help", "all"});
  if (!contains(help.out, "--http0.9")) {
    WARN("skipped: this curl has no --http0.9");
    SUCCEED();
    return;
  }
  const Certificates certificates;
  TlsServer server(certificates);
  const std::string port = std::to_string(server.port);
  // HTTP/0.9 ends at the connection's close, which an echo server never does first: curl stops
  // at --max-time (exit status 28) with what it got.
  const ToolRun run = run_tool({"curl", "-sS", "--http0.9", "--cacert", certificates.ca_file,
                                "--resolve", "localhost:" + port + ":127.0.0.1", "--max-time", "2",
                                "https://localhost:" + port + "/echo-me"});
  INFO("stderr: " << run.err);
  CHECK_FALSE(run.timed_out);
  CHECK(run.exit_status == 28);
  CHECK(run.out.rfind("GET /echo-me HTTP/1.1\r\nHost: localhost:" + port + "\r\n", 0) == 0);
  CHECK(run.out.size() >= 4);
  CHECK(run.out.substr(run.out.size() - 4) == "\r\n\r\n");
  server.stop();
}

// --- echo_load --tls
// --------------------------------------------------------------------------------

TEST_CASE("echo_load --tls verifies echo_server's certificate as told and runs over TLS",
          "[tls][interop][echo_load]") {
  const Certificates certificates;
  TlsServer server(certificates);
  const std::string port = std::to_string(server.port);
  const std::vector<std::string> base{ECHO_LOAD_PATH, "--port", port,        "--conns", "4",
                                      "--size",       "4096",   "--seconds", "0.5"};
  const auto load = [&](std::vector<std::string> tls) {
    std::vector<std::string> args = base;
    args.insert(args.end(), tls.begin(), tls.end());
    return run_tool(args, {}, 0, 60s);
  };

  SECTION("against the test CA (--tls-ca): exit 0 and the usual report") {
    const ToolRun run = load({"--tls", "--tls-ca", certificates.ca_file});
    INFO("stdout: " << run.out << "stderr: " << run.err);
    CHECK(run.exit_status == 0);
    CHECK(contains(run.out, "summary: "));
    CHECK(contains(run.out, ", 4 connections, 0 errors, 0 mismatches\n"));
    CHECK(run.err.empty());
  }
  SECTION("against the system store: one connect line naming the verification failure, exit 1") {
    const ToolRun run = load({"--tls"});
    INFO("stdout: " << run.out << "stderr: " << run.err);
    CHECK(run.exit_status == 1);
    CHECK(std::count(run.err.begin(), run.err.end(), '\n') == 1);
    CHECK(run.err.rfind("echo_load: connect to 127.0.0.1:" + port + " (connection ", 0) == 0);
    CHECK(contains(run.err, "certificate"));
    CHECK(contains(run.out, "0 connections, 1 errors, 0 mismatches\n"));
  }
  SECTION("--tls-insecure: no verification, exit 0") {
    const ToolRun run = load({"--tls", "--tls-insecure"});
    INFO("stdout: " << run.out << "stderr: " << run.err);
    CHECK(run.exit_status == 0);
    CHECK(contains(run.out, ", 4 connections, 0 errors, 0 mismatches\n"));
  }
  SECTION("--host localhost and a --tls-name the certificate does not hold: exit 1") {
    const ToolRun run = load({"--host", "localhost", "--tls", "--tls-ca", certificates.ca_file,
                              "--tls-name", "other.example"});
    INFO("stdout: " << run.out << "stderr: " << run.err);
    CHECK(run.exit_status == 1);
    CHECK(contains(run.err, "echo_load: connect to "));
    CHECK(contains(run.err, "hostname mismatch"));
  }
  SECTION("--host localhost: the name checked is localhost") {
    const ToolRun run = load({"--host", "localhost", "--tls", "--tls-ca", certificates.ca_file});
    INFO("stdout: " << run.out << "stderr: " << run.err);
    CHECK(run.exit_status == 0);
  }
  SECTION("TLS options without --tls: usage, exit 2") {
    const ToolRun run = load({"--tls-ca", certificates.ca_file});
    CHECK(run.exit_status == 2);
    CHECK(run.err.rfind("echo_load: --tls-ca needs --tls\n", 0) == 0);
  }
  server.stop();
}

// --- Bad flags and files
// --------------------------------------------------------------------------

TEST_CASE("echo_server refuses half a TLS configuration and reports a bad certificate file",
          "[tls][interop][usage]") {
  const Certificates certificates;
  const std::string program = ECHO_SERVER_PATH;
  SECTION("--tls-cert without --tls-key: usage, exit 2") {
    const ToolRun run = run_tool({program, "--tls-cert", certificates.cert_file});
    CHECK(run.exit_status == 2);
    CHECK(run.out.empty());
    CHECK(run.err.rfind(program + ": --tls-cert and --tls-key go together\nusage: ", 0) == 0);
  }
  SECTION("--tls-key without --tls-cert: usage, exit 2") {
    const ToolRun run = run_tool({program, "--tls-key", certificates.key_file});
    CHECK(run.exit_status == 2);
    CHECK(contains(run.err, "usage: "));
  }
  SECTION("a certificate file that does not exist: one 'echo_server: tls:' line, exit 1") {
    const ToolRun run = run_tool({program, "--tls-cert", certificates.dir.path() + "/missing.pem",
                                  "--tls-key", certificates.key_file});
    INFO("stderr: " << run.err);
    CHECK(run.exit_status == 1);
    CHECK(run.out.empty());
    CHECK(run.err.rfind("echo_server: tls: ", 0) == 0);
    CHECK(contains(run.err, "missing.pem"));
    CHECK(std::count(run.err.begin(), run.err.end(), '\n') == 1);
  }
  SECTION("a key that is not the certificate's: exit 1") {
    const reactor_test::Pem other = certificates.ca.issue({"localhost"});
    const std::string other_key = certificates.dir.write("other-key.pem", other.key);
    const ToolRun run =
        run_tool({program, "--tls-cert", certificates.cert_file, "--tls-key", other_key});
    INFO("stderr: " << run.err);
    CHECK(run.exit_status == 1);
    CHECK(run.err.rfind("echo_server: tls: ", 0) == 0);
  }
}

TEST_CASE(
    "echo_server --tls-cert --threads 2 echoes through openssl s_client in every balance mode",
    "[tls][interop][openssl][pool]") {
  REQUIRE_TOOL_OR_SKIP("openssl");
  const std::string balance = GENERATE("reuseport", "dispatch", "round-robin", "exclusive");
  INFO("--balance " << balance);
  const Certificates certificates;
  TlsServer server(certificates, {"--threads", "2", "--balance", balance});
  // Several clients, so that both threads get some (each is checked byte for byte).
  for (int i = 0; i < 4; ++i) {
    const std::string data = random_bytes(256 * 1024, 10 + i);
    check_echo(s_client_echo(server, certificates.ca_file, data, {"-quiet"}), data);
  }
  server.stop();
}

// --- Bad peers
// ------------------------------------------------------------------------------------

TEST_CASE("echo_server --tls-cert survives garbage and resets mid-handshake and keeps serving",
          "[tls][interop][openssl]") {
  REQUIRE_TOOL_OR_SKIP("openssl");
  const Certificates certificates;
  TlsServer server(certificates);
  const reactor::Endpoint endpoint =
      reactor::Endpoint::from_host_port("127.0.0.1", static_cast<std::uint16_t>(server.port));
  {
    INFO("garbage instead of a ClientHello: the server closes the connection");
    reactor::UniqueFd peer = connect_to(endpoint);
    const std::string garbage = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" + random_bytes(4096, 7);
    CHECK(send_without_reading(peer.get(), garbage, kLimit) > 0);
    CHECK(wait_closed(peer.get()));
  }
  const std::string hello = client_hello();
  {
    INFO("half a ClientHello, then a reset");
    reactor::UniqueFd peer = connect_to(endpoint);
    CHECK(send_without_reading(peer.get(), std::string_view(hello).substr(0, hello.size() / 2),
                               kLimit) == hello.size() / 2);
    reset(peer);
  }
  {
    INFO("a whole ClientHello, the server's first answer, then a reset");
    reactor::UniqueFd peer = connect_to(endpoint);
    CHECK(send_without_reading(peer.get(), hello, kLimit) == hello.size());
    CHECK((poll_one(peer.get(), POLLIN, Clock::now() + kLimit) & POLLIN) != 0);
    char buffer[512];
    CHECK(::read(peer.get(), buffer, sizeof buffer) > 0);
    reset(peer);
  }
  {
    INFO("a connection that closes before sending anything");
    reactor::UniqueFd peer = connect_to(endpoint);
    reset(peer);
  }
  CHECK(server.running());
  const std::string data = random_bytes(kMiB, 3);
  check_echo(s_client_echo(server, certificates.ca_file, data, {"-quiet"}), data);
  CHECK(server.running());
  server.stop();
}

// --- Certificate reload
// ---------------------------------------------------------------------------

TEST_CASE("echo_server reloads its certificate on SIGHUP and keeps the old one if that fails",
          "[tls][interop][openssl]") {
  REQUIRE_TOOL_OR_SKIP("openssl");
  Certificates certificates;
  TlsServer server(certificates);
  const std::string data = "before and after the reload\n";
  check_echo(s_client_echo(server, certificates.ca_file, data, {"-quiet"}), data);

  // A leaf from another CA replaces the files: once reloaded, only that CA verifies the server.
  const reactor_test::TestCa other_ca;
  const reactor_test::Pem other = other_ca.issue({"localhost"}, {"127.0.0.1"});
  const std::string other_ca_file =
      certificates.dir.write("other-ca.pem", other_ca.certificate_pem());
  certificates.dir.write("cert.pem", other.certificate);
  certificates.dir.write("key.pem", other.key);
  server.process.signal(SIGHUP);
  CHECK(eventually(
      [&] { return s_client_echo(server, other_ca_file, data, {"-quiet"}).out == data; }));
  const ToolRun old_ca = s_client_echo(server, certificates.ca_file, data, {"-quiet"});
  CHECK(old_ca.exit_status != 0);
  CHECK(old_ca.out.empty());

  // A broken file: the reload fails, a line says so, and the last good certificate stays.
  certificates.dir.write("cert.pem", "not a certificate\n");
  server.process.signal(SIGHUP);
  check_echo(s_client_echo(server, other_ca_file, data, {"-quiet"}), data);
  CHECK(server.running());
  stop_and_check_exit(server.process);
  const std::optional<std::string> err = server.process.read_stderr_to_eof();
  REQUIRE(err.has_value());
  CHECK(contains(*err, "echo_server: tls: reload failed"));
  CHECK(contains(*err, "echo_server: shut down: "));
}
