// zerocopy_probe: does MSG_ZEROCOPY pay off for large TCP sends on this machine?
//
// A sender thread and a receiver thread share a fresh loopback TCP connection per run. For each
// buffer size it sends --total-mib MiB with plain send() and again with SO_ZEROCOPY +
// send(MSG_ZEROCOPY), and reports throughput, CPU per MiB (getrusage(RUSAGE_THREAD), user+sys,
// for sender and receiver) and the share of zerocopy sends whose completion carried
// SO_EE_CODE_ZEROCOPY_COPIED (the kernel copied after all; expected on loopback, see
// Documentation/networking/msg_zerocopy.rst "Loopback").
//
// Zerocopy buffers come from a ring (>= 8 MiB, >= 4 slots); a slot is reused only after the
// completion of every send() that referenced it. ENOBUFS (optmem_max exceeded) drains the error
// queue and retries. A zerocopy run ends when all completions have arrived.
//
// Standalone, not part of the CMake build:
//   g++ -std=c++20 -O2 -pthread bench/zerocopy_probe.cpp -o /tmp/zcprobe/probe
//   /tmp/zcprobe/probe [--total-mib N]   (default 1024)
#include <arpa/inet.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif

namespace {

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(1);
}

double thread_cpu_s() {
  rusage ru{};
  getrusage(RUSAGE_THREAD, &ru);
  auto tv = [](timeval t) { return double(t.tv_sec) + double(t.tv_usec) / 1e6; };
  return tv(ru.ru_utime) + tv(ru.ru_stime);
}

// Connected loopback TCP pair: `out` is the client (sender), `in` the accepted side (receiver).
void tcp_pair(int& out, int& in) {
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (lfd < 0 || bind(lfd, reinterpret_cast<sockaddr*>(&a), len) < 0 || listen(lfd, 1) < 0 ||
      getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len) < 0)
    die("listen");
  out = socket(AF_INET, SOCK_STREAM, 0);
  if (out < 0 || connect(out, reinterpret_cast<sockaddr*>(&a), len) < 0) die("connect");
  in = accept(lfd, nullptr, nullptr);
  if (in < 0) die("accept");
  close(lfd);
}

struct Stats {
  double secs = 0, send_cpu = 0, recv_cpu = 0;
  uint64_t bytes = 0, zc_sends = 0, notes = 0, copied = 0, enobufs = 0;
};

// Completion bookkeeping: send() number i (0-based) is complete once i < upto.
struct Completions {
  int fd;
  std::vector<uint8_t> done;
  uint32_t upto = 0;
  Stats* st;

  // Reads every queued notification; with `wait`, polls (once, 100 ms max) if none is queued.
  void drain(bool wait) {
    for (bool got = false;;) {
      char ctrl[CMSG_SPACE(sizeof(sock_extended_err)) + 64];
      msghdr m{};
      m.msg_control = ctrl;
      m.msg_controllen = sizeof ctrl;
      if (recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) die("recvmsg(MSG_ERRQUEUE)");
        if (!wait || got) return;
        pollfd p{fd, 0, 0};  // POLLERR is always reported
        poll(&p, 1, 100);
        wait = false;
        continue;
      }
      for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (!((c->cmsg_level == SOL_IP && c->cmsg_type == IP_RECVERR) ||
              (c->cmsg_level == SOL_IPV6 && c->cmsg_type == IPV6_RECVERR)))
          continue;
        sock_extended_err e;
        std::memcpy(&e, CMSG_DATA(c), sizeof e);
        if (e.ee_origin != SO_EE_ORIGIN_ZEROCOPY || e.ee_errno != 0) continue;
        uint32_t n = e.ee_data - e.ee_info + 1;  // range [ee_info, ee_data]
        for (uint32_t i = e.ee_info; i != e.ee_data + 1; ++i) done[i] = 1;
        ++st->notes;
        if (e.ee_code & SO_EE_CODE_ZEROCOPY_COPIED) st->copied += n;
        got = true;
      }
      while (upto < done.size() && done[upto]) ++upto;
    }
  }
};

