/*
 * simctl.h -- the shared state of one simulated domain (pyxl's fakexen).
 *
 * Shared by libfakexen.so (the simulated hypervisor, preloaded into a
 * save/restore helper), pyxl-sim-vcpu (the simulated guest) and pyxl/sim.py
 * (the control API, which mirrors every offset below; `pyxl-sim-vcpu layout`
 * prints them and a test compares).
 *
 * A domain lives in the directory  $PYXL_SIM_DIR/d<domid>/:
 *
 *   ctl        the control block below, mmap'd MAP_SHARED by everyone
 *   mem        guest-physical memory, one 4 KiB page per pfn at offset
 *              pfn * 4096; a sparse file sized for the whole guest-physical
 *              space, with only populated pages allocated (fallocate)
 *   vcpu.lock  flock'd (LOCK_EX) by the live vCPU process for its lifetime:
 *              "is a vCPU running?" is a non-blocking flock attempt, never a
 *              pid test
 *
 * Creation builds the directory under a temporary name and renames it into
 * place, so a d<domid> directory is always complete.
 *
 * The control block (all integers little endian, naturally aligned):
 *
 *   0x000000  struct fx_ctl        one page of scalars
 *   0x001000  grant table frame    one page (map_resource type 1 frame 0)
 *   0x002000  CPUID leaves         FX_MAX_LEAVES x 24 bytes
 *   0x002c00  MSRs                 FX_MAX_MSRS x 16 bytes
 *   0x003000  config JSON          FX_CONFIG_MAX bytes (libxl-style)
 *   0x013000  HVM context blob     FX_HVMCTX_MAX bytes
 *   0x113000  populated bitmap     nr_pfns bits (bit p%64 of u64 word p/64)
 *   ...       dirty bitmap         nr_pfns bits, same layout
 *
 * nr_pfns is a multiple of FX_PFN_ALIGN so both bitmaps are page aligned.
 */
#ifndef PYXL_FAKEXEN_SIMCTL_H
#define PYXL_FAKEXEN_SIMCTL_H

#include <stddef.h>
#include <stdint.h>

#define FX_PAGE_SHIFT       12
#define FX_PAGE_SIZE        4096UL

#define FX_CTL_MAGIC        0x314c544358594c50ULL  /* "PLYXCTL1" little endian */
#define FX_CTL_VERSION      1

#define FX_GNT_OFF          0x001000UL
#define FX_LEAVES_OFF       0x002000UL
#define FX_MSRS_OFF         0x002c00UL
#define FX_CONFIG_OFF       0x003000UL
#define FX_CONFIG_MAX       0x010000UL
#define FX_HVMCTX_OFF       0x013000UL
#define FX_HVMCTX_MAX       0x100000UL
#define FX_BITMAPS_OFF      0x113000UL

#define FX_MAX_LEAVES       120   /* CPUID_MAX_SERIALISED_LEAVES */
#define FX_MAX_MSRS         2     /* MSR_MAX_SERIALISED_ENTRIES */
#define FX_NR_PARAMS        39    /* HVM_NR_PARAMS in 4.17 */
#define FX_PFN_ALIGN        32768 /* bits per bitmap page */

/* The libxl HVM guest-physical layout the simulator builds. */
#define FX_VGA_HOLE_START   0xa0UL
#define FX_VGA_HOLE_END     0xc0UL      /* exclusive */
#define FX_LOWMEM_END       0xf0000UL   /* RAM below 4 GiB stops at 3.75 GiB */
#define FX_HIGHMEM_START    0x100000UL  /* RAM above the MMIO hole */
#define FX_SPECIAL_START    0xfeff0UL   /* ioreq servers, rings, store, console */
#define FX_SPECIAL_END      0xff000UL   /* exclusive */
#define FX_GUEST_STATE_PFN  0UL         /* the simulated vCPU keeps its state here */

/* Domain run state (fx_ctl.state). */
enum fx_state {
    FX_RUNNING = 0,
    FX_PAUSED = 1,
    FX_SUSPENDED = 2,   /* shut down with reason suspend, and paused */
    FX_DYING = 3,
};

/* Controller -> vCPU requests (fx_ctl.req; fx_ctl.req_seq is bumped per request). */
enum fx_req {
    FX_REQ_NONE = 0,
    FX_REQ_RUN = 1,
    FX_REQ_PAUSE = 2,
    FX_REQ_SUSPEND = 3,
    FX_REQ_EXIT = 4,
};

struct fx_tsc {
    uint32_t mode;
    uint32_t gtsc_khz;
    uint32_t incarnation;
    uint32_t pad;
    uint64_t elapsed_nsec;
};

