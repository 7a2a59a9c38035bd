// Internal: Task, a move-only `void()` callable with inline storage, for posted work and timer
// callbacks. Callables up to kInlineSize bytes (a lambda capturing a few pointers, or a pointer and
// a std::string) live inside the Task; larger ones go to the heap. Not for the per-event path,
// which calls handlers directly.
#pragma once

#include <cstddef>
#include <new>
#include <type_traits>
#include <utility>

namespace reactor::detail {

class Task {
 public:
  static constexpr std::size_t kInlineSize = 48;

  Task() noexcept = default;

  template <class F>
  requires(!std::is_same_v<std::decay_t<F>, Task> && std::is_invocable_v<std::decay_t<F>&>)
      Task(F&& callable) {  // NOLINT(google-explicit-constructor): a Task is made from any callable
    using Stored = std::decay_t<F>;
    if constexpr (fits_inline<Stored>()) {
      ::new (static_cast<void*>(storage_)) Stored(std::forward<F>(callable));
      ops_ = &kInlineOps<Stored>;
    } else {
      *reinterpret_cast<Stored**>(storage_) = new Stored(std::forward<F>(callable));
      ops_ = &kHeapOps<Stored>;
    }
  }

  Task(Task&& other) noexcept : ops_(other.ops_) {
    if (ops_ != nullptr) ops_->move(other.storage_, storage_);
    other.ops_ = nullptr;
  }

  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      reset();
      ops_ = std::exchange(other.ops_, nullptr);
      if (ops_ != nullptr) ops_->move(other.storage_, storage_);
    }
    return *this;
  }

  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() { reset(); }

  explicit operator bool() const noexcept { return ops_ != nullptr; }

  void operator()() { ops_->invoke(storage_); }

  void reset() noexcept {
    if (ops_ != nullptr) std::exchange(ops_, nullptr)->destroy(storage_);
  }

 private:
  struct Ops {
    void (*invoke)(void* storage);
    void (*move)(void* from, void* to) noexcept;  // leaves `from` destroyed
    void (*destroy)(void* storage) noexcept;
  };

  template <class F>
  static constexpr bool fits_inline() {
    return sizeof(F) <= kInlineSize && alignof(F) <= alignof(std::max_align_t) &&
           std::is_nothrow_move_constructible_v<F>;
  }

  template <class F>
  static constexpr Ops kInlineOps{
      [](void* storage) { (*std::launder(static_cast<F*>(storage)))(); },
      [](void* from, void* to) noexcept {
        F* source = std::launder(static_cast<F*>(from));
        ::new (to) F(std::move(*source));
        source->~F();
      },
      [](void* storage) noexcept { std::launder(static_cast<F*>(storage))->~F(); },
  };

  template <class F>
  static constexpr Ops kHeapOps{
      [](void* storage) { (**static_cast<F**>(storage))(); },
      [](void* from, void* to) noexcept { *static_cast<F**>(to) = *static_cast<F**>(from); },
      [](void* storage) noexcept { delete *static_cast<F**>(storage); },
  };

  alignas(std::max_align_t) unsigned char storage_[kInlineSize];
  const Ops* ops_ = nullptr;
};

}  // namespace reactor::detail
