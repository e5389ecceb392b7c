/*
 * pyxl-spawner: starts pyxl's child processes so that pyxl's loop never waits
 * for one to exec.
 *
 * Why: fork+exec from the loop (subprocess, posix_spawn: vfork semantics)
 * sleeps until the child has exec'd.  With the CPUs busy (16 helpers on 2
 * CPUs) the child waits for a CPU first, and the loop sleeps for tens of ms,
 * then waits again for a CPU to wake up on.  Here the loop only sends a
 * request; this process does the waiting.
 *
 * The children are the *caller's* children, not ours: clone(CLONE_PARENT)
 * makes the new process a sibling of this one, so pyxl waits for it, gets
 * its exit status and its SIGCHLD (left at its default), exactly as if it had
 * forked it.  We never have a child to reap.
 *
 * One request (a SOCK_SEQPACKET message on fd 0):
 *   SCM_RIGHTS: [reply socket, fd for target 0, fd for target 1, ...]
 *   bytes:      "PXS1" u32 flags u32 nfds i32 target[nfds] i32 nice u32 masklen
 *               u8 cpumask[masklen] u32 argc u32 envc
 *               then NUL-terminated: path, cwd ("" = stay), argv[argc], env[envc]
 *   flags:      1 = the child leads a new process group (Ctrl-C is the caller's)
 *               2 = the child leads a new session (setsid: a daemon, as libxl's QEMU)
 *   nice, cpumask: the caller's, at the request (a child of a fork would
 *               inherit them; ours would inherit this process's instead);
 *               the policy is never a real-time one (see child())
 * The reply (on the reply socket, which is then closed):
 *   bytes:      i32 pid (-1: none), i32 errno (0: exec'd), u32 stage
 *   SCM_RIGHTS: [pidfd of the child] when pid >= 0
 * stage says which step failed: 1 the request, 2 clone, 3 fds, 4 chdir, 5 exec.
 * A child whose exec failed has exited with status 127 (the caller reaps it).
 * Every fd of the child that is not a target is closed; 0-2 default to
 * /dev/null.  Requests are taken while earlier children have yet to exec;
 * each is answered once its child has.  EOF on fd 0 (the caller closed it
 * or died): we answer what is in flight and exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif

#define MAX_MSG   (256 * 1024)
#define MAX_FDS   16           /* the reply socket + 15 targets */
#define MAX_TARGET 1000         /* targets are small fd numbers */
#define MAX_MASK  1024          /* bytes of CPU mask: 8192 CPUs */

enum { ST_OK, ST_REQUEST, ST_CLONE, ST_FDS, ST_CHDIR, ST_EXEC };

struct request {
    uint32_t flags, nfds, argc, envc, masklen;
    int32_t target[MAX_FDS], nice;
    const unsigned char *mask;
    int fds[MAX_FDS];           /* fds[0]: reply socket */
    int nrecv;
    const char *path, *cwd;
    char **argv, **envp;
};

static char msg[MAX_MSG + 1];

