// expect: on_close is never called: it must be on_close\(Connection&, std::error_code\)
// A hook with a signature the library never calls (here on_close without the reason) must not
// compile silently: the error names the hook and the signature it needs.
#include <reactor.hpp>

struct ForgotReason {
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
  void on_close(auto& /*connection*/) {}
};

int main() {
  reactor::Reactor<> loop;
  reactor::Acceptor<ForgotReason> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"));
  loop.run_once(std::chrono::milliseconds(0));
}