struct fx_ctl {
    uint64_t magic;            /* 0x000 */
    uint32_t version;          /* 0x008 */
    uint32_t domid;            /* 0x00c */
    uint64_t nr_pfns;          /* 0x010 guest-physical pages the mem file covers */
    uint64_t max_pages;        /* 0x018 populate limit (Xen's max_pages) */
    uint64_t tot_pages;        /* 0x020 populated pages */
    uint64_t max_gpfn;         /* 0x028 highest populated pfn (0 when none) */
    uint32_t state;            /* 0x030 enum fx_state */
    uint32_t shutdown_reason;  /* 0x034 meaningful when state == FX_SUSPENDED */
    uint32_t req;              /* 0x038 enum fx_req */
    uint32_t req_seq;          /* 0x03c futex word, bumped by the controller */
    uint32_t ack_seq;          /* 0x040 futex word, = req_seq once the vCPU acted */
    int32_t  vcpu_pid;         /* 0x044 informational; liveness is vcpu.lock */
    uint64_t dirty_rate;       /* 0x048 guest write rate, bytes/s (0 = idle) */
    uint32_t logdirty;         /* 0x050 log-dirty mode on */
    uint32_t hvm;              /* 0x054 always 1 */
    uint64_t mem_bytes;        /* 0x058 RAM the domain was created with */
    struct fx_tsc tsc;         /* 0x060 */
    uint64_t params[64];       /* 0x078 HVM params (FX_NR_PARAMS used) */
    uint32_t hvmctx_len;       /* 0x278 */
    uint32_t nr_leaves;        /* 0x27c */
    uint32_t nr_msrs;          /* 0x280 */
    uint32_t config_len;       /* 0x284 */
    uint8_t  uuid[16];         /* 0x288 */
    char     name[64];         /* 0x298 NUL terminated */
    uint64_t created_ns;       /* 0x2d8 CLOCK_REALTIME */
    uint64_t populated_off;    /* 0x2e0 = FX_BITMAPS_OFF */
    uint64_t dirty_off;        /* 0x2e8 = populated_off + nr_pfns / 8 */
    uint64_t ctl_size;         /* 0x2f0 total size of the ctl file */
    uint64_t vcpu_starts;      /* 0x2f8 vCPU processes started on this domain */
    uint32_t resume_paused;    /* 0x300 paused by the toolstack while suspended:
                                  resume leaves it paused (Xen's pause count) */
    uint32_t cpu_cap;          /* 0x304 scheduler cap, percent of one CPU (Xen's credit
                                  and credit2 `cap`); 0 = uncapped.  The vCPU runs
                                  only this share of the time, so it dirties at
                                  dirty_rate * cpu_cap / 100.  Not migrated, as in Xen. */
};

_Static_assert(offsetof(struct fx_ctl, state) == 0x30, "fx_ctl layout");
_Static_assert(offsetof(struct fx_ctl, tsc) == 0x60, "fx_ctl layout");
_Static_assert(offsetof(struct fx_ctl, params) == 0x78, "fx_ctl layout");
_Static_assert(offsetof(struct fx_ctl, hvmctx_len) == 0x278, "fx_ctl layout");
_Static_assert(offsetof(struct fx_ctl, vcpu_starts) == 0x2f8, "fx_ctl layout");
_Static_assert(offsetof(struct fx_ctl, resume_paused) == 0x300, "fx_ctl layout");
_Static_assert(offsetof(struct fx_ctl, cpu_cap) == 0x304, "fx_ctl layout");
_Static_assert(sizeof(struct fx_ctl) <= 0x1000, "fx_ctl fits its page");

/*
 * The simulated guest's own state, in guest memory at FX_GUEST_STATE_PFN,
 * so that a vCPU started on a restored domain continues where the source
 * stopped.
 *
 * Guest RAM pages (populated, outside [FX_LOWMEM_END, FX_HIGHMEM_START) and
 * not the state page) are written in a tour in pfn order.  Lap L writes
 * generation L; pages below `cursor` carry generation `lap`, the others
 * `lap - 1`.  Creation stamps every RAM page with generation 0 and sets
 * lap = 1, cursor = the first RAM pfn.
 */
#define FX_GUEST_MAGIC      0x54534555474c5850ULL  /* "PXLGUEST" */
#define FX_PAGE_MAGIC       0x4547415054534950ULL  /* "PISTPAGE" head */
#define FX_PAGE_MAGIC_TAIL  0x4c494154544d4953ULL  /* "SIMTTAIL" tail */

struct fx_guest_state {
    uint64_t magic;
    uint64_t lap;
    uint64_t cursor;           /* next pfn to write in this lap */
    uint64_t pages_written;    /* page writes since creation, across migrations */
    uint64_t boots;            /* vCPU processes that ran this guest */
    uint64_t ram_pages;        /* RAM pages in the tour */
};

/* Page format: words 0..2 head {magic, pfn, gen}, 3..508 body, 509..511 tail {gen, pfn, magic}. */
#define FX_WORDS_PER_PAGE   512

static inline uint64_t fx_body_word(uint64_t pfn, uint64_t gen, unsigned i)
{
    uint64_t x = (pfn * 0x9e3779b97f4a7c15ULL) ^ (gen * 0xc2b2ae3d27d4eb4fULL);
    return x + (uint64_t)i * 0x165667b19e3779f9ULL;
}

static inline int fx_is_guest_ram(uint64_t pfn)
{
    return pfn != FX_GUEST_STATE_PFN && (pfn < FX_LOWMEM_END || pfn >= FX_HIGHMEM_START);
}

#endif
