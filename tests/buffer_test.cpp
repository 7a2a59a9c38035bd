// Tests for include/reactor/buffer.hpp: the output queue against a plain string model, its two
// chunk sizes, the chunk pool's reuse, allocation failure, and the input buffer.
#include <reactor/buffer.hpp>

#include <new>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

// The library allocates chunks with nothrow new: these count those allocations and, when
// allocations_before_failure is n >= 0, let n more succeed and fail the one after.
int nothrow_allocations = 0;
int allocations_before_failure = -1;

}  // namespace

// Forwards to the throwing form, so that the pair matches whatever operator delete is in use
// (ASan's or libstdc++'s).
void* operator new(std::size_t size, const std::nothrow_t& /*tag*/) noexcept {
  if (allocations_before_failure == 0) {
    allocations_before_failure = -1;
    return nullptr;
  }
  if (allocations_before_failure > 0) --allocations_before_failure;
  ++nothrow_allocations;
  try {
    return ::operator new(size);
  } catch (...) {
    return nullptr;
  }
}

namespace {

using reactor::ChunkPool;

// False where the replacement above is not the one in use: valgrind's memcheck puts its own
// operator new in place of every replacement, so the tests that count or fail nothrow
// allocations have nothing to observe there (they say so and stop).
bool nothrow_hook_active() {
  const int before = nothrow_allocations;
  ::operator delete(::operator new(1, std::nothrow));
  return nothrow_allocations == before + 1;
}

// The length of each iovec gather() reports.
std::vector<std::size_t> vector_lengths(const reactor::OutputQueue& queue) {
  iovec vectors[1024];
  const int count = queue.gather(vectors, 1024);
  std::vector<std::size_t> lengths;
  for (int i = 0; i < count; ++i) lengths.push_back(vectors[i].iov_len);
  return lengths;
}

// Everything the queue would hand to writev, concatenated.
std::string gathered(const reactor::OutputQueue& queue) {
  iovec vectors[1024];
  const int count = queue.gather(vectors, 1024);
  std::string bytes;
  for (int i = 0; i < count; ++i) {
    bytes.append(static_cast<const char*>(vectors[i].iov_base), vectors[i].iov_len);
  }
  return bytes;
}

}  // namespace

