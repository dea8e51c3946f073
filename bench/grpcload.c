/* grpcload: a lean load generator for unary gRPC calls, for bench/grpc_score.py.
 *
 * The bench's grpc.aio client processes cost about 0.2 ms of CPU per call, on the same two
 * cores as the server they measure; this one speaks HTTP/2 through libnghttp2 and costs a
 * few microseconds, so what it measures is mostly the server. Calls send the given
 * pre-framed request bodies in turn and are checked by their grpc-status trailer.
 *
 * usage: grpcload PORT PATH BODIES OUT closed CONCURRENCY CONNECTIONS WARMUP DURATION
 *        grpcload PORT PATH BODIES OUT open   RATE        CONNECTIONS WARMUP DURATION
 *
 * BODIES holds records of (u32 little-endian length, that many bytes: one gRPC message
 * frame). Closed loop: CONCURRENCY calls in flight, each followed by the next as it ends.
 * Open loop: RATE calls/s on a fixed schedule. Calls round-robin over CONNECTIONS. OUT gets
 * one line per measured call, "from_send_us from_schedule_us" (closed loop: the same number
 * twice). stdout gets one JSON object: calls measured, errors by grpc-status (whole run;
 * "no_status" for a stream that ended without a valid one: reset, or no trailers), CPU
 * seconds of this process and the largest lag of a send behind its schedule. A server that
 * goes away (GOAWAY, closed connection) or calls unanswered 30 s after the end stop the
 * run with exit status 2.
 *
 * Modes "sclosed" and "sopen" do the same over one bidirectional stream per connection
 * (FindBestWorkerStream): each body is one message on it (one or more decisions),
 * answers come in order, and a call is one message and its answer. Each decision in an
 * answer (field 1 of FindBestWorkerStreamResponse) is counted, with its status from its
 * `code` (field 2, a varint), and gets the message's latency; CONCURRENCY and RATE count
 * messages. A stream that ends early stops the run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

enum { MAX_CONNS = 256, NO_STATUS = 17, N_STATUS = 18 };

typedef struct {
  const uint8_t *data;
  size_t len;
} Body;

typedef struct Stream Stream;

typedef struct {
  int fd;
  int blocked; /* the last send hit EAGAIN: wait for EPOLLOUT */
  nghttp2_session *session;
  Stream *stream; /* stream modes: the connection's one stream */
} Conn;

/* Stream modes: one long-lived stream, its unsent bytes, its unanswered sends (FIFO) and
 * the answer being read. */
struct Stream {
  Conn *conn;
  int32_t id;
  int deferred, eof;
  uint8_t *out;
  size_t out_len, out_off, out_cap;
  double *sent, *scheduled;
  size_t head, count, cap;
  uint8_t header[5];
  size_t header_have;
  uint8_t *msg;
  size_t msg_len, msg_have, msg_cap;
};

typedef struct {
  Conn *conn;
  const Body *body;
  size_t offset;
  double scheduled, sent;
  int status; /* grpc-status; -1 until the trailer arrives */
} Call;

static Body *bodies;
static size_t n_bodies, next_body;
static Conn conns[MAX_CONNS];
static int n_conns, next_conn, epfd, closed_loop, measuring, stream_mode;
static const char *path;
static char authority[32];
static double measure_from, end_time, max_lag;
static long in_flight, measured, errors[N_STATUS];
static FILE *out;

