// expect: a Connector's handler must be a class that is not final
// A Connector's connections use a handler derived from the user's (it tells the connector when the
// connection closes), so a final handler is refused with one line saying why.
#include <reactor.hpp>

struct Sealed final {
  void on_data(auto& /*conn*/, std::string_view /*bytes*/) {}
};

void use(reactor::Reactor<>& loop) {
  reactor::Connector client(loop, Sealed{},
                            [](auto*, std::error_code, const reactor::Endpoint&) {});
  client.connect("127.0.0.1", 7000);
}
