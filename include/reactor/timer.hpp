// Public: TimerId, the handle of a timer scheduled on a Reactor (schedule_after, schedule_at,
// schedule_every; cancel), and the timer queue behind it: a binary heap indexed by slot, so that
// scheduling, cancelling and firing are O(log n) and a cancelled or fired id is recognised by its
// generation; beside it, a second heap of deadlines embedded in their owners (detail::Deadline,
// each connection's one timer), which need no slot, no Task and no allocation per arm. Both fire
// in one order. Not thread-safe: timers belong to the reactor thread.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "detail/task.hpp"

namespace reactor {

// Identifies one scheduled timer. A default-constructed id names no timer.
struct TimerId {
  std::uint32_t index = std::numeric_limits<std::uint32_t>::max();
  std::uint32_t generation = 0;

  explicit operator bool() const noexcept {
    return index != std::numeric_limits<std::uint32_t>::max();
  }
  friend bool operator==(const TimerId&, const TimerId&) = default;
};

namespace detail {

class TimerQueue;

// A one-shot deadline embedded in the object it times (a connection: its handshake timeout, its
// timeout checks, its linger deadline), queued by TimerQueue::arm(). It replaces a general timer
// there: 20 bytes in its owner (a derived class may put a 4-byte member in its tail padding) and 8
// in the heap, against a 96-byte slot (a 48-byte Task, period, generation, free link) and a heap
// entry. It holds no callback: when it is due, after it left the heap, the queue calls its one
// fire function (the reactor's, for all connections), which may arm it again. The owner disarms
// it before it is destroyed; it must not move while armed.
class Deadline {
 public:
  using Clock = std::chrono::steady_clock;

  Deadline() noexcept = default;
  Deadline(const Deadline&) = delete;
  Deadline& operator=(const Deadline&) = delete;

  bool armed() const noexcept { return position_ != kNotQueued; }
  // When it fires; only meaningful while armed().
  Clock::time_point due() const noexcept { return due_; }

 private:
  friend class TimerQueue;
  static constexpr std::uint32_t kNotQueued = std::numeric_limits<std::uint32_t>::max();

  Clock::time_point due_{};
  std::uint64_t sequence_ = 0;  // from the TimerQueue's one counter: ties fire in arming order
  std::uint32_t position_ = kNotQueued;  // in TimerQueue::deadlines_
};

class TimerQueue {
 public:
  using Clock = std::chrono::steady_clock;
  // Called for each deadline that is due (one function for all: a deadline stores none).
  using FireDeadline = void (*)(Deadline&) noexcept;

  explicit TimerQueue(FireDeadline fire_deadline = nullptr) noexcept
      : fire_deadline_(fire_deadline) {}

  // Schedules `task` at `due`; a positive `period` makes it repeat at due + k * period.
  TimerId add(Clock::time_point due, Clock::duration period, Task task) {
    std::uint32_t index;
    if (free_head_ != kNone) {
      index = free_head_;
      free_head_ = slots_[index].next_free;
    } else {
      // The heap never holds more entries than there are slots; keeping room for every slot lets
      // run_due() put a periodic timer back without allocating, so it never throws (the reactor
      // calls it from noexcept code, and callbacks may have added timers since the entry was
      // taken out). Reserved first, so that a failure here changes nothing.
      if (heap_.capacity() < slots_.size() + 1) {
        heap_.reserve(std::max<std::size_t>(2 * heap_.capacity(), slots_.size() + 1));
      }
      index = static_cast<std::uint32_t>(slots_.size());
      slots_.emplace_back();
    }
    Slot& slot = slots_[index];
    slot.task = std::move(task);
    slot.due = due;
    slot.period = period;
    slot.sequence = next_sequence_++;
    slot.heap_position = heap_.size();
    heap_.push_back(index);
    sift_up(slot.heap_position);
    return {index, slot.generation};
  }

  // Cancels a pending timer; returns false if it already fired (one-shot), was cancelled, or
  // never existed. Safe from inside any timer callback, including the timer's own.
  bool cancel(TimerId id) noexcept {
    if (!id || id.index >= slots_.size()) return false;
    Slot& slot = slots_[id.index];
    if (slot.generation != id.generation) return false;
    if (slot.heap_position != kNotQueued) remove_from_heap(slot.heap_position);
    release(id.index);
    return true;
  }

