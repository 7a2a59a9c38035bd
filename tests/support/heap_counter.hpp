// Test-only (not part of reactor): replaces the global operator new/delete to count heap use —
// calls (test::heap_allocations) and bytes currently allocated (test::heap_live_bytes, as
// malloc_usable_size sees them). Include it in exactly one source file of a test executable.
#pragma once

#include <malloc.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

// GCC pairs the replaced operator new with free() below and warns of a mismatch that is not one.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

namespace test {

inline std::atomic<std::size_t> heap_allocations{0};
inline std::atomic<std::size_t> heap_live_bytes{0};

inline void* counted_malloc(std::size_t size) noexcept {
  void* p = std::malloc(size == 0 ? 1 : size);
  if (p == nullptr) return nullptr;
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  heap_live_bytes.fetch_add(::malloc_usable_size(p), std::memory_order_relaxed);
  return p;
}

}  // namespace test

void* operator new(std::size_t size) {
  if (void* p = test::counted_malloc(size)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, const std::nothrow_t& /*tag*/) noexcept {
  return test::counted_malloc(size);
}
void operator delete(void* p) noexcept {
  if (p == nullptr) return;
  test::heap_live_bytes.fetch_sub(::malloc_usable_size(p), std::memory_order_relaxed);
  std::free(p);
}
void operator delete(void* p, std::size_t /*size*/) noexcept {
  operator delete(p);
}