TEST_CASE("the output queue keeps bytes in order across chunk boundaries", "[buffer]") {
  reactor::ChunkPool pool;
  reactor::OutputQueue queue;
  std::string model;
  std::mt19937 random(42);
  const std::string source = test::pattern(200'000);
  std::size_t offset = 0;
  for (int round = 0; round < 2000; ++round) {
    if (random() % 2 == 0 && offset < source.size()) {
      const std::size_t n = std::min<std::size_t>(random() % 40'000, source.size() - offset);
      REQUIRE(queue.append(pool, source.data() + offset, n));
      model.append(source, offset, n);
      offset += n;
    } else if (!model.empty()) {
      const std::size_t n = random() % (model.size() + 1);
      queue.consume(pool, n);
      model.erase(0, n);
    }
    REQUIRE(queue.size() == model.size());
    REQUIRE(queue.empty() == model.empty());
  }
  CHECK(gathered(queue) == model);
  queue.clear(pool);
  CHECK(queue.empty());
}

TEST_CASE("gather stops at the iovec limit and covers a prefix", "[buffer]") {
  reactor::ChunkPool pool;
  reactor::OutputQueue queue;
  const std::string bytes = test::pattern(5 * reactor::ChunkPool::kChunkCapacity + 10);
  REQUIRE(queue.append(pool, bytes.data(), bytes.size()));
  iovec vectors[2];
  REQUIRE(queue.gather(vectors, 2) == 2);
  CHECK(vectors[0].iov_len == reactor::ChunkPool::kChunkCapacity);
  CHECK(std::string(static_cast<char*>(vectors[1].iov_base), vectors[1].iov_len) ==
        bytes.substr(reactor::ChunkPool::kChunkCapacity, reactor::ChunkPool::kChunkCapacity));
  queue.clear(pool);
}

TEST_CASE("chunks return to the pool and are reused", "[buffer]") {
  reactor::ChunkPool pool(4);
  reactor::OutputQueue queue;
  const std::string bytes = test::pattern(3 * reactor::ChunkPool::kChunkCapacity);
  REQUIRE(queue.append(pool, bytes.data(), bytes.size()));
  CHECK(pool.cached_chunks() == 0);
  queue.consume(pool, bytes.size());
  CHECK(pool.cached_chunks() == 3);
  // More than a small chunk holds: a big one, from the cache.
  REQUIRE(queue.append(pool, bytes.data(), ChunkPool::kSmallChunkCapacity + 1));
  CHECK(pool.cached_chunks() == 2);
  queue.clear(pool);
  CHECK(pool.cached_chunks() == 3);
  CHECK(pool.cached_small_chunks() == 0);

  // Beyond max_cached, freed chunks go back to the heap.
  const std::string big = test::pattern(6 * reactor::ChunkPool::kChunkCapacity);
  REQUIRE(queue.append(pool, big.data(), big.size()));
  queue.clear(pool);
  CHECK(pool.cached_chunks() == 4);
}

TEST_CASE("a queue started with a few bytes takes a small chunk and grows into big ones in order",
          "[buffer]") {
  ChunkPool pool;
  std::mt19937 random(7);
  const std::string source = test::pattern(400'000, 5);
  for (int queue_round = 0; queue_round < 200; ++queue_round) {
    reactor::OutputQueue queue;
    std::string model;
    std::size_t offset = 0;
    // The first append is small, as a reply the socket had no room for.
    const std::size_t first = 1 + random() % ChunkPool::kSmallChunkCapacity;
    REQUIRE(queue.append(pool, source.data(), first));
    model.append(source, 0, first);
    offset = first;
    REQUIRE(vector_lengths(queue) == std::vector<std::size_t>{first});
    for (int step = 0; step < 40; ++step) {
      if (random() % 3 != 0 && offset < source.size()) {
        // Mostly small appends (they fill the small chunk, then big ones), sometimes a big one.
        std::size_t n = random() % 4 == 0 ? random() % 40'000 : random() % 600;
        n = std::min(n, source.size() - offset);
        REQUIRE(queue.append(pool, source.data() + offset, n));
        model.append(source, offset, n);
        offset += n;
      } else if (!model.empty()) {
        const std::size_t n = random() % (model.size() + 1);
        queue.consume(pool, n);
        model.erase(0, n);
      }
      REQUIRE(queue.size() == model.size());
      REQUIRE(gathered(queue) == model);
      // Only the first chunk may be small; every chunk after it is a big one.
      const std::vector<std::size_t> lengths = vector_lengths(queue);
      for (std::size_t i = 0; i < lengths.size(); ++i) {
        REQUIRE(lengths[i] <= ChunkPool::kChunkCapacity);
        if (i + 1 < lengths.size() && i > 0) REQUIRE(lengths[i] == ChunkPool::kChunkCapacity);
      }
    }
    queue.clear(pool);
  }
  // Every chunk came back: a small one per queue at most, each reused by the next queue.
  CHECK(pool.cached_small_chunks() == 1);
}

TEST_CASE("a queue started with more than a small chunk holds begins with a big chunk",
          "[buffer][tls]") {
  // TLS relies on it: the first min(size, kChunkCapacity) bytes of the append that starts a queue
  // are offered again in one iovec (tls.hpp, write_all).
  ChunkPool pool;
  reactor::OutputQueue queue;
  const std::string bytes = test::pattern(3 * ChunkPool::kChunkCapacity, 9);
  REQUIRE(queue.append(pool, bytes.data(), ChunkPool::kSmallChunkCapacity + 1));
  CHECK(vector_lengths(queue) == std::vector<std::size_t>{ChunkPool::kSmallChunkCapacity + 1});
  queue.clear(pool);
  CHECK(pool.cached_chunks() == 1);
  CHECK(pool.cached_small_chunks() == 0);

  REQUIRE(queue.append(pool, bytes.data(), bytes.size()));
  CHECK(vector_lengths(queue) == std::vector<std::size_t>(3, ChunkPool::kChunkCapacity));
  CHECK(gathered(queue) == bytes);
  queue.clear(pool);

  // Exactly a small chunk's capacity: one small chunk.
  REQUIRE(queue.append(pool, bytes.data(), ChunkPool::kSmallChunkCapacity));
  CHECK(pool.cached_small_chunks() == 0);
  queue.clear(pool);
  CHECK(pool.cached_small_chunks() == 1);
}

TEST_CASE("an append that cannot allocate changes nothing", "[buffer][allocation]") {
  if (!nothrow_hook_active()) {
    WARN("nothrow operator new is not this test's (valgrind?): nothing to count");
    SUCCEED();  // skipped, not failed
    return;
  }
  ChunkPool pool(8, 8);
  reactor::OutputQueue queue;
  const std::string bytes = test::pattern(4 * ChunkPool::kChunkCapacity, 3);

  // Empty queue: neither the small chunk nor the first of three big ones can be had.
  allocations_before_failure = 0;
  CHECK_FALSE(queue.append(pool, bytes.data(), 100));
  CHECK(queue.empty());
  allocations_before_failure = 2;
  CHECK_FALSE(queue.append(pool, bytes.data(), 3 * ChunkPool::kChunkCapacity));
  CHECK(queue.empty());
  CHECK(vector_lengths(queue).empty());
  CHECK(pool.cached_chunks() == 2);  // the two it did get went back to the pool

  // A small chunk holding 100 bytes, then an append that needs two big chunks after it, the
  // second of which fails: the first goes back to the pool, the queue keeps its 100 bytes.
  // (A fresh pool, so that both big chunks are allocated.)
  const std::size_t more = (ChunkPool::kSmallChunkCapacity - 100) + ChunkPool::kChunkCapacity + 1;
  ChunkPool empty_pool(8, 8);
  REQUIRE(queue.append(empty_pool, bytes.data(), 100));
  const int before = nothrow_allocations;
  allocations_before_failure = 1;
  CHECK_FALSE(queue.append(empty_pool, bytes.data() + 100, more));
  CHECK(nothrow_allocations == before + 1);
  CHECK(queue.size() == 100);
  CHECK(vector_lengths(queue) == std::vector<std::size_t>{100});
  CHECK(gathered(queue) == bytes.substr(0, 100));
  CHECK(empty_pool.cached_chunks() == 1);

  // With memory again the same append fills the small chunk, then two big ones.
  allocations_before_failure = -1;
  REQUIRE(queue.append(empty_pool, bytes.data() + 100, more));
  CHECK(gathered(queue) == bytes.substr(0, 100 + more));
  CHECK(vector_lengths(queue) ==
        std::vector<std::size_t>{ChunkPool::kSmallChunkCapacity, ChunkPool::kChunkCapacity, 1});
  CHECK(empty_pool.cached_chunks() == 0);
  queue.clear(empty_pool);
  CHECK(empty_pool.cached_chunks() == 2);
  CHECK(empty_pool.cached_small_chunks() == 1);
}

TEST_CASE("the small chunk cache is bounded and reused", "[buffer]") {
  if (!nothrow_hook_active()) {
    WARN("nothrow operator new is not this test's (valgrind?): nothing to count");
    SUCCEED();  // skipped, not failed
    return;
  }
  ChunkPool pool(4, 2);
  reactor::OutputQueue queues[3];
  const std::string bytes = test::pattern(300, 4);
  const int before = nothrow_allocations;
  for (auto& queue : queues) REQUIRE(queue.append(pool, bytes.data(), bytes.size()));
  CHECK(nothrow_allocations == before + 3);
  for (auto& queue : queues) queue.clear(pool);
  // Two kept (the bound), the third went back to the heap; no big chunk was involved.
  CHECK(pool.cached_small_chunks() == 2);
  CHECK(pool.cached_chunks() == 0);

  // Reused: two queues start without allocating, the third allocates again.
  for (auto& queue : queues) REQUIRE(queue.append(pool, bytes.data(), bytes.size()));
  CHECK(nothrow_allocations == before + 4);
  CHECK(pool.cached_small_chunks() == 0);
  for (auto& queue : queues) {
    CHECK(gathered(queue) == bytes);
    queue.clear(pool);
  }
  CHECK(pool.cached_small_chunks() == 2);
}

TEST_CASE("the input buffer keeps the unconsumed tail and frees itself when empty", "[buffer]") {
  reactor::InputBuffer input;
  CHECK(input.empty());
  CHECK(input.data() == nullptr);
  const std::string bytes = test::pattern(1000);
  REQUIRE(input.append(bytes.data(), 300));
  REQUIRE(input.append(bytes.data() + 300, 700));
  CHECK(std::string(input.data(), input.size()) == bytes);
  input.consume(250);
  CHECK(std::string(input.data(), input.size()) == bytes.substr(250));
  input.consume(750);
  CHECK(input.empty());
  CHECK(input.data() == nullptr);
}
