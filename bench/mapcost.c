/*
 * mapcost: what it costs to send a tmpfs file's pages into a pipe the way
 * libxc's write_batch() does (map 1024 pages, one writev of a 8208-byte
 * header and 1024 4 KiB iovecs, unmap), against the way `cat` does
 * (read + write).  The writer and a reader process (read 128 KiB at a time,
 * discard) share one CPU, as in `make bench`'s pipe sink.  See
 * bench/results/mapcost.md.
 *
 *   cc -O2 -o /tmp/mapcost bench/mapcost.c
 *   /tmp/mapcost FILE MODE [CPU]
 *
 * MODE:
 *   read      read(st_blksize, at least 128 KiB) + write, as cat does
 *   view      per batch: mmap(MAP_SHARED|MAP_POPULATE), writev, munmap
 *             (fakexen's read-only foreign mapping before PYXL_SIM_ROCOPY)
 *   fault     the same without MAP_POPULATE (pages fault in on the copy)
 *   copy      per batch: pread into a reused buffer, writev
 *             (fakexen's PYXL_SIM_ROCOPY=1 mapping)
 *   maponly   per batch: mmap(MAP_POPULATE), munmap; nothing written
 *   prefault  one mapping of the whole file, populated before the clock
 *             starts, then writev per batch: the copy into the pipe alone
 *
 * Prints throughput, the writer's and the reader's CPU time (getrusage).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define BATCH 1024UL
#define HDR 8208UL   /* record header 16 + 1024 pfns * 8 */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double cpu_s(const struct rusage *r)
{
    return r->ru_utime.tv_sec + r->ru_stime.tv_sec +
           1e-6 * (r->ru_utime.tv_usec + r->ru_stime.tv_usec);
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* writev of all of iov[0..n), IOV_MAX at a time, resuming after short writes. */
static void writev_all(int fd, struct iovec *iov, int n)
{
    int i = 0;
    while (i < n) {
        ssize_t w = writev(fd, iov + i, n - i > IOV_MAX ? IOV_MAX : n - i);
        if (w < 0)
            die("writev");
        while (w > 0 && i < n) {
            if ((size_t)w >= iov[i].iov_len) {
                w -= iov[i].iov_len;
                i++;
            } else {
                iov[i].iov_base = (char *)iov[i].iov_base + w;
                iov[i].iov_len -= w;
                w = 0;
            }
        }
    }
}

static int batch_iov(struct iovec *iov, char *hdr, char *pages, size_t n)
{
    iov[0] = (struct iovec){hdr, HDR};
    for (size_t i = 0; i < n; i++)
        iov[1 + i] = (struct iovec){pages + i * PAGE, PAGE};
    return 1 + (int)n;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s FILE read|view|fault|copy|maponly|prefault [CPU]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[2];
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        die(argv[1]);
    size_t size = st.st_size & ~(PAGE - 1), pages = size / PAGE;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(argc > 3 ? atoi(argv[3]) : 1, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        die("sched_setaffinity");
    int p[2];
    if (pipe(p) < 0)
        die("pipe");
    pid_t reader = fork();
    if (!reader) {
        static char b[131072];
        close(p[1]);
        while (read(p[0], b, sizeof(b)) > 0)
            ;
        _exit(0);
    }
    close(p[0]);
    static char hdr[HDR];
    struct iovec *iov = calloc(BATCH + 1, sizeof(*iov));
    char *whole = NULL;
    if (!strcmp(mode, "prefault")) {
        whole = mmap(NULL, size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
        if (whole == MAP_FAILED)
            die("mmap");
    }
    struct rusage r0, r1, rc;
    getrusage(RUSAGE_SELF, &r0);
    double t0 = now();
    if (!strcmp(mode, "read")) {
        size_t bs = st.st_blksize > 131072 ? (size_t)st.st_blksize : 131072;
        char *b = malloc(bs);
        ssize_t n;
        while ((n = read(fd, b, bs)) > 0)
            for (ssize_t o = 0; o < n;) {
                ssize_t w = write(p[1], b + o, n - o);
                if (w < 0)
                    die("write");
                o += w;
            }
    } else if (!strcmp(mode, "copy")) {
        char *buf = mmap(NULL, BATCH * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (buf == MAP_FAILED)
            die("mmap");
        for (size_t pg = 0; pg < pages; pg += BATCH) {
            size_t n = pages - pg < BATCH ? pages - pg : BATCH;
            if (pread(fd, buf, n * PAGE, pg * PAGE) != (ssize_t)(n * PAGE))
                die("pread");
            writev_all(p[1], iov, batch_iov(iov, hdr, buf, n));
        }
    } else {
        int view = !strcmp(mode, "view"), fault = !strcmp(mode, "fault");
        int maponly = !strcmp(mode, "maponly");
        if (!view && !fault && !maponly && !whole) {
            fprintf(stderr, "unknown mode %s\n", mode);
            return 2;
        }
        for (size_t pg = 0; pg < pages; pg += BATCH) {
            size_t n = pages - pg < BATCH ? pages - pg : BATCH;
            char *m = whole ? whole + pg * PAGE
                            : mmap(NULL, n * PAGE, PROT_READ,
                                   MAP_SHARED | (fault ? 0 : MAP_POPULATE), fd, pg * PAGE);
            if (m == MAP_FAILED)
                die("mmap");
            if (!maponly)
                writev_all(p[1], iov, batch_iov(iov, hdr, m, n));
            if (!whole)
                munmap(m, n * PAGE);
        }
    }
    close(p[1]);
    getrusage(RUSAGE_SELF, &r1);
    int status;
    waitpid(reader, &status, 0);
    double wall = now() - t0;
    getrusage(RUSAGE_CHILDREN, &rc);
    printf("%-9s %5.2f GiB/s  writer %4.0f ms  reader %4.0f ms\n", mode,
           size / 1073741824.0 / wall, (cpu_s(&r1) - cpu_s(&r0)) * 1e3, cpu_s(&rc) * 1e3);
    return 0;
}
