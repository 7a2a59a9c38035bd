// expect: on_data must return void or an integer byte count, not bool
// on_data returning bool would read `true` as "one byte consumed": refused at compile time.
#include <reactor.hpp>

struct BoolData {
  bool on_data(auto& /*connection*/, std::string_view /*bytes*/) { return true; }
};

int main() {
  reactor::Reactor<> loop;
  reactor::Acceptor<BoolData> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"));
  loop.run_once(std::chrono::milliseconds(0));
}
