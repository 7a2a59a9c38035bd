// expect: on_eof is never called: it must be on_eof\(Connection&\)
// A non-template hook with an extra parameter is refused too.
#include <reactor.hpp>

struct Handler {
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
  void on_eof(reactor::Connection<Handler>& /*connection*/, int /*extra*/) {}
};

int main() {
  reactor::Reactor<> loop;
  reactor::Acceptor<Handler> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"));
  loop.run_once(std::chrono::milliseconds(0));
}
