// Public: the byte storage behind a connection. OutputQueue holds bytes accepted by send() that
// the kernel has not taken yet, as a list of fixed-size chunks drawn from the reactor's ChunkPool;
// InputBuffer holds bytes a handler left unconsumed. Both allocate only while they hold data, so an
// idle connection owns no buffer memory. Not thread-safe: each belongs to one reactor thread.
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>

namespace reactor {

// A recycling allocator of output chunks, shared by every connection of one reactor, so that the
// steady state allocates nothing: a chunk freed by one connection is reused by the next.
class ChunkPool {
 public:
  // Total size of one chunk allocation, header included.
  static constexpr std::size_t kChunkBytes = 16 * 1024;

  struct Chunk {
    Chunk* next;
    std::uint32_t begin;  // first unsent byte
    std::uint32_t end;    // one past the last stored byte
    char* data() noexcept { return reinterpret_cast<char*>(this + 1); }
  };
  static constexpr std::size_t kChunkCapacity = kChunkBytes - sizeof(Chunk);

  // Keeps at most `max_cached` free chunks for reuse; the rest go back to the heap.
  explicit ChunkPool(std::size_t max_cached = 64) noexcept : max_cached_(max_cached) {}
  ChunkPool(const ChunkPool&) = delete;
  ChunkPool& operator=(const ChunkPool&) = delete;
  ~ChunkPool() {
    while (free_ != nullptr) ::operator delete(std::exchange(free_, free_->next));
  }

  // An empty chunk, or nullptr when the heap is exhausted.
  Chunk* acquire() noexcept {
    Chunk* chunk = free_;
    if (chunk != nullptr) {
      free_ = chunk->next;
      --cached_;
    } else {
      chunk = static_cast<Chunk*>(::operator new(kChunkBytes, std::nothrow));
      if (chunk == nullptr) return nullptr;
    }
    chunk->next = nullptr;
    chunk->begin = chunk->end = 0;
    return chunk;
  }

  void release(Chunk* chunk) noexcept {
    if (cached_ >= max_cached_) {
      ::operator delete(chunk);
      return;
    }
    chunk->next = free_;
    free_ = chunk;
    ++cached_;
  }

  std::size_t cached_chunks() const noexcept { return cached_; }

 private:
  Chunk* free_ = nullptr;
  std::size_t cached_ = 0;
  std::size_t max_cached_;
};

// FIFO of pending output bytes. 24 bytes when empty; chunks come from and return to a ChunkPool
// passed to each call (the queue does not store it, to stay small).
class OutputQueue {
 public:
  using Chunk = ChunkPool::Chunk;

  OutputQueue() noexcept = default;
  OutputQueue(const OutputQueue&) = delete;
  OutputQueue& operator=(const OutputQueue&) = delete;
  // The owner must call clear(pool) before destruction; a non-empty queue here is a leak.
  ~OutputQueue() = default;

  bool empty() const noexcept { return size_ == 0; }
  std::size_t size() const noexcept { return size_; }

  // Appends `size` bytes. Returns false (and appends nothing) when a chunk cannot be allocated.
  bool append(ChunkPool& pool, const char* data, std::size_t size) noexcept {
    if (size == 0) return true;
    // Acquire every chunk needed first, so that failure leaves the queue as it was. Each new chunk
    // receives at least one byte.
    std::size_t room = tail_ == nullptr ? 0 : ChunkPool::kChunkCapacity - tail_->end;
    Chunk* first_new = nullptr;
    Chunk* last_new = nullptr;
    for (; room < size; room += ChunkPool::kChunkCapacity) {
      Chunk* chunk = pool.acquire();
      if (chunk == nullptr) {
        while (first_new != nullptr) pool.release(std::exchange(first_new, first_new->next));
        return false;
      }
      (last_new == nullptr ? first_new : last_new->next) = chunk;
      last_new = chunk;
    }
    Chunk* chunk = tail_ != nullptr && tail_->end < ChunkPool::kChunkCapacity ? tail_ : first_new;
    if (tail_ == nullptr) {
      head_ = first_new;
    } else {
      tail_->next = first_new;
    }
    if (last_new != nullptr) tail_ = last_new;
    size_ += size;
    for (;;) {
      const std::size_t n = std::min(size, ChunkPool::kChunkCapacity - chunk->end);
      std::memcpy(chunk->data() + chunk->end, data, n);
      chunk->end += static_cast<std::uint32_t>(n);
      data += n;
      size -= n;
      if (size == 0) return true;
      chunk = chunk->next;
    }
  }

