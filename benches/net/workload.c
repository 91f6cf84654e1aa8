/* netbench guest workload: TCP bulk throughput both ways and 1-byte request/response.
 *
 * usage: workload SERVER SINKPORT SOURCEPORT ECHOPORT MIB RRSECS STALLSECS
 *
 *   1. tx: connect to SERVER:SINKPORT, send an 8-byte length (little endian) and then MIB MiB
 *      in 128 KiB write(2)s, then wait for the host's 8-byte count of what it received: the
 *      time is from after connect(2) to that count, so every byte has reached the host's
 *      sink. No half-close (shutdown(SHUT_WR)): Debian bookworm's passt (2023-03) forwards
 *      nothing to the guest after the guest's FIN, so the count would never arrive.
 *   2. rx: connect to SERVER:SOURCEPORT, read until EOF (the host sends MIB MiB, then closes);
 *      the byte count is checked.
 *   3. rr: connect to SERVER:ECHOPORT (TCP_NODELAY), write 1 byte and read it back, for
 *      RRSECS seconds.
 *
 * A phase that makes no progress for STALLSECS seconds (SO_SNDTIMEO / SO_RCVTIMEO) or fails
 * prints "<phase>_error ..." and the workload goes on with the next phase, so one stalled
 * direction still leaves the other figures.
 *
 * Prints one "key value" line per figure (Mbit/s = 10^6 bit/s, times from CLOCK_MONOTONIC),
 * "@phase" lines just before each timed phase and "@end" after the last, so that a reader
 * can also time the phases by when the lines arrive. Build: gcc -O2 -static.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (128 << 10)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static const char *server;
static long stall_secs;

/* Connects to server:port with send/receive timeouts of stall_secs; retries for up to 10 s
 * (the first connection may race the link coming up). Returns -1 after printing
 * "<what>_error ...". */
static int dial(const char *what, int port, int nodelay) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, server, &sa.sin_addr) != 1) {
        say("%s_error bad server address %s\n", what, server);
        return -1;
    }
    double end = now() + 10;
    for (int attempt = 0; attempt < 100; attempt++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            say("%s_error socket: %s\n", what, strerror(errno));
            return -1;
        }
        struct timeval tv = {.tv_sec = stall_secs};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (nodelay) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            return fd;
        int e = errno;
        close(fd);
        if (now() >= end) {
            say("%s_error connect %s:%d: %s\n", what, server, port, strerror(e));
            return -1;
        }
        usleep(100000);
    }
    say("%s_error connect %s:%d: no success in 100 attempts\n", what, server, port);
    return -1;
}

static const char *why(int e) {
    return (e == EAGAIN || e == EWOULDBLOCK) ? "stalled (no progress within the stall timeout)"
                                             : strerror(e);
}

static void tx(int port, long long bytes, char *buf) {
    /* TCP_NODELAY: full 128 KiB writes are not delayed either way, but without it the last
     * partial segment waits for the ACK of the previous ones (Nagle), a fixed delay that
     * small --mib runs would see. */
    int fd = dial("tx", port, 1);
    if (fd < 0)
        return;
    say("@tx\n");
    double t0 = now();
    long long sent = 0;
    unsigned char hdr[8];
    for (int i = 0; i < 8; i++)
        hdr[i] = (unsigned char)((unsigned long long)bytes >> (8 * i));
    for (size_t off = 0; off < sizeof hdr;) {
        ssize_t n = write(fd, hdr + off, sizeof hdr - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            say("tx_error writing the length: %s\n", why(errno));
            close(fd);
            return;
        }
        off += n;
    }
    while (sent < bytes) {
        size_t want = bytes - sent < CHUNK ? (size_t)(bytes - sent) : CHUNK;
        ssize_t n = write(fd, buf, want);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            say("tx_error write after %lld of %lld bytes (%.1f s): %s\n", sent, bytes,
                now() - t0, why(errno));
            close(fd);
            return;
        }
        sent += n;
    }
    /* The host's count (8 bytes, little endian). */
    unsigned char ack[8];
    size_t got = 0;
    while (got < 8) {
        ssize_t n = read(fd, ack + got, 8 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            say("tx_error waiting for the host's count after sending %lld bytes (%.1f s): %s\n",
                sent, now() - t0, why(errno));
            close(fd);
            return;
        }
        if (n == 0)
            break;
        got += n;
    }
    double t = now() - t0;
    close(fd);
    if (got < 8) {
        say("tx_error host closed without its count (%zu bytes)\n", got);
        return;
    }
    uint64_t host = 0;
    for (int i = 7; i >= 0; i--)
        host = host << 8 | ack[i];
    if ((long long)host != bytes) {
        say("tx_error host received %llu of %lld bytes\n", (unsigned long long)host, bytes);
        return;
    }
    say("tx_bytes %lld\ntx_s %.4f\ntx_mbps %.1f\n", bytes, t, bytes * 8 / 1e6 / t);
}

