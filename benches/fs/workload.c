/* fsbench workload: the same file-system workload on the host and in the guests.
 *
 * usage: workload DIR [MIB [FILES]]      (defaults: 256 MiB, 10000 files)
 *
 *   1. sequential write of DIR/fsbench.big: MIB x 1 MiB write(2) + fsync(2)
 *   2. sync + "3" > /proc/sys/vm/drop_caches (a failure is reported, not fatal)
 *   3. sequential read of it in 1 MiB read(2)s (the byte count is checked)
 *   3b. "reread": the same file read again through the same descriptor after lseek(0): the
 *      pages are now in the (guest's) page cache, so this is the copy-to-user ceiling of the
 *      machine the workload runs on, with no file-system round trip; then unlink
 *   4. in DIR/fsbench.small: FILES x open(O_CREAT|O_WRONLY)+close, FILES x stat,
 *      FILES x unlink
 *
 * Prints one "key value" line per figure (MB = 10^6 bytes, times from CLOCK_MONOTONIC) and
 * "@phase" lines just before each timed phase and "@end" after the last, so that a reader
 * can also time the phases by when the lines arrive. Build: gcc -O2 -static.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)

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

static void die(const char *what, const char *path) {
    say("fsbench_error %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

/* Reads fd to its end in CHUNK-sized read(2)s into buf; returns the byte count. */
static long long read_to_end(int fd, char *buf, const char *path) {
    long long total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("read", path);
        if (n == 0)
            return total;
        total += n;
    }
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 4) {
        fprintf(stderr, "usage: workload DIR [MIB [FILES]]\n");
        return 2;
    }
    const char *dir = argv[1];
    long mib = argc > 2 ? atol(argv[2]) : 256;
    long files = argc > 3 ? atol(argv[3]) : 10000;
    if (mib <= 0 || files <= 0) {
        fprintf(stderr, "workload: MIB and FILES must be > 0\n");
        return 2;
    }
    char big[4096], sdir[4096], path[4200];
    snprintf(big, sizeof big, "%s/fsbench.big", dir);
    snprintf(sdir, sizeof sdir, "%s/fsbench.small", dir);
    char *buf = malloc(CHUNK);
    if (!buf)
        die("malloc", "1 MiB");
    for (size_t i = 0; i < CHUNK; i++)
        buf[i] = (char)(i * 131 + 7);
    say("workload_params mib=%ld files=%ld\n", mib, files);

    /* 1. sequential write */
    say("@seqwrite\n");
    double t0 = now();
    int fd = open(big, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    if (fd < 0)
        die("open", big);
    for (long i = 0; i < mib; i++) {
        size_t done = 0;
        while (done < CHUNK) {
            ssize_t n = write(fd, buf + done, CHUNK - done);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                die("write", big);
            done += (size_t)n;
        }
    }
    if (fsync(fd) != 0)
        die("fsync", big);
    if (close(fd) != 0)
        die("close", big);
    double t = now() - t0;
    say("seqwrite_s %.6f\nseqwrite_MBps %.2f\n", t, mib * (double)CHUNK / 1e6 / t);

    /* 2. drop the page cache so the read goes to the file system, not to cached pages */
    sync();
    int dc = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
    int dropped = dc >= 0 && write(dc, "3", 1) == 1;
    if (dc >= 0)
        close(dc);
    say("drop_caches %d\n", dropped);

    /* 3. sequential read */
    say("@seqread\n");
    t0 = now();
    fd = open(big, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die("open", big);
    long long total = read_to_end(fd, buf, big);
    t = now() - t0;
    if (total != mib * (long long)CHUNK) {
        say("fsbench_error short read %lld of %lld bytes\n", total, mib * (long long)CHUNK);
        return 1;
    }
    say("seqread_s %.6f\nseqread_MBps %.2f\n", t, total / 1e6 / t);

    /* 3b. cached re-read (same descriptor: no open, so FUSE keeps the page cache) */
    if (lseek(fd, 0, SEEK_SET) != 0)
        die("lseek", big);
    say("@reread\n");
    t0 = now();
    long long again = read_to_end(fd, buf, big);
    t = now() - t0;
    close(fd);
    if (again != total) {
        say("fsbench_error short re-read %lld of %lld bytes\n", again, total);
        return 1;
    }
    say("reread_s %.6f\nreread_MBps %.2f\n", t, again / 1e6 / t);
    if (unlink(big) != 0)
        die("unlink", big);

    /* 4. metadata: create, stat, unlink */
    if (mkdir(sdir, 0755) != 0 && errno != EEXIST)
        die("mkdir", sdir);
    double tm = now();
    say("@create\n");
    t0 = now();
    for (long i = 0; i < files; i++) {
        snprintf(path, sizeof path, "%s/f%06ld", sdir, i);
        fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
        if (fd < 0)
            die("create", path);
        close(fd);
    }
    double tc = now() - t0;
    say("@stat\n");
    t0 = now();
    for (long i = 0; i < files; i++) {
        struct stat st;
        snprintf(path, sizeof path, "%s/f%06ld", sdir, i);
        if (stat(path, &st) != 0)
            die("stat", path);
    }
    double ts = now() - t0;
    say("@unlink\n");
    t0 = now();
    for (long i = 0; i < files; i++) {
        snprintf(path, sizeof path, "%s/f%06ld", sdir, i);
        if (unlink(path) != 0)
            die("unlink", path);
    }
    double tu = now() - t0;
    say("@end\n");
    double tt = now() - tm;
    rmdir(sdir);
    say("create_ops %.1f\nstat_ops %.1f\nunlink_ops %.1f\n", files / tc, files / ts, files / tu);
    say("meta_s %.6f\nmeta_ops %.1f\n", tt, 3.0 * files / tt);
    say("fsbench_done 1\n");
    return 0;
}