  // Arms `deadline` at `due`, or moves it there if armed (it then fires after the timers already
  // due at that moment, as a timer cancelled and scheduled again would). Returns false, leaving
  // it disarmed, only when a disarmed deadline needs room in the heap and none can be had: moving
  // an armed one never allocates, nor does arming one in a heap that has held as many.
  bool arm(Deadline& deadline, Clock::time_point due) noexcept {
    if (!deadline.armed()) {
      if (deadlines_.size() == deadlines_.capacity()) {
        try {
          deadlines_.reserve(std::max<std::size_t>(2 * deadlines_.capacity(), 16));
        } catch (...) {
          return false;
        }
      }
      deadline.position_ = static_cast<std::uint32_t>(deadlines_.size());
      deadlines_.push_back(&deadline);  // no allocation: reserved above
    }
    deadline.due_ = due;
    deadline.sequence_ = next_sequence_++;
    // Moved earlier or later: one of the two sifts moves it, the other finds it in place.
    deadline_sift_up(deadline.position_);
    deadline_sift_down(deadline.position_);
    return true;
  }

  // Takes `deadline` out of the heap; nothing if it is not armed. Safe from any callback.
  void disarm(Deadline& deadline) noexcept {
    if (deadline.armed()) remove_deadline(deadline.position_);
  }

  bool empty() const noexcept { return heap_.empty() && deadlines_.empty(); }
  std::uint64_t exceptions() const noexcept { return exceptions_; }
  // Timers and armed deadlines.
  std::size_t size() const noexcept { return heap_.size() + deadlines_.size(); }

  // The earliest deadline of both heaps; only meaningful when !empty().
  Clock::time_point next_due() const noexcept {
    if (deadlines_.empty()) return slots_[heap_.front()].due;
    if (heap_.empty()) return deadlines_.front()->due_;
    return std::min(slots_[heap_.front()].due, deadlines_.front()->due_);
  }
  // The same, or Clock::time_point::max() when empty: one test per heap, for the loop's check
  // on every iteration.
  Clock::time_point next_due_or_max() const noexcept {
    auto due = Clock::time_point::max();
    if (!heap_.empty()) due = slots_[heap_.front()].due;
    if (!deadlines_.empty()) due = std::min(due, deadlines_.front()->due_);
    return due;
  }

  // Runs every timer and deadline due at `now`, earliest first (ties in scheduling or arming
  // order, across both heaps: one sequence counter numbers both). Timers scheduled, and deadlines
  // armed, by these callbacks wait for the next call, even if already due, so a callback cannot
  // starve the loop. A periodic timer is rescheduled at its next due time after `now`, skipping
  // missed periods. Returns how many callbacks ran. An exception from a timer's callback is
  // counted and dropped; nothing else throws (add() keeps the heap's room for every slot, and a
  // deadline that fired left a place in its heap that arming it again reuses).
  std::size_t run_due(Clock::time_point now) noexcept {
    const std::uint64_t pass_end = next_sequence_;
    std::size_t ran = 0;
    for (;;) {
      // The earlier of the two fronts, as if both heaps were one.
      const bool have_timer = !heap_.empty();
      if (!deadlines_.empty()) {
        Deadline& deadline = *deadlines_.front();
        const bool first = !have_timer || deadline.due_ < slots_[heap_.front()].due ||
                           (deadline.due_ == slots_[heap_.front()].due &&
                            deadline.sequence_ < slots_[heap_.front()].sequence);
        if (first) {
          if (deadline.due_ > now || deadline.sequence_ >= pass_end) break;
          remove_deadline(0);
          ++ran;
          fire_deadline_(deadline);
          continue;
        }
      }
      if (!have_timer) break;
      const std::uint32_t index = heap_.front();
      if (slots_[index].due > now || slots_[index].sequence >= pass_end) break;
      remove_from_heap(0);
      // Move the task out: the callback may add timers, which can reallocate slots_.
      Task task = std::move(slots_[index].task);
      const std::uint32_t generation = slots_[index].generation;
      const bool periodic = slots_[index].period > Clock::duration::zero();
      if (!periodic) release(index);
      ++ran;
      try {
        task();
      } catch (...) {
        ++exceptions_;  // a throwing callback must not leave the queue half-updated
      }
      if (!periodic) continue;
      Slot& slot = slots_[index];
      if (slot.generation != generation) continue;  // cancelled from inside its own callback
      const auto behind = (now - slot.due) / slot.period;
      slot.due += slot.period * (behind + 1);
      slot.task = std::move(task);
      slot.sequence = next_sequence_++;
      slot.heap_position = heap_.size();
      heap_.push_back(index);
      sift_up(slot.heap_position);
    }
    return ran;
  }