void sender(int fd, size_t size, uint64_t total, bool zc, Stats& st) {
  const size_t slots = std::max<size_t>(4, (size_t{8} << 20) / size);
  std::vector<char> ring(slots * size);
  for (size_t i = 0; i < ring.size(); ++i) ring[i] = char(i * 131);
  constexpr uint32_t kNone = UINT32_MAX;
  std::vector<uint32_t> last_id(slots, kNone);  // last send() number that used each slot
  Completions c{fd, {}, 0, &st};
  c.done.reserve(total / size + 1024);
  uint32_t next_id = 0;
  double cpu0 = thread_cpu_s();
  for (uint64_t sent = 0, slot = 0; sent < total; sent += size, slot = (slot + 1) % slots) {
    char* buf = ring.data() + slot * size;
    if (zc) {
      c.drain(false);
      while (last_id[slot] != kNone && c.upto <= last_id[slot]) c.drain(true);
    }
    for (size_t off = 0; off < size;) {
      ssize_t r = send(fd, buf + off, size - off, zc ? MSG_ZEROCOPY : 0);
      if (r < 0) {
        if (zc && (errno == ENOBUFS || errno == EAGAIN)) {
          ++st.enobufs;
          c.drain(true);
          continue;
        }
        die("send");
      }
      if (zc) {
        last_id[slot] = next_id++;
        c.done.push_back(0);
        ++st.zc_sends;
      }
      off += size_t(r);
    }
  }
  while (zc && c.upto < next_id) c.drain(true);
  st.send_cpu = thread_cpu_s() - cpu0;
  shutdown(fd, SHUT_WR);
}

void receiver(int fd, Stats& st) {
  std::vector<char> buf(1 << 20);
  double cpu0 = thread_cpu_s();
  for (;;) {
    ssize_t r = recv(fd, buf.data(), buf.size(), 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) die("recv");
    if (r == 0) break;
    st.bytes += uint64_t(r);
  }
  st.recv_cpu = thread_cpu_s() - cpu0;
}

Stats run(size_t size, uint64_t total, bool zc) {
  int out, in;
  tcp_pair(out, in);
  int one = 1;
  if (zc && setsockopt(out, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) < 0)
    die("setsockopt(SO_ZEROCOPY)");
  Stats st;
  auto t0 = std::chrono::steady_clock::now();
  std::thread rt(receiver, in, std::ref(st));
  std::thread s(sender, out, size, total, zc, std::ref(st));
  s.join();
  rt.join();
  st.secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (st.bytes != total) std::fprintf(stderr, "short transfer: %lu of %lu\n", st.bytes, total);
  close(out);
  close(in);
  return st;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t total_mib = 1024;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--total-mib" && i + 1 < argc) {
      total_mib = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--total-mib N]\n", argv[0]);
      return 2;
    }
  }
  utsname u{};
  uname(&u);
  std::string optmem;
  std::ifstream("/proc/sys/net/core/optmem_max") >> optmem;
  std::printf("kernel %s %s, %u cpus, optmem_max %s, %lu MiB per run, loopback TCP\n", u.release,
              u.machine, std::thread::hardware_concurrency(), optmem.c_str(), total_mib);
  std::printf("%8s %-5s %9s %14s %14s %9s %8s %8s %7s\n", "size", "mode", "MiB/s", "sendCPU us/MiB",
              "recvCPU us/MiB", "zc_sends", "notifs", "copied%", "ENOBUFS");
  const uint64_t total = total_mib << 20;
  for (size_t size :
       {size_t{4} << 10, size_t{16} << 10, size_t{64} << 10, size_t{256} << 10, size_t{1} << 20}) {
    for (bool zc : {false, true}) {
      Stats s = run(size, total, zc);
      double mib = double(s.bytes) / (1 << 20);
      std::printf("%7zuK %-5s %9.0f %14.0f %14.0f %9lu %8lu %7.1f%% %7lu\n", size >> 10,
                  zc ? "zc" : "plain", mib / s.secs, s.send_cpu * 1e6 / mib, s.recv_cpu * 1e6 / mib,
                  s.zc_sends, s.notes,
                  s.zc_sends ? 100.0 * double(s.copied) / double(s.zc_sends) : 0.0, s.enobufs);
      std::fflush(stdout);
    }
  }
}
