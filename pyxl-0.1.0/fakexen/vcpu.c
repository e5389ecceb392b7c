/*
 * pyxl-sim-vcpu -- the vCPU of a simulated guest (one process, one thread).
 *
 *   pyxl-sim-vcpu run DOMDIR [--foreground]   run the guest (detached by default)
 *   pyxl-sim-vcpu init DOMDIR [PROFILE SEED]  stamp every RAM page, generation 0,
 *                                             or fill it from a content profile
 *   pyxl-sim-vcpu check DOMDIR                verify the guest pattern, print JSON
 *   pyxl-sim-vcpu layout                      print the control-block layout as JSON
 *
 * The guest writes whole RAM pages at dirty_rate bytes/s (scaled by the
 * scheduler cap, fx_ctl.cpu_cap, when one is set), touring RAM in pfn
 * order.  Each page carries its pfn and a generation (the lap) in its head
 * and tail, and a body derived from both, so a lost, stale, torn or misplaced
 * page shows.  All guest state (lap, cursor, counters) lives in guest memory
 * (simctl.h: struct fx_guest_state at FX_GUEST_STATE_PFN), so a vCPU started
 * on a restored domain continues where the source stopped.
 *
 * Dirty logging: after a page's data stores, the page's bit is OR'ed into the
 * shared dirty bitmap with release ordering; always, whether or not log-dirty
 * mode is on.  The hypervisor's ENABLE_LOGDIRTY clears the bitmap and CLEAN
 * exchanges words with 0, which makes tracking race-free without the guest
 * ever reading the log-dirty flag.
 *
 * Control: fx_ctl.req/req_seq carry requests (run, pause, suspend, exit); the
 * vCPU checks them between pages, acts, and sets ack_seq.  On suspend it
 * finishes the page in hand, records shutdown reason "suspend", sets the
 * domain state to suspended and exits.  `run` daemonizes (double fork +
 * setsid), so whoever starts it never gets a child or a zombie; it holds an
 * flock on DOMDIR/vcpu.lock for its lifetime and exits by itself when its
 * domain is destroyed or its directory disappears.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "simctl.h"

#define SHUTDOWN_suspend 2
#define HVM_CTX_CPU      2
#define HVM_CPU_RIP_OFF  640   /* offset of rip in the CPU save record */

struct dom {
    char dir[PATH_MAX];
    int ctlfd, memfd;
    struct fx_ctl *ctl;
    size_t ctl_size;
    uint64_t *mem;             /* whole guest-physical space */
    uint64_t *populated, *dirty;
    uint64_t nr_pfns;
    ino_t ctl_ino;
};

static int g_report_fd = -1;   /* startup errors go back to the launching process */

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if (n >= (int)sizeof(buf))
        n = sizeof(buf) - 1;
    ssize_t r;
    if (g_report_fd >= 0)
        r = write(g_report_fd, buf, n);
    r = write(2, "pyxl-sim-vcpu: ", 15);
    r = write(2, buf, n);
    r = write(2, "\n", 1);
    (void)r;
    exit(1);
}

static void dom_open(struct dom *d, const char *dir)
{
    char path[PATH_MAX + 16];
    struct stat st;
    memset(d, 0, sizeof(*d));
    snprintf(d->dir, sizeof(d->dir), "%s", dir);
    snprintf(path, sizeof(path), "%s/ctl", dir);
    d->ctlfd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (d->ctlfd < 0)
        die("%s: %s", path, strerror(errno));
    if (fstat(d->ctlfd, &st) < 0 || st.st_size < (off_t)FX_BITMAPS_OFF)
        die("%s: not a simulated domain", path);
    d->ctl_ino = st.st_ino;
    d->ctl_size = st.st_size;
    d->ctl = mmap(NULL, d->ctl_size, PROT_READ | PROT_WRITE, MAP_SHARED, d->ctlfd, 0);
    if (d->ctl == MAP_FAILED)
        die("mmap %s: %s", path, strerror(errno));
    struct fx_ctl *c = d->ctl;
    d->nr_pfns = c->nr_pfns;
    if (c->magic != FX_CTL_MAGIC || c->version != FX_CTL_VERSION || c->ctl_size != d->ctl_size ||
        d->nr_pfns % FX_PFN_ALIGN || c->dirty_off + d->nr_pfns / 8 > d->ctl_size)
        die("%s: not a simulated domain (bad magic, version or size)", path);
    d->populated = (uint64_t *)((char *)c + c->populated_off);
    d->dirty = (uint64_t *)((char *)c + c->dirty_off);
    snprintf(path, sizeof(path), "%s/mem", dir);
    d->memfd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (d->memfd < 0)
        die("%s: %s", path, strerror(errno));
    d->mem = mmap(NULL, d->nr_pfns * FX_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
                  d->memfd, 0);
    if (d->mem == MAP_FAILED)
        die("mmap %s: %s", path, strerror(errno));
}

