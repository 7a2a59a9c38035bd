// expect: on_result must be callable as
// A Connector's on_result that cannot take (Connection*, std::error_code, const Endpoint&) is a
// compile error naming the signature it needs.
#include <reactor.hpp>

struct Echo {
  void on_data(auto& conn, std::string_view bytes) { conn.send(bytes); }
};

void use(reactor::Reactor<>& loop) {
  reactor::Connector client(loop, Echo{}, [](std::error_code) {});
  client.connect("127.0.0.1", 7000);
}
