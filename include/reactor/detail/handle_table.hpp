// Internal: the table behind connection handles. A handle is (slot index, generation); the slot
// holds the connection while it lives and its generation moves on when the connection closes, so
// a handle to a closed connection is recognised even after its slot is reused. Slots live in
// fixed-size blocks that never move, so other threads can check a generation while the reactor
// thread adds blocks.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>

#include "watcher.hpp"

namespace reactor::detail {

class HandleTable {
 public:
  static constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();

  HandleTable() noexcept = default;
  HandleTable(const HandleTable&) = delete;
  HandleTable& operator=(const HandleTable&) = delete;
  ~HandleTable() {
    std::atomic<Slot*>* directory = directory_.load(std::memory_order_relaxed);
    if (directory == nullptr) return;
    for (std::uint32_t i = 0; i < kMaxBlocks; ++i)
      delete[] directory[i].load(std::memory_order_relaxed);
    delete[] directory;
  }

  // Reactor thread: gives `watcher` a slot; false when out of memory or slots.
  bool acquire(OwnedWatcher& watcher, std::uint32_t& index, std::uint32_t& generation) noexcept {
    if (free_head_ == kNone && !grow()) return false;
    index = free_head_;
    Slot& slot = at(index);
    free_head_ = slot.next_free;
    slot.watcher = &watcher;
    generation = slot.generation.load(std::memory_order_relaxed);
    return true;
  }

  // Reactor thread: the connection in `index` closed; its handles go stale.
  void release(std::uint32_t index) noexcept {
    Slot& slot = at(index);
    slot.watcher = nullptr;
    slot.generation.fetch_add(1, std::memory_order_release);
    slot.next_free = free_head_;
    free_head_ = index;
  }

  // Reactor thread: the live watcher for a handle, or nullptr when the handle is stale.
  OwnedWatcher* find(std::uint32_t index, std::uint32_t generation) noexcept {
    if (index >= slot_count_) return nullptr;
    Slot& slot = at(index);
    if (slot.generation.load(std::memory_order_relaxed) != generation) return nullptr;
    return slot.watcher;
  }

  // Reactor thread: the current generation of an acquired slot.
  std::uint32_t generation(std::uint32_t index) noexcept {
    return at(index).generation.load(std::memory_order_relaxed);
  }

  // Any thread: whether the handle still names a live connection (it may close right after).
  bool is_current(std::uint32_t index, std::uint32_t generation) const noexcept {
    std::atomic<Slot*>* directory = directory_.load(std::memory_order_acquire);
    if (directory == nullptr || index / kBlockSize >= kMaxBlocks) return false;
    Slot* block = directory[index / kBlockSize].load(std::memory_order_acquire);
    if (block == nullptr) return false;
    const Slot& slot = block[index % kBlockSize];
    return slot.generation.load(std::memory_order_acquire) == generation && generation != kNone;
  }

 private:
  static constexpr std::uint32_t kBlockSize = 1024;
  static constexpr std::uint32_t kMaxBlocks = 4096;  // 4M live handles per reactor

  struct Slot {
    std::atomic<std::uint32_t> generation{0};
    OwnedWatcher* watcher = nullptr;
    std::uint32_t next_free = kNone;
  };

  Slot& at(std::uint32_t index) noexcept {
    return directory_.load(std::memory_order_relaxed)[index / kBlockSize].load(
        std::memory_order_relaxed)[index % kBlockSize];
  }

  bool grow() noexcept {
    std::atomic<Slot*>* directory = directory_.load(std::memory_order_relaxed);
    if (directory == nullptr) {
      directory = new (std::nothrow) std::atomic<Slot*>[kMaxBlocks];
      if (directory == nullptr) return false;
      for (std::uint32_t i = 0; i < kMaxBlocks; ++i)
        directory[i].store(nullptr, std::memory_order_relaxed);
      directory_.store(directory, std::memory_order_release);
    }
    const std::uint32_t block_number = slot_count_ / kBlockSize;
    if (block_number >= kMaxBlocks) return false;
    Slot* block = new (std::nothrow) Slot[kBlockSize];
    if (block == nullptr) return false;
    for (std::uint32_t i = kBlockSize; i-- > 0;) {
      block[i].next_free = free_head_;
      free_head_ = slot_count_ + i;
    }
    directory[block_number].store(block, std::memory_order_release);
    slot_count_ += kBlockSize;
    return true;
  }

  std::atomic<std::atomic<Slot*>*> directory_{nullptr};
  std::uint32_t slot_count_ = 0;
  std::uint32_t free_head_ = kNone;
};

}  // namespace reactor::detail