static int recv_request(struct request *rq, ssize_t *len)
{
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)]; } ctl;
    struct iovec iov = { msg, MAX_MSG };
    struct msghdr mh = { 0 };
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl.buf;
    mh.msg_controllen = sizeof(ctl.buf);
    ssize_t n;
    rq->nrecv = 0;
    do
        n = recvmsg(0, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -1;
    *len = n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (int i = 0; i < k && rq->nrecv < MAX_FDS; i++)
            memcpy(&rq->fds[rq->nrecv++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    if (n == 0 && rq->nrecv == 0)
        return -1;              /* EOF (an empty request with fds is malformed, not EOF) */
    if (n == 0 || mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
        return 1;               /* malformed: answered if a reply socket came */
    return 0;
}

static const char *take_str(char **p, char *end)
{
    char *s = *p, *z = memchr(s, 0, end - s);
    if (!z)
        return NULL;
    *p = z + 1;
    return s;
}

static int parse(struct request *rq, ssize_t len)
{
    char *p = msg, *end = msg + len;
    uint32_t hdr[3];
    if (len < 16 || memcmp(p, "PXS1", 4))
        return -1;
    memcpy(hdr, p + 4, 8);
    rq->flags = hdr[0];
    rq->nfds = hdr[1];
    p += 12;
    if (rq->nfds + 1 != (uint32_t)rq->nrecv || rq->nfds >= MAX_FDS)
        return -1;
    if (end - p < (ssize_t)(4 * rq->nfds + 8))
        return -1;
    memcpy(rq->target, p, 4 * rq->nfds);
    p += 4 * rq->nfds;
    for (uint32_t i = 0; i < rq->nfds; i++)
        if (rq->target[i] < 0 || rq->target[i] >= MAX_TARGET)
            return -1;
    memcpy(&rq->nice, p, 4);
    memcpy(&rq->masklen, p + 4, 4);
    p += 8;
    if (rq->masklen > MAX_MASK || end - p < (ssize_t)rq->masklen + 8)
        return -1;
    rq->mask = (const unsigned char *)p;
    p += rq->masklen;
    memcpy(&rq->argc, p, 4);
    memcpy(&rq->envc, p + 4, 4);
    p += 8;
    if (rq->argc < 1 || rq->argc > 4096 || rq->envc > 4096)
        return -1;
    if (!(rq->path = take_str(&p, end)) || !(rq->cwd = take_str(&p, end)))
        return -1;
    rq->argv = calloc(rq->argc + 1, sizeof(char *));
    rq->envp = calloc(rq->envc + 1, sizeof(char *));
    if (!rq->argv || !rq->envp)
        return -1;
    for (uint32_t i = 0; i < rq->argc; i++)
        if (!(rq->argv[i] = (char *)take_str(&p, end)))
            return -1;
    for (uint32_t i = 0; i < rq->envc; i++)
        if (!(rq->envp[i] = (char *)take_str(&p, end)))
            return -1;
    return p == end ? 0 : -1;
}

static void report(int fd, int stage)
{
    int32_t v[2] = { errno, stage };
    ssize_t unused = write(fd, v, sizeof(v));
    (void)unused;
    _exit(127);
}

/* In the child (a copy of us, sharing nothing): install the fds, exec.
 * Nothing here uses a fixed high fd number: RLIMIT_NOFILE may be 1024. */
static void child(struct request *rq, int status)
{
    int keep[MAX_FDS + 2], nkeep = 0, null = -1, top = 2;
    if (rq->flags & 2)
        setsid();
    else if (rq->flags & 1)
        setpgid(0, 0);
    /* Best effort, as a fork would have them: a lower nice than ours needs
     * privileges the caller may have and we may not. */
    if (rq->masklen) {
        cpu_set_t set;
        CPU_ZERO(&set);
        memcpy(&set, rq->mask, rq->masklen < sizeof(set) ? rq->masklen : sizeof(set));
        sched_setaffinity(0, sizeof(set), &set);
    }
    if (getpriority(PRIO_PROCESS, 0) != rq->nice)
        setpriority(PRIO_PROCESS, 0, rq->nice);
    /* Never a real-time policy, unlike a fork: an application may give its
     * loop thread SCHED_FIFO so that nothing preempts it (and so this process
     * may have it too), but a helper is bulk, CPU-bound work that would then
     * starve the host.  Leaving a real-time policy needs no privilege. */
    int policy = sched_getscheduler(0) & ~SCHED_RESET_ON_FORK;
    if (policy == SCHED_FIFO || policy == SCHED_RR) {
        struct sched_param normal = { .sched_priority = 0 };
        sched_setscheduler(0, SCHED_OTHER, &normal);
    }
    for (uint32_t i = 0; i < rq->nfds; i++)
        if (rq->target[i] > top)
            top = rq->target[i];
    /* The report pipe and every source go above the highest target first,
     * then each source is put in place (dup2 clears CLOEXEC on the target). */
    int high = fcntl(status, F_DUPFD_CLOEXEC, top + 1);
    if (high < 0)
        report(status, ST_FDS);     /* a target at the fd limit: said, not a silent 127 */
    status = high;
    for (uint32_t i = 0; i < rq->nfds; i++) {
        int hi = fcntl(rq->fds[i + 1], F_DUPFD_CLOEXEC, top + 1);
        if (hi < 0)
            report(status, ST_FDS);
        rq->fds[i + 1] = hi;
    }
    for (uint32_t i = 0; i < rq->nfds; i++)
        if (dup2(rq->fds[i + 1], rq->target[i]) < 0)
            report(status, ST_FDS);
    for (int t = 0; t < 3; t++) {
        int given = 0;
        for (uint32_t i = 0; i < rq->nfds; i++)
            given |= rq->target[i] == t;
        if (given)
            continue;
        if (null < 0 && (null = open("/dev/null", O_RDWR | O_CLOEXEC)) < 0)
            report(status, ST_FDS);
        if (dup2(null, t) < 0)
            report(status, ST_FDS);
    }
    /* Close everything else: keep 0-2, the targets and the report pipe
     * (CLOEXEC: it closes at the exec).  The keep list is sorted first. */
    keep[nkeep++] = 2;
    for (uint32_t i = 0; i < rq->nfds; i++)
        if (rq->target[i] > 2)
            keep[nkeep++] = rq->target[i];
    keep[nkeep++] = status;
    for (int i = 1; i < nkeep; i++)
        for (int j = i; j > 0 && keep[j - 1] > keep[j]; j--) {
            int t = keep[j]; keep[j] = keep[j - 1]; keep[j - 1] = t;
        }
    for (int i = 0; i < nkeep; i++) {
        unsigned lo = keep[i] + 1;
        unsigned hi = i + 1 < nkeep ? (unsigned)keep[i + 1] - 1 : ~0U;
        if (lo <= hi && syscall(SYS_close_range, lo, hi, 0) < 0) {
            /* No close_range (before Linux 5.9, or a seccomp filter): one by one. */
            long max = sysconf(_SC_OPEN_MAX);
            for (unsigned fd = lo; fd <= hi && (long)fd < max; fd++)
                close((int)fd);
        }
    }
    if (rq->cwd[0] && chdir(rq->cwd) < 0)
        report(status, ST_CHDIR);
    execve(rq->path, rq->argv, rq->envp);
    report(status, ST_EXEC);
}

static void reply(int sock, int32_t pid, int32_t err, uint32_t stage, int pidfd)
{
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } ctl;
    int32_t body[3] = { pid, err, (int32_t)stage };
    struct iovec iov = { body, sizeof(body) };
    struct msghdr mh = { 0 };
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (pidfd >= 0) {
        memset(&ctl, 0, sizeof(ctl));
        mh.msg_control = ctl.buf;
        mh.msg_controllen = sizeof(ctl.buf);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &pidfd, sizeof(int));
    }
    /* The caller may have gone (cancelled): no SIGPIPE, nothing to do. */
    while (sendmsg(sock, &mh, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
}

/* Children started and not yet exec'd: their reply is sent once their exec
 * report pipe says how it went, while further requests are taken meanwhile
 * (with the CPUs busy, a child may wait a while for one to exec on). */
#define MAX_INFLIGHT 64
struct inflight { int status, sock, pidfd; int32_t pid; };
static struct inflight inflight[MAX_INFLIGHT];
static int ninflight;

/* Start the request's child; its reply socket is kept in `inflight`. */
static void serve(struct request *rq, int malformed, ssize_t len)
{
    int sock = rq->nrecv > 0 ? rq->fds[0] : -1;
    if (malformed || parse(rq, len) < 0) {
        if (sock >= 0)
            reply(sock, -1, EINVAL, ST_REQUEST, -1);
        return;
    }
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        reply(sock, -1, errno, ST_CLONE, -1);
        return;
    }
    int pidfd = -1;
    /* fork semantics (no CLONE_VM, no stack), but the child is our parent's. */
    long pid = syscall(SYS_clone, CLONE_PARENT | CLONE_PIDFD, 0, &pidfd, 0, 0);
    if (pid == 0) {
        close(pipefd[0]);
        child(rq, pipefd[1]);
    }
    int err = pid < 0 ? errno : 0;
    close(pipefd[1]);
    if (pid < 0) {
        close(pipefd[0]);
        reply(sock, -1, err, ST_CLONE, -1);
        return;
    }
    struct inflight *f = &inflight[ninflight++];
    f->status = pipefd[0];
    f->sock = fcntl(sock, F_DUPFD_CLOEXEC, 0);   /* the request's own copy is closed by the caller */
    f->pidfd = pidfd;
    f->pid = (int32_t)pid;
}

/* A child's exec report pipe is readable: EOF (exec'd: the pipe was CLOEXEC)
 * or its errno; answer, and forget it. */
static void settle(int i)
{
    struct inflight *f = &inflight[i];
    int32_t v[2] = { 0, ST_OK };
    ssize_t n;
    do
        n = read(f->status, v, sizeof(v));
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof(v))
        v[0] = 0, v[1] = ST_OK;
    reply(f->sock, f->pid, v[0], (uint32_t)v[1], f->pidfd);
    close(f->status);
    close(f->sock);
    close(f->pidfd);
    inflight[i] = inflight[--ninflight];
}

int main(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int open_for_requests = 1;
    while (open_for_requests || ninflight) {
        struct pollfd pfd[MAX_INFLIGHT + 1];
        int n = 0, first = 0;
        if (open_for_requests && ninflight < MAX_INFLIGHT) {
            pfd[n++] = (struct pollfd){ .fd = 0, .events = POLLIN };
            first = 1;
        }
        for (int i = 0; i < ninflight; i++)
            pfd[n++] = (struct pollfd){ .fd = inflight[i].status, .events = POLLIN };
        if (poll(pfd, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        /* Settle from the last: settle() moves the last entry into the hole. */
        for (int i = n - 1; i >= first; i--)
            if (pfd[i].revents)
                settle(i - first);
        if (first && pfd[0].revents) {
            struct request rq;
            ssize_t len = 0;
            memset(&rq, 0, sizeof(rq));
            int r = recv_request(&rq, &len);
            if (r < 0 && rq.nrecv == 0) {
                open_for_requests = 0;  /* EOF: the caller is gone or done */
                continue;
            }
            serve(&rq, r != 0, len);
            for (int i = 0; i < rq.nrecv; i++)
                close(rq.fds[i]);
            free(rq.argv);
            free(rq.envp);
        }
    }
    return 0;
}
