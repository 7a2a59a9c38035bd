// Public: Endpoint, a socket address (IPv4, IPv6 or Unix domain) that can be parsed from and
// printed as text: "127.0.0.1:8080", "[::1]:8080", "unix:/run/app.sock" (or any text with a '/'),
// "unix:@name" for the abstract namespace.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <charconv>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "error.hpp"

namespace reactor {

namespace detail {

// An integer type std::in_range accepts: not bool, not a character type.
template <class T>
concept PortInteger = std::integral<T> && !std::same_as<T, bool> && !std::same_as<T, char> &&
                      !std::same_as<T, wchar_t> && !std::same_as<T, char8_t> &&
                      !std::same_as<T, char16_t> && !std::same_as<T, char32_t>;

}  // namespace detail

class Endpoint {
 public:
  // An empty endpoint (family AF_UNSPEC).
  Endpoint() noexcept = default;

  // An IPv4 or IPv6 endpoint from a numeric host ("127.0.0.1", "::1", "[::1]"; "localhost" means
  // 127.0.0.1) and a port of any integer type. Sets ec to invalid_argument on a malformed host or
  // a port outside 0..65535 (never narrowed to 16 bits).
  template <detail::PortInteger Port>
  static Endpoint from_host_port(std::string_view host, Port port, std::error_code& ec) noexcept {
    if (!std::in_range<std::uint16_t>(port)) {
      ec = std::make_error_code(std::errc::invalid_argument);
      return {};
    }
    return from_host_port16(host, static_cast<std::uint16_t>(port), ec);
  }

  // Throwing overload: std::system_error naming "parse endpoint".
  template <detail::PortInteger Port>
  static Endpoint from_host_port(std::string_view host, Port port) {
    std::error_code ec;
    Endpoint ep = from_host_port(host, port, ec);
    detail::throw_if(ec, "parse endpoint");
    return ep;
  }

  // A Unix domain socket path; a leading '@' selects the abstract namespace. Sets ec to
  // filename_too_long when the path does not fit sockaddr_un.
  static Endpoint unix_path(std::string_view path, std::error_code& ec) noexcept {
    ec.clear();
    Endpoint ep;
    sockaddr_un un{};
    if (path.empty() || path.size() >= sizeof un.sun_path) {
      ec = std::make_error_code(path.empty() ? std::errc::invalid_argument
                                             : std::errc::filename_too_long);
      return ep;
    }
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, path.data(), path.size());
    socklen_t length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
    if (path.front() == '@') {
      un.sun_path[0] = '\0';  // abstract: the name is exactly the bytes given, no terminator
      length -= 1;
    }
    ep.assign(&un, length);
    return ep;
  }

  static Endpoint unix_path(std::string_view path) {
    std::error_code ec;
    Endpoint ep = unix_path(path, ec);
    detail::throw_if(ec, "parse endpoint");
    return ep;
  }

