// Example (not part of the reactor library): an incremental HTTP/1.1 request parser, header-only,
// used by examples/http_server.cpp, tests/http_parser_test.cpp and the http_parser_fuzzer.
//
// RequestParser::parse(bytes, request) looks for one request at the front of `bytes`: the request
// line, header fields, an empty line, then Content-Length bytes of body (RFC 9112). It copies and
// allocates nothing: the request's fields point into `bytes`. It fits on_data's contract: return
// the bytes of the complete requests, and the library hands the rest back, with what follows.
//
// Rejected, with the status to answer (the connection should close after it):
// - 400: a malformed request line or header line (whitespace before the colon, obs-fold, a control
//   character), a Content-Length that is not digits or comes twice, a request line preceded by
//   empty lines, an HTTP/1.1 request without a Host header or any request with two (RFC 9112
//   section 3.2). Lines end in CRLF: a bare LF or CR is a 400 (RFC 9112 section 2.2 allows reading
//   a bare LF as CRLF, but a server and a proxy in front of it that split lines differently invite
//   request smuggling, and refusing is the simpler rule).
// - 413: Content-Length over kMaxBodyBytes (1 MiB), refused before the body arrives.
// - 431: a request line and header section (through the empty line) over kMaxHeaderBytes (8 KiB).
// - 501: any Transfer-Encoding (chunked bodies are not supported).
// - 505: a version other than HTTP/1.0 and HTTP/1.1.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string_view>

namespace http {

inline constexpr std::size_t kMaxHeaderBytes = 8 * 1024;
inline constexpr std::size_t kMaxBodyBytes = 1024 * 1024;

// Case-insensitive ASCII comparison (header names, Connection tokens).
inline bool equals_ignore_case(std::string_view a, std::string_view b) noexcept {
  const auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(),
                                            [&](char x, char y) { return lower(x) == lower(y); });
}

// `text` without the spaces and tabs around it.
inline std::string_view trim(std::string_view text) noexcept {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
  return text;
}

// One parsed request; every view points into the bytes given to parse().
struct Request {
  std::string_view method;
  std::string_view target;
  int minor_version = 1;     // HTTP/1.<minor_version>: 0 or 1
  bool keep_alive = true;    // false: close after answering (see RequestParser)
  std::string_view headers;  // the header lines, each ending in CRLF
  std::string_view body;
  std::size_t size = 0;  // bytes of input the request took: consume them

  // The value of the first header field called `name` (any case), without the whitespace around
  // it; empty when there is none.
  std::string_view header(std::string_view name) const noexcept {
    for (std::string_view rest = headers; !rest.empty();) {
      const std::string_view line = rest.substr(0, rest.find("\r\n"));
      rest.remove_prefix(line.size() + 2);
      const std::size_t colon = line.find(':');
      if (equals_ignore_case(line.substr(0, colon), name)) return trim(line.substr(colon + 1));
    }
    return {};
  }
};

enum class ParseResult { kComplete, kIncomplete, kError };

// Parses requests one at a time. Keep-alive: HTTP/1.1 unless a Connection header says "close";
// HTTP/1.0 only when one says "keep-alive" (and none "close").
class RequestParser {
 public:
  // Parses the request at the front of `bytes`:
  // - kComplete: `request` is filled in; it took request.size bytes. The next call starts afresh,
  //   with the bytes after those.
  // - kIncomplete: call again with the same bytes followed by more (what was scanned is not
  //   scanned again).
  // - kError: status() says which; every later call returns kError until reset().
  ParseResult parse(std::string_view bytes, Request& request) noexcept {
    if (head_size_ == 0 && status_ == 0) find_head(bytes);
    if (status_ != 0) return ParseResult::kError;
    if (head_size_ == 0 || bytes.size() < head_size_ + body_size_) return ParseResult::kIncomplete;
    request.method = bytes.substr(0, method_size_);
    request.target = bytes.substr(method_size_ + 1, target_size_);
    request.minor_version = minor_version_;
    request.keep_alive = keep_alive_;
    request.headers = bytes.substr(headers_begin_, head_size_ - 2 - headers_begin_);
    request.body = bytes.substr(head_size_, body_size_);
    request.size = head_size_ + body_size_;
    reset();
    return ParseResult::kComplete;
  }

  // The HTTP status for the error (400, 413, 431, 501 or 505); 0 while there is none.
  int status() const noexcept { return status_; }

  // Forgets everything, the error included.
  void reset() noexcept { *this = RequestParser(); }