static inline int populated(const struct dom *d, uint64_t pfn)
{
    return pfn < d->nr_pfns &&
           ((__atomic_load_n(&d->populated[pfn / 64], __ATOMIC_RELAXED) >> (pfn % 64)) & 1);
}

/* The first guest-RAM pfn >= from, or UINT64_MAX. */
static uint64_t next_ram(const struct dom *d, uint64_t from)
{
    uint64_t pfn = from;
    while (pfn < d->nr_pfns) {
        if (!fx_is_guest_ram(pfn)) {
            pfn = pfn == FX_GUEST_STATE_PFN ? pfn + 1 : FX_HIGHMEM_START;
            continue;
        }
        uint64_t w = __atomic_load_n(&d->populated[pfn / 64], __ATOMIC_RELAXED) >> (pfn % 64);
        if (!w) {
            pfn = (pfn | 63) + 1;
            continue;
        }
        pfn += __builtin_ctzll(w);
        if (pfn < d->nr_pfns && fx_is_guest_ram(pfn))
            return pfn;
    }
    return UINT64_MAX;
}

static inline void mark_dirty(struct dom *d, uint64_t pfn)
{
    __atomic_fetch_or(&d->dirty[pfn / 64], 1ULL << (pfn % 64), __ATOMIC_RELEASE);
}

static void write_page(struct dom *d, uint64_t pfn, uint64_t gen)
{
    uint64_t *w = d->mem + pfn * FX_WORDS_PER_PAGE;
    w[0] = FX_PAGE_MAGIC;
    w[1] = pfn;
    w[2] = gen;
    for (unsigned i = 3; i < FX_WORDS_PER_PAGE - 3; i++)
        w[i] = fx_body_word(pfn, gen, i);
    w[509] = gen;
    w[510] = pfn;
    w[511] = FX_PAGE_MAGIC_TAIL;
}

static struct fx_guest_state *guest_state(struct dom *d)
{
    if (!populated(d, FX_GUEST_STATE_PFN))
        die("%s: guest state page (pfn %#lx) is not populated", d->dir, FX_GUEST_STATE_PFN);
    return (struct fx_guest_state *)(d->mem + FX_GUEST_STATE_PFN * FX_WORDS_PER_PAGE);
}

static uint64_t count_ram(const struct dom *d)
{
    uint64_t n = 0;
    for (uint64_t p = next_ram(d, 0); p != UINT64_MAX; p = next_ram(d, p + 1))
        n++;
    return n;
}

/* ---- init --------------------------------------------------------------- */

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Prefault the populated runs writable in one go: a fault per page is the slow part. */
static void prefault_ram(struct dom *d)
{
    uint64_t pfn = 0;
    while (pfn < d->nr_pfns) {
        if (!populated(d, pfn)) {
            pfn++;
            continue;
        }
        uint64_t end = pfn + 1;
        while (end < d->nr_pfns && populated(d, end))
            end++;
        madvise((char *)d->mem + pfn * FX_PAGE_SIZE, (end - pfn) * FX_PAGE_SIZE,
                MADV_POPULATE_WRITE);   /* best effort: older kernels fault as usual */
        pfn = end;
    }
}

/*
 * Content profiles: realistic guest memory for measuring compression.  Every
 * page's content is a function of (seed, pfn) alone, so two guests created
 * with the same seed hold the same bytes and digests are reproducible.
 *   zero     every page zero;
 *   text     words of a 512-word pseudo-vocabulary, spaces and newlines:
 *            about 3x compressible with zlib level 6 (measured 3.06);
 *   random   splitmix64 output: incompressible;
 *   typical  per page: 50 % zero, 30 % text, 20 % random.
 * The stamped pattern (the default, no profile) is what `check` verifies;
 * profile pages are not stamped, so `check` counts them as torn/unstamped
 * until the vCPU has rewritten them.
 */