  // Fills up to `max` iovecs with the unsent bytes, in order; returns how many were filled.
  int gather(iovec* vectors, int max) const noexcept {
    int count = 0;
    for (Chunk* chunk = head_; chunk != nullptr && count < max; chunk = chunk->next) {
      if (chunk->end == chunk->begin) break;
      vectors[count].iov_base = chunk->data() + chunk->begin;
      vectors[count].iov_len = chunk->end - chunk->begin;
      ++count;
    }
    return count;
  }

  // Drops the first `size` bytes (size <= this->size()) and frees the chunks emptied by it.
  void consume(ChunkPool& pool, std::size_t size) noexcept {
    size_ -= size;
    while (size > 0) {
      const std::size_t n = std::min<std::size_t>(size, head_->end - head_->begin);
      head_->begin += static_cast<std::uint32_t>(n);
      size -= n;
      if (head_->begin == head_->end) pop_head(pool);
    }
    if (size_ == 0) clear(pool);
  }

  // Drops every byte and returns all chunks to the pool.
  void clear(ChunkPool& pool) noexcept {
    while (head_ != nullptr) pop_head(pool);
    size_ = 0;
  }

 private:
  void pop_head(ChunkPool& pool) noexcept {
    Chunk* chunk = head_;
    head_ = chunk->next;
    if (head_ == nullptr) tail_ = nullptr;
    pool.release(chunk);
  }

  Chunk* head_ = nullptr;
  Chunk* tail_ = nullptr;
  std::size_t size_ = 0;
};

// Unconsumed input of one connection: a single growable heap block, allocated when a handler
// first leaves bytes behind and freed as soon as it is empty again. 8 bytes when empty.
class InputBuffer {
 public:
  InputBuffer() noexcept = default;
  InputBuffer(const InputBuffer&) = delete;
  InputBuffer& operator=(const InputBuffer&) = delete;
  ~InputBuffer() { reset(); }

  bool empty() const noexcept { return block_ == nullptr || block_->size == 0; }
  std::size_t size() const noexcept { return block_ == nullptr ? 0 : block_->size; }
  const char* data() const noexcept { return block_ == nullptr ? nullptr : block_->bytes(); }

  // Appends bytes, growing geometrically. Returns false (unchanged) when allocation fails.
  bool append(const char* data, std::size_t size) noexcept {
    const std::size_t needed = this->size() + size;
    if (block_ == nullptr || needed > block_->capacity) {
      std::size_t capacity = block_ == nullptr ? 256 : block_->capacity * 2;
      while (capacity < needed) capacity *= 2;
      auto* grown = static_cast<Block*>(::operator new(sizeof(Block) + capacity, std::nothrow));
      if (grown == nullptr) return false;
      grown->size = this->size();
      grown->capacity = capacity;
      if (block_ != nullptr) std::memcpy(grown->bytes(), block_->bytes(), block_->size);
      ::operator delete(block_);
      block_ = grown;
    }
    std::memcpy(block_->bytes() + block_->size, data, size);
    block_->size = needed;
    return true;
  }

  // Drops the first `size` bytes; frees the block when nothing is left.
  void consume(std::size_t size) noexcept {
    if (block_ == nullptr) return;
    if (size >= block_->size) {
      reset();
      return;
    }
    std::memmove(block_->bytes(), block_->bytes() + size, block_->size - size);
    block_->size -= size;
  }

  void reset() noexcept {
    ::operator delete(block_);
    block_ = nullptr;
  }

 private:
  struct Block {
    std::size_t size;
    std::size_t capacity;
    char* bytes() noexcept { return reinterpret_cast<char*>(this + 1); }
  };
  Block* block_ = nullptr;
};

}  // namespace reactor
