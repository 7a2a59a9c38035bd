// Microbenchmarks (Google Benchmark) for buffer.hpp: the output queue's append / gather /
// consume cycle that every partial write goes through, the chunk pool behind it, and the input
// buffer that keeps a partial frame. All in user space; no syscall is timed here.
#include <benchmark/benchmark.h>
#include <reactor/buffer.hpp>

#include <cstddef>
#include <vector>

namespace {

using reactor::ChunkPool;
using reactor::InputBuffer;
using reactor::OutputQueue;

// One queued write and its flush: append `size` bytes, gather them as iovecs, consume them all.
// The steady state: chunks come back from the pool's cache, nothing is allocated.
void BM_OutputQueue_AppendGatherConsume(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  ChunkPool pool;
  OutputQueue queue;
  std::vector<char> bytes(size, 'x');
  iovec vectors[64];
  for (auto _ : state) {
    queue.append(pool, bytes.data(), size);
    const int count = queue.gather(vectors, 64);
    benchmark::DoNotOptimize(count);
    queue.consume(pool, size);
  }
  queue.clear(pool);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * size));
}
BENCHMARK(BM_OutputQueue_AppendGatherConsume)->Arg(64)->Arg(1024)->Arg(16 * 1024)->Arg(64 * 1024);

// A slow reader: many small appends pile up, then one flush takes them all.
void BM_OutputQueue_SmallAppends(benchmark::State& state) {
  const auto appends = static_cast<std::size_t>(state.range(0));
  ChunkPool pool;
  OutputQueue queue;
  const char bytes[64] = {};
  iovec vectors[64];
  for (auto _ : state) {
    for (std::size_t i = 0; i < appends; ++i) queue.append(pool, bytes, sizeof bytes);
    benchmark::DoNotOptimize(queue.gather(vectors, 64));
    queue.consume(pool, queue.size());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * appends));
}
BENCHMARK(BM_OutputQueue_SmallAppends)->Arg(16)->Arg(1024);

// A partial flush: the kernel takes part of the queue, the rest stays (begin moves in a chunk).
void BM_OutputQueue_PartialConsume(benchmark::State& state) {
  ChunkPool pool;
  OutputQueue queue;
  std::vector<char> bytes(64 * 1024, 'x');
  for (auto _ : state) {
    queue.append(pool, bytes.data(), bytes.size());
    for (std::size_t left = bytes.size(); left > 0; left -= 4096) queue.consume(pool, 4096);
  }
}
BENCHMARK(BM_OutputQueue_PartialConsume);

void BM_ChunkPool_AcquireRelease(benchmark::State& state) {
  ChunkPool pool;
  pool.release(pool.acquire());  // warm: one chunk cached
  for (auto _ : state) {
    ChunkPool::Chunk* chunk = pool.acquire();
    benchmark::DoNotOptimize(chunk);
    pool.release(chunk);
  }
}
BENCHMARK(BM_ChunkPool_AcquireRelease);

// A handler that leaves a partial frame: the remainder is stored, then consumed on the next read.
// The block is allocated and freed every time the buffer empties (by design: no memory while idle).
void BM_InputBuffer_PartialFrame(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  InputBuffer input;
  std::vector<char> bytes(size, 'x');
  for (auto _ : state) {
    input.append(bytes.data(), size);
    input.append(bytes.data(), size);
    benchmark::DoNotOptimize(input.data());
    input.consume(input.size());
  }
}
BENCHMARK(BM_InputBuffer_PartialFrame)->Arg(64)->Arg(4096);

}  // namespace

BENCHMARK_MAIN();