static void die(const char *what) {
  fprintf(stderr, "grpcload: %s: %s\n", what, errno ? strerror(errno) : "failed");
  exit(2);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static nghttp2_nv header(const char *name, const char *value) {
  nghttp2_nv nv = {(uint8_t *)name, (uint8_t *)value, strlen(name), strlen(value),
                   NGHTTP2_NV_FLAG_NONE};
  return nv;
}

static ssize_t read_body(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                         size_t length, uint32_t *flags, nghttp2_data_source *source,
                         void *user_data) {
  (void)session, (void)stream_id, (void)user_data;
  Call *call = source->ptr;
  size_t left = call->body->len - call->offset;
  size_t n = left < length ? left : length;
  memcpy(buf, call->body->data + call->offset, n);
  call->offset += n;
  if (call->offset == call->body->len) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

static void enqueue(Conn *conn, double scheduled);

static void submit(Conn *conn, double scheduled) {
  if (stream_mode) {
    enqueue(conn, scheduled);
    return;
  }
  if (!nghttp2_session_check_request_allowed(conn->session)) {
    errno = 0; /* after GOAWAY every new stream would be refused: stop, do not spin */
    die("the server is going away (GOAWAY)");
  }
  Call *call = calloc(1, sizeof *call);
  if (!call) die("calloc");
  call->conn = conn;
  call->body = &bodies[next_body++ % n_bodies];
  call->scheduled = scheduled;
  call->sent = now();
  call->status = -1;
  nghttp2_nv headers[] = {
      header(":method", "POST"),      header(":scheme", "http"),
      header(":authority", authority), header(":path", path),
      header("content-type", "application/grpc"), header("te", "trailers"),
  };
  nghttp2_data_provider provider = {.source.ptr = call, .read_callback = read_body};
  if (nghttp2_submit_request(conn->session, NULL, headers, 6, &provider, call) < 0)
    die("nghttp2_submit_request");
  in_flight++;
}

static ssize_t read_stream(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                           size_t length, uint32_t *flags, nghttp2_data_source *source,
                           void *user_data) {
  (void)session, (void)stream_id, (void)user_data;
  Stream *st = source->ptr;
  size_t left = st->out_len - st->out_off;
  if (!left) {
    if (st->eof) {
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      return 0;
    }
    st->deferred = 1;
    return NGHTTP2_ERR_DEFERRED;
  }
  size_t n = left < length ? left : length;
  memcpy(buf, st->out + st->out_off, n);
  st->out_off += n;
  if (st->out_off == st->out_len) st->out_off = st->out_len = 0;
  return (ssize_t)n;
}

static void open_stream(Conn *conn) {
  Stream *st = calloc(1, sizeof *st);
  if (!st) die("calloc");
  st->conn = conn;
  st->cap = 1024;
  st->sent = malloc(st->cap * sizeof *st->sent);
  st->scheduled = malloc(st->cap * sizeof *st->scheduled);
  if (!st->sent || !st->scheduled) die("malloc");
  nghttp2_nv headers[] = {
      header(":method", "POST"),      header(":scheme", "http"),
      header(":authority", authority), header(":path", path),
      header("content-type", "application/grpc"), header("te", "trailers"),
  };
  nghttp2_data_provider provider = {.source.ptr = st, .read_callback = read_stream};
  st->id = nghttp2_submit_request(conn->session, NULL, headers, 6, &provider, st);
  if (st->id < 0) die("nghttp2_submit_request");
  conn->stream = st;
}

/* Stream modes: one body more on the connection's stream. */
static void enqueue(Conn *conn, double scheduled) {
  Stream *st = conn->stream;
  const Body *body = &bodies[next_body++ % n_bodies];
  if (st->out_len + body->len > st->out_cap) {
    st->out_cap = (st->out_len + body->len) * 2;
    st->out = realloc(st->out, st->out_cap);
    if (!st->out) die("realloc");
  }
  memcpy(st->out + st->out_len, body->data, body->len);
  st->out_len += body->len;
  if (st->count == st->cap) { /* grow the ring, unwrapping it */
    double *sent = malloc(2 * st->cap * sizeof *sent);
    double *sched = malloc(2 * st->cap * sizeof *sched);
    if (!sent || !sched) die("malloc");
    for (size_t i = 0; i < st->count; i++) {
      sent[i] = st->sent[(st->head + i) % st->cap];
      sched[i] = st->scheduled[(st->head + i) % st->cap];
    }
    free(st->sent), free(st->scheduled);
    st->sent = sent, st->scheduled = sched, st->head = 0, st->cap *= 2;
  }
  size_t at = (st->head + st->count++) % st->cap;
  st->sent[at] = now();
  st->scheduled[at] = scheduled;
  in_flight++;
  if (st->deferred) {
    st->deferred = 0;
    if (nghttp2_session_resume_data(conn->session, st->id)) die("nghttp2_session_resume_data");
  }
}

/* Read a varint at p[*i]; 0 past the end. */
static uint64_t varint_at(const uint8_t *p, size_t len, size_t *i) {
  uint64_t value = 0;
  for (int shift = 0; *i < len && shift < 64; shift += 7) {
    value |= (uint64_t)(p[*i] & 0x7f) << shift;
    if (!(p[(*i)++] & 0x80)) break;
  }
  return value;
}

/* Call `each(field, wire, value, start, length)` for the fields of a message; -1 when it
 * is malformed. */
static int walk(const uint8_t *p, size_t len, int (*each)(int, int, uint64_t, const uint8_t *,
                                                          size_t, void *), void *arg) {
  size_t i = 0;
  while (i < len) {
    uint64_t key = varint_at(p, len, &i), value = 0;
    int wire = (int)(key & 7), field = (int)(key >> 3);
    size_t start = i, length = 0;
    if (wire == 0) {
      value = varint_at(p, len, &i);
    } else if (wire == 2) {
      length = (size_t)varint_at(p, len, &i);
      start = i;
      i += length;
    } else if (wire == 1) {
      i += 8;
    } else if (wire == 5) {
      i += 4;
    } else {
      return -1;
    }
    if (i > len) return -1;
    if (each(field, wire, value, p + start, length, arg)) return -1;
  }
  return 0;
}

static int code_field(int field, int wire, uint64_t value, const uint8_t *p, size_t len,
                      void *arg) {
  (void)p, (void)len;
  if (field == 2 && wire == 0) *(int *)arg = value >= NO_STATUS ? NO_STATUS : (int)value;
  return 0;
}

typedef struct {
  int codes[4096];
  int n;
} Codes;

static int answer_field(int field, int wire, uint64_t value, const uint8_t *p, size_t len,
                        void *arg) {
  (void)value;
  Codes *codes = arg;
  if (field != 1 || wire != 2 || codes->n == 4096) return 0;
  int code = 0;
  if (walk(p, len, code_field, &code)) code = NO_STATUS;
  codes->codes[codes->n++] = code;
  return 0;
}

static void on_answer(Stream *st) {
  if (!st->count) {
    errno = 0;
    die("an answer with no request outstanding");
  }
  double done = now(), sent = st->sent[st->head], scheduled = st->scheduled[st->head];
  st->head = (st->head + 1) % st->cap;
  st->count--;
  in_flight--;
  static Codes codes;
  codes.n = 0;
  if (walk(st->msg, st->msg_len, answer_field, &codes) || !codes.n) {
    errors[NO_STATUS]++;
  }
  int in_window = measuring && (closed_loop ? sent >= measure_from && done <= end_time
                                            : scheduled >= measure_from);
  for (int k = 0; k < codes.n; k++) {
    if (codes.codes[k]) {
      errors[codes.codes[k]]++;
    } else if (in_window) {
      measured++;
      fprintf(out, "%.1f %.1f\n", (done - sent) * 1e6, (done - scheduled) * 1e6);
    }
  }
  if (in_window && sent - scheduled > max_lag) max_lag = sent - scheduled;
  if (closed_loop && measuring && done < end_time) enqueue(st->conn, done);
}

static int on_data(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                   const uint8_t *data, size_t len, void *user_data) {
  (void)flags, (void)user_data;
  if (!stream_mode) return 0;
  Stream *st = nghttp2_session_get_stream_user_data(session, stream_id);
  if (!st) return 0;
  while (len) {
    if (st->header_have < 5) {
      size_t n = 5 - st->header_have < len ? 5 - st->header_have : len;
      memcpy(st->header + st->header_have, data, n);
      st->header_have += n, data += n, len -= n;
      if (st->header_have < 5) break;
      st->msg_len = (size_t)st->header[1] << 24 | (size_t)st->header[2] << 16 |
                    (size_t)st->header[3] << 8 | st->header[4];
      st->msg_have = 0;
      if (st->msg_len > st->msg_cap) {
        st->msg_cap = st->msg_len * 2;
        st->msg = realloc(st->msg, st->msg_cap);
        if (!st->msg) die("realloc");
      }
    }
    size_t need = st->msg_len - st->msg_have;
    size_t n = need < len ? need : len;
    memcpy(st->msg + st->msg_have, data, n);
    st->msg_have += n, data += n, len -= n;
    if (st->msg_have == st->msg_len) {
      st->header_have = 0;
      on_answer(st);
    }
  }
  return 0;
}

static ssize_t on_send(nghttp2_session *session, const uint8_t *data, size_t length,
                       int flags, void *user_data) {
  (void)session, (void)flags;
  Conn *conn = user_data;
  ssize_t n = send(conn->fd, data, length, MSG_NOSIGNAL);
  if (n >= 0) return n;
  if (errno == EAGAIN || errno == EWOULDBLOCK) {
    conn->blocked = 1;
    return NGHTTP2_ERR_WOULDBLOCK;
  }
  return NGHTTP2_ERR_CALLBACK_FAILURE;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user_data) {
  (void)flags, (void)user_data;
  if (frame->hd.type != NGHTTP2_HEADERS || namelen != 11 || memcmp(name, "grpc-status", 11))
    return 0;
  if (stream_mode) {
    if (valuelen != 1 || value[0] != '0') fprintf(stderr, "grpcload: stream ended with grpc-status %.*s\n", (int)valuelen, value);
    return 0;
  }
  Call *call = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
  if (!call) return 0;
  int status = 0;
  size_t i = 0;
  for (; i < valuelen && i < 3 && value[i] >= '0' && value[i] <= '9'; i++)
    status = status * 10 + (value[i] - '0');
  call->status = i == 0 || i != valuelen || status >= NO_STATUS ? NO_STATUS : status;
  return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                           void *user_data) {
  (void)user_data, (void)error_code;
  if (stream_mode) {
    Stream *st = nghttp2_session_get_stream_user_data(session, stream_id);
    if (st && !st->eof) {
      errno = 0;
      die("the server ended a stream before the run did (see its grpc-status)");
    }
    return 0;
  }
  Call *call = nghttp2_session_get_stream_user_data(session, stream_id);
  if (!call) return 0;
  double done = now();
  /* a status that arrived stands, even if the stream was then reset */
  int status = call->status >= 0 ? call->status : NO_STATUS;
  in_flight--;
  if (status) {
    errors[status]++;
  } else if (measuring && (closed_loop ? call->sent >= measure_from && done <= end_time
                                       : call->scheduled >= measure_from)) {
    measured++;
    fprintf(out, "%.1f %.1f\n", (done - call->sent) * 1e6, (done - call->scheduled) * 1e6);
    if (call->sent - call->scheduled > max_lag) max_lag = call->sent - call->scheduled;
  }
  if (closed_loop && measuring && done < end_time) submit(call->conn, done);
  free(call);
  return 0;
}

static void flush(Conn *conn) {
  if (conn->blocked) return;
  if (nghttp2_session_send(conn->session)) die("nghttp2_session_send");
  if (conn->blocked) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = conn};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, conn->fd, &ev)) die("epoll_ctl");
  }
}

