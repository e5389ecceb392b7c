/*
 * libfakexen.so -- a simulated Xen hypervisor for x86 HVM save/restore.
 *
 * LD_PRELOAD this library into a save/restore helper (Debian's
 * libxl-save-helper or pyxl's).  It replaces the three OS-interface
 * libraries beneath Debian's libxenctrl/libxenguest 4.17 -- libxencall,
 * libxenforeignmemory and libxendevicemodel -- so that Xen's own
 * xc_domain_save()/xc_domain_restore() run against domains simulated in a
 * state directory (see simctl.h), with no hypervisor and no /dev/xen.
 *
 * The real libraries stay loaded (they satisfy the symbol-version checks);
 * our unversioned definitions win because they come first in the global
 * scope.  Every function that receives one of our handles is defined here.
 *
 * Hypercall arguments are pointers to hypercall buffers in this process;
 * they are dereferenced directly and never kept.  Results follow the
 * libxencall convention: >= 0 on success, -1 with errno on failure.
 *
 * Environment:
 *   PYXL_SIM_DIR       state directory (default /dev/shm/pyxl-sim-$EUID); its files are
 *                      opened with O_NOFOLLOW: a symlink planted there is never written through
 *   PYXL_SIM_TRACE     1: trace every hypercall and mapping batch to stderr;
 *                      an absolute path: append the trace to that file
 *   PYXL_SIM_STATS     append one JSON line of counters to this file at exit
 *   PYXL_SIM_POPULATE  MAP_POPULATE foreign mappings: 0 never, 1 read-only ones
 *                      (save batches; the default), 2 all (restore batches too)
 *   PYXL_SIM_ROCOPY    read-only foreign mappings: 1 (the default) a read-only copy
 *                      of the pages made at map time (see do_map_copy), 0 a shared
 *                      view of the domain's memory file, as writable ones always are
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <link.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "simctl.h"

#define EXPORT __attribute__((visibility("default")))

/* ---- Xen 4.17 ABI facts (x86-64) ------------------------------------- */

enum {
    HC_memory_op = 12,
    HC_multicall = 13,
    HC_xen_version = 17,
    HC_grant_table_op = 20,
    HC_hvm_op = 34,
    HC_sysctl = 35,
    HC_domctl = 36,
};

#define SYSCTL_INTERFACE_VERSION 0x15   /* 4.17 and 4.20 alike */

/*
 * The Xen releases fakexen can stand in for, told apart by the libxenctrl
 * loaded in this process (its soname, libxenctrl.so.4.NN): the hypervisor a
 * library was built for is the one it may talk to.  What differs between them
 * on the save/restore path: the domctl interface version, and getdomaininfo of
 * a missing domain (4.17: the next domain up; 4.18 and later: ESRCH).  Every
 * other domctl fakexen serves has the same layout in both.
 */
struct xenrel {
    unsigned minor;            /* 4.<minor> */
    uint32_t domctl_version;
    int getinfo_exact;         /* getdomaininfo: this domid or ESRCH */
};
static const struct xenrel g_releases[] = {
    {17, 0x15, 0},
    {20, 0x17, 1},
};
static const struct xenrel *g_rel = &g_releases[0];   /* no libxenctrl loaded: 4.17 */

enum {
    DOMCTL_getdomaininfo = 5,
    DOMCTL_shadow_op = 10,
    DOMCTL_gethvmcontext = 33,
    DOMCTL_sethvmcontext = 34,
    DOMCTL_gettscinfo = 59,
    DOMCTL_settscinfo = 60,
    DOMCTL_getpageframeinfo3 = 61,
    DOMCTL_get_cpu_policy = 82,
    DOMCTL_set_cpu_policy = 83,
};
#define SYSCTL_get_cpu_policy 29

enum { SHADOW_OFF = 0, SHADOW_ENABLE_LOGDIRTY = 2, SHADOW_CLEAN = 11, SHADOW_PEEK = 12 };
#define SHADOW_LOGDIRTY_FINAL 1u

enum { XENMEM_populate_physmap = 6, XENMEM_maximum_gpfn = 14 };
enum { HVMOP_set_param = 0, HVMOP_get_param = 1 };

#define DOMINF_dying     0x001u
#define DOMINF_hvm_guest 0x002u
#define DOMINF_shutdown  0x004u
#define DOMINF_paused    0x008u
#define DOMINF_running   0x020u
#define DOMINF_hap       0x100u
#define DOMINF_shutdownshift 16

#define PFINFO_NOTAB 0x0ULL
#define PFINFO_XTAB  0xf0000000ULL
#define MAX_PFINFO_BATCH 1024

#define DOMID_FIRST_RESERVED 0x7ff0u

#define HVM_SAVE_MAGIC   0x54381286u
#define HVM_SAVE_VERSION 1u
#define HVM_SAVE_CODE_MAX 20u
#define HVM_SAVE_LAPIC    5u
#define LAPIC_SIZE_417    24u   /* struct hvm_hw_lapic up to 4.20.0 */
#define LAPIC_SIZE_420_1  32u   /* 4.20.1 and later: pending_esr */

#define RESOURCE_grant_table 1u

/* Offsets inside struct xen_domctl (144 bytes) and xen_sysctl (136 bytes). */
#define DOMCTL_SIZE 144
#define DOMCTL_U 16
#define SYSCTL_U 8

/* ---- small helpers --------------------------------------------------- */

#define AT(type, base, off) (*(type *)((char *)(base) + (off)))

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_simdir[PATH_MAX];
static int g_inited;
static FILE *g_trace;
static int g_populate = 1;
static int g_rocopy = 1;

static struct {
    uint64_t hypercalls, domctls, map_calls, mmaps, munmaps, pages_mapped,
             pfinfo_batches, populate_pages, fallocs, cleans, dirty_returned,
             copied_maps, copied_pages;
} g_stats;

static void fx_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fx_log(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(buf) - 2)
        n = sizeof(buf) - 2;
    buf[n++] = '\n';
    /* One write() so that concurrent writers' lines do not interleave. */
    ssize_t r = write(2, "fakexen: ", 9);
    r = write(2, buf, n);
    (void)r;
}

#define TRACE(...) do { if (g_trace) { fprintf(g_trace, "fakexen: " __VA_ARGS__); \
                                      fputc('\n', g_trace); } } while (0)

/* dl_iterate_phdr callback: the minor version of a loaded libxenctrl.so.4.NN. */
static int find_xenctrl(struct dl_phdr_info *info, size_t size, void *out)
{
    (void)size;
    const char *name = info->dlpi_name ? strrchr(info->dlpi_name, '/') : NULL;
    name = name ? name + 1 : info->dlpi_name;
    unsigned minor;
    char tail;
    if (name && sscanf(name, "libxenctrl.so.4.%u%c", &minor, &tail) >= 1) {
        *(unsigned *)out = minor;
        return 1;
    }
    return 0;
}

/* Which Xen this process's libxenctrl was built for (see struct xenrel). */
static void pick_release(void)
{
    unsigned minor = 0;
    dl_iterate_phdr(find_xenctrl, &minor);
    if (!minor)
        return;
    for (size_t i = 0; i < sizeof(g_releases) / sizeof(g_releases[0]); i++)
        if (g_releases[i].minor == minor) {
            g_rel = &g_releases[i];
            return;
        }
    fx_log("libxenctrl.so.4.%u loaded: fakexen simulates Xen 4.17 and 4.20 only; "
           "hypercalls will be refused", minor);
    g_rel = NULL;
}

