// chat_server: line-based broadcast chat. Every line a client sends goes to every other client,
// prefixed with the sender's number. Clients are tracked by ConnectionHandle, so the room never
// holds a pointer to a connection that may be gone. A client that stops reading is dropped by the
// output cap instead of growing the server's memory; a line longer than 4 KiB closes its sender.
//
//   chat_server [--host ADDR] [--port N]
//
// Try it: chat_server --port 7000, then `nc 127.0.0.1 7000` in two terminals.
#include <reactor.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

using Loop = reactor::Reactor<>;
using Handle = reactor::ConnectionHandle<Loop>;

constexpr std::size_t kMaxLine = 4096;

struct Room {
  struct Member {
    Handle handle;
    int number;
  };
  std::vector<Member> members;
  int next_number = 1;

  void broadcast(const Handle& from, std::string_view text) {
    for (const Member& member : members) {
      if (!(member.handle == from)) member.handle.send(text);  // a stale handle just says no
    }
  }
};

// The room is the reactor's: one per loop, reached from any connection (no pointer per handler).
Room& room_of(auto& connection) {
  return connection.reactor().template local<Room>();
}

struct Chatter {
  Handle self{};
  int number = 0;
  std::string line;

  void on_open(auto& connection) {
    Room& room = room_of(connection);
    self = connection.handle();
    number = room.next_number++;
    room.members.push_back({self, number});
    connection.send("welcome, you are #" + std::to_string(number) + "\n");
    room.broadcast(self, "* #" + std::to_string(number) + " joined\n");
  }

  // Consumes complete lines; a partial line stays in the connection for the next call (the
  // connection closes the sender once that exceeds max_pending_input).
  std::size_t on_data(auto& connection, std::string_view bytes) {
    std::size_t consumed = 0;
    for (auto end = bytes.find('\n'); end != std::string_view::npos;
         end = bytes.find('\n', consumed)) {
      if (end - consumed >= kMaxLine) {  // a complete line can be too long too
        connection.abort();
        return bytes.size();
      }
      // Built with += rather than assign("#"): GCC 12 at -O2 reports a false -Wrestrict for the
      // latter (GCC PR 105329).
      line.clear();
      line += '#';
      line += std::to_string(number);
      line += ": ";
      line += bytes.substr(consumed, end + 1 - consumed);
      room_of(connection).broadcast(self, line);
      consumed = end + 1;
    }
    return consumed;
  }

  void on_close(auto& connection, std::error_code reason) {
    Room& room = room_of(connection);
    std::erase_if(room.members, [&](const Room::Member& m) { return m.handle == self; });
    room.broadcast(self, "* #" + std::to_string(number) + " left" +
                             (reason ? " (" + reason.message() + ")" : std::string()) + "\n");
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string host = "127.0.0.1";
  unsigned long port = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view flag = argv[i];
    if (flag == "--host") {
      host = argv[i + 1];
    } else if (flag == "--port") {
      port = std::strtoul(argv[i + 1], nullptr, 10);
    }
  }
  if (argc % 2 == 0 || port > 65535) {
    std::fprintf(stderr, "usage: %s [--host ADDR] [--port N]\n", argv[0]);
    return 2;
  }
  try {
    Loop loop;
    reactor::ListenOptions options;
    options.connection.max_pending_input = kMaxLine;      // longest partial line
    options.connection.max_pending_output = 1024 * 1024;  // a slow reader is dropped here
    options.connection.idle_timeout = std::chrono::minutes(10);
    reactor::Acceptor<Chatter, Loop> acceptor(
        loop, reactor::Endpoint::from_host_port(host, static_cast<std::uint16_t>(port)), Chatter{},
        options);
    reactor::SignalSet signals(loop, {SIGINT, SIGTERM}, [&](int) { loop.stop(); });
    std::printf("listening on %s\n", acceptor.local_endpoint().to_string().c_str());
    std::fflush(stdout);
    loop.run();
    loop.shutdown(std::chrono::seconds(1));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "chat_server: %s\n", e.what());
    return 1;
  }
}