 private:
  // Looks for the end of the head (request line, header lines, empty line) at the front of
  // `bytes` and parses the head once it is there: sets head_size_, or status_. Each byte is judged
  // by itself and the ones before it, so the outcome does not depend on how the input was split.
  void find_head(std::string_view bytes) noexcept {
    const std::size_t limit = std::min(bytes.size(), kMaxHeaderBytes);
    for (; scanned_ < limit; ++scanned_) {
      const char c = bytes[scanned_];
      const char previous = scanned_ > 0 ? bytes[scanned_ - 1] : '\0';
      if ((previous == '\r' && c != '\n') || (c == '\n' && previous != '\r')) return fail(400);
      if (c == '\n' && scanned_ >= 3 && bytes[scanned_ - 2] == '\n') {
        return parse_head(bytes.substr(0, scanned_ + 1));
      }
    }
    if (bytes.size() >= kMaxHeaderBytes) fail(431);
  }

  // Checks the head (which ends in CRLF CRLF) and keeps what parse() returns, or sets status_.
  void parse_head(std::string_view head) noexcept {
    const std::string_view line = head.substr(0, head.find("\r\n"));
    const std::size_t space = line.find(' ');
    const std::size_t last_space = line.rfind(' ');
    if (space == std::string_view::npos || space == last_space) return fail(400);
    const std::string_view method = line.substr(0, space);
    const std::string_view target = line.substr(space + 1, last_space - space - 1);
    const std::string_view version = line.substr(last_space + 1);
    if (!is_token(method) || target.empty() ||
        !std::all_of(target.begin(), target.end(), [](char c) { return c > ' ' && c < 127; })) {
      return fail(400);
    }
    if (version.size() != 8 || !version.starts_with("HTTP/") || !is_digit(version[5]) ||
        version[6] != '.' || !is_digit(version[7])) {
      return fail(400);
    }
    if (version[5] != '1' || version[7] > '1') return fail(505);

    bool has_length = false, transfer_encoding = false, close = false, keep_alive = false;
    int hosts = 0;
    std::size_t length = 0;
    headers_begin_ = line.size() + 2;
    for (std::size_t at = headers_begin_; at < head.size() - 2;) {
      const std::string_view field = head.substr(at, head.find("\r\n", at) - at);
      at += field.size() + 2;
      const std::size_t colon = field.find(':');
      if (colon == std::string_view::npos || !is_token(field.substr(0, colon))) return fail(400);
      const std::string_view name = field.substr(0, colon);
      const std::string_view value = trim(field.substr(colon + 1));
      if (!std::all_of(value.begin(), value.end(), is_value_char)) return fail(400);
      if (equals_ignore_case(name, "Content-Length")) {
        if (has_length || value.empty() || !std::all_of(value.begin(), value.end(), is_digit)) {
          return fail(400);
        }
        has_length = true;
        for (const char digit : value) {  // stops growing past the limit: no overflow
          if (length <= kMaxBodyBytes) length = length * 10 + static_cast<std::size_t>(digit - '0');
        }
      } else if (equals_ignore_case(name, "Transfer-Encoding")) {
        transfer_encoding = true;
      } else if (equals_ignore_case(name, "Connection")) {
        close = close || has_token(value, "close");
        keep_alive = keep_alive || has_token(value, "keep-alive");
      } else if (equals_ignore_case(name, "Host")) {
        ++hosts;
      }
    }
    if (hosts > 1 || (version[7] == '1' && hosts == 0)) return fail(400);
    if (transfer_encoding) return fail(501);
    if (length > kMaxBodyBytes) return fail(413);
    method_size_ = method.size();
    target_size_ = target.size();
    minor_version_ = version[7] - '0';
    keep_alive_ = !close && (minor_version_ == 1 || keep_alive);
    body_size_ = length;
    head_size_ = head.size();
  }

  void fail(int status) noexcept { status_ = status; }

  static bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

  // RFC 9110 token: one or more of ALPHA, DIGIT and !#$%&'*+-.^_`|~
  static bool is_token(std::string_view text) noexcept {
    return !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || is_digit(c) ||
             std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
    });
  }

  // A field value's byte: visible ASCII, space, tab or obs-text (0x80-0xFF); no control bytes.
  static bool is_value_char(char c) noexcept {
    const auto byte = static_cast<unsigned char>(c);
    return byte == '\t' || (byte >= ' ' && byte != 127);
  }

  // Whether the comma-separated list `value` holds `token` (any case).
  static bool has_token(std::string_view value, std::string_view token) noexcept {
    while (!value.empty()) {
      const std::size_t comma = std::min(value.find(','), value.size());
      if (equals_ignore_case(trim(value.substr(0, comma)), token)) return true;
      value.remove_prefix(std::min(comma + 1, value.size()));
    }
    return false;
  }

  std::size_t scanned_ = 0;    // bytes searched for the end of the head, which was not there
  std::size_t head_size_ = 0;  // 0 until the head is parsed; then the fields below are set
  std::size_t method_size_ = 0;
  std::size_t target_size_ = 0;  // the target starts after the method and a space
  std::size_t headers_begin_ = 0;
  std::size_t body_size_ = 0;
  int minor_version_ = 1;
  bool keep_alive_ = true;
  int status_ = 0;
};

}  // namespace http
