/* wsbench: a WebSocket ping-pong load generator for the web echo's figures (scripts/web-figures).
 *
 * N connections to 127.0.0.1:PORT (loopback only), each one upgrades, then sends one masked binary
 * message of SIZE bytes at a time and waits for it to come back; every echoed byte is checked
 * against what was sent. One epoll loop, no threads, so it can load a Python server from one core.
 * Prints one JSON line: {"messages": N, "per_s": R, "errors": E, "verified": true|false}.
 *
 *   cc -O2 -o wsbench wsbench.c && ./wsbench --port P [--conns 50] [--size 1024] [--duration 5]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 4096

struct conn {
    int fd;
    uint64_t seq;        /* messages echoed so far */
    size_t got;          /* bytes of the current echo frame read */
    unsigned char *in;   /* the echo frame being read */
    int failed;
};

static size_t size = 1024;
static size_t header_len(size_t n) { return n < 126 ? 2 : n < 65536 ? 4 : 10; }

static unsigned char payload_byte(uint64_t seq, size_t i, int conn) {
    return (unsigned char)(seq * 131 + i * 7 + (size_t)conn * 17);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int send_all(int fd, const unsigned char *data, size_t n) {
    while (n) {
        ssize_t sent = send(fd, data, n, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EINTR) continue; /* (rare on loopback for 1 KiB) */
            return -1;
        }
        data += sent;
        n -= (size_t)sent;
    }
    return 0;
}

/* One masked binary frame (client to server frames must be masked, RFC 6455 5.3). */
static int send_message(struct conn *c, int index, unsigned char *frame) {
    size_t h = 0;
    frame[h++] = 0x82;
    if (size < 126) {
        frame[h++] = 0x80 | (unsigned char)size;
    } else if (size < 65536) {
        frame[h++] = 0x80 | 126;
        frame[h++] = (unsigned char)(size >> 8);
        frame[h++] = (unsigned char)size;
    } else {
        frame[h++] = 0x80 | 127;
        for (int shift = 56; shift >= 0; shift -= 8) frame[h++] = (unsigned char)((uint64_t)size >> shift);
    }
    unsigned char mask[4] = {0x12, 0x34, 0x56, (unsigned char)c->seq};
    memcpy(frame + h, mask, 4);
    h += 4;
    for (size_t i = 0; i < size; i++) frame[h + i] = payload_byte(c->seq, i, index) ^ mask[i & 3];
    return send_all(c->fd, frame, h + size);
}

static int upgrade(int fd, int port) {
    char request[256];
    int n = snprintf(request, sizeof request,
                     "GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     port);
    if (send_all(fd, (unsigned char *)request, (size_t)n) < 0) return -1;
    char answer[4096];
    size_t got = 0;
    while (got < sizeof answer - 1) { /* byte by byte: nothing after the head may be consumed */
        ssize_t r = recv(fd, answer + got, 1, 0);
        if (r <= 0) return -1;
        got++;
        if (got >= 4 && memcmp(answer + got - 4, "\r\n\r\n", 4) == 0) break;
    }
    answer[got] = 0;
    return strncmp(answer, "HTTP/1.1 101", 12) == 0 ? 0 : -1;
}

int main(int argc, char **argv) {
    int port = 0, conns = 50;
    double duration = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--conns")) conns = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--size")) size = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else { fprintf(stderr, "wsbench: unknown option %s\n", argv[i]); return 2; }
    }
    if (port <= 0 || conns < 1 || conns > MAX_CONNS || size < 1 || size > (1 << 24) || duration <= 0) {
        fprintf(stderr, "usage: wsbench --port P [--conns 1..%d] [--size BYTES] [--duration S]\n", MAX_CONNS);
        return 2;
    }
    static struct conn c[MAX_CONNS];
    unsigned char *frame = malloc(size + 14);
    int ep = epoll_create1(0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* loopback only, by construction */
    long errors = 0;
    for (int i = 0; i < conns; i++) {
        c[i].fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(c[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c[i].fd, (struct sockaddr *)&to, sizeof to) < 0 || upgrade(c[i].fd, port) < 0) {
            fprintf(stderr, "wsbench: connection %d: connect or upgrade failed\n", i);
            return 1;
        }
        c[i].in = malloc(header_len(size) + size);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
    }
    double start = now(), end = start + duration;
    for (int i = 0; i < conns; i++)
        if (send_message(&c[i], i, frame) < 0) c[i].failed = 1, errors++;
    size_t want = header_len(size) + size;
    uint64_t messages = 0;
    struct epoll_event events[256];
    while (now() < end) {
        int n = epoll_wait(ep, events, 256, 100);
        for (int k = 0; k < n; k++) {
            int i = (int)events[k].data.u32;
            struct conn *cn = &c[i];
            if (cn->failed) continue;
            ssize_t r = recv(cn->fd, cn->in + cn->got, want - cn->got, 0);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                cn->failed = 1, errors++;
                epoll_ctl(ep, EPOLL_CTL_DEL, cn->fd, NULL);
                continue;
            }
            cn->got += (size_t)r;
            if (cn->got < want) continue;
            /* A whole echo frame: unmasked binary, the same length, the same bytes. */
            size_t h = header_len(size);
            int ok = cn->in[0] == 0x82 && (cn->in[1] & 0x80) == 0;
            for (size_t b = 0; ok && b < size; b++) ok = cn->in[h + b] == payload_byte(cn->seq, b, i);
            if (!ok) {
                cn->failed = 1, errors++;
                epoll_ctl(ep, EPOLL_CTL_DEL, cn->fd, NULL);
                continue;
            }
            cn->got = 0;
            cn->seq++;
            messages++;
            if (now() < end && send_message(cn, i, frame) < 0) cn->failed = 1, errors++;
        }
    }
    double elapsed = now() - start;
    for (int i = 0; i < conns; i++) {
        unsigned char close_frame[8] = {0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8}; /* 1000, mask 0 */
        send_all(c[i].fd, close_frame, sizeof close_frame);
        close(c[i].fd);
    }
    printf("{\"messages\": %llu, \"per_s\": %.1f, \"errors\": %ld, \"verified\": %s}\n",
           (unsigned long long)messages, messages / elapsed, errors, errors ? "false" : "true");
    return errors ? 1 : 0;
}