static void on_writable(Conn *conn) {
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = conn};
  if (epoll_ctl(epfd, EPOLL_CTL_MOD, conn->fd, &ev)) die("epoll_ctl");
  conn->blocked = 0;
}

static void on_readable(Conn *conn) {
  static uint8_t buf[1 << 16];
  for (;;) {
    ssize_t n = recv(conn->fd, buf, sizeof buf, 0);
    if (n > 0) {
      if (nghttp2_session_mem_recv(conn->session, buf, (size_t)n) < 0)
        die("nghttp2_session_mem_recv");
    } else if (n == 0) {
      errno = 0;
      die("the server closed a connection");
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return;
    } else {
      die("recv");
    }
  }
}

static void open_conn(Conn *conn, int port) {
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int one = 1;
  conn->fd = socket(AF_INET, SOCK_STREAM, 0);
  if (conn->fd < 0 || connect(conn->fd, (struct sockaddr *)&addr, sizeof addr)) die("connect");
  setsockopt(conn->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (fcntl(conn->fd, F_SETFL, O_NONBLOCK)) die("fcntl");
  nghttp2_session_callbacks *cbs;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_send_callback(cbs, on_send);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data);
  if (nghttp2_session_client_new(&conn->session, cbs, conn)) die("nghttp2_session_client_new");
  conn->stream = NULL;
  nghttp2_session_callbacks_del(cbs);
  nghttp2_settings_entry settings[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 4096},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20},
  };
  nghttp2_submit_settings(conn->session, NGHTTP2_FLAG_NONE, settings, 2);
  nghttp2_session_set_local_window_size(conn->session, NGHTTP2_FLAG_NONE, 0, 1 << 24);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = conn};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, conn->fd, &ev)) die("epoll_ctl");
}