static void fx_init(void)
{
    if (__atomic_load_n(&g_inited, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&g_lock);
    if (!g_inited) {
        const char *dir = getenv("PYXL_SIM_DIR");
        if (dir && *dir)
            snprintf(g_simdir, sizeof(g_simdir), "%s", dir);
        else    /* pyxl's default (pyxl/sim/layout.py): per user */
            snprintf(g_simdir, sizeof(g_simdir), "/dev/shm/pyxl-sim-%u", (unsigned)geteuid());
        const char *tr = getenv("PYXL_SIM_TRACE");
        if (tr && *tr && strcmp(tr, "0") != 0) {
            if (tr[0] == '/') {
                g_trace = fopen(tr, "a");
                if (g_trace)
                    setvbuf(g_trace, NULL, _IOLBF, 0);
            } else {
                g_trace = stderr;
            }
        }
        const char *pop = getenv("PYXL_SIM_POPULATE");
        if (pop && *pop)
            g_populate = atoi(pop);
        const char *roc = getenv("PYXL_SIM_ROCOPY");
        if (roc && *roc)
            g_rocopy = atoi(roc);
        pick_release();
        __atomic_store_n(&g_inited, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&g_lock);
}

__attribute__((destructor)) static void fx_fini(void)
{
    const char *path = getenv("PYXL_SIM_STATS");
    if (!g_inited || !path || !*path)
        return;
    FILE *f = fopen(path, "a");
    if (!f)
        return;
    fprintf(f, "{\"pid\": %d, \"hypercalls\": %" PRIu64 ", \"domctls\": %" PRIu64
            ", \"map_calls\": %" PRIu64 ", \"mmap_calls\": %" PRIu64 ", \"munmap_calls\": %" PRIu64
            ", \"pages_mapped\": %" PRIu64 ", \"pfinfo_batches\": %" PRIu64
            ", \"populated_pages\": %" PRIu64 ", \"fallocate_calls\": %" PRIu64
            ", \"cleans\": %" PRIu64 ", \"dirty_returned\": %" PRIu64 ", \"map_populate\": %d"
            ", \"copied_maps\": %" PRIu64 ", \"copied_pages\": %" PRIu64 ", \"map_rocopy\": %d}\n",
            (int)getpid(), g_stats.hypercalls, g_stats.domctls, g_stats.map_calls, g_stats.mmaps,
            g_stats.munmaps, g_stats.pages_mapped, g_stats.pfinfo_batches, g_stats.populate_pages,
            g_stats.fallocs, g_stats.cleans, g_stats.dirty_returned, g_populate,
            g_stats.copied_maps, g_stats.copied_pages, g_rocopy);
    fclose(f);
}

/* ---- simulated domains ----------------------------------------------- */

struct fxdom {
    struct fxdom *next;
    unsigned domid;
    int ctlfd, memfd;
    struct fx_ctl *ctl;
    size_t ctl_size;
    uint64_t *populated, *dirty;
    uint64_t nr_pfns;
    dev_t dev;
    ino_t ino;
};

static struct fxdom *g_doms;

static inline int test_bit(const uint64_t *map, uint64_t bit)
{
    return (__atomic_load_n(&map[bit / 64], __ATOMIC_RELAXED) >> (bit % 64)) & 1;
}

static void dom_free(struct fxdom *d)
{
    if (d->ctl)
        munmap(d->ctl, d->ctl_size);
    if (d->ctlfd >= 0)
        close(d->ctlfd);
    if (d->memfd >= 0)
        close(d->memfd);
    free(d);
}

/* Open d<domid> from the state directory; NULL with errno ESRCH if absent. */
static struct fxdom *dom_open(unsigned domid)
{
    char path[PATH_MAX + 32];
    struct stat st;
    struct fxdom *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->ctlfd = d->memfd = -1;
    d->domid = domid;
    snprintf(path, sizeof(path), "%s/d%u/ctl", g_simdir, domid);
    d->ctlfd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (d->ctlfd < 0)
        goto esrch;
    if (fstat(d->ctlfd, &st) < 0 || st.st_size < (off_t)FX_BITMAPS_OFF)
        goto corrupt;
    d->dev = st.st_dev;
    d->ino = st.st_ino;
    d->ctl_size = st.st_size;
    d->ctl = mmap(NULL, d->ctl_size, PROT_READ | PROT_WRITE, MAP_SHARED, d->ctlfd, 0);
    if (d->ctl == MAP_FAILED) {
        d->ctl = NULL;
        goto corrupt;
    }
    struct fx_ctl *c = d->ctl;
    d->nr_pfns = c->nr_pfns;
    if (c->magic != FX_CTL_MAGIC || c->version != FX_CTL_VERSION || c->domid != domid ||
        c->ctl_size != d->ctl_size || d->nr_pfns % FX_PFN_ALIGN ||
        c->populated_off != FX_BITMAPS_OFF || c->dirty_off != c->populated_off + d->nr_pfns / 8 ||
        c->dirty_off + d->nr_pfns / 8 > d->ctl_size)
        goto corrupt;
    d->populated = (uint64_t *)((char *)c + c->populated_off);
    d->dirty = (uint64_t *)((char *)c + c->dirty_off);
    snprintf(path, sizeof(path), "%s/d%u/mem", g_simdir, domid);
    d->memfd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (d->memfd < 0)
        goto esrch;
    if (fstat(d->memfd, &st) < 0 || (uint64_t)st.st_size < d->nr_pfns * FX_PAGE_SIZE)
        goto corrupt;
    return d;

corrupt:
    fx_log("d%u: state in %s/d%u is not a valid pyxl-sim domain", domid, g_simdir, domid);
esrch:
    dom_free(d);
    errno = ESRCH;
    return NULL;
}

/*
 * The domain for a hypercall: cached per process.  A destroyed domain is
 * marked FX_DYING before its files go, so hot paths need no stat().
 * With `revalidate`, also check that the directory still holds the same
 * domain (cheap; used by getdomaininfo).
 */
static struct fxdom *dom_get(unsigned domid, int revalidate)
{
    struct fxdom *d, **pp;
    fx_init();
    pthread_mutex_lock(&g_lock);
    for (pp = &g_doms; (d = *pp); pp = &d->next)
        if (d->domid == domid)
            break;
    if (d && revalidate) {
        char path[PATH_MAX + 32];
        struct stat st;
        snprintf(path, sizeof(path), "%s/d%u/ctl", g_simdir, domid);
        if (stat(path, &st) < 0 || st.st_ino != d->ino || st.st_dev != d->dev) {
            *pp = d->next;
            /* Mappings handed out earlier stay valid; only our view goes. */
            dom_free(d);
            d = NULL;
        }
    }
    if (!d) {
        d = dom_open(domid);
        if (d) {
            d->next = g_doms;
            g_doms = d;
        }
    }
    pthread_mutex_unlock(&g_lock);
    if (!d)
        errno = ESRCH;
    return d;
}

/* A domain that hypercalls may operate on: present and not being destroyed. */
static struct fxdom *dom_live(unsigned domid)
{
    struct fxdom *d = dom_get(domid, 0);
    if (d && __atomic_load_n(&d->ctl->state, __ATOMIC_ACQUIRE) == FX_DYING) {
        errno = ESRCH;
        return NULL;
    }
    if (!d)
        fx_log("d%u: no such domain in %s", domid, g_simdir);
    return d;
}

/* getdomaininfo semantics: the first domain whose id is >= domid. */
static struct fxdom *dom_first_from(unsigned domid)
{
    struct fxdom *d = dom_get(domid, 1);
    if (d)
        return d;
    DIR *dir = opendir(g_simdir);
    if (!dir) {
        errno = ESRCH;
        return NULL;
    }
    unsigned best = UINT_MAX;
    struct dirent *de;
    while ((de = readdir(dir))) {
        char *end;
        if (de->d_name[0] != 'd' || !de->d_name[1])
            continue;
        unsigned long id = strtoul(de->d_name + 1, &end, 10);
        if (*end || id <= domid || id >= DOMID_FIRST_RESERVED)
            continue;
        if (id < best)
            best = id;
    }
    closedir(dir);
    if (best == UINT_MAX) {
        errno = ESRCH;
        return NULL;
    }
    return dom_get(best, 1);
}

/* Test hook (not a Xen interface): the Xen 4.<minor> this process's fakexen
 * simulates (see struct xenrel); 0 if it refuses hypercalls. */
EXPORT unsigned pyxl_fakexen_release(void)
{
    fx_init();
    return g_rel ? g_rel->minor : 0;
}

/*
 * Test hook (not a Xen interface): forget cached domains and re-read the
 * environment, so one process can talk to several state directories in turn.
 */
EXPORT void pyxl_fakexen_reset(void)
{
    pthread_mutex_lock(&g_lock);
    while (g_doms) {
        struct fxdom *d = g_doms;
        g_doms = d->next;
        dom_free(d);
    }
    if (g_trace && g_trace != stderr)
        fclose(g_trace);
    g_trace = NULL;
    g_populate = 1;
    g_rocopy = 1;
    __atomic_store_n(&g_inited, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&g_lock);
}

/* ---- domctl ---------------------------------------------------------- */

static long domctl_getdomaininfo(void *dc)
{
    unsigned domid = AT(uint16_t, dc, 8);
    if (domid >= DOMID_FIRST_RESERVED)
        return -EINVAL;
    struct fxdom *d = g_rel->getinfo_exact ? dom_get(domid, 1) : dom_first_from(domid);
    if (!d) {
        fx_log("getdomaininfo d%u: no such domain (nor a higher one) in %s", domid, g_simdir);
        return -ESRCH;
    }
    struct fx_ctl *c = d->ctl;
    char *u = (char *)dc + DOMCTL_U;
    memset(u, 0, 112);
    uint32_t state = __atomic_load_n(&c->state, __ATOMIC_ACQUIRE);
    uint32_t flags = DOMINF_hvm_guest | DOMINF_hap;
    switch (state) {
    case FX_RUNNING:
        flags |= DOMINF_running;
        break;
    case FX_PAUSED:
        flags |= DOMINF_paused;
        break;
    case FX_SUSPENDED:
        flags |= DOMINF_shutdown | DOMINF_paused |
                 ((c->shutdown_reason & 0xff) << DOMINF_shutdownshift);
        break;
    default:
        flags |= DOMINF_dying | DOMINF_paused;
        break;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
    AT(uint16_t, dc, 8) = d->domid;
    AT(uint16_t, u, 0) = d->domid;
    AT(uint32_t, u, 4) = flags;
    AT(uint64_t, u, 8) = __atomic_load_n(&c->tot_pages, __ATOMIC_RELAXED);
    AT(uint64_t, u, 16) = c->max_pages;
    AT(uint64_t, u, 56) = now > c->created_ns ? now - c->created_ns : 0;  /* cpu_time */
    AT(uint32_t, u, 64) = 1;   /* nr_online_vcpus */
    AT(uint32_t, u, 68) = 0;   /* max_vcpu_id */
    memcpy(u + 76, c->uuid, 16);
    AT(uint8_t, u, 96) = 52;   /* gpaddr_bits */
    TRACE("getdomaininfo d%u -> d%u flags %#x tot %" PRIu64, domid, d->domid, flags,
          AT(uint64_t, u, 8));
    return 0;
}

static void store_u64_le(uint8_t *out, uint64_t v, unsigned nbytes)
{
    for (unsigned i = 0; i < nbytes; i++)
        out[i] = (uint8_t)(v >> (8 * i));
}

static long domctl_shadow_op(struct fxdom *d, char *u)
{
    uint32_t op = AT(uint32_t, u, 0);
    uint32_t mode = AT(uint32_t, u, 4);
    struct fx_ctl *c = d->ctl;
    uint64_t words = d->nr_pfns / 64;

    switch (op) {
    case SHADOW_OFF:
        __atomic_store_n(&c->logdirty, 0, __ATOMIC_RELEASE);
        TRACE("d%u shadow_op OFF", d->domid);
        return 0;

    case SHADOW_ENABLE_LOGDIRTY:
        if (__atomic_load_n(&c->logdirty, __ATOMIC_ACQUIRE)) {
            TRACE("d%u shadow_op ENABLE_LOGDIRTY: already on, EINVAL", d->domid);
            return -EINVAL;
        }
        /*
         * Start with an empty dirty set.  The guest marks a page after its
         * store, so a write before this clear is seen by iteration 0's copy
         * and a write after it sets its bit again.
         */
        for (uint64_t w = 0; w < words; w++)
            if (__atomic_load_n(&d->dirty[w], __ATOMIC_RELAXED))
                __atomic_exchange_n(&d->dirty[w], 0, __ATOMIC_ACQ_REL);
        __atomic_store_n(&c->logdirty, 1, __ATOMIC_RELEASE);
        TRACE("d%u shadow_op ENABLE_LOGDIRTY", d->domid);
        return 0;

    case SHADOW_CLEAN:
    case SHADOW_PEEK: {
        if (mode & ~SHADOW_LOGDIRTY_FINAL)
            return -EINVAL;
        int clean = op == SHADOW_CLEAN;
        int on = __atomic_load_n(&c->logdirty, __ATOMIC_ACQUIRE);
        uint64_t pages = AT(uint64_t, u, 24);
        uint8_t *out = (uint8_t *)(uintptr_t)AT(uint64_t, u, 16);
        uint64_t nbits = pages < d->nr_pfns ? pages : d->nr_pfns;
        uint64_t full = nbits / 64, count = 0;
        for (uint64_t w = 0; w < full; w++) {
            uint64_t v = 0;
            if (on) {
                v = __atomic_load_n(&d->dirty[w], __ATOMIC_RELAXED);
                /* Exchange only non-zero words: same result, fewer locked ops. */
                if (v && clean)
                    v = __atomic_exchange_n(&d->dirty[w], 0, __ATOMIC_ACQ_REL);
            }
            count += __builtin_popcountll(v);
            if (out)
                store_u64_le(out + w * 8, v, 8);
        }
        uint64_t done_bytes = full * 8;
        unsigned rem = nbits % 64;
        if (rem) {
            uint64_t mask = (1ULL << rem) - 1, v = 0;
            if (on)
                v = clean ? __atomic_fetch_and(&d->dirty[full], ~mask, __ATOMIC_ACQ_REL) & mask
                          : __atomic_load_n(&d->dirty[full], __ATOMIC_ACQUIRE) & mask;
            count += __builtin_popcountll(v);
            if (out)
                store_u64_le(out + done_bytes, v, (rem + 7) / 8);
            done_bytes += (rem + 7) / 8;
        }
        uint64_t want = (pages + 7) / 8;
        if (out && want > done_bytes)
            memset(out + done_bytes, 0, want - done_bytes);
        AT(uint32_t, u, 32) = 0;                                 /* fault_count */
        AT(uint32_t, u, 36) = count > UINT32_MAX ? UINT32_MAX : (uint32_t)count;
        g_stats.cleans++;
        g_stats.dirty_returned += count;
        TRACE("d%u shadow_op %s%s pages %" PRIu64 " -> dirty %" PRIu64, d->domid,
              clean ? "CLEAN" : "PEEK", mode ? " FINAL" : "", pages, count);
        return 0;
    }
    default:
        fx_log("d%u: shadow_op %u not simulated", d->domid, op);
        return -EINVAL;
    }
}

static long domctl_getpageframeinfo3(struct fxdom *d, char *u)
{
    uint64_t num = AT(uint64_t, u, 0);
    uint64_t *arr = (uint64_t *)(uintptr_t)AT(uint64_t, u, 8);
    if (num > MAX_PFINFO_BATCH)
        return -E2BIG;
    if (num && !arr)
        return -EFAULT;
    uint64_t data = 0, first = num ? arr[0] : 0;
    for (uint64_t i = 0; i < num; i++) {
        uint64_t gfn = arr[i];
        int ram = gfn < d->nr_pfns && test_bit(d->populated, gfn);
        arr[i] = ram ? PFINFO_NOTAB : PFINFO_XTAB;
        data += ram;
    }
    g_stats.pfinfo_batches++;
    if (num)
        TRACE("d%u getpageframeinfo3 %" PRIu64 " pfns from %#" PRIx64 ": %" PRIu64 " RAM",
              d->domid, num, first, data);
    return 0;
}

static int hvmctx_valid(const uint8_t *buf, uint32_t size)
{
    uint32_t pos = 0;
    int first = 1;
    while (pos + 8 <= size) {
        uint16_t type = AT(uint16_t, buf, pos);
        uint32_t len = AT(uint32_t, buf, pos + 4);
        pos += 8;
        if (len > size - pos)
            return 0;
        if (first) {
            if (type != 1 || len < 8 || AT(uint32_t, buf, pos) != HVM_SAVE_MAGIC ||
                AT(uint32_t, buf, pos + 4) != HVM_SAVE_VERSION)
                return 0;
            first = 0;
        } else if (type == 0) {
            return 1;
        } else if (type >= HVM_SAVE_CODE_MAX) {
            return 0;
        } else if (type == HVM_SAVE_LAPIC && len != LAPIC_SIZE_417 &&
                   !(g_rel->minor >= 20 && len == LAPIC_SIZE_420_1)) {
            /* 4.20.1 grew the LAPIC record (pending_esr); 4.20 loads both
             * sizes, 4.17 checks the exact size and refuses the longer one. */
            fx_log("sethvmcontext: a %u-byte LAPIC record; Xen 4.%u loads %s", len,
                   g_rel->minor, g_rel->minor >= 20 ? "24 or 32 bytes" : "24 bytes");
            return 0;
        }
        pos += len;
    }
    return 0;
}

static long domctl_hvmcontext(struct fxdom *d, char *u, int set)
{
    struct fx_ctl *c = d->ctl;
    uint8_t *blob = (uint8_t *)c + FX_HVMCTX_OFF;
    uint32_t size = AT(uint32_t, u, 0);
    uint8_t *buf = (uint8_t *)(uintptr_t)AT(uint64_t, u, 8);
    if (set) {
        if (!buf || !size || size > FX_HVMCTX_MAX || !hvmctx_valid(buf, size)) {
            fx_log("d%u: sethvmcontext rejects a %u-byte context (empty, too big or bad framing)",
                   d->domid, size);
            return -EINVAL;
        }
        memcpy(blob, buf, size);
        __atomic_store_n(&c->hvmctx_len, size, __ATOMIC_RELEASE);
        TRACE("d%u sethvmcontext %u bytes", d->domid, size);
        return 0;
    }
    uint32_t len = __atomic_load_n(&c->hvmctx_len, __ATOMIC_ACQUIRE);
    if (len > FX_HVMCTX_MAX)
        len = 0;
    if (!buf) {
        AT(uint32_t, u, 0) = len;
        TRACE("d%u gethvmcontext size query -> %u", d->domid, len);
        return 0;
    }
    if (size < len)
        return -ENOSPC;
    memcpy(buf, blob, len);
    AT(uint32_t, u, 0) = len;
    TRACE("d%u gethvmcontext %u bytes", d->domid, len);
    return 0;
}

static long domctl_tscinfo(struct fxdom *d, char *u, int set)
{
    struct fx_tsc *t = &d->ctl->tsc;
    if (set) {
        t->mode = AT(uint32_t, u, 0);
        t->gtsc_khz = AT(uint32_t, u, 4);
        t->incarnation = AT(uint32_t, u, 8);
        t->elapsed_nsec = AT(uint64_t, u, 16);
    } else {
        memset(u, 0, 24);
        AT(uint32_t, u, 0) = t->mode;
        AT(uint32_t, u, 4) = t->gtsc_khz;
        AT(uint32_t, u, 8) = t->incarnation;
        AT(uint64_t, u, 16) = t->elapsed_nsec;
    }
    TRACE("d%u %stscinfo mode %u khz %u", d->domid, set ? "set" : "get", t->mode, t->gtsc_khz);
    return 0;
}

static long domctl_cpu_policy(struct fxdom *d, char *u, int set)
{
    struct fx_ctl *c = d->ctl;
    uint8_t *leaves = (uint8_t *)c + FX_LEAVES_OFF;
    uint8_t *msrs = (uint8_t *)c + FX_MSRS_OFF;
    uint32_t nl = AT(uint32_t, u, 0), nm = AT(uint32_t, u, 4);
    uint8_t *ul = (uint8_t *)(uintptr_t)AT(uint64_t, u, 8);
    uint8_t *um = (uint8_t *)(uintptr_t)AT(uint64_t, u, 16);
    if (set) {
        if (nl > FX_MAX_LEAVES || nm > FX_MAX_MSRS || (nl && !ul) || (nm && !um))
            return -EINVAL;
        if (nl)
            memcpy(leaves, ul, (size_t)nl * 24);
        if (nm)
            memcpy(msrs, um, (size_t)nm * 16);
        c->nr_leaves = nl;
        c->nr_msrs = nm;
        TRACE("d%u set_cpu_policy %u leaves %u msrs", d->domid, nl, nm);
        return 0;
    }
    uint32_t have_l = c->nr_leaves <= FX_MAX_LEAVES ? c->nr_leaves : 0;
    uint32_t have_m = c->nr_msrs <= FX_MAX_MSRS ? c->nr_msrs : 0;
    if (!ul) {
        AT(uint32_t, u, 0) = FX_MAX_LEAVES;
    } else {
        if (nl < have_l)
            return -ENOBUFS;
        memcpy(ul, leaves, (size_t)have_l * 24);
        AT(uint32_t, u, 0) = have_l;
    }
    if (!um) {
        AT(uint32_t, u, 4) = FX_MAX_MSRS;
    } else {
        if (nm < have_m)
            return -ENOBUFS;
        memcpy(um, msrs, (size_t)have_m * 16);
        AT(uint32_t, u, 4) = have_m;
    }
    TRACE("d%u get_cpu_policy -> %u leaves %u msrs", d->domid, have_l, have_m);
    return 0;
}

static long do_domctl(void *dc)
{
    if (!dc)
        return -EFAULT;
    g_stats.domctls++;
    uint32_t cmd = AT(uint32_t, dc, 0);
    if (!g_rel)
        return -EACCES;
    if (AT(uint32_t, dc, 4) != g_rel->domctl_version) {
        fx_log("domctl %u: interface version %#x, this hypervisor (Xen 4.%u) speaks %#x", cmd,
               AT(uint32_t, dc, 4), g_rel->minor, g_rel->domctl_version);
        return -EACCES;
    }
    if (cmd == DOMCTL_getdomaininfo)
        return domctl_getdomaininfo(dc);

    unsigned domid = AT(uint16_t, dc, 8);
    char *u = (char *)dc + DOMCTL_U;
    struct fxdom *d = dom_live(domid);
    if (!d) {
        TRACE("domctl %u d%u: ESRCH", cmd, domid);
        return -ESRCH;
    }
    switch (cmd) {
    case DOMCTL_shadow_op:
        return domctl_shadow_op(d, u);
    case DOMCTL_getpageframeinfo3:
        return domctl_getpageframeinfo3(d, u);
    case DOMCTL_gethvmcontext:
        return domctl_hvmcontext(d, u, 0);
    case DOMCTL_sethvmcontext:
        return domctl_hvmcontext(d, u, 1);
    case DOMCTL_gettscinfo:
        return domctl_tscinfo(d, u, 0);
    case DOMCTL_settscinfo:
        return domctl_tscinfo(d, u, 1);
    case DOMCTL_get_cpu_policy:
        return domctl_cpu_policy(d, u, 0);
    case DOMCTL_set_cpu_policy:
        return domctl_cpu_policy(d, u, 1);
    default:
        fx_log("d%u: domctl %u not simulated", domid, cmd);
        return -ENOSYS;
    }
}

/* ---- sysctl ---------------------------------------------------------- */

static long do_sysctl(void *sc)
{
    if (!sc)
        return -EFAULT;
    uint32_t cmd = AT(uint32_t, sc, 0);
    if (AT(uint32_t, sc, 4) != SYSCTL_INTERFACE_VERSION) {
        fx_log("sysctl %u: interface version %#x, this hypervisor speaks %#x", cmd,
               AT(uint32_t, sc, 4), SYSCTL_INTERFACE_VERSION);
        return -EACCES;
    }
    char *u = (char *)sc + SYSCTL_U;
    if (cmd == SYSCTL_get_cpu_policy) {
        /* Only the size query is on the save/restore path; the simulated
         * host exposes no raw/host policy entries of its own. */
        uint32_t index = AT(uint32_t, u, 0);
        if (index > 1)
            return -EINVAL;
        AT(uint32_t, u, 4) = AT(uint64_t, u, 16) ? 0 : FX_MAX_LEAVES;
        AT(uint32_t, u, 8) = AT(uint64_t, u, 24) ? 0 : FX_MAX_MSRS;
        TRACE("sysctl get_cpu_policy index %u", index);
        return 0;
    }
    fx_log("sysctl %u not simulated", cmd);
    return -ENOSYS;
}

/* ---- memory_op ------------------------------------------------------- */

static void set_bits(uint64_t *map, uint64_t start, uint64_t n)
{
    while (n) {
        uint64_t w = start / 64;
        unsigned b = start % 64;
        unsigned take = 64 - b < n ? 64 - b : (unsigned)n;
        uint64_t mask = take == 64 ? ~0ULL : ((1ULL << take) - 1) << b;
        __atomic_fetch_or(&map[w], mask, __ATOMIC_RELEASE);
        start += take;
        n -= take;
    }
}

static uint64_t count_bits(const uint64_t *map, uint64_t start, uint64_t n)
{
    uint64_t c = 0;
    for (uint64_t p = start; p < start + n; p++)
        c += test_bit(map, p);
    return c;
}

static long populate_physmap(void *arg)
{
    uint64_t *gfns = (uint64_t *)(uintptr_t)AT(uint64_t, arg, 0);
    uint64_t n = AT(uint64_t, arg, 8);
    uint32_t order = AT(uint32_t, arg, 16);
    unsigned domid = AT(uint16_t, arg, 24);
    struct fxdom *d = dom_live(domid);
    if (!d)
        return -ESRCH;
    if (order > 18)
        return -EINVAL;
    struct fx_ctl *c = d->ctl;
    uint64_t ext = 1ULL << order, done = 0, i = 0;
    while (i < n) {
        uint64_t start = gfns[i];
        if (start & (ext - 1))
            break;
        uint64_t j = i + 1;
        while (j < n && gfns[j] == gfns[j - 1] + ext)
            j++;
        /* Trim the run to the guest-physical space. */
        if (start >= d->nr_pfns) {
            fx_log("d%u: populate_physmap pfn %#" PRIx64 " is outside the simulated "
                   "guest-physical space (%#" PRIx64 " pages)", domid, start, d->nr_pfns);
            break;
        }
        uint64_t fit = (d->nr_pfns - start) / ext;
        if (!fit)
            break;
        if (j - i > fit)
            j = i + fit;
        uint64_t pages = (j - i) * ext;
        uint64_t already = count_bits(d->populated, start, pages);
        uint64_t tot = __atomic_load_n(&c->tot_pages, __ATOMIC_RELAXED);
        if (tot + pages - already > c->max_pages) {
            fx_log("d%u: populate_physmap over-allocation: %" PRIu64 " + %" PRIu64
                   " pages exceeds max_pages %" PRIu64, domid, tot, pages - already,
                   c->max_pages);
            break;
        }
        off_t off = (off_t)(start * FX_PAGE_SIZE), len = (off_t)(pages * FX_PAGE_SIZE);
        /* Xen hands out fresh zeroed pages, even over populated ones. */
        if (already)
            fallocate(d->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
        /* Allocate now: a full tmpfs must fail here, not SIGBUS a writer later. */
        g_stats.fallocs++;
        if (fallocate(d->memfd, 0, off, len) < 0) {
            int e = errno;
            fx_log("d%u: populate_physmap cannot back %" PRIu64 " pages at pfn %#" PRIx64
                   " in %s: %s", domid, pages, start, g_simdir, strerror(e));
            break;
        }
        set_bits(d->populated, start, pages);
        __atomic_fetch_add(&c->tot_pages, pages - already, __ATOMIC_RELAXED);
        uint64_t last = start + pages - 1, cur = __atomic_load_n(&c->max_gpfn, __ATOMIC_RELAXED);
        while (last > cur &&
               !__atomic_compare_exchange_n(&c->max_gpfn, &cur, last, 0, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED))
            ;
        g_stats.populate_pages += pages;
        done += j - i;
        i = j;
    }
    TRACE("d%u populate_physmap %" PRIu64 " extents (order %u) from %#" PRIx64 ": %" PRIu64
          " done", domid, n, order, n ? gfns[0] : 0, done);
    return (long)done;
}

static long do_memory_op(uint64_t cmd, void *arg)
{
    switch (cmd) {
    case XENMEM_maximum_gpfn: {
        if (!arg)
            return -EFAULT;
        unsigned domid = *(uint16_t *)arg;
        struct fxdom *d = dom_live(domid);
        if (!d)
            return -ESRCH;
        long r = (long)__atomic_load_n(&d->ctl->max_gpfn, __ATOMIC_RELAXED);
        TRACE("d%u maximum_gpfn -> %#lx", domid, r);
        return r;
    }
    case XENMEM_populate_physmap:
        if (!arg)
            return -EFAULT;
        return populate_physmap(arg);
    default:
        fx_log("memory_op %" PRIu64 " not simulated", cmd);
        return -ENOSYS;
    }
}

static long do_multicall(void *calls, uint64_t nr)
{
    if (!calls)
        return -EFAULT;
    for (uint64_t i = 0; i < nr; i++) {
        char *e = (char *)calls + i * 64;
        uint64_t op = AT(uint64_t, e, 0);
        long r;
        if (op == HC_memory_op)
            r = do_memory_op(AT(uint64_t, e, 16), (void *)(uintptr_t)AT(uint64_t, e, 24));
        else {
            fx_log("multicall entry: hypercall %" PRIu64 " not simulated", op);
            r = -ENOSYS;
        }
        AT(uint64_t, e, 8) = (uint64_t)r;
    }
    return 0;
}

/* ---- hvm_op, xen_version -------------------------------------------- */

static long do_hvm_op(uint64_t op, void *arg)
{
    if (op != HVMOP_set_param && op != HVMOP_get_param) {
        fx_log("hvm_op %" PRIu64 " not simulated", op);
        return -ENOSYS;
    }
    if (!arg)
        return -EFAULT;
    unsigned domid = AT(uint16_t, arg, 0);
    uint32_t index = AT(uint32_t, arg, 4);
    struct fxdom *d = dom_live(domid);
    if (!d)
        return -ESRCH;
    if (index >= FX_NR_PARAMS)
        return -EINVAL;
    if (op == HVMOP_set_param)
        __atomic_store_n(&d->ctl->params[index], AT(uint64_t, arg, 8), __ATOMIC_RELEASE);
    else
        AT(uint64_t, arg, 8) = __atomic_load_n(&d->ctl->params[index], __ATOMIC_ACQUIRE);
    TRACE("d%u %s_param %u = %#" PRIx64, domid, op == HVMOP_set_param ? "set" : "get", index,
          AT(uint64_t, arg, 8));
    return 0;
}

static long do_xen_version(uint64_t cmd)
{
    if (cmd == 0)   /* XENVER_version: major << 16 | minor */
        return g_rel ? (long)(0x40000u | g_rel->minor) : -EACCES;
    fx_log("xen_version %" PRIu64 " not simulated", cmd);
    return -ENOSYS;
}

static long hypercall(unsigned op, uint64_t a1, uint64_t a2)
{
    fx_init();
    g_stats.hypercalls++;
    switch (op) {
    case HC_domctl:
        return do_domctl((void *)(uintptr_t)a1);
    case HC_sysctl:
        return do_sysctl((void *)(uintptr_t)a1);
    case HC_multicall:
        return do_multicall((void *)(uintptr_t)a1, a2);
    case HC_memory_op:
        return do_memory_op(a1, (void *)(uintptr_t)a2);
    case HC_hvm_op:
        return do_hvm_op(a1, (void *)(uintptr_t)a2);
    case HC_xen_version:
        return do_xen_version(a1);
    default:
        fx_log("hypercall %u not simulated", op);
        return -ENOSYS;
    }
}

static int ret_int(long r)
{
    if (r < 0) {
        errno = (int)-r;
        return -1;
    }
    return (int)r;
}

/* ---- libxencall ------------------------------------------------------ */

struct fx_handle {
    uint32_t magic;
};
#define XCALL_MAGIC 0x7863616cu
#define FMEM_MAGIC  0x666d656du
#define DM_MAGIC    0x646d6f64u

static void *handle_new(uint32_t magic)
{
    fx_init();
    struct fx_handle *h = malloc(sizeof(*h));
    if (h)
        h->magic = magic;
    return h;
}

static int handle_close(void *h, uint32_t magic)
{
    if (!h)
        return 0;
    struct fx_handle *fh = h;
    if (fh->magic != magic)
        fx_log("close of a handle that is not ours (%#x)", fh->magic);
    fh->magic = 0;
    free(h);
    return 0;
}

EXPORT void *xencall_open(void *logger, unsigned flags)
{
    (void)logger;
    (void)flags;
    void *h = handle_new(XCALL_MAGIC);
    TRACE("xencall_open (state dir %s)", g_simdir);
    return h;
}

EXPORT int xencall_close(void *h) { return handle_close(h, XCALL_MAGIC); }

EXPORT int xencall0(void *h, unsigned op) { (void)h; return ret_int(hypercall(op, 0, 0)); }
EXPORT int xencall1(void *h, unsigned op, uint64_t a1)
{ (void)h; return ret_int(hypercall(op, a1, 0)); }
EXPORT int xencall2(void *h, unsigned op, uint64_t a1, uint64_t a2)
{ (void)h; return ret_int(hypercall(op, a1, a2)); }
EXPORT int xencall3(void *h, unsigned op, uint64_t a1, uint64_t a2, uint64_t a3)
{ (void)h; (void)a3; return ret_int(hypercall(op, a1, a2)); }
EXPORT int xencall4(void *h, unsigned op, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4)
{ (void)h; (void)a3; (void)a4; return ret_int(hypercall(op, a1, a2)); }
EXPORT int xencall5(void *h, unsigned op, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                    uint64_t a5)
{ (void)h; (void)a3; (void)a4; (void)a5; return ret_int(hypercall(op, a1, a2)); }

EXPORT long xencall2L(void *h, unsigned op, uint64_t a1, uint64_t a2)
{
    (void)h;
    long r = hypercall(op, a1, a2);
    if (r < 0) {
        errno = (int)-r;
        return -1;
    }
    return r;
}

/* Hypercall buffers: plain zeroed allocations (hot path: one per bounced argument). */
EXPORT void *xencall_alloc_buffer(void *h, size_t size)
{
    (void)h;
    return calloc(1, size ? size : 1);
}

EXPORT void xencall_free_buffer(void *h, void *p)
{
    (void)h;
    free(p);
}

EXPORT void *xencall_alloc_buffer_pages(void *h, size_t nr)
{
    (void)h;
    void *p = mmap(NULL, (nr ? nr : 1) * FX_PAGE_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

EXPORT void xencall_free_buffer_pages(void *h, void *p, size_t nr)
{
    (void)h;
    if (p)
        munmap(p, (nr ? nr : 1) * FX_PAGE_SIZE);
}

EXPORT int xencall_buffers_never_fault(void *h) { (void)h; return 1; }
EXPORT int xencall_fd(void *h) { (void)h; return -1; }

/* ---- libxenforeignmemory -------------------------------------------- */

EXPORT void *xenforeignmemory_open(void *logger, unsigned flags)
{
    (void)logger;
    (void)flags;
    return handle_new(FMEM_MAGIC);
}

EXPORT int xenforeignmemory_close(void *h) { return handle_close(h, FMEM_MAGIC); }

/*
 * Read-only foreign mappings as copies (PYXL_SIM_ROCOPY=1, the default).
 *
 * Sharing 4 KiB pages of a tmpfs file into a process and tearing them down
 * again (page-table entries, rmap and memcg accounting, zap) costs about
 * 400 ns a page: ~100 ms per GiB saved, more than copying the memory into the
 * pipe, and the whole gap between a save and `cat` of the same memory
 * (bench/results/mapcost.md).  Xen's own foreign mappings cost what they cost
 * in Xen; this simulation need not add a kernel's worth of its own.  So a
 * read-only mapping is filled with pread() of the memory file (the kernel's
 * copy, as `cat` does) into a reused anonymous buffer, 2 MiB-aligned with
 * MADV_HUGEPAGE, which is then made read-only: a write through it faults, as
 * through Xen's PROT_READ mappings.
 *
 * For libxc (map, writev, unmap within one write_batch) the contents are what
 * a shared view could show: the page as of a moment while it is mapped.  A
 * guest store after the copy is not seen through it; the guest marks the page
 * dirty after its store, so log-dirty sends the page again, exactly as with a
 * store that lands after libxc has read a shared view.
 *
 * Buffers return to the pool only through xenforeignmemory_unmap().  One that
 * a caller releases with plain munmap() stays marked busy and is never
 * touched again; a later mapping that the kernel places at its address
 * proves it gone (copy_forget).
 */
#define COPY_ALIGN (2u << 20)
#define COPY_POOL  4

static struct copybuf {
    char *addr;
    size_t cap;
    int busy;
} g_copy[COPY_POOL];
static pthread_mutex_t g_copy_lock = PTHREAD_MUTEX_INITIALIZER;

/* A new anonymous read-write buffer of `cap` bytes (a multiple of COPY_ALIGN), aligned. */
static char *copy_alloc(size_t cap)
{
    char *raw = mmap(NULL, cap + COPY_ALIGN, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    g_stats.mmaps++;
    if (raw == MAP_FAILED)
        return NULL;
    char *p = (char *)(((uintptr_t)raw + COPY_ALIGN - 1) & ~(uintptr_t)(COPY_ALIGN - 1));
    if (p > raw)
        munmap(raw, p - raw);
    if (raw + COPY_ALIGN > p)
        munmap(p + cap, raw + COPY_ALIGN - p);
    madvise(p, cap, MADV_HUGEPAGE);   /* fewer faults and TLB entries; advisory */
    return p;
}

/* Drop pool entries overlapping [p, p+len): the kernel just mapped something there. */
static void copy_forget(const char *p, size_t len)
{
    pthread_mutex_lock(&g_copy_lock);
    for (int i = 0; i < COPY_POOL; i++)
        if (g_copy[i].addr && g_copy[i].addr < p + len && p < g_copy[i].addr + g_copy[i].cap)
            g_copy[i] = (struct copybuf){0};
    pthread_mutex_unlock(&g_copy_lock);
}

/* A read-write buffer for `len` bytes: a free pooled one, or a new one. */
static char *copy_get(size_t len)
{
    size_t cap = (len + COPY_ALIGN - 1) & ~(size_t)(COPY_ALIGN - 1);
    char *p = NULL;
    int slot = -1;
    pthread_mutex_lock(&g_copy_lock);
    for (int i = 0; i < COPY_POOL; i++) {
        if (g_copy[i].addr && !g_copy[i].busy && g_copy[i].cap >= len) {
            g_copy[i].busy = 1;
            p = g_copy[i].addr;
            cap = g_copy[i].cap;
            break;
        }
        if (slot < 0 && (!g_copy[i].addr || !g_copy[i].busy))
            slot = i;
    }
    pthread_mutex_unlock(&g_copy_lock);
    if (p) {
        if (mprotect(p, cap, PROT_READ | PROT_WRITE) < 0) {
            copy_forget(p, cap);
            return NULL;
        }
        return p;
    }
    p = copy_alloc(cap);
    if (!p)
        return NULL;
    copy_forget(p, cap);
    pthread_mutex_lock(&g_copy_lock);
    if (slot >= 0 && g_copy[slot].addr && g_copy[slot].busy)
        slot = -1;               /* taken meanwhile */
    if (slot < 0)
        for (int i = 0; i < COPY_POOL && slot < 0; i++)
            if (!g_copy[i].addr || !g_copy[i].busy)
                slot = i;
    struct copybuf old = {0};
    if (slot >= 0) {
        old = g_copy[slot];      /* a free, smaller buffer: replaced */
        g_copy[slot] = (struct copybuf){p, cap, 1};
    }
    pthread_mutex_unlock(&g_copy_lock);
    if (old.addr)
        munmap(old.addr, old.cap);
    if (slot < 0) {
        /* Pool full of busy buffers: an unpooled one, released by munmap() in unmap. */
        if (cap > len)
            munmap(p + ((len + FX_PAGE_SIZE - 1) & ~(size_t)(FX_PAGE_SIZE - 1)),
                   cap - ((len + FX_PAGE_SIZE - 1) & ~(size_t)(FX_PAGE_SIZE - 1)));
    }
    return p;
}

/* Return a pooled buffer: 1 if `p` was one (now free), 0 if not ours. */
static int copy_put(void *p)
{
    int found = 0;
    pthread_mutex_lock(&g_copy_lock);
    for (int i = 0; i < COPY_POOL; i++)
        if (g_copy[i].addr == p && g_copy[i].busy) {
            g_copy[i].busy = 0;
            found = 1;
            break;
        }
    pthread_mutex_unlock(&g_copy_lock);
    return found;
}

/* The copy path of do_map: every page is populated (no err entries). NULL with errno. */
static void *do_map_copy(struct fxdom *d, int prot, size_t num, const uint64_t *arr)
{
    size_t len = num * FX_PAGE_SIZE;
    char *p = copy_get(len);
    if (!p)
        return NULL;
    size_t i = 0;
    while (i < num) {
        size_t j = i + 1;
        while (j < num && arr[j] == arr[j - 1] + 1)
            j++;
        size_t want = (j - i) * FX_PAGE_SIZE, got = 0;
        off_t off = (off_t)(arr[i] * FX_PAGE_SIZE);
        while (got < want) {
            ssize_t r = pread(d->memfd, p + i * FX_PAGE_SIZE + got, want - got, off + (off_t)got);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                int e = r < 0 ? errno : EIO;
                fx_log("d%u: copy of %zu pages at pfn %#" PRIx64 ": %s", d->domid, j - i, arr[i],
                       strerror(e));
                if (!copy_put(p))
                    munmap(p, len);
                errno = e;
                return NULL;
            }
            got += (size_t)r;
        }
        i = j;
    }
    /* The whole buffer: a partial mprotect would split its huge pages. */
    size_t cap = (len + COPY_ALIGN - 1) & ~(size_t)(COPY_ALIGN - 1);
    int pooled = 0;
    pthread_mutex_lock(&g_copy_lock);
    for (int k = 0; k < COPY_POOL; k++)
        if (g_copy[k].addr == p) {
            pooled = 1;
            cap = g_copy[k].cap;
        }
    pthread_mutex_unlock(&g_copy_lock);
    if (!pooled)
        cap = (len + FX_PAGE_SIZE - 1) & ~(size_t)(FX_PAGE_SIZE - 1);
    if (mprotect(p, cap, prot) < 0) {
        int e = errno;
        if (!copy_put(p))
            munmap(p, len);
        errno = e;
        return NULL;
    }
    g_stats.copied_maps++;
    g_stats.copied_pages += num;
    return p;
}

/*
 * Map `num` guest pages into one contiguous range.  One mmap of the domain's
 * memory file per run of consecutive populated gfns (a whole batch is
 * usually one run), into a PROT_NONE reservation when there are several;
 * never a syscall per page.  The result is a real shared view, so callers
 * may release it with plain munmap().  Read-only mappings are copies instead
 * (do_map_copy above), unless some page fails or PYXL_SIM_ROCOPY=0.
 */
static void *do_map(uint32_t dom, void *addr, int prot, int flags, size_t num,
                    const uint64_t *arr, int *err)
{
    g_stats.map_calls++;
    if (!num || !arr) {
        errno = EINVAL;
        return NULL;
    }
    struct fxdom *d = dom_live(dom);
    if (!d)
        return NULL;
    size_t runs = 0, bad = 0;
    int first_err = 0, prev_ok = 0;
    for (size_t i = 0; i < num; i++) {
        uint64_t gfn = arr[i];
        int e = 0;
        if (gfn >= d->nr_pfns)
            e = -EINVAL;
        else if (!test_bit(d->populated, gfn))
            e = -ENOENT;
        if (err)
            err[i] = e;
        if (e) {
            bad++;
            if (!first_err)
                first_err = e;
            prev_ok = 0;
            continue;
        }
        if (!prev_ok || arr[i] != arr[i - 1] + 1)
            runs++;
        prev_ok = 1;
    }
    if (bad && !err) {
        fx_log("d%u: map of %zu pages: pfn not populated (%s)", dom, num, strerror(-first_err));
        errno = -first_err;
        return NULL;
    }
    size_t len = num * FX_PAGE_SIZE;
    int fixed = addr && (flags & MAP_FIXED);
    if (g_rocopy && prot == PROT_READ && !bad && !fixed) {
        void *p = do_map_copy(d, prot, num, arr);
        if (p) {
            g_stats.pages_mapped += num;
            TRACE("d%u map %zu pages from %#" PRIx64 " prot %d: %zu runs, copied -> %p", dom, num,
                  arr[0], prot, runs, p);
        }
        return p;
    }
    /*
     * Save batches are read at once by writev: prefaulting the run in one go
     * replaces ~16 read faults per 64 KiB.  Restore batches are written page by
     * page; measured, prefaulting them costs slightly more than the faults.
     */
    int pop = (g_populate >= 2 || (g_populate == 1 && !(prot & PROT_WRITE))) ? MAP_POPULATE : 0;
    void *base;
    if (runs == 1 && !bad) {
        base = mmap(addr, len, prot, MAP_SHARED | pop | (fixed ? MAP_FIXED : 0), d->memfd,
                    (off_t)(arr[0] * FX_PAGE_SIZE));
        g_stats.mmaps++;
        if (base == MAP_FAILED)
            return NULL;
    } else {
        base = mmap(addr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE |
                    (fixed ? MAP_FIXED : 0), -1, 0);
        g_stats.mmaps++;
        if (base == MAP_FAILED)
            return NULL;
        size_t i = 0;
        while (i < num) {
            if (err && err[i]) {
                i++;
                continue;
            }
            size_t j = i + 1;
            while (j < num && !(err && err[j]) && arr[j] == arr[j - 1] + 1)
                j++;
            void *p = mmap((char *)base + i * FX_PAGE_SIZE, (j - i) * FX_PAGE_SIZE, prot,
                           MAP_SHARED | MAP_FIXED | pop, d->memfd, (off_t)(arr[i] * FX_PAGE_SIZE));
            g_stats.mmaps++;
            if (p == MAP_FAILED) {
                int e = errno;
                if (!err) {
                    munmap(base, len);
                    errno = e;
                    return NULL;
                }
                for (size_t k = i; k < j; k++)
                    err[k] = -e;
            }
            i = j;
        }
    }
    copy_forget(base, len);
    g_stats.pages_mapped += num - bad;
    TRACE("d%u map %zu pages from %#" PRIx64 " prot %d: %zu runs, %zu failed -> %p", dom, num,
          arr[0], prot, runs, bad, base);
    return base;
}

EXPORT void *xenforeignmemory_map(void *h, uint32_t dom, int prot, size_t num,
                                  const uint64_t arr[], int err[])
{
    (void)h;
    fx_init();
    return do_map(dom, NULL, prot, 0, num, arr, err);
}

EXPORT void *xenforeignmemory_map2(void *h, uint32_t dom, void *addr, int prot, int flags,
                                   size_t num, const uint64_t arr[], int err[])
{
    (void)h;
    fx_init();
    return do_map(dom, addr, prot, flags, num, arr, err);
}

EXPORT int xenforeignmemory_unmap(void *h, void *addr, size_t num)
{
    (void)h;
    g_stats.munmaps++;
    if (addr && copy_put(addr))
        return 0;
    return munmap(addr, num * FX_PAGE_SIZE);
}

EXPORT int xenforeignmemory_restrict(void *h, uint16_t domid)
{
    (void)h;
    (void)domid;
    return 0;
}

struct fx_resource {
    void *addr;
    size_t len;
};

EXPORT void *xenforeignmemory_map_resource(void *h, uint16_t domid, unsigned type, unsigned id,
                                           unsigned long frame, unsigned long nr_frames,
                                           void **paddr, int prot, int flags)
{
    (void)h;
    fx_init();
    if (type != RESOURCE_grant_table || id != 0) {
        fx_log("d%u: map_resource type %u id %u not simulated", domid, type, id);
        errno = EOPNOTSUPP;
        return NULL;
    }
    if (frame != 0 || nr_frames != 1 || !paddr) {
        errno = EINVAL;
        return NULL;
    }
    struct fxdom *d = dom_live(domid);
    if (!d)
        return NULL;
    struct fx_resource *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    int fixed = *paddr && (flags & MAP_FIXED);
    void *p = mmap(*paddr, FX_PAGE_SIZE, prot, MAP_SHARED | (fixed ? MAP_FIXED : 0), d->ctlfd,
                   (off_t)FX_GNT_OFF);
    g_stats.mmaps++;
    if (p == MAP_FAILED) {
        int e = errno;
        free(r);
        errno = e;
        return NULL;
    }
    r->addr = p;
    r->len = FX_PAGE_SIZE;
    *paddr = p;
    TRACE("d%u map_resource grant table frame 0 -> %p", domid, p);
    return r;
}

EXPORT int xenforeignmemory_unmap_resource(void *h, void *res)
{
    (void)h;
    struct fx_resource *r = res;
    if (!r)
        return 0;
    int rc = munmap(r->addr, r->len);
    g_stats.munmaps++;
    free(r);
    return rc;
}

EXPORT int xenforeignmemory_resource_size(void *h, uint16_t domid, unsigned type, unsigned id,
                                          size_t *size)
{
    (void)h;
    (void)domid;
    if (type != RESOURCE_grant_table || id != 0) {
        errno = EOPNOTSUPP;
        return -1;
    }
    *size = FX_PAGE_SIZE;
    return 0;
}

/* ---- libxendevicemodel ---------------------------------------------- */

EXPORT void *xendevicemodel_open(void *logger, unsigned flags)
{
    (void)logger;
    (void)flags;
    return handle_new(DM_MAGIC);
}

EXPORT int xendevicemodel_close(void *h) { return handle_close(h, DM_MAGIC); }

/*
 * libxenctrl imports these; none is called during save/restore.  They would
 * otherwise receive our handle and dereference it, so they fail cleanly.
 */
#define DM_STUB(name) \
    EXPORT int name(void) { fx_log(#name " not simulated"); errno = ENOSYS; return -1; }
DM_STUB(xendevicemodel_create_ioreq_server)
DM_STUB(xendevicemodel_get_ioreq_server_info)
DM_STUB(xendevicemodel_map_io_range_to_ioreq_server)
DM_STUB(xendevicemodel_unmap_io_range_from_ioreq_server)
DM_STUB(xendevicemodel_map_pcidev_to_ioreq_server)
DM_STUB(xendevicemodel_unmap_pcidev_from_ioreq_server)
DM_STUB(xendevicemodel_destroy_ioreq_server)
DM_STUB(xendevicemodel_set_ioreq_server_state)
DM_STUB(xendevicemodel_set_pci_intx_level)
DM_STUB(xendevicemodel_set_isa_irq_level)
DM_STUB(xendevicemodel_set_pci_link_route)
DM_STUB(xendevicemodel_inject_msi)
DM_STUB(xendevicemodel_track_dirty_vram)
DM_STUB(xendevicemodel_modified_memory)
DM_STUB(xendevicemodel_set_mem_type)
DM_STUB(xendevicemodel_inject_event)
DM_STUB(xendevicemodel_pin_memory_cacheattr)
