// expect: handler must define on_data
// A handler without the required on_data hook must fail to compile with one readable line.
#include <reactor.hpp>

struct NoData {
  void on_open(auto& /*connection*/) {}
};

int main() {
  reactor::Reactor<> loop;
  reactor::Acceptor<NoData> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"));
  loop.run_once(std::chrono::milliseconds(0));
}
