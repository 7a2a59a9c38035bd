// Benchmark peer (not part of reactor): an echo server on standalone asio, written as asio's own
// example writes it (src/examples/cpp11/echo/async_tcp_echo_server.cpp): a shared_ptr session
// per connection that alternates async_read_some into its inline buffer and async_write of what
// arrived, and an acceptor that starts the next async_accept from each completion.
//
//   bench_asio_echo [--port N]
//
// Changes from the example, the same for every server bench/compare runs: bind 127.0.0.1 on the
// given port (0: ephemeral) and print "listening on HOST:PORT", TCP_NODELAY on clients, and
// SIGINT or SIGTERM stop the io_context. One more: the example's buffer is 1024 bytes; here it is
// 16 KiB (libevent's read size), so the 16 KiB and 64 KiB scenarios measure asio and not a
// choice of buffer size. The backlog is asio's default, SOMAXCONN.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

#include <asio.hpp>

using asio::ip::tcp;

class session : public std::enable_shared_from_this<session> {
 public:
  session(tcp::socket socket) : socket_(std::move(socket)) {}

  void start() { do_read(); }

 private:
  void do_read() {
    auto self(shared_from_this());
    socket_.async_read_some(asio::buffer(data_, max_length),
                            [this, self](std::error_code ec, std::size_t length) {
                              if (!ec) {
                                do_write(length);
                              }
                            });
  }

  void do_write(std::size_t length) {
    auto self(shared_from_this());
    asio::async_write(socket_, asio::buffer(data_, length),
                      [this, self](std::error_code ec, std::size_t /*length*/) {
                        if (!ec) {
                          do_read();
                        }
                      });
  }

  tcp::socket socket_;
  enum { max_length = 16384 };
  char data_[max_length];
};

class server {
 public:
  server(asio::io_context& io_context, unsigned short port)
      : acceptor_(io_context, tcp::endpoint(asio::ip::make_address("127.0.0.1"), port)) {
    do_accept();
  }

  unsigned short port() const { return acceptor_.local_endpoint().port(); }

 private:
  void do_accept() {
    acceptor_.async_accept([this](std::error_code ec, tcp::socket socket) {
      if (!ec) {
        socket.set_option(tcp::no_delay(true), ec);
        std::make_shared<session>(std::move(socket))->start();
      }
      do_accept();
    });
  }

  tcp::acceptor acceptor_;
};

int main(int argc, char* argv[]) {
  unsigned short port = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      port = static_cast<unsigned short>(std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--port N]\n", argv[0]);
      return 2;
    }
  }
  try {
    asio::io_context io_context;
    server s(io_context, port);
    asio::signal_set signals(io_context, SIGINT, SIGTERM);
    signals.async_wait([&](std::error_code, int) { io_context.stop(); });
    std::printf("listening on 127.0.0.1:%u\n", static_cast<unsigned>(s.port()));
    std::fflush(stdout);
    io_context.run();
  } catch (std::exception& e) {
    std::fprintf(stderr, "Exception: %s\n", e.what());
    return 1;
  }
  return 0;
}