/* Wait for socket events (or `timer`), handle them and flush every connection. */
static void step(int timer, int timeout_ms) {
  if (now() > end_time + 30) { /* end_time is the warm-up call's deadline before the run */
    errno = 0;
    die("calls still unanswered 30 s after the end");
  }
  struct epoll_event events[MAX_CONNS + 1];
  int n = epoll_wait(epfd, events, MAX_CONNS + 1, timeout_ms);
  if (n < 0 && errno != EINTR) die("epoll_wait");
  for (int i = 0; i < n; i++) {
    if (events[i].data.ptr == NULL) {
      uint64_t ticks;
      if (read(timer, &ticks, sizeof ticks) < 0 && errno != EAGAIN) die("timerfd read");
      continue;
    }
    Conn *conn = events[i].data.ptr;
    if (events[i].events & EPOLLOUT) on_writable(conn);
    if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(conn);
  }
  for (int i = 0; i < n_conns; i++) flush(&conns[i]);
}

static void load_bodies(const char *file) {
  FILE *f = fopen(file, "rb");
  if (!f || fseek(f, 0, SEEK_END)) die(file);
  long size = ftell(f);
  uint8_t *data = malloc((size_t)size);
  rewind(f);
  if (!data || fread(data, 1, (size_t)size, f) != (size_t)size) die(file);
  fclose(f);
  bodies = malloc(sizeof *bodies * ((size_t)size / 4 + 1));
  for (long at = 0; at + 4 <= size;) {
    uint32_t len = (uint32_t)data[at] | (uint32_t)data[at + 1] << 8 |
                   (uint32_t)data[at + 2] << 16 | (uint32_t)data[at + 3] << 24;
    if (at + 4 + (long)len > size) die("truncated bodies file");
    bodies[n_bodies++] = (Body){data + at + 4, len};
    at += 4 + (long)len;
  }
  if (!n_bodies) die("no bodies");
}

