/* Benchmark peer (not part of reactor): an echo server on libuv, written as libuv's own guide
 * writes it (docs "Networking", uvbook code/tcp-echo-server/main.c): a malloc'd uv_tcp_t per
 * client, alloc_cb mallocs the suggested 64 KiB for every read, each echo is a malloc'd
 * uv_write_t that frees the buffer when the write completes.
 *
 *   bench_uv_echo [--port N]
 *
 * Changes from the guide, the same for every server bench/compare runs: bind 127.0.0.1 on the
 * given port (0: ephemeral) and print "listening on HOST:PORT", TCP_NODELAY on clients, a backlog
 * of SOMAXCONN instead of 128 (so 10,000 connections do not measure SYN retries), and SIGINT or
 * SIGTERM stop the loop. */
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <uv.h>

static uv_loop_t *loop;

typedef struct {
  uv_write_t req;
  uv_buf_t buf;
} write_req_t;

static void free_write_req(uv_write_t *req) {
  write_req_t *wr = (write_req_t *)req;
  free(wr->buf.base);
  free(wr);
}

static void alloc_buffer(uv_handle_t *handle, size_t suggested_size, uv_buf_t *buf) {
  (void)handle;
  buf->base = (char *)malloc(suggested_size);
  buf->len = suggested_size;
}

static void on_close(uv_handle_t *handle) { free(handle); }

static void echo_write(uv_write_t *req, int status) {
  (void)status; /* the guide prints write errors; clients going away is normal here */
  free_write_req(req);
}

static void echo_read(uv_stream_t *client, ssize_t nread, const uv_buf_t *buf) {
  if (nread > 0) {
    write_req_t *req = (write_req_t *)malloc(sizeof(write_req_t));
    req->buf = uv_buf_init(buf->base, nread);
    uv_write((uv_write_t *)req, client, &req->buf, 1, echo_write);
    return;
  }
  if (nread < 0) {
    uv_close((uv_handle_t *)client, on_close);
  }
  free(buf->base);
}

static void on_new_connection(uv_stream_t *server, int status) {
  if (status < 0) {
    fprintf(stderr, "New connection error %s\n", uv_strerror(status));
    return;
  }
  uv_tcp_t *client = (uv_tcp_t *)malloc(sizeof(uv_tcp_t));
  uv_tcp_init(loop, client);
  if (uv_accept(server, (uv_stream_t *)client) == 0) {
    uv_tcp_nodelay(client, 1);
    uv_read_start((uv_stream_t *)client, alloc_buffer, echo_read);
  } else {
    uv_close((uv_handle_t *)client, on_close);
  }
}

static void on_signal(uv_signal_t *handle, int signum) {
  (void)signum;
  uv_stop(handle->loop);
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
  loop = uv_default_loop();

  uv_tcp_t server;
  uv_tcp_init(loop, &server);
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", port, &addr);
  uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
  int r = uv_listen((uv_stream_t *)&server, SOMAXCONN, on_new_connection);
  if (r) {
    fprintf(stderr, "Listen error %s\n", uv_strerror(r));
    return 1;
  }
  int length = sizeof addr;
  uv_tcp_getsockname(&server, (struct sockaddr *)&addr, &length);

  uv_signal_t sigint, sigterm;
  uv_signal_init(loop, &sigint);
  uv_signal_start(&sigint, on_signal, SIGINT);
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigterm, on_signal, SIGTERM);

  printf("listening on 127.0.0.1:%d\n", ntohs(addr.sin_port));
  fflush(stdout);
  return uv_run(loop, UV_RUN_DEFAULT);
}
