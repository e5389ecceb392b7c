/*
 * pyxl-finisher: puts a saved image in place, off pyxl's loop.
 *
 *   pyxl-finisher follow TMP DEST DIR       flush TMP while it grows; stdin
 *                                           "commit\n": fsync TMP, rename it
 *                                           to DEST, fsync DIR; stdin EOF (or
 *                                           anything else): abandoned, exit
 *                                           without touching anything
 *   pyxl-finisher finish TMP DEST DIR SYNC  rename TMP to DEST; SYNC "1":
 *                                           fsync TMP before, DIR after
 *
 * Why a program of its own: fsync and the rename over an old image block for
 * as long as the disk takes (tens of ms), so pyxl's loop runs them in a child
 * (pyxl/childproc.py).  Each save has one, all of them starting together
 * with the saves: as a Python interpreter each cost about 19 ms of CPU, taken
 * from the same CPUs as the loop's; this costs well under one.
 *
 * follow: every 10 ms (or when stdin says something), each new 8 MiB of TMP
 * gets its writeback started (sync_file_range WRITE) and the chunk before it
 * is waited for, so the disk writes while the save does and the dirty pages
 * stay bounded.  The parent closes the file's writer before "commit": fsync
 * flushes the inode's pages whoever wrote them.
 *
 * Errors: one line on stderr, "STEP: strerror", exit status 1.  Success ends
 * with "\nok\n" on stderr (an application that set SIGCHLD to SIG_IGN leaves
 * the parent no exit status to read: success is said, not assumed).  Bad
 * arguments: a usage line, status 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK      (8LL << 20)
#define POLL_MS    10

static const char *step_what;
static const char *step_arg;

static void fail(void)
{
    int err = errno;
    fprintf(stderr, "%s%s: %s\n", step_what, step_arg, strerror(err));
    exit(1);
}

static void step(const char *what, const char *arg)
{
    step_what = what;
    step_arg = arg;
}

static void fsync_path(const char *path, int flags)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | flags);
    if (fd < 0 || fsync(fd) != 0)
        fail();
    close(fd);
}

/* The rename, the directory's fsync, then success. */
static int place(const char *tmp, const char *dest, const char *dir, int sync)
{
    step("rename to ", dest);
    if (rename(tmp, dest) != 0)
        fail();
    if (sync) {
        step("fsync of directory ", dir);
        fsync_path(dir, O_DIRECTORY);
    }
    fputs("\nok\n", stderr);
    return 0;
}

/* stdin's word: 1 commit, 0 nothing yet, -1 abandoned (EOF, or anything else). */
static int heard(int timeout_ms)
{
    struct pollfd p = { .fd = 0, .events = POLLIN };
    int n = poll(&p, 1, timeout_ms);
    if (n < 0)
        return errno == EINTR ? 0 : -1;
    if (n == 0)
        return 0;
    char buf[64];
    ssize_t got = read(0, buf, sizeof(buf));
    if (got < 0 && (errno == EINTR || errno == EAGAIN))
        return 0;
    return got == 7 && memcmp(buf, "commit\n", 7) == 0 ? 1 : -1;
}

static int follow(const char *tmp, const char *dest, const char *dir)
{
    step("open ", tmp);
    int fd = open(tmp, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail();
    long long started = 0, waited = 0;
    int commit = 0;
    step("writeback of ", tmp);
    while (!commit) {
        int word = heard(POLL_MS);
        if (word < 0)
            return 0;               /* abandoned: the parent removes the file */
        commit = word;
        struct stat st;
        if (fstat(fd, &st) != 0)
            fail();
        while (st.st_size - started >= CHUNK) {
            if (sync_file_range(fd, started, CHUNK, SYNC_FILE_RANGE_WRITE) != 0)
                fail();
            if (waited < started) {
                if (sync_file_range(fd, waited, started - waited,
                                    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                    SYNC_FILE_RANGE_WAIT_AFTER) != 0)
                    fail();
                waited = started;
            }
            started += CHUNK;
        }
    }
    step("fsync ", tmp);
    if (fsync(fd) != 0)
        fail();
    close(fd);
    return place(tmp, dest, dir, 1);
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "follow") == 0)
        return follow(argv[2], argv[3], argv[4]);
    if (argc == 6 && strcmp(argv[1], "finish") == 0 &&
        (strcmp(argv[5], "0") == 0 || strcmp(argv[5], "1") == 0)) {
        int sync = argv[5][0] == '1';
        if (sync) {
            step("fsync ", argv[2]);
            fsync_path(argv[2], 0);
        }
        return place(argv[2], argv[3], argv[4], sync);
    }
    fputs("usage: pyxl-finisher follow TMP DEST DIR | finish TMP DEST DIR 0|1\n", stderr);
    return 2;
}
