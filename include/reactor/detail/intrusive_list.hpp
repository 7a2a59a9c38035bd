// Internal: a circular, doubly linked intrusive list. An item joins a list by deriving from
// ListHook<Tag>; one tag per list lets an item sit in several lists at once. Linking and
// unlinking never allocate, and an item can unlink itself without knowing its list.
#pragma once

namespace reactor::detail {

template <class Tag>
struct ListHook {
  ListHook* prev = nullptr;
  ListHook* next = nullptr;

  bool is_linked() const noexcept { return next != nullptr; }

  // Removes the item from the list holding it; a no-op when it is in none.
  void unlink() noexcept {
    if (next == nullptr) return;
    prev->next = next;
    next->prev = prev;
    prev = next = nullptr;
  }
};

template <class T, class Tag>
class IntrusiveList {
  using Hook = ListHook<Tag>;

 public:
  IntrusiveList() noexcept { head_.prev = head_.next = &head_; }
  IntrusiveList(const IntrusiveList&) = delete;
  IntrusiveList& operator=(const IntrusiveList&) = delete;
  ~IntrusiveList() { clear(); }

  bool empty() const noexcept { return head_.next == &head_; }

  void push_back(T& item) noexcept {
    Hook& hook = item;
    hook.prev = head_.prev;
    hook.next = &head_;
    head_.prev->next = &hook;
    head_.prev = &hook;
  }

  // The first item, or nullptr when the list is empty.
  T* front() noexcept { return empty() ? nullptr : static_cast<T*>(head_.next); }

  T* pop_front() noexcept {
    T* item = front();
    if (item != nullptr) static_cast<Hook&>(*item).unlink();
    return item;
  }

  // Moves every item of `other` to the end of this list, in order.
  void splice_back(IntrusiveList& other) noexcept {
    if (other.empty()) return;
    Hook* first = other.head_.next;
    Hook* last = other.head_.prev;
    other.head_.prev = other.head_.next = &other.head_;
    first->prev = head_.prev;
    head_.prev->next = first;
    last->next = &head_;
    head_.prev = last;
  }

  // Calls f(item) for each item in order; f must not unlink items.
  template <class F>
  void for_each(F&& f) {
    for (Hook* hook = head_.next; hook != &head_; hook = hook->next) f(*static_cast<T*>(hook));
  }

  // Unlinks every item; the items themselves are untouched.
  void clear() noexcept {
    while (!empty()) head_.next->unlink();
  }

 private:
  Hook head_;
};

}  // namespace reactor::detail
