// expect: its hooks take the connection as auto&
// A Connector's connections are Connection<Dialed<Handler>> (Connector::connection_type), not
// Connection<Handler>: a hook typed for the latter is never called, and the error says to take the
// connection as auto& instead of only that on_data is missing.
#include <reactor.hpp>

struct Typed {
  void on_data(reactor::Connection<Typed>& conn, std::string_view bytes) { conn.send(bytes); }
};

void use(reactor::Reactor<>& loop) {
  reactor::Connector client(loop, Typed{}, [](auto*, std::error_code, const reactor::Endpoint&) {});
  client.connect("127.0.0.1", 7000);
}
