// Tests for include/reactor/buffer.hpp: the output queue against a plain string model, the chunk
// pool's reuse, and the input buffer.
#include <reactor/buffer.hpp>

#include <random>
#include <string>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

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
  REQUIRE(queue.append(pool, bytes.data(), 10));
  CHECK(pool.cached_chunks() == 2);
  queue.clear(pool);
  CHECK(pool.cached_chunks() == 3);

  // Beyond max_cached, freed chunks go back to the heap.
  const std::string big = test::pattern(6 * reactor::ChunkPool::kChunkCapacity);
  REQUIRE(queue.append(pool, big.data(), big.size()));
  queue.clear(pool);
  CHECK(pool.cached_chunks() == 4);
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
