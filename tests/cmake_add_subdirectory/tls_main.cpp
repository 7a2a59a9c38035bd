// Consumer test of reactor::tls: see tests/cmake_add_subdirectory/CMakeLists.txt.
// Offline: it builds a client context (OpenSSL linked and initialised through reactor::tls) and a
// transport prototype on it, and connects nowhere.
#include <reactor/tls.hpp>

#include <system_error>

int main() {
  std::error_code ec;
  reactor::TlsContext context(reactor::TlsRole::kClient, reactor::TlsOptions{}, ec);
  if (ec) return 1;
  reactor::TlsTransport prototype(context, "example.org");
  return prototype.peer_name() == "example.org" && prototype.version().empty() ? 0 : 1;
}