enum { PROF_STAMP, PROF_ZERO, PROF_TEXT, PROF_RANDOM, PROF_TYPICAL };

static inline uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#define VOCAB 512
static char g_vocab[VOCAB][10];
static unsigned char g_vocab_len[VOCAB];

static void make_vocab(void)
{
    uint64_t s = 12345;
    for (unsigned i = 0; i < VOCAB; i++) {
        uint64_t r = splitmix64(&s);
        unsigned n = 2 + r % 8;
        for (unsigned k = 0; k < n; k++)
            g_vocab[i][k] = (char)('a' + (r >> (8 + 5 * k)) % 26);
        g_vocab_len[i] = (unsigned char)n;
    }
}

static void fill_text(unsigned char *pg, uint64_t s)
{
    size_t pos = 0;
    while (pos < FX_PAGE_SIZE) {
        uint64_t r = splitmix64(&s);
        for (unsigned k = 0; k < 4 && pos < FX_PAGE_SIZE; k++) {
            unsigned x = (unsigned)(r >> (16 * k)) & 0xffff;
            const char *w = g_vocab[x % VOCAB];
            for (unsigned c = 0; c < g_vocab_len[x % VOCAB] && pos < FX_PAGE_SIZE; c++)
                pg[pos++] = (unsigned char)w[c];
            if (pos < FX_PAGE_SIZE)
                pg[pos++] = (x >> 12) == 0 ? '\n' : ' ';
        }
    }
}

static void fill_page(struct dom *d, uint64_t pfn, int profile, uint64_t seed)
{
    unsigned char *pg = (unsigned char *)(d->mem + pfn * FX_WORDS_PER_PAGE);
    uint64_t s = seed ^ (pfn * 0xd1b54a32d192ed03ULL);
    if (profile == PROF_TYPICAL) {
        uint64_t pick = splitmix64(&s) % 100;
        profile = pick < 50 ? PROF_ZERO : pick < 80 ? PROF_TEXT : PROF_RANDOM;
    }
    if (profile == PROF_ZERO) {
        memset(pg, 0, FX_PAGE_SIZE);
    } else if (profile == PROF_TEXT) {
        fill_text(pg, splitmix64(&s));
    } else {
        uint64_t *w = (uint64_t *)pg;
        for (unsigned i = 0; i < FX_WORDS_PER_PAGE; i++)
            w[i] = splitmix64(&s);
    }
}

static int parse_profile(const char *name)
{
    static const char *const names[] = {"stamp", "zero", "text", "random", "typical"};
    for (int i = 0; i < 5; i++)
        if (!strcmp(name, names[i]))
            return i;
    die("unknown content profile %s (stamp, zero, text, random, typical)", name);
}

static int cmd_init(const char *dir, int profile, uint64_t seed)
{
    struct dom d;
    dom_open(&d, dir);
    struct fx_guest_state *gs = guest_state(&d);
    prefault_ram(&d);
    if (profile == PROF_TEXT || profile == PROF_TYPICAL)
        make_vocab();
    uint64_t n = 0, first = next_ram(&d, 0);
    for (uint64_t p = first; p != UINT64_MAX; p = next_ram(&d, p + 1)) {
        if (profile == PROF_STAMP)
            write_page(&d, p, 0);
        else
            fill_page(&d, p, profile, seed);
        n++;
    }
    memset(gs, 0, FX_PAGE_SIZE);
    gs->lap = 1;
    gs->cursor = first == UINT64_MAX ? 0 : first;
    gs->ram_pages = n;
    gs->magic = FX_GUEST_MAGIC;
    printf("{\"ram_pages\": %" PRIu64 "}\n", n);
    return 0;
}

/* ---- check -------------------------------------------------------------- */

static uint64_t ctx_rip(struct dom *d)
{
    const uint8_t *b = (const uint8_t *)d->ctl + FX_HVMCTX_OFF;
    uint32_t len = d->ctl->hvmctx_len, pos = 0;
    if (len > FX_HVMCTX_MAX)
        return UINT64_MAX;
    while (pos + 8 <= len) {
        uint16_t type = *(const uint16_t *)(b + pos);
        uint16_t inst = *(const uint16_t *)(b + pos + 2);
        uint32_t rlen = *(const uint32_t *)(b + pos + 4);
        pos += 8;
        if (type == 0 || rlen > len - pos)
            break;
        if (type == HVM_CTX_CPU && inst == 0 && rlen >= HVM_CPU_RIP_OFF + 8)
            return *(const uint64_t *)(b + pos + HVM_CPU_RIP_OFF);
        pos += rlen;
    }
    return UINT64_MAX;
}

