// Public: the byte storage behind a connection. OutputQueue holds bytes accepted by send() that
// the kernel has not taken yet, as a list of chunks drawn from the reactor's ChunkPool: a 512-byte
// one when a queue starts with a few bytes (at most 496: the common case, a reply the socket had
// no room for), 16 KiB ones for everything else; InputBuffer holds bytes a handler left unconsumed.
// Both allocate only while they hold data, so an idle connection owns no buffer memory. Not
// thread-safe: each belongs to one reactor thread.
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
// steady state allocates nothing: a chunk freed by one connection is reused by the next. Two size
// classes, each with its own bounded cache: big chunks carry bulk output, small ones the few bytes
// that are all many connections ever leave pending (16 KiB for 100 bytes would make 10,000 such
// connections cost 156 MiB of heap instead of 5 MiB).
class ChunkPool {
 public:
  // Total size of one chunk allocation, header included.
  static constexpr std::size_t kChunkBytes = 16 * 1024;
  static constexpr std::size_t kSmallChunkBytes = 512;

  // 16 bytes: 16-bit offsets leave room for the capacity (the size class, which release() needs)
  // without growing the header, so a big chunk holds 16368 bytes and a small one 496.
  struct Chunk {
    Chunk* next;
    std::uint16_t begin;     // first unsent byte
    std::uint16_t end;       // one past the last stored byte
    std::uint16_t capacity;  // kChunkCapacity or kSmallChunkCapacity: the size class
    char* data() noexcept { return reinterpret_cast<char*>(this + 1); }
  };
  static constexpr std::size_t kChunkCapacity = kChunkBytes - sizeof(Chunk);
  static constexpr std::size_t kSmallChunkCapacity = kSmallChunkBytes - sizeof(Chunk);
  static_assert(kChunkCapacity <= UINT16_MAX, "chunk offsets are 16 bits");

  // Keeps at most `max_cached` free big chunks and `max_cached_small` free small ones for reuse;
  // the rest go back to the heap.
  explicit ChunkPool(std::size_t max_cached = 64, std::size_t max_cached_small = 256) noexcept
      : big_(max_cached), small_(max_cached_small) {}
  ChunkPool(const ChunkPool&) = delete;
  ChunkPool& operator=(const ChunkPool&) = delete;
  ~ChunkPool() {
    big_.free_all();
    small_.free_all();
  }

  // An empty chunk of kChunkCapacity bytes, or nullptr when the heap is exhausted.
  Chunk* acquire() noexcept { return big_.acquire(kChunkBytes, kChunkCapacity); }
  // An empty chunk of kSmallChunkCapacity bytes, or nullptr when the heap is exhausted.
  Chunk* acquire_small() noexcept { return small_.acquire(kSmallChunkBytes, kSmallChunkCapacity); }

  // Takes back a chunk of either size from acquire() or acquire_small().
  void release(Chunk* chunk) noexcept {
    (chunk->capacity == kSmallChunkCapacity ? small_ : big_).release(chunk);
  }

  std::size_t cached_chunks() const noexcept { return big_.cached; }
  std::size_t cached_small_chunks() const noexcept { return small_.cached; }

 private:
  // The free list of one size class.
  struct Cache {
    explicit Cache(std::size_t max) noexcept : max_cached(max) {}

    Chunk* free = nullptr;
    std::size_t cached = 0;
    std::size_t max_cached;

    Chunk* acquire(std::size_t bytes, std::size_t capacity) noexcept {
      Chunk* chunk = free;
      if (chunk != nullptr) {
        free = chunk->next;
        --cached;
      } else {
        chunk = static_cast<Chunk*>(::operator new(bytes, std::nothrow));
        if (chunk == nullptr) return nullptr;
        chunk->capacity = static_cast<std::uint16_t>(capacity);
      }
      chunk->next = nullptr;
      chunk->begin = chunk->end = 0;
      return chunk;
    }

    void release(Chunk* chunk) noexcept {
      if (cached >= max_cached) {
        ::operator delete(chunk);
        return;
      }
      chunk->next = free;
      free = chunk;
      ++cached;
    }

    void free_all() noexcept {
      while (free != nullptr) ::operator delete(std::exchange(free, free->next));
    }
  };

  Cache big_;
  Cache small_;
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
  // An empty queue given at most kSmallChunkCapacity bytes takes a small chunk; bytes that do not
  // fit the tail go to big chunks after it. So the first chunk of a queue started with more than
  // that is a big one, holding the first min(size, kChunkCapacity) bytes in one piece: TLS
  // (tls.hpp) relies on it, a record OpenSSL holds must be offered again in one iovec.
  bool append(ChunkPool& pool, const char* data, std::size_t size) noexcept {
    if (size == 0) return true;
    if (tail_ == nullptr && size <= ChunkPool::kSmallChunkCapacity) {
      Chunk* chunk = pool.acquire_small();
      if (chunk == nullptr) return false;
      std::memcpy(chunk->data(), data, size);
      chunk->end = static_cast<std::uint16_t>(size);
      head_ = tail_ = chunk;
      size_ = size;
      return true;
    }
    // Acquire every chunk needed first, so that failure leaves the queue as it was. Each new chunk
    // receives at least one byte.
    std::size_t room = tail_ == nullptr ? 0 : tail_->capacity - tail_->end;
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
    Chunk* chunk = tail_ != nullptr && tail_->end < tail_->capacity ? tail_ : first_new;
    if (tail_ == nullptr) {
      head_ = first_new;
    } else {
      tail_->next = first_new;
    }
    if (last_new != nullptr) tail_ = last_new;
    size_ += size;
    for (;;) {
      const std::size_t n = std::min<std::size_t>(size, chunk->capacity - chunk->end);
      std::memcpy(chunk->data() + chunk->end, data, n);
      chunk->end += static_cast<std::uint16_t>(n);
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
      head_->begin += static_cast<std::uint16_t>(n);
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
