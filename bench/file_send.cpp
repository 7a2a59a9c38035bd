// Benchmark tool (not a test): serving a file over loopback TCP, two ways:
//   send_file   Connection::send_file(): the kernel copies the file to the socket (sendfile(2));
//   read_send   pread into a 256 KiB buffer, then send(), refilling from on_drain whenever the
//               connection's backpressure lifts (what a server without send_file() does).
//
//   bench_file_send [--size MiB] [--count N] [--repeats R]
//
// Defaults: a 64 MiB file (a temporary file under /tmp, in the page cache after the first round),
// served 8 times per round, 5 rounds per mode, the modes taking turns. The server is a Reactor on
// its own thread with one Acceptor on 127.0.0.1; the client, on the main thread, connects once per
// round, asks for the file N times (one byte each) and reads every byte with blocking read()s of
// 1 MiB, checking only the count. One line per mode: the median MB/s (10^6 bytes per second of
// wall time, client's view) over the rounds, the slowest and fastest, and the server thread's CPU
// time (user + system, getrusage RUSAGE_THREAD) per GiB served, median. The client's CPU is the
// same for both modes (it reads the same bytes) and is not reported.
//
// Measured with:
//   cmake --preset release && cmake --build --preset release -j1 --target bench_file_send
//   build/release/bench/bench_file_send --size 64 --count 8 --repeats 5
// Figures: docs/performance.md, "Issue 13: file send".
#include <reactor.hpp>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

enum class Mode { kSendFile, kReadSend };

struct Shared {
  int file = -1;
  std::uint64_t size = 0;
  std::atomic<Mode> mode{Mode::kSendFile};
  std::atomic<double> server_cpu{0};  // CPU seconds of the server thread, after its last step
  std::atomic<bool> stop{false};
};

double thread_cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_THREAD, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

// Serves the file once per request byte.
struct FileServer {
  static constexpr std::size_t kChunk = 256 * 1024;
  Shared* shared;
  std::uint64_t requests = 0;  // asked for, not yet started (read_send)
  std::uint64_t offset = 0;    // read_send: the next byte of the current copy
  bool serving = false;        // read_send: a copy is under way
  std::vector<char> buffer{};  // read_send: one chunk

  void on_data(auto& connection, std::string_view bytes) {
    if (shared->mode.load() == Mode::kSendFile) {
      for (std::size_t i = 0; i < bytes.size(); ++i) {
        if (const std::error_code ec = connection.send_file(shared->file, 0, shared->size)) {
          std::fprintf(stderr, "send_file: %s\n", ec.message().c_str());
          connection.abort();
          return;
        }
      }
      return;
    }
    requests += bytes.size();
    pump(connection);
  }
  void on_drain(auto& connection) { pump(connection); }

  // read_send: copies chunks until the connection's backpressure stops it (on_drain resumes).
  void pump(auto& connection) {
    if (buffer.empty()) buffer.resize(kChunk);
    const std::size_t high_water = 1024 * 1024;
    while (connection.is_open() && connection.pending_output_bytes() < high_water) {
      if (!serving) {
        if (requests == 0) return;
        --requests;
        serving = true;
        offset = 0;
      }
      const std::size_t want =
          static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, shared->size - offset));
      const ssize_t n = ::pread(shared->file, buffer.data(), want, static_cast<off_t>(offset));
      if (n <= 0) {
        std::perror("pread");
        connection.abort();
        return;
      }
      connection.send(buffer.data(), static_cast<std::size_t>(n));
      offset += static_cast<std::uint64_t>(n);
      if (offset == shared->size) serving = false;
    }
  }
};

struct Round {
  double mb_per_s = 0;
  double cpu_per_gib = 0;  // server thread, seconds
};