static void set_ctx_rip(struct dom *d, uint64_t rip)
{
    uint8_t *b = (uint8_t *)d->ctl + FX_HVMCTX_OFF;
    uint32_t len = d->ctl->hvmctx_len, pos = 0;
    if (len > FX_HVMCTX_MAX)
        return;
    while (pos + 8 <= len) {
        uint16_t type = *(uint16_t *)(b + pos);
        uint16_t inst = *(uint16_t *)(b + pos + 2);
        uint32_t rlen = *(uint32_t *)(b + pos + 4);
        pos += 8;
        if (type == 0 || rlen > len - pos)
            break;
        if (type == HVM_CTX_CPU && inst == 0 && rlen >= HVM_CPU_RIP_OFF + 8) {
            *(uint64_t *)(b + pos + HVM_CPU_RIP_OFF) = rip;
            return;
        }
        pos += rlen;
    }
}

static int cmd_check(const char *dir)
{
    struct dom d;
    dom_open(&d, dir);
    struct fx_guest_state *gs = guest_state(&d);
    uint64_t checked = 0, ok = 0, torn = 0, stale = 0, foreign = 0, unstamped = 0;
    uint64_t special_nonzero = 0, first_bad = UINT64_MAX, min_gen = UINT64_MAX, max_gen = 0;
    int have_state = gs->magic == FX_GUEST_MAGIC;
    for (uint64_t p = next_ram(&d, 0); p != UINT64_MAX; p = next_ram(&d, p + 1)) {
        const uint64_t *w = d.mem + p * FX_WORDS_PER_PAGE;
        checked++;
        int bad = 0;
        if (w[0] != FX_PAGE_MAGIC) {
            int zero = 1;
            for (unsigned i = 0; i < FX_WORDS_PER_PAGE && zero; i++)
                zero = !w[i];
            if (zero)
                unstamped++;
            else
                torn++;
            bad = 1;
        } else if (w[1] != p) {
            foreign++;
            bad = 1;
        } else {
            uint64_t gen = w[2];
            int intact = w[509] == gen && w[510] == p && w[511] == FX_PAGE_MAGIC_TAIL;
            for (unsigned i = 3; i < FX_WORDS_PER_PAGE - 3 && intact; i++)
                intact = w[i] == fx_body_word(p, gen, i);
            if (!intact) {
                torn++;
                bad = 1;
            } else {
                if (gen < min_gen)
                    min_gen = gen;
                if (gen > max_gen)
                    max_gen = gen;
                uint64_t want = p < gs->cursor ? gs->lap : gs->lap - 1;
                if (have_state && gen != want) {
                    stale++;
                    bad = 1;
                }
            }
        }
        if (bad && first_bad == UINT64_MAX)
            first_bad = p;
        ok += !bad;
    }
    for (uint64_t p = FX_SPECIAL_START; p < FX_SPECIAL_END && p < d.nr_pfns; p++) {
        if (!populated(&d, p))
            continue;
        const uint64_t *w = d.mem + p * FX_WORDS_PER_PAGE;
        for (unsigned i = 0; i < FX_WORDS_PER_PAGE; i++)
            if (w[i]) {
                special_nonzero++;
                break;
            }
    }
    uint64_t rip = ctx_rip(&d);
    printf("{\"state_valid\": %s, \"lap\": %" PRIu64 ", \"cursor\": %" PRIu64
           ", \"pages_written\": %" PRIu64 ", \"boots\": %" PRIu64 ", \"ram_pages\": %" PRIu64
           ", \"checked\": %" PRIu64 ", \"ok\": %" PRIu64 ", \"torn\": %" PRIu64
           ", \"stale\": %" PRIu64 ", \"foreign\": %" PRIu64 ", \"unstamped\": %" PRIu64
           ", \"special_nonzero\": %" PRIu64 ", \"first_bad\": %" PRId64
           ", \"min_gen\": %" PRId64 ", \"max_gen\": %" PRIu64 ", \"ctx_rip\": %" PRId64 "}\n",
           have_state ? "true" : "false", gs->lap, gs->cursor, gs->pages_written, gs->boots,
           gs->ram_pages, checked, ok, torn, stale, foreign, unstamped, special_nonzero,
           first_bad == UINT64_MAX ? (int64_t)-1 : (int64_t)first_bad,
           min_gen == UINT64_MAX ? (int64_t)-1 : (int64_t)min_gen, max_gen,
           rip == UINT64_MAX ? (int64_t)-1 : (int64_t)rip);
    return 0;
}

