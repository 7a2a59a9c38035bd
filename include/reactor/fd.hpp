// Public: UniqueFd, the move-only owner of one file descriptor on the user's side (a connected
// socket about to be adopted, say). Objects inside the library own their fds directly and close
// them through their reactor's syscall policy.
#pragma once

#include <unistd.h>

#include <utility>

namespace reactor {

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  // Takes ownership of `fd` (-1 for none).
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }

  // Gives up ownership without closing; returns the fd.
  int release() noexcept { return std::exchange(fd_, -1); }

  // Closes the owned fd (never retried: after EINTR the fd is gone on Linux) and takes `fd`.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace reactor
