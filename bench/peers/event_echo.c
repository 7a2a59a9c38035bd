/* Benchmark peer (not part of reactor): an echo server on libevent 2, written as libevent's own
 * book writes it ("Connection listeners: accepting TCP connections", the evconnlistener echo
 * server): evconnlistener_new_bind, one bufferevent per connection, and the read callback moves
 * the whole input buffer to the output buffer with evbuffer_add_buffer.
 *
 *   bench_event_echo [--port N]
 *
 * Changes from the book, the same for every server bench/compare runs: bind 127.0.0.1 on the
 * given port (0: ephemeral) and print "listening on HOST:PORT", TCP_NODELAY on clients, a backlog
 * of SOMAXCONN instead of libevent's default (128), and SIGINT or SIGTERM end the loop. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

static void echo_read_cb(struct bufferevent *bev, void *ctx) {
  (void)ctx;
  /* This callback is invoked when there is data to read on bev. */
  struct evbuffer *input = bufferevent_get_input(bev);
  struct evbuffer *output = bufferevent_get_output(bev);
  /* Copy all the data from the input buffer to the output buffer. */
  evbuffer_add_buffer(output, input);
}

static void echo_event_cb(struct bufferevent *bev, short events, void *ctx) {
  (void)ctx;
  if (events & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
    bufferevent_free(bev);
  }
}

static void accept_conn_cb(struct evconnlistener *listener, evutil_socket_t fd,
                           struct sockaddr *address, int socklen, void *ctx) {
  (void)address;
  (void)socklen;
  (void)ctx;
  /* We got a new connection! Set up a bufferevent for it. */
  struct event_base *base = evconnlistener_get_base(listener);
  int on = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
  struct bufferevent *bev = bufferevent_socket_new(base, fd, BEV_OPT_CLOSE_ON_FREE);
  bufferevent_setcb(bev, echo_read_cb, NULL, echo_event_cb, NULL);
  bufferevent_enable(bev, EV_READ | EV_WRITE);
}

static void accept_error_cb(struct evconnlistener *listener, void *ctx) {
  (void)ctx;
  struct event_base *base = evconnlistener_get_base(listener);
  int err = EVUTIL_SOCKET_ERROR();
  fprintf(stderr, "Got an error %d (%s) on the listener.\n", err,
          evutil_socket_error_to_string(err));
  event_base_loopexit(base, NULL);
}

static void signal_cb(evutil_socket_t sig, short events, void *ctx) {
  (void)sig;
  (void)events;
  event_base_loopexit((struct event_base *)ctx, NULL);
}

int main(int argc, char **argv) {
  int port = 0;
  for (int i = 1; i < argc; ++i) {
    if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      port = atoi(argv[++i]);
    } else {
      fprintf(stderr, "usage: %s [--port N]\n", argv[0]);
      return 2;
    }
  }
  struct event_base *base = event_base_new();
  if (!base) {
    puts("Couldn't open event base");
    return 1;
  }
  struct sockaddr_in sin;
  memset(&sin, 0, sizeof(sin));
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sin.sin_port = htons(port);
  struct evconnlistener *listener =
      evconnlistener_new_bind(base, accept_conn_cb, NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE,
                              SOMAXCONN, (struct sockaddr *)&sin, sizeof(sin));
  if (!listener) {
    perror("Couldn't create listener");
    return 1;
  }
  evconnlistener_set_error_cb(listener, accept_error_cb);
  socklen_t length = sizeof sin;
  getsockname(evconnlistener_get_fd(listener), (struct sockaddr *)&sin, &length);

  struct event *sigint = evsignal_new(base, SIGINT, signal_cb, base);
  struct event *sigterm = evsignal_new(base, SIGTERM, signal_cb, base);
  event_add(sigint, NULL);
  event_add(sigterm, NULL);

  printf("listening on 127.0.0.1:%d\n", ntohs(sin.sin_port));
  fflush(stdout);
  event_base_dispatch(base);
  return 0;
}
