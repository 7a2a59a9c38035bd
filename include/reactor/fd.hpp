// Public: UniqueFd, the move-only owner of one file descriptor on the user's side (a connected
// socket about to be adopted, say). Objects inside the library own their fds directly and close
// them through their reactor's syscall policy. BasicUniqueFd<Sys> closes through policy Sys, so an
// fd of a simulated kernel (tests/support/sim_kernel.hpp) is never handed to the real close();
// UniqueFd is BasicUniqueFd<LinuxSyscalls>.
#pragma once

#include <type_traits>
#include <utility>

#include "syscalls.hpp"

namespace reactor {

template <class Sys = LinuxSyscalls>
class BasicUniqueFd {
 public:
  BasicUniqueFd() noexcept = default;
  // Takes ownership of `fd` (-1 for none).
  explicit BasicUniqueFd(int fd) noexcept : fd_(fd) {}
  BasicUniqueFd(BasicUniqueFd&& other) noexcept : fd_(other.release()) {}
  // Takes over an fd owned under another policy. Implicit when one policy derives from the other
  // (a fault-injecting policy over LinuxSyscalls: the same kernel, as UniqueFd code written before
  // BasicUniqueFd expects), explicit otherwise: the two must agree on what the fd is.
  template <class Other>
  explicit(!(std::is_base_of_v<Sys, Other> || std::is_base_of_v<Other, Sys>))
      BasicUniqueFd(BasicUniqueFd<Other>&& other) noexcept
      : fd_(other.release()) {}
  BasicUniqueFd& operator=(BasicUniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  BasicUniqueFd(const BasicUniqueFd&) = delete;
  BasicUniqueFd& operator=(const BasicUniqueFd&) = delete;
  ~BasicUniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }

  // Gives up ownership without closing; returns the fd.
  int release() noexcept { return std::exchange(fd_, -1); }

  // Closes the owned fd (never retried: after EINTR the fd is gone on Linux) and takes `fd`.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) Sys::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

using UniqueFd = BasicUniqueFd<>;

}  // namespace reactor