Round run_round(Shared& shared, std::uint16_t port, int count) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    std::perror("connect");
    std::exit(1);
  }
  std::vector<char> buffer(1 << 20);
  const std::uint64_t total = shared.size * static_cast<std::uint64_t>(count);
  const auto start = Clock::now();
  const double cpu0 = shared.server_cpu.load();
  const std::string requests(static_cast<std::size_t>(count), 'G');
  if (::write(fd, requests.data(), requests.size()) != static_cast<ssize_t>(requests.size())) {
    std::perror("write");
    std::exit(1);
  }
  std::uint64_t received = 0;
  while (received < total) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n <= 0) {
      std::fprintf(stderr, "read: %s after %llu of %llu bytes\n", n == 0 ? "EOF" : strerror(errno),
                   static_cast<unsigned long long>(received),
                   static_cast<unsigned long long>(total));
      std::exit(1);
    }
    received += static_cast<std::uint64_t>(n);
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  ::close(fd);
  Round round;
  round.mb_per_s = static_cast<double>(total) / 1e6 / seconds;
  round.cpu_per_gib = (shared.server_cpu.load() - cpu0) / (static_cast<double>(total) / (1 << 30));
  return round;
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t size_mib = 64;
  int count = 8;
  int repeats = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view flag = argv[i];
    if (flag == "--size") {
      size_mib = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (flag == "--count") {
      count = std::atoi(argv[i + 1]);
    } else if (flag == "--repeats") {
      repeats = std::atoi(argv[i + 1]);
    } else {
      std::fprintf(stderr, "usage: %s [--size MiB] [--count N] [--repeats R]\n", argv[0]);
      return 2;
    }
  }

  Shared shared;
  shared.size = size_mib << 20;
  char name[] = "/tmp/bench_file_send_XXXXXX";
  shared.file = ::mkstemp(name);
  if (shared.file < 0) {
    std::perror("mkstemp");
    return 1;
  }
  ::unlink(name);
  {
    std::vector<char> block(1 << 20);
    for (std::size_t i = 0; i < block.size(); ++i) block[i] = static_cast<char>(i * 131 + 7);
    for (std::uint64_t written = 0; written < shared.size; written += block.size()) {
      if (::write(shared.file, block.data(), block.size()) != static_cast<ssize_t>(block.size())) {
        std::perror("write");
        return 1;
      }
    }
  }

  reactor::Reactor<> loop;
  reactor::ListenOptions options;
  reactor::Acceptor<FileServer> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"),
                                         FileServer{&shared}, options);
  const std::uint16_t port = acceptor.local_endpoint().port();
  std::thread server([&] {
    // The server thread's CPU clock, sampled after every loop step (one getrusage per step).
    while (!shared.stop.load()) {
      loop.run_once(std::chrono::milliseconds(50));
      shared.server_cpu.store(thread_cpu_seconds());
    }
  });

  std::vector<Round> results[2];
  for (int r = 0; r < repeats; ++r) {
    for (const Mode mode : {Mode::kSendFile, Mode::kReadSend}) {
      shared.mode.store(mode);
      results[mode == Mode::kSendFile ? 0 : 1].push_back(run_round(shared, port, count));
    }
  }
  shared.stop.store(true);
  server.join();

  std::printf("%llu MiB file, served %d times per round, %d rounds per mode\n",
              static_cast<unsigned long long>(size_mib), count, repeats);
  for (int m = 0; m < 2; ++m) {
    std::vector<Round>& rounds = results[m];
    std::vector<double> speeds, cpus;
    for (const Round& round : rounds) {
      speeds.push_back(round.mb_per_s);
      cpus.push_back(round.cpu_per_gib);
    }
    std::sort(speeds.begin(), speeds.end());
    std::sort(cpus.begin(), cpus.end());
    std::printf("%-10s %8.0f MB/s (min %.0f, max %.0f)   server CPU %.3f s per GiB\n",
                m == 0 ? "send_file" : "read_send", speeds[speeds.size() / 2], speeds.front(),
                speeds.back(), cpus[cpus.size() / 2]);
  }
  ::close(shared.file);
  return 0;
}
