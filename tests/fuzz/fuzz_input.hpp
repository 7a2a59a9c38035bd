// Test-only (not part of reactor): FuzzInput, the fuzz targets' view of their input — small
// integers read off the front of the byte string, zero once it is used up. Self-contained (no
// <fuzzer/FuzzedDataProvider.h>), so the targets also build with GCC for the corpus replay.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fuzz {

class FuzzInput {
 public:
  FuzzInput(const std::uint8_t* data, std::size_t size) noexcept : data_(data), size_(size) {}

  bool empty() const noexcept { return size_ == 0; }

  std::uint8_t byte() noexcept {
    if (size_ == 0) return 0;
    --size_;
    return *data_++;
  }
  std::uint16_t u16() noexcept {
    const auto low = byte();
    return static_cast<std::uint16_t>(low | (byte() << 8));
  }
  // A value in [0, bound), bound > 0.
  std::size_t below(std::size_t bound) noexcept { return (bound <= 256 ? byte() : u16()) % bound; }
  bool flag() noexcept { return (byte() & 1) != 0; }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
};

}  // namespace fuzz

#include <cstdio>
#include <cstdlib>

// Checks an invariant: prints it and aborts (a crash libFuzzer records, a failed replay test).
#define FUZZ_CHECK(condition)                                                                \
  do {                                                                                       \
    if (!(condition)) {                                                                      \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #condition); \
      std::abort();                                                                          \
    }                                                                                        \
  } while (false)