/* ---- run ---------------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* Sleep until the controller bumps req_seq or `ns` pass. */
static void wait_request(struct dom *d, uint32_t seen, uint64_t ns)
{
    struct timespec ts = { .tv_sec = ns / 1000000000ULL, .tv_nsec = ns % 1000000000ULL };
    syscall(SYS_futex, &d->ctl->req_seq, FUTEX_WAIT, seen, &ts, NULL, 0);
}

static void ack(struct dom *d, uint32_t seq)
{
    __atomic_store_n(&d->ctl->ack_seq, seq, __ATOMIC_RELEASE);
    syscall(SYS_futex, &d->ctl->ack_seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static int still_ours(struct dom *d)
{
    char path[PATH_MAX + 16];
    struct stat st;
    snprintf(path, sizeof(path), "%s/ctl", d->dir);
    return stat(path, &st) == 0 && st.st_ino == d->ctl_ino;
}

static void daemonize(void)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        die("pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid > 0) {
        /* The launcher: report the vCPU's startup result, reap the middle child. */
        char buf[512];
        close(p[1]);
        ssize_t n, got = 0;
        while ((n = read(p[0], buf + got, sizeof(buf) - 1 - got)) > 0)
            got += n;
        buf[got > 0 ? got : 0] = 0;
        int st;
        waitpid(pid, &st, 0);
        if (got >= 2 && !strncmp(buf, "OK", 2))
            exit(0);
        fprintf(stderr, "pyxl-sim-vcpu: %s\n", got ? buf : "vCPU failed to start");
        exit(1);
    }
    close(p[0]);
    if (setsid() < 0)
        die("setsid: %s", strerror(errno));
    pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid > 0)
        _exit(0);
    g_report_fd = p[1];
}

static void detach_stdio(const char *dir)
{
    char path[PATH_MAX + 16];
    int null = open("/dev/null", O_RDWR);
    snprintf(path, sizeof(path), "%s/vcpu.log", dir);
    int log = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(log >= 0 ? log : null, 2);
        if (null > 2)
            close(null);
    }
    if (log > 2)
        close(log);
}