  // Parses "HOST:PORT", "[V6]:PORT", "unix:PATH" or a path containing '/'.
  static Endpoint parse(std::string_view text, std::error_code& ec) noexcept {
    if (text.starts_with("unix:")) return unix_path(text.substr(5), ec);
    if (text.find('/') != std::string_view::npos) return unix_path(text, ec);
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos || colon + 1 == text.size()) {
      ec = std::make_error_code(std::errc::invalid_argument);
      return {};
    }
    const std::string_view host = text.substr(0, colon);
    const std::string_view port_text = text.substr(colon + 1);
    // A bare IPv6 address has more colons; require brackets so the port is unambiguous.
    if (host.find(':') != std::string_view::npos && !host.starts_with("[")) {
      ec = std::make_error_code(std::errc::invalid_argument);
      return {};
    }
    std::uint16_t port = 0;
    const auto [end, err] =
        std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (err != std::errc{} || end != port_text.data() + port_text.size()) {
      ec = std::make_error_code(std::errc::invalid_argument);
      return {};
    }
    return from_host_port(host, port, ec);
  }

  static Endpoint parse(std::string_view text) {
    std::error_code ec;
    Endpoint ep = parse(text, ec);
    detail::throw_if(ec, "parse endpoint");
    return ep;
  }

  // Copies a kernel-filled address (from getsockname, accept4, ...).
  static Endpoint from_sockaddr(const sockaddr* address, socklen_t length) noexcept {
    Endpoint ep;
    if (length > 0 && length <= sizeof(sockaddr_storage)) ep.assign(address, length);
    return ep;
  }

  int family() const noexcept { return storage_.ss_family; }
  bool empty() const noexcept { return family() == AF_UNSPEC; }
  bool is_unix() const noexcept { return family() == AF_UNIX; }

  // The port for IPv4/IPv6, 0 otherwise.
  std::uint16_t port() const noexcept {
    if (family() == AF_INET) return ntohs(as<sockaddr_in>().sin_port);
    if (family() == AF_INET6) return ntohs(as<sockaddr_in6>().sin6_port);
    return 0;
  }

  // The host part as text ("127.0.0.1", "::1"), or the path for Unix sockets.
  std::string host() const {
    char text[INET6_ADDRSTRLEN] = {};
    if (family() == AF_INET) {
      ::inet_ntop(AF_INET, &as<sockaddr_in>().sin_addr, text, sizeof text);
      return text;
    }
    if (family() == AF_INET6) {
      ::inet_ntop(AF_INET6, &as<sockaddr_in6>().sin6_addr, text, sizeof text);
      return text;
    }
    if (family() == AF_UNIX) return unix_name();
    return {};
  }

  // "127.0.0.1:8080", "[::1]:8080", "unix:/path", or "" when empty.
  std::string to_string() const {
    if (family() == AF_INET) return host() + ':' + std::to_string(port());
    if (family() == AF_INET6) return '[' + host() + "]:" + std::to_string(port());
    if (family() == AF_UNIX) return "unix:" + unix_name();
    return {};
  }

  const sockaddr* data() const noexcept { return reinterpret_cast<const sockaddr*>(&storage_); }
  socklen_t size() const noexcept { return size_; }

  friend bool operator==(const Endpoint& a, const Endpoint& b) noexcept {
    return a.size_ == b.size_ && std::memcmp(&a.storage_, &b.storage_, a.size_) == 0;
  }

 private:
  static Endpoint from_host_port16(std::string_view host, std::uint16_t port,
                                   std::error_code& ec) noexcept {
    ec.clear();
    Endpoint ep;
    if (host == "localhost") host = "127.0.0.1";
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
      host = host.substr(1, host.size() - 2);
    }
    char text[INET6_ADDRSTRLEN] = {};
    if (host.size() >= sizeof text) {
      ec = std::make_error_code(std::errc::invalid_argument);
      return ep;
    }
    std::memcpy(text, host.data(), host.size());
    sockaddr_in v4{};
    sockaddr_in6 v6{};
    if (::inet_pton(AF_INET, text, &v4.sin_addr) == 1) {
      v4.sin_family = AF_INET;
      v4.sin_port = htons(port);
      ep.assign(&v4, sizeof v4);
    } else if (::inet_pton(AF_INET6, text, &v6.sin6_addr) == 1) {
      v6.sin6_family = AF_INET6;
      v6.sin6_port = htons(port);
      ep.assign(&v6, sizeof v6);
    } else {
      ec = std::make_error_code(std::errc::invalid_argument);
    }
    return ep;
  }

  template <class T>
  const T& as() const noexcept {
    return *reinterpret_cast<const T*>(&storage_);
  }

  void assign(const void* address, socklen_t length) noexcept {
    std::memset(&storage_, 0, sizeof storage_);
    std::memcpy(&storage_, address, length);
    size_ = length;
  }

  // The path of a Unix endpoint, with '@' standing for the abstract namespace's leading NUL.
  std::string unix_name() const {
    const auto& un = as<sockaddr_un>();
    const std::size_t offset = offsetof(sockaddr_un, sun_path);
    if (size_ <= offset) return {};
    const std::size_t length = size_ - offset;
    if (un.sun_path[0] == '\0') return '@' + std::string(un.sun_path + 1, length - 1);
    return std::string(un.sun_path, ::strnlen(un.sun_path, length));
  }

  sockaddr_storage storage_{};
  socklen_t size_ = 0;
};

}  // namespace reactor