static double cpu_seconds(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

int main(int argc, char **argv) {
  const char *mode = argc == 10 ? argv[5] : "";
  stream_mode = mode[0] == 's';
  if (stream_mode) mode++;
  if (argc != 10 || (strcmp(mode, "closed") && strcmp(mode, "open"))) {
    fprintf(stderr, "usage: grpcload PORT PATH BODIES OUT [s]closed|[s]open CONCURRENCY|RATE "
                    "CONNECTIONS WARMUP DURATION\n");
    return 2;
  }
  int port = atoi(argv[1]);
  path = argv[2];
  load_bodies(argv[3]);
  out = fopen(argv[4], "w");
  if (!out) die(argv[4]);
  closed_loop = !strcmp(mode, "closed");
  double load = atof(argv[6]), warmup = atof(argv[8]), duration = atof(argv[9]);
  n_conns = atoi(argv[7]);
  if (n_conns < 1 || n_conns > MAX_CONNS || load <= 0) die("bad arguments");
  snprintf(authority, sizeof authority, "127.0.0.1:%d", port);

  prctl(PR_SET_TIMERSLACK, 1UL); /* wake for the schedule, not up to 50 µs after it */
  epfd = epoll_create1(0);
  int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
  struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
  if (epfd < 0 || timer < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, timer, &tev)) die("epoll");
  for (int i = 0; i < n_conns; i++) {
    open_conn(&conns[i], port);
    if (stream_mode) open_stream(&conns[i]);
  }
  end_time = now();
  for (int i = 0; i < n_conns; i++) submit(&conns[i], now()); /* one unmeasured call each */
  while (in_flight) step(timer, 1000);

  measuring = 1;
  double cpu0 = cpu_seconds(), start = now();
  measure_from = start + warmup;
  end_time = measure_from + duration;
  if (closed_loop) {
    for (int i = 0; i < (int)load; i++) submit(&conns[next_conn++ % n_conns], start);
    for (int i = 0; i < n_conns; i++) flush(&conns[i]);
    while (in_flight) step(timer, 100);
  } else {
    double period = 1.0 / load;
    long sent = 0;
    for (double next = start; next < end_time || in_flight;) {
      for (double t = now(); next <= t && next < end_time; next = start + (double)++sent * period)
        submit(&conns[next_conn++ % n_conns], next);
      for (int i = 0; i < n_conns; i++) flush(&conns[i]);
      if (next < end_time) {
        struct itimerspec due = {.it_value = {(time_t)next, (long)((next - (double)(time_t)next) * 1e9)}};
        if (timerfd_settime(timer, TFD_TIMER_ABSTIME, &due, NULL)) die("timerfd_settime");
      }
      step(timer, next < end_time ? -1 : 100);
    }
  }
  double cpu = cpu_seconds() - cpu0;
  fclose(out);
  printf("{\"calls\": %ld, \"cpu\": %.4f, \"max_lag\": %.6f, \"errors\": {", measured, cpu,
         max_lag);
  for (int s = 1, first = 1; s < N_STATUS; s++) {
    if (!errors[s]) continue;
    if (s == NO_STATUS)
      printf("%s\"no_status\": %ld", first ? "" : ", ", errors[s]);
    else
      printf("%s\"%d\": %ld", first ? "" : ", ", s, errors[s]);
    first = 0;
  }
  printf("}}\n");
  return 0;
}
