// Benchmark tool (not part of reactor): a heap-allocation counter to preload into a server,
//
//   MALLOC_COUNT_FILE=/tmp/counts LD_PRELOAD=.../libbench_malloc_count.so server ...
//
// It replaces malloc, calloc, realloc, free and the aligned allocators (operator new and
// delete reach them through libstdc++), forwards to glibc's own __libc_* functions, and keeps
// its counters in a 4 KiB file mapped shared, so that bench/compare can read them at any moment
// while the server runs: no signal, no exit hook, no cooperation from the server. The file holds
// little-endian uint64 words: [0] allocations (every call that returned new memory, realloc
// included), [1] frees of non-null pointers, [2] bytes requested. Without MALLOC_COUNT_FILE the
// counters are kept in memory only. glibc only: it relies on the __libc_* entry points.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

extern "C" {
void* __libc_malloc(std::size_t size);
void* __libc_calloc(std::size_t count, std::size_t size);
void* __libc_realloc(void* pointer, std::size_t size);
void __libc_free(void* pointer);
void* __libc_memalign(std::size_t alignment, std::size_t size);
}

namespace {

struct Counters {
  std::uint64_t allocations;
  std::uint64_t frees;
  std::uint64_t bytes;
};

Counters fallback;
Counters* counters = &fallback;  // switched to the shared mapping once the constructor has run

void count_allocation(std::size_t size) noexcept {
  __atomic_fetch_add(&counters->allocations, 1, __ATOMIC_RELAXED);
  __atomic_fetch_add(&counters->bytes, size, __ATOMIC_RELAXED);
}

void count_free(void* pointer) noexcept {
  if (pointer != nullptr) __atomic_fetch_add(&counters->frees, 1, __ATOMIC_RELAXED);
}

// Runs before main; allocations made earlier (by other constructors) stay in `fallback` and are
// carried over.
__attribute__((constructor)) void open_counter_file() {
  const char* path = std::getenv("MALLOC_COUNT_FILE");
  if (path == nullptr || *path == '\0') return;
  const int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  void* mapping = MAP_FAILED;
  if (ftruncate(fd, 4096) == 0) {
    mapping = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  close(fd);
  if (mapping == MAP_FAILED) return;
  auto* shared = static_cast<Counters*>(mapping);
  *shared = fallback;
  counters = shared;
}

}  // namespace

extern "C" {

void* malloc(std::size_t size) noexcept {
  count_allocation(size);
  return __libc_malloc(size);
}

void* calloc(std::size_t count, std::size_t size) noexcept {
  count_allocation(count * size);
  return __libc_calloc(count, size);
}

void* realloc(void* pointer, std::size_t size) noexcept {
  count_allocation(size);
  return __libc_realloc(pointer, size);
}

void free(void* pointer) noexcept {
  count_free(pointer);
  __libc_free(pointer);
}

void* memalign(std::size_t alignment, std::size_t size) noexcept {
  count_allocation(size);
  return __libc_memalign(alignment, size);
}

void* aligned_alloc(std::size_t alignment, std::size_t size) noexcept {
  count_allocation(size);
  return __libc_memalign(alignment, size);
}

int posix_memalign(void** result, std::size_t alignment, std::size_t size) noexcept {
  count_allocation(size);
  void* pointer = __libc_memalign(alignment, size);
  if (pointer == nullptr) return ENOMEM;
  *result = pointer;
  return 0;
}

}  // extern "C"
