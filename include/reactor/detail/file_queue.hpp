// Internal: FileQueue, the file ranges a connection was asked to send with send_file(), in order,
// each with the number of bytes of the connection's ordinary output queued ahead of it. A
// Connection allocates one only while it has files to send, and its reactor keeps it (a map from
// connection to queue, see Reactor::file_queue), so connections that never send files pay one
// flag bit and no byte. The queue makes no syscall: the connection writes the files and closes
// their fds through its syscall policy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <utility>

namespace reactor::detail {

// One file range to send. The connection owns `fd` (a dup of the caller's) until it pops the entry.
struct FileSend {
  FileSend* next = nullptr;
  int fd = -1;
  std::uint64_t offset = 0;  // the next byte of the file to send
  std::uint64_t left = 0;    // bytes of the range not yet written to the socket
  // Bytes of ordinary output queued between the previous entry (or the head of the output queue,
  // for the first entry) and this one: they are written before this file.
  std::size_t ahead = 0;
  // sendfile(2) cannot be used for this file (the transport is not the plain socket, the policy
  // has no sendfile, or the kernel refused it): its bytes are read with pread into the queue's
  // buffer and written through the transport.
  bool copy = false;
};

class FileQueue {
 public:
  // Size of the buffer that copied files go through: a few socket buffers' worth, small enough
  // to free once the queue empties.
  static constexpr std::size_t kBufferSize = std::size_t{64} * 1024;

  FileQueue() noexcept = default;
  FileQueue(const FileQueue&) = delete;
  FileQueue& operator=(const FileQueue&) = delete;
  // Frees the entries; their fds must have been taken with pop() and closed already.
  ~FileQueue() {
    while (head_ != nullptr) delete std::exchange(head_, head_->next);
  }

  bool empty() const noexcept { return head_ == nullptr; }
  FileSend* front() noexcept { return head_; }
  // File bytes not yet written, of all entries.
  std::uint64_t bytes() const noexcept { return bytes_; }

  // Appends `file`; `queued_output` is the size of the connection's ordinary output queue now:
  // what of it is not ahead of an earlier entry goes ahead of this one.
  void push(FileSend* file, std::size_t queued_output) noexcept {
    file->ahead = queued_output - ahead_total_;
    ahead_total_ = queued_output;
    bytes_ += file->left;
    if (tail_ == nullptr) {
      head_ = tail_ = file;
    } else {
      tail_->next = file;
      tail_ = file;
    }
  }

  // `size` bytes of ordinary output ahead of the first entry were written (size <= its ahead).
  void output_written(std::size_t size) noexcept {
    head_->ahead -= size;
    ahead_total_ -= size;
  }

  // `size` bytes of the first entry's range were written.
  void file_written(std::uint64_t size) noexcept {
    head_->offset += size;
    head_->left -= size;
    bytes_ -= size;
  }

  // Removes the first entry and returns its fd for the caller to close.
  int pop() noexcept {
    FileSend* file = head_;
    head_ = file->next;
    if (head_ == nullptr) tail_ = nullptr;
    bytes_ -= file->left;
    buffered_ = buffer_start_ = 0;  // the buffer only ever holds the first entry's bytes
    const int fd = file->fd;
    delete file;
    return fd;
  }

  // The buffer for copied files, allocated on first use; nullptr when out of memory.
  char* buffer() noexcept {
    if (!buffer_) buffer_.reset(new (std::nothrow) char[kBufferSize]);
    return buffer_.get();
  }
  // Bytes of the first entry read into the buffer and not yet written: [start, start + size).
  std::size_t buffered() const noexcept { return buffered_ - buffer_start_; }
  const char* buffered_data() const noexcept { return buffer_.get() + buffer_start_; }
  void filled(std::size_t size) noexcept {
    buffer_start_ = 0;
    buffered_ = size;
  }
  void drained(std::size_t size) noexcept { buffer_start_ += size; }

 private:
  FileSend* head_ = nullptr;
  FileSend* tail_ = nullptr;
  std::uint64_t bytes_ = 0;
  std::size_t ahead_total_ = 0;  // the sum of the entries' `ahead`
  std::unique_ptr<char[]> buffer_;
  std::size_t buffer_start_ = 0;
  std::size_t buffered_ = 0;
};

}  // namespace reactor::detail
