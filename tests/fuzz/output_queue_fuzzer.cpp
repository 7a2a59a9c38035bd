// Fuzz target: OutputQueue (with its ChunkPool) and InputBuffer against a std::string model. The
// input is a list of operations — append, gather, consume, clear, and "the next N allocations
// fail" — applied to both; after each, the queue's size and the bytes gather() reports must
// equal the model's, a failed append must leave the queue as it was, and the pool must never
// cache more than its limits (big and small chunks). Leaks are ASan's (LeakSanitizer) to find.
#include <sys/uio.h>

#include <reactor/buffer.hpp>

#include <cstddef>
#include <cstdint>
#include <new>
#include <string>

#include "fuzz_input.hpp"

namespace {

// Allocation failure on demand: the library allocates chunks and input blocks with nothrow new.
int failing_allocations = 0;

}  // namespace

// Forwards to the throwing form, so that the pair matches whatever operator delete is in use
// (ASan's, valgrind's or libstdc++'s).
void* operator new(std::size_t size, const std::nothrow_t& /*tag*/) noexcept {
  if (failing_allocations > 0) {
    --failing_allocations;
    return nullptr;
  }
  try {
    return ::operator new(size);
  } catch (...) {
    return nullptr;
  }
}

namespace {

// Bytes that differ per position and per append, so that loss, duplication or reordering shows.
std::string bytes_for(std::size_t size, std::uint32_t salt) {
  std::string bytes(size, '\0');
  for (std::size_t i = 0; i < size; ++i) {
    bytes[i] = static_cast<char>((i * 131 + salt * 7 + (i >> 8)) & 0xff);
  }
  return bytes;
}

void check_queue(const reactor::OutputQueue& queue, const std::string& model, int max_vectors) {
  FUZZ_CHECK(queue.size() == model.size());
  FUZZ_CHECK(queue.empty() == model.empty());
  iovec vectors[80];
  const int count = queue.gather(vectors, max_vectors);
  FUZZ_CHECK(count >= 0 && count <= max_vectors);
  std::size_t offset = 0;
  for (int i = 0; i < count; ++i) {
    FUZZ_CHECK(vectors[i].iov_len > 0);
    FUZZ_CHECK(offset + vectors[i].iov_len <= model.size());
    FUZZ_CHECK(model.compare(offset, vectors[i].iov_len,
                             static_cast<const char*>(vectors[i].iov_base),
                             vectors[i].iov_len) == 0);
    offset += vectors[i].iov_len;
  }
  // Fewer vectors than asked for means the queue had no more bytes.
  if (count < max_vectors) FUZZ_CHECK(offset == model.size());
  if (!model.empty()) FUZZ_CHECK(count > 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::FuzzInput input(data, size);
  const std::size_t max_cached = input.below(8);
  // Derived, not read, so that the corpus keeps its meaning; still every bound from 0 to 7.
  const std::size_t max_cached_small = 7 - max_cached;
  reactor::ChunkPool pool(max_cached, max_cached_small);
  reactor::OutputQueue queue;
  std::string model;
  reactor::InputBuffer in;
  std::string in_model;
  std::uint32_t salt = 0;
  failing_allocations = 0;

  for (int steps = 0; !input.empty() && steps < 4096; ++steps) {
    switch (input.below(8)) {
      case 0:
      case 1: {  // append up to ~3 chunks' worth, sometimes exactly a chunk's capacity, sometimes
                 // at most what a small chunk holds
        std::size_t n = input.below(3 * reactor::ChunkPool::kChunkCapacity + 1);
        const std::size_t shape = input.below(8);
        if (shape == 0) n = reactor::ChunkPool::kChunkCapacity;
        if (shape == 1) n = n % (reactor::ChunkPool::kSmallChunkCapacity + 1);
        const std::string bytes = bytes_for(n, ++salt);
        const bool fails = failing_allocations > 0;
        const bool ok = queue.append(pool, bytes.data(), bytes.size());
        if (ok) {
          model += bytes;
        } else {
          FUZZ_CHECK(fails);  // only an allocation failure may refuse bytes
        }
        break;
      }
      case 2: {  // gather with a small vector budget
        check_queue(queue, model, 1 + static_cast<int>(input.below(70)));
        break;
      }
      case 3: {  // consume part of what is queued, as a short write would
        const std::size_t n = model.empty() ? 0 : input.below(model.size() + 1);
        queue.consume(pool, n);
        model.erase(0, n);
        break;
      }
      case 4:
        queue.clear(pool);
        model.clear();
        break;
      case 5:
        failing_allocations = static_cast<int>(input.below(4));
        break;
      case 6: {  // InputBuffer: append
        const std::string bytes = bytes_for(input.below(70000), ++salt);
        const bool fails = failing_allocations > 0;
        if (in.append(bytes.data(), bytes.size())) {
          in_model += bytes;
        } else {
          FUZZ_CHECK(fails);
        }
        break;
      }
      case 7: {  // InputBuffer: consume (possibly more than it holds)
        const std::size_t n = input.below(in_model.size() + 2);
        in.consume(n);
        in_model.erase(0, n);
        break;
      }
    }
    FUZZ_CHECK(queue.size() == model.size());
    FUZZ_CHECK(pool.cached_chunks() <= max_cached);
    FUZZ_CHECK(pool.cached_small_chunks() <= max_cached_small);
    FUZZ_CHECK(in.size() == in_model.size());
    FUZZ_CHECK(in.empty() == in_model.empty());
    FUZZ_CHECK(in_model.empty() || in_model.compare(0, in_model.size(), in.data(), in.size()) == 0);
  }
  failing_allocations = 0;
  check_queue(queue, model, 64);
  queue.clear(pool);
  FUZZ_CHECK(queue.empty());
  return 0;
}
