// Benchmark peer (not part of reactor): a TLS echo server on standalone asio, written as asio's own
// example writes it (src/examples/cpp11/ssl/server.cpp): a shared_ptr session per connection
// owning an asio::ssl::stream<tcp::socket> that runs async_handshake, then alternates
// async_read_some into its inline buffer and async_write of what arrived.
//
//   bench_asio_ssl_echo --cert FILE --key FILE [--port N]
//
// Changes from the example, those of bench_asio_echo (bind 127.0.0.1, print "listening on
// HOST:PORT", TCP_NODELAY, SIGINT/SIGTERM stop, a 16 KiB buffer) plus what bench_tls's protocol
// needs: the soft fd limit raised to the hard one (for 2000 idle connections), SIGUSR1 prints
// "stats CPU_US HEAP" (getrusage of the process, mallinfo2's in-use bytes). No password callback or
// DH file (the key is not encrypted; TLS 1.3 uses ECDHE), and the context is tls_server with asio's
// default options.
#include <malloc.h>
#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include <asio.hpp>
#include <asio/ssl.hpp>

using asio::ip::tcp;

class session : public std::enable_shared_from_this<session> {
 public:
  session(tcp::socket socket, asio::ssl::context& context) : socket_(std::move(socket), context) {}

  void start() { do_handshake(); }

 private:
  void do_handshake() {
    auto self(shared_from_this());
    socket_.async_handshake(asio::ssl::stream_base::server,
                            [this, self](const std::error_code& error) {
                              if (!error) {
                                do_read();
                              }
                            });
  }

  void do_read() {
    auto self(shared_from_this());
    socket_.async_read_some(asio::buffer(data_, max_length),
                            [this, self](const std::error_code& ec, std::size_t length) {
                              if (!ec) {
                                do_write(length);
                              }
                            });
  }

  void do_write(std::size_t length) {
    auto self(shared_from_this());
    asio::async_write(socket_, asio::buffer(data_, length),
                      [this, self](const std::error_code& ec, std::size_t /*length*/) {
                        if (!ec) {
                          do_read();
                        }
                      });
  }

  asio::ssl::stream<tcp::socket> socket_;
  enum { max_length = 16384 };
  char data_[max_length];
};

class server {
 public:
  server(asio::io_context& io_context, unsigned short port, const std::string& cert,
         const std::string& key)
      : acceptor_(io_context, tcp::endpoint(asio::ip::make_address("127.0.0.1"), port)),
        context_(asio::ssl::context::tls_server) {
    context_.set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2);
    context_.use_certificate_chain_file(cert);
    context_.use_private_key_file(key, asio::ssl::context::pem);
    do_accept();
  }

  unsigned short port() const { return acceptor_.local_endpoint().port(); }

 private:
  void do_accept() {
    acceptor_.async_accept([this](const std::error_code& error, tcp::socket socket) {
      if (!error) {
        std::error_code ec;
        socket.set_option(tcp::no_delay(true), ec);
        std::make_shared<session>(std::move(socket), context_)->start();
      }
      do_accept();
    });
  }

  tcp::acceptor acceptor_;
  asio::ssl::context context_;
};

void print_stats() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const auto us = [](timeval t) { return t.tv_sec * 1000000LL + t.tv_usec; };
  std::printf("stats %lld %zu\n", us(usage.ru_utime) + us(usage.ru_stime), mallinfo2().uordblks);
  std::fflush(stdout);
}

void wait_signal(asio::io_context& io_context, asio::signal_set& signals) {
  signals.async_wait([&](std::error_code ec, int number) {
    if (ec) return;
    if (number == SIGUSR1) {
      print_stats();
      wait_signal(io_context, signals);
    } else {
      io_context.stop();
    }
  });
}

int main(int argc, char* argv[]) {
  unsigned short port = 0;
  std::string cert, key;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      port = static_cast<unsigned short>(std::atoi(argv[++i]));
    } else if (std::strcmp(argv[i], "--cert") == 0 && i + 1 < argc) {
      cert = argv[++i];
    } else if (std::strcmp(argv[i], "--key") == 0 && i + 1 < argc) {
      key = argv[++i];
    } else {
      cert.clear();
      break;
    }
  }
  if (cert.empty() || key.empty()) {
    std::fprintf(stderr, "usage: %s --cert FILE --key FILE [--port N]\n", argv[0]);
    return 2;
  }
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }
  try {
    asio::io_context io_context(1);
    server s(io_context, port, cert, key);
    asio::signal_set signals(io_context, SIGINT, SIGTERM, SIGUSR1);
    wait_signal(io_context, signals);
    std::printf("listening on 127.0.0.1:%u\n", static_cast<unsigned>(s.port()));
    std::fflush(stdout);
    io_context.run();
  } catch (std::exception& e) {
    std::fprintf(stderr, "Exception: %s\n", e.what());
    return 1;
  }
  return 0;
}