static void rx(int port, long long bytes, char *buf) {
    int fd = dial("rx", port, 0);
    if (fd < 0)
        return;
    say("@rx\n");
    double t0 = now();
    long long got = 0;
    for (;;) {
        ssize_t n = read(fd, buf, CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            say("rx_error read after %lld of %lld bytes (%.1f s): %s\n", got, bytes, now() - t0,
                why(errno));
            close(fd);
            return;
        }
        if (n == 0)
            break;
        got += n;
    }
    double t = now() - t0;
    close(fd);
    if (got != bytes) {
        say("rx_error received %lld of %lld bytes\n", got, bytes);
        return;
    }
    say("rx_bytes %lld\nrx_s %.4f\nrx_mbps %.1f\n", got, t, got * 8 / 1e6 / t);
}

static void rr(int port, long secs) {
    int fd = dial("rr", port, 1);
    if (fd < 0)
        return;
    say("@rr\n");
    double t0 = now(), end = t0 + secs, t = t0;
    long long count = 0;
    char c = 'x';
    /* Bounded by time (checked every 64 round trips) and by the stall timeout per call. */
    while (t < end) {
        ssize_t w = write(fd, &c, 1);
        if (w < 0 && errno == EINTR)
            continue;
        if (w != 1) {
            say("rr_error write after %lld round trips: %s\n", count, why(errno));
            close(fd);
            return;
        }
        ssize_t r;
        do
            r = read(fd, &c, 1);
        while (r < 0 && errno == EINTR);
        if (r != 1) {
            say("rr_error read after %lld round trips: %s\n", count,
                r == 0 ? "host closed" : why(errno));
            close(fd);
            return;
        }
        count++;
        if ((count & 63) == 0)
            t = now();
    }
    t = now() - t0;
    close(fd);
    say("rr_count %lld\nrr_s %.4f\nrr_per_s %.0f\nrr_us %.1f\n", count, t, count / t,
        t * 1e6 / count);
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr,
                "usage: workload SERVER SINKPORT SOURCEPORT ECHOPORT MIB RRSECS STALLSECS\n");
        return 2;
    }
    server = argv[1];
    int sink = atoi(argv[2]), source = atoi(argv[3]), echo = atoi(argv[4]);
    long mib = atol(argv[5]), rrsecs = atol(argv[6]);
    stall_secs = atol(argv[7]);
    if (mib <= 0 || rrsecs <= 0 || stall_secs <= 0) {
        fprintf(stderr, "workload: MIB, RRSECS and STALLSECS must be > 0\n");
        return 2;
    }
    static char buf[CHUNK];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (char)(i * 131 + (i >> 8));
    long long bytes = (long long)mib << 20;
    tx(sink, bytes, buf);
    rx(source, bytes, buf);
    rr(echo, rrsecs);
    say("@end\nnetbench_done 1\n");
    return 0;
}