 private:
  static constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();
  static constexpr std::size_t kNotQueued = std::numeric_limits<std::size_t>::max();

  struct Slot {
    Task task;
    Clock::time_point due{};
    Clock::duration period{};
    std::uint64_t sequence = 0;
    std::size_t heap_position = kNotQueued;
    std::uint32_t generation = 0;
    std::uint32_t next_free = kNone;
  };

  bool earlier(std::uint32_t a, std::uint32_t b) const noexcept {
    const Slot& x = slots_[a];
    const Slot& y = slots_[b];
    return x.due < y.due || (x.due == y.due && x.sequence < y.sequence);
  }

  void place(std::size_t position, std::uint32_t index) noexcept {
    heap_[position] = index;
    slots_[index].heap_position = position;
  }

  void sift_up(std::size_t position) noexcept {
    const std::uint32_t index = heap_[position];
    while (position > 0) {
      const std::size_t parent = (position - 1) / 2;
      if (!earlier(index, heap_[parent])) break;
      place(position, heap_[parent]);
      position = parent;
    }
    place(position, index);
  }

  void sift_down(std::size_t position) noexcept {
    const std::uint32_t index = heap_[position];
    for (;;) {
      std::size_t child = 2 * position + 1;
      if (child >= heap_.size()) break;
      if (child + 1 < heap_.size() && earlier(heap_[child + 1], heap_[child])) ++child;
      if (!earlier(heap_[child], index)) break;
      place(position, heap_[child]);
      position = child;
    }
    place(position, index);
  }

  void remove_from_heap(std::size_t position) noexcept {
    const std::uint32_t removed = heap_[position];
    const std::uint32_t last = heap_.back();
    heap_.pop_back();
    slots_[removed].heap_position = kNotQueued;
    if (position == heap_.size()) return;
    place(position, last);
    sift_down(position);
    sift_up(slots_[last].heap_position);
  }

  // The deadline heap: the same ordering, on entry pointers that know their own position.
  static bool earlier(const Deadline& x, const Deadline& y) noexcept {
    return x.due_ < y.due_ || (x.due_ == y.due_ && x.sequence_ < y.sequence_);
  }

  void place_deadline(std::size_t position, Deadline* deadline) noexcept {
    deadlines_[position] = deadline;
    deadline->position_ = static_cast<std::uint32_t>(position);
  }

  void deadline_sift_up(std::size_t position) noexcept {
    Deadline* deadline = deadlines_[position];
    while (position > 0) {
      const std::size_t parent = (position - 1) / 2;
      if (!earlier(*deadline, *deadlines_[parent])) break;
      place_deadline(position, deadlines_[parent]);
      position = parent;
    }
    place_deadline(position, deadline);
  }

  void deadline_sift_down(std::size_t position) noexcept {
    Deadline* deadline = deadlines_[position];
    const std::size_t size = deadlines_.size();
    for (;;) {
      std::size_t child = 2 * position + 1;
      if (child >= size) break;
      if (child + 1 < size && earlier(*deadlines_[child + 1], *deadlines_[child])) ++child;
      if (!earlier(*deadlines_[child], *deadline)) break;
      place_deadline(position, deadlines_[child]);
      position = child;
    }
    place_deadline(position, deadline);
  }

  void remove_deadline(std::size_t position) noexcept {
    Deadline* removed = deadlines_[position];
    Deadline* last = deadlines_.back();
    deadlines_.pop_back();
    removed->position_ = Deadline::kNotQueued;
    if (position == deadlines_.size()) return;
    place_deadline(position, last);
    deadline_sift_down(position);
    deadline_sift_up(last->position_);
  }

  void release(std::uint32_t index) noexcept {
    Slot& slot = slots_[index];
    slot.task.reset();
    ++slot.generation;
    slot.heap_position = kNotQueued;
    slot.next_free = free_head_;
    free_head_ = index;
  }

  std::vector<Slot> slots_;
  std::vector<std::uint32_t> heap_;
  std::vector<Deadline*> deadlines_;  // a binary heap of the armed deadlines
  FireDeadline fire_deadline_;
  std::uint32_t free_head_ = kNone;
  std::uint64_t next_sequence_ = 0;
  std::uint64_t exceptions_ = 0;
};

}  // namespace detail
}  // namespace reactor