static int cmd_run(const char *dir, int foreground)
{
    char path[PATH_MAX + 16];
    if (!foreground)
        daemonize();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);

    snprintf(path, sizeof(path), "%s/vcpu.lock", dir);
    int lockfd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (lockfd < 0)
        die("%s: %s", path, strerror(errno));
    /* A vCPU that acknowledged a suspend or pause exits right after, but on a
     * loaded host its exit (and so the lock's release) can trail a resume
     * that follows at once (a Remus checkpoint): wait for it, briefly. */
    int tries = 0;
    while (flock(lockfd, LOCK_EX | LOCK_NB) < 0) {
        if (errno != EWOULDBLOCK || ++tries > 3000)
            die("%s: a vCPU is already running for this domain", dir);
        usleep(1000);
    }

    struct dom d;
    dom_open(&d, dir);
    struct fx_ctl *c = d.ctl;
    struct fx_guest_state *gs = guest_state(&d);
    uint32_t st = __atomic_load_n(&c->state, __ATOMIC_ACQUIRE);
    if (st == FX_DYING || st == FX_SUSPENDED)
        die("%s: domain is %s", dir, st == FX_DYING ? "dying" : "suspended");
    if (gs->magic != FX_GUEST_MAGIC) {
        /* Memory never stamped by `init` (e.g. a restored foreign image): start a tour. */
        uint64_t first = next_ram(&d, 0);
        memset(gs, 0, sizeof(*gs));
        gs->lap = 1;
        gs->cursor = first == UINT64_MAX ? 0 : first;
        gs->ram_pages = count_ram(&d);
        gs->magic = FX_GUEST_MAGIC;
    }
    gs->boots++;
    mark_dirty(&d, FX_GUEST_STATE_PFN);
    c->vcpu_pid = getpid();
    __atomic_fetch_add(&c->vcpu_starts, 1, __ATOMIC_RELAXED);

    uint32_t handled = __atomic_load_n(&c->req_seq, __ATOMIC_ACQUIRE);
    ack(&d, handled);
    if (!foreground)
        detach_stdio(dir);
    if (g_report_fd >= 0) {
        ssize_t r = write(g_report_fd, "OK", 2);
        (void)r;
        close(g_report_fd);
        g_report_fd = -1;
    }

    uint64_t next = now_ns(), last_check = next;
    for (;;) {
        uint32_t seq = __atomic_load_n(&c->req_seq, __ATOMIC_ACQUIRE);
        if (seq != handled) {
            uint32_t req = __atomic_load_n(&c->req, __ATOMIC_ACQUIRE);
            st = __atomic_load_n(&c->state, __ATOMIC_ACQUIRE);
            switch (req) {
            case FX_REQ_RUN:
                if (st == FX_PAUSED) {
                    __atomic_store_n(&c->state, FX_RUNNING, __ATOMIC_RELEASE);
                    next = now_ns();
                }
                break;
            case FX_REQ_PAUSE:
                if (st == FX_RUNNING) {
                    /* A paused vCPU's registers are what the context reports. */
                    set_ctx_rip(&d, gs->pages_written);
                    __atomic_store_n(&c->state, FX_PAUSED, __ATOMIC_RELEASE);
                }
                break;
            case FX_REQ_SUSPEND:
                if (st == FX_RUNNING || st == FX_PAUSED) {
                    /* What the guest's suspend path leaves behind: its state in the context. */
                    set_ctx_rip(&d, gs->pages_written);
                    c->shutdown_reason = SHUTDOWN_suspend;
                    __atomic_store_n(&c->state, FX_SUSPENDED, __ATOMIC_RELEASE);
                }
                c->vcpu_pid = 0;
                ack(&d, seq);
                return 0;
            case FX_REQ_EXIT:
                c->vcpu_pid = 0;
                ack(&d, seq);
                return 0;
            default:
                break;
            }
            handled = seq;
            ack(&d, seq);
            continue;
        }
        uint64_t now = now_ns();
        if (now - last_check > 1000000000ULL) {
            last_check = now;
            if (!still_ours(&d))
                return 0;   /* domain destroyed or state directory removed */
        }
        st = __atomic_load_n(&c->state, __ATOMIC_ACQUIRE);
        if (st == FX_DYING || st == FX_SUSPENDED)
            return 0;
        uint64_t rate = __atomic_load_n(&c->dirty_rate, __ATOMIC_RELAXED);
        if (st != FX_RUNNING || rate == 0 || !gs->ram_pages) {
            wait_request(&d, seq, 100000000ULL);
            next = now_ns();
            continue;
        }
        if (now < next) {
            uint64_t ns = next - now;
            wait_request(&d, seq, ns < 100000000ULL ? ns : 100000000ULL);
            continue;
        }
        /* A capped vCPU runs cap % of the time, so it writes proportionally fewer
         * pages: the dirty rate falls the way a real capped guest's does. */
        uint32_t cap = __atomic_load_n(&c->cpu_cap, __ATOMIC_RELAXED);
        double eff = cap ? (double)rate * (double)cap / 100.0 : (double)rate;
        if (eff < 1.0)
            eff = 1.0;
        uint64_t interval = (uint64_t)(FX_PAGE_SIZE * 1000000000.0 / eff);
        /* A burst of pages, but requests are honoured between any two pages. */
        for (unsigned n = 0; n < 256 && now >= next; n++) {
            uint64_t pfn = gs->cursor;
            if (!fx_is_guest_ram(pfn) || !populated(&d, pfn)) {
                pfn = next_ram(&d, pfn);
                if (pfn == UINT64_MAX) {
                    gs->lap++;
                    pfn = next_ram(&d, 0);
                    if (pfn == UINT64_MAX)
                        break;
                }
            }
            write_page(&d, pfn, gs->lap);
            mark_dirty(&d, pfn);
            uint64_t nxt = next_ram(&d, pfn + 1);
            if (nxt == UINT64_MAX) {
                gs->lap++;
                nxt = next_ram(&d, 0);
            }
            gs->cursor = nxt;
            gs->pages_written++;
            mark_dirty(&d, FX_GUEST_STATE_PFN);
            next += interval;
            if (__atomic_load_n(&c->req_seq, __ATOMIC_ACQUIRE) != seq)
                break;
            if ((n & 15) == 15)
                now = now_ns();
        }
        now = now_ns();
        if (now > next && now - next > 100000000ULL)
            next = now;   /* do not build up a backlog after a stall */
    }
}

/* ---- layout ------------------------------------------------------------- */

#define F(name) printf("  \"%s\": %zu,\n", #name, offsetof(struct fx_ctl, name))

static int cmd_layout(void)
{
    printf("{\n");
    F(magic); F(version); F(domid); F(nr_pfns); F(max_pages); F(tot_pages); F(max_gpfn);
    F(state); F(shutdown_reason); F(req); F(req_seq); F(ack_seq); F(vcpu_pid); F(dirty_rate);
    F(logdirty); F(hvm); F(mem_bytes); F(tsc); F(params); F(hvmctx_len); F(nr_leaves);
    F(nr_msrs); F(config_len); F(uuid); F(name); F(created_ns); F(populated_off); F(dirty_off);
    F(ctl_size); F(vcpu_starts); F(resume_paused); F(cpu_cap);
    printf("  \"sizeof_ctl\": %zu,\n", sizeof(struct fx_ctl));
    printf("  \"GNT_OFF\": %lu,\n  \"LEAVES_OFF\": %lu,\n  \"MSRS_OFF\": %lu,\n"
           "  \"CONFIG_OFF\": %lu,\n  \"CONFIG_MAX\": %lu,\n  \"HVMCTX_OFF\": %lu,\n"
           "  \"HVMCTX_MAX\": %lu,\n  \"BITMAPS_OFF\": %lu,\n  \"PFN_ALIGN\": %d,\n"
           "  \"CTL_MAGIC\": %llu,\n  \"CTL_VERSION\": %d,\n  \"GUEST_MAGIC\": %llu,\n"
           "  \"PAGE_MAGIC\": %llu,\n  \"PAGE_MAGIC_TAIL\": %llu,\n"
           "  \"guest_state\": {\"magic\": %zu, \"lap\": %zu, \"cursor\": %zu, "
           "\"pages_written\": %zu, \"boots\": %zu, \"ram_pages\": %zu}\n}\n",
           FX_GNT_OFF, FX_LEAVES_OFF, FX_MSRS_OFF, FX_CONFIG_OFF, FX_CONFIG_MAX, FX_HVMCTX_OFF,
           FX_HVMCTX_MAX, FX_BITMAPS_OFF, FX_PFN_ALIGN, FX_CTL_MAGIC, FX_CTL_VERSION,
           FX_GUEST_MAGIC, FX_PAGE_MAGIC, FX_PAGE_MAGIC_TAIL,
           offsetof(struct fx_guest_state, magic), offsetof(struct fx_guest_state, lap),
           offsetof(struct fx_guest_state, cursor), offsetof(struct fx_guest_state, pages_written),
           offsetof(struct fx_guest_state, boots), offsetof(struct fx_guest_state, ram_pages));
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: pyxl-sim-vcpu run DOMDIR [--foreground]\n"
                    "       pyxl-sim-vcpu init DOMDIR [PROFILE SEED]\n"
                    "       pyxl-sim-vcpu check DOMDIR\n"
                    "       pyxl-sim-vcpu layout\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "layout"))
        return cmd_layout();
    if (argc < 3)
        usage();
    if (!strcmp(argv[1], "run") && (argc == 3 || (argc == 4 && !strcmp(argv[3], "--foreground"))))
        return cmd_run(argv[2], argc == 4);
    if (argc == 3 && !strcmp(argv[1], "init"))
        return cmd_init(argv[2], PROF_STAMP, 0);
    if (argc == 5 && !strcmp(argv[1], "init"))
        return cmd_init(argv[2], parse_profile(argv[3]), strtoull(argv[4], NULL, 0));
    if (argc == 3 && !strcmp(argv[1], "check"))
        return cmd_check(argv[2]);
    usage();
}
