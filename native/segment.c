// SPDX-License-Identifier: MIT
/*
 * segment.c - the domain's format, its robust locks, the callback-name table
 * and fault injection.
 *
 * A segment is formatted in full before it gets its name (the Python side
 * formats it under a temporary name and links it into place), so an opener
 * never sees a half-made one; the magic is still written last.
 *
 * Layer: segment. Calls sys.
 */
#include "tw_internal.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* fault injection                                                           */

static int kp_point = -1;          /* -1: not yet read from the environment */
static int kp_stop;                /* ":stop": SIGSTOP instead of SIGKILL   */
static int64_t kp_count;

static void kp_init(void)
{
    static const char *names[] = { "", "after_alloc", "after_push", "after_detach",
                                   "in_pi_lock", "mid_pop", "in_callback", "in_claim",
                                   "in_register", "in_reap", "in_dl_file", "in_detach",
                                   "key_reserved", "key_pushed", "mid_batch_pop",
                                   "mid_batch_push", "in_notify" };
    const char *env = getenv("SHM_TASKWORK_KILLPOINT");
    kp_point = TW_KP_NONE;
    kp_count = 1;
    kp_stop = 0;
    if (!env || !*env)
        return;
    for (int i = 1; i < (int)(sizeof(names) / sizeof(names[0])); i++) {
        size_t n = strlen(names[i]);
        if (strncmp(env, names[i], n) != 0 || (env[n] != 0 && env[n] != ':'))
            continue;
        kp_point = i;
        const char *rest = env + n;
        if (*rest == ':' && rest[1] >= '0' && rest[1] <= '9') {
            char *end;
            kp_count = strtoll(rest + 1, &end, 10);
            rest = end;
        }
        if (strcmp(rest, ":stop") == 0)
            kp_stop = 1;
        if (kp_count < 1)
            kp_count = 1;
    }
}

void tw_killpoint_set(int point, int64_t countdown)
{
    kp_point = point;
    kp_count = countdown < 1 ? 1 : countdown;
}

int tw_killpoint_get(void)
{
    if (kp_point < 0)
        kp_init();
    return kp_point;
}

void tw_killpoint(int point)
{
    if (__builtin_expect(kp_point < 0, 0))
        kp_init();
    if (__builtin_expect(kp_point == point, 0) && --kp_count <= 0) {
        kp_point = TW_KP_NONE;       /* once: a stopped process goes on when continued */
        kill(getpid(), kp_stop ? SIGSTOP : SIGKILL);
    }
}

/* ------------------------------------------------------------------------ */
/* clocks and robust locks, never waited on forever                          */

int tw_mutex_init_robust(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    int r = pthread_mutexattr_init(&a);
    if (r)
        return -r;
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    r = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return -r;
}

int tw_mutex_sane(pthread_mutex_t *m)
{
#ifdef __GLIBC__
    /* glibc keeps the mutex's type inside the mutex, i.e. in the segment.
     * Garbage there selects code paths (priority protection, PI) that
     * assert() on values they never expect and abort the process. Take only
     * a mutex that still has the type tw_format() gave it. (The type of a
     * freshly made robust, process-shared mutex, computed once; racing
     * first callers compute the same value.) */
    static int robust_kind = -1;
    if (__builtin_expect(LD_RLX(&robust_kind) < 0, 0)) {
        pthread_mutex_t t;
        if (tw_mutex_init_robust(&t) == 0) {
            ST_RLX(&robust_kind, t.__data.__kind);
            pthread_mutex_destroy(&t);
        }
    }
    return LD_RLX(&m->__data.__kind) == LD_RLX(&robust_kind);
#else
    return 1;
#endif
}

/*
 * Take a robust mutex with a deadline on CLOCK_MONOTONIC (a wall-clock step
 * must not shorten or stretch it). EOWNERDEAD: the previous owner died inside
 * its critical section; the state it guarded is consistent at every step
 * (each change there is a single compare-and-swap, or is recovered by the
 * caller), so we mark the mutex consistent - without that call it would be
 * ENOTRECOVERABLE forever - and report the recovery through *recovered.
 */
int tw_lock(pthread_mutex_t *m, int64_t timeout_ns, uint32_t *recovered)
{
    if (!tw_mutex_sane(m))
        return -EUCLEAN;
    /* Uncontended (the common case): no deadline needed, so no clock read. */
    int r = pthread_mutex_trylock(m);
    if (r == 0)
        return 0;
    if (r == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        if (recovered)
            ST_REL(recovered, 1u);
        return 0;
    }
    if (r != EBUSY)
        return -EUCLEAN;        /* ENOTRECOVERABLE, EINVAL: corrupt */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += timeout_ns / 1000000000LL;
    ts.tv_nsec += timeout_ns % 1000000000LL;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    r = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
    if (r == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        if (recovered)
            ST_REL(recovered, 1u);
        return 0;
    }
    if (r == 0)
        return 0;
    if (r == ETIMEDOUT)
        return -ETIMEDOUT;
    return -EUCLEAN;            /* ENOTRECOVERABLE, EINVAL, EDEADLK: corrupt */
}

int tw_fsck_lock(struct tw_dom *d)
{
    return tw_lock(&HDR(d)->fsck_lock, d->lock_timeout_ns, NULL);
}

void tw_fsck_unlock(struct tw_dom *d)
{
    pthread_mutex_unlock(&HDR(d)->fsck_lock);
}

/* ------------------------------------------------------------------------ */
/* format                                                                     */

static uint64_t align64(uint64_t x) { return (x + 63) & ~63ull; }

static uint32_t node_size_for(uint32_t payload_size, uint32_t record_origin)
{
    return (uint32_t)align64(TW_NODE_HDR + (record_origin ? TW_ORIGIN_LEN : 0) + payload_size);
}

uint32_t tw_layout_version(void) { return TW_LAYOUT_VERSION; }
uint32_t tw_node_header_size(void) { return TW_NODE_HDR; }

uint32_t tw_outcome_rec_size(uint32_t payload_size)
{
    return (uint32_t)align64(sizeof(struct tw_outcome) + payload_size);
}

uint64_t tw_layout_size(uint32_t max_tasks, uint32_t pool_size, uint32_t payload_size,
                        uint32_t max_procs, uint32_t names_cap, uint32_t record_origin,
                        uint32_t outcomes)
{
    uint64_t off = align64(sizeof(struct tw_header));
    off += align64((uint64_t)max_tasks * sizeof(struct tw_slot));
    off += align64((uint64_t)max_procs * sizeof(struct tw_proc));
    off += align64((uint64_t)names_cap * sizeof(struct tw_name));
    off += (uint64_t)pool_size * node_size_for(payload_size, record_origin);
    off += (uint64_t)TW_KEYS_CAP * sizeof(struct tw_key);   /* nodes end 64-aligned */
    off += TW_KEY_TAGS_SIZE;                                 /* (so do the keys)     */
    off = align64(off);
    off += (uint64_t)outcomes * tw_outcome_rec_size(payload_size);
    return off;
}

static int sizes_ok(uint32_t max_tasks, uint32_t pool_size, uint32_t payload_size,
                    uint32_t max_procs, uint32_t names_cap, uint32_t outcomes)
{
    return outcomes >= 1 && outcomes <= TW_OUTCOMES_LIMIT && max_tasks >= 1 && max_tasks <= MAX_TASKS_LIMIT && pool_size >= 1 &&
           pool_size <= MAX_POOL_LIMIT && payload_size <= MAX_PAYLOAD && max_procs >= 1 &&
           max_procs <= MAX_PROCS_LIMIT && names_cap >= 1 && names_cap <= (1u << 20);
}

int tw_format(void *base, uint64_t size, uint32_t max_tasks, uint32_t pool_size,
              uint32_t payload_size, uint32_t max_procs, uint32_t names_cap,
              uint32_t record_origin, uint32_t outcomes, uint64_t now_ns)
{
    if (!sizes_ok(max_tasks, pool_size, payload_size, max_procs, names_cap, outcomes))
        return -EINVAL;
    if (size < tw_layout_size(max_tasks, pool_size, payload_size, max_procs, names_cap,
                              record_origin, outcomes))
        return -EINVAL;
    char *b = base;
    struct tw_header *h = base;
    memset(h, 0, sizeof(*h));
    h->layout_version = TW_LAYOUT_VERSION;
    h->node_size = node_size_for(payload_size, record_origin);
    h->header_size = sizeof(struct tw_header);
    h->slot_size = sizeof(struct tw_slot);
    h->max_tasks = max_tasks;
    h->pool_size = pool_size;
    h->payload_size = payload_size;
    h->max_procs = max_procs;
    h->names_cap = names_cap;
    h->record_origin = record_origin ? 1 : 0;
    uint64_t off = align64(sizeof(struct tw_header));
    h->slots_off = off;
    off += align64((uint64_t)max_tasks * sizeof(struct tw_slot));
    h->procs_off = off;
    off += align64((uint64_t)max_procs * sizeof(struct tw_proc));
    h->names_off = off;
    off += align64((uint64_t)names_cap * sizeof(struct tw_name));
    h->nodes_off = off;
    off += (uint64_t)pool_size * h->node_size;
    h->keys_off = off;
    h->keys_cap = TW_KEYS_CAP;
    off += (uint64_t)TW_KEYS_CAP * sizeof(struct tw_key) + TW_KEY_TAGS_SIZE;
    memset(b + h->keys_off, 0, (uint64_t)TW_KEYS_CAP * sizeof(struct tw_key) + TW_KEY_TAGS_SIZE);
    off = align64(off);
    h->out_off = off;
    h->out_cap = outcomes;
    h->out_rec_size = tw_outcome_rec_size(payload_size);
    off += (uint64_t)outcomes * h->out_rec_size;
    memset(b + h->out_off, 0, (uint64_t)outcomes * h->out_rec_size);
    h->total_size = off;
    h->created_ns = now_ns;
    h->dl_head = TW_NIL;
    int r = tw_mutex_init_robust(&h->dl_lock);
    if (!r)
        r = tw_mutex_init_robust(&h->fsck_lock);
    if (!r)
        r = tw_mutex_init_robust(&h->keys_lock);
    if (r)
        return r;

    for (uint32_t i = 0; i < max_tasks; i++) {
        struct tw_slot *s = (struct tw_slot *)(b + h->slots_off + (uint64_t)i * sizeof(*s));
        memset(s, 0, sizeof(*s));
        s->head = HEAD(0, TW_EXITED);
        s->efd = -1;
        r = tw_mutex_init_robust(&s->pi_lock);
        if (r)
            return r;
    }
    for (uint32_t i = 0; i < max_procs; i++) {
        struct tw_proc *p = (struct tw_proc *)(b + h->procs_off + (uint64_t)i * sizeof(*p));
        memset(p, 0, sizeof(*p));
        for (int k = 0; k < TW_INTENTS; k++)
            p->intent[k] = ~0ull;
    }
    /* The free list starts as 0 -> 1 -> ... -> pool_size-1. */
    for (uint32_t i = 0; i < pool_size; i++) {
        struct tw_node *n = (struct tw_node *)(b + h->nodes_off + (uint64_t)i * h->node_size);
        n->owner = OWNER(0, TW_N_FREE, 0);
        n->next = (i + 1 < pool_size) ? i + 1 : TW_NIL;
    }
    h->free_head = HEAD(0, 0);
    /* Last: the magic. A reader that sees it sees a formatted segment. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(h->magic, TW_MAGIC, 8);
    return 0;
}

/*
 * Validate the header and fill the process-local view. Nothing here trusts
 * the segment: the sizes must be within limits and must describe exactly the
 * layout this build would make, or the mapping is refused.
 */
int tw_attach(struct tw_dom *d, void *base, uint64_t size)
{
    struct tw_header *h = base;
    memset(d, 0, sizeof(*d));
    if (size < sizeof(struct tw_header) || memcmp(h->magic, TW_MAGIC, 8) != 0)
        return -EUCLEAN;
    if (h->layout_version != TW_LAYOUT_VERSION || h->header_size != sizeof(struct tw_header) ||
        h->slot_size != sizeof(struct tw_slot))
        return -EPROTO;
    uint32_t mt = h->max_tasks, ps = h->pool_size, pl = h->payload_size, mp = h->max_procs,
             nc = h->names_cap, ro = h->record_origin, oc = h->out_cap;
    if (ro > 1 || !sizes_ok(mt, ps, pl, mp, nc, oc) || h->node_size != node_size_for(pl, ro) ||
        h->out_rec_size != tw_outcome_rec_size(pl))
        return -EUCLEAN;
    uint64_t need = tw_layout_size(mt, ps, pl, mp, nc, ro, oc);
    if (need > size || h->total_size != need)
        return -EUCLEAN;
    uint64_t off = align64(sizeof(struct tw_header));
    if (h->slots_off != off)
        return -EUCLEAN;
    off += align64((uint64_t)mt * sizeof(struct tw_slot));
    if (h->procs_off != off)
        return -EUCLEAN;
    off += align64((uint64_t)mp * sizeof(struct tw_proc));
    if (h->names_off != off)
        return -EUCLEAN;
    off += align64((uint64_t)nc * sizeof(struct tw_name));
    if (h->nodes_off != off)
        return -EUCLEAN;
    off += (uint64_t)ps * h->node_size;
    if (h->keys_off != off || h->keys_cap != TW_KEYS_CAP)
        return -EUCLEAN;
    off = align64(off + (uint64_t)TW_KEYS_CAP * sizeof(struct tw_key) + TW_KEY_TAGS_SIZE);
    if (h->out_off != off)
        return -EUCLEAN;
    d->base = base;
    d->size = size;
    d->max_tasks = mt;
    d->pool_size = ps;
    d->payload_size = pl;
    d->node_size = h->node_size;
    d->max_procs = mp;
    d->names_cap = nc;
    d->out_cap = oc;
    d->out_rec_size = h->out_rec_size;
    d->out_off = h->out_off;
    d->record_origin = ro;
    d->origin_off = TW_NODE_HDR;
    d->payload_off = TW_NODE_HDR + (ro ? TW_ORIGIN_LEN : 0);
    d->slots_off = h->slots_off;
    d->procs_off = h->procs_off;
    d->names_off = h->names_off;
    d->nodes_off = h->nodes_off;
    d->my_proc = -1;
    d->my_pid = getpid();
    d->my_start = tw_proc_start_ticks(d->my_pid);
    d->lock_timeout_ns = DEFAULT_LOCK_TIMEOUT_NS;
    /* Read the kill-point switch now: getenv() is not async-signal-safe, and
     * the first native call may otherwise be tw_add_nmi() in a handler. */
    (void)tw_killpoint_get();
    return 0;
}

int tw_map(struct tw_dom *d, int fd, uint64_t size)
{
    if (size < sizeof(struct tw_header))
        return -EUCLEAN;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    int r = tw_attach(d, p, size);
    if (r) {
        munmap(p, size);
        memset(d, 0, sizeof(*d));
    }
    return r;
}

/* ------------------------------------------------------------------------ */
/* callback names: open addressing on the id, claimed by CAS                  */

int tw_name_put(struct tw_dom *d, uint64_t id, const char *name, uint32_t len)
{
    if (id == 0)
        return -EINVAL;
    if (len >= TW_FUNC_NAME_LEN)
        return -ENAMETOOLONG;
    for (uint32_t k = 0; k < d->names_cap; k++) {
        struct tw_name *e = NAME(d, (uint32_t)((id + k) % d->names_cap));
        uint64_t cur = LD_ACQ(&e->id);
        if (cur == 0) {
            uint64_t expect = 0;
            /* acq_rel: pairs with the acquire loads of readers and racers. */
            if (!CAS(&e->id, &expect, id, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                cur = expect;
            else
                cur = id;
        }
        if (cur != id)
            continue;
        if (LD_ACQ(&e->ready))
            return 0;
        /* Claimed by us, or by someone who may have died before ready: the
         * name is the same bytes either way. */
        memcpy(e->name, name, len);
        e->name[len] = 0;
        e->len = len;
        ST_REL(&e->ready, 1u);   /* pairs with the acquire in tw_name_get */
        return 0;
    }
    return -ENOSPC;
}

int tw_name_get(struct tw_dom *d, uint64_t id, char *out, uint32_t cap)
{
    if (id == 0 || cap == 0)
        return -EINVAL;
    for (uint32_t k = 0; k < d->names_cap; k++) {
        struct tw_name *e = NAME(d, (uint32_t)((id + k) % d->names_cap));
        uint64_t cur = LD_ACQ(&e->id);
        if (cur == 0)
            return -ENOENT;
        if (cur != id)
            continue;
        if (!LD_ACQ(&e->ready))
            return -ENOENT;
        uint32_t len = LD_RLX(&e->len);   /* read once, then checked */
        if (len >= TW_FUNC_NAME_LEN)
            len = TW_FUNC_NAME_LEN - 1;
        if (len >= cap)
            len = cap - 1;
        memcpy(out, e->name, len);
        out[len] = 0;
        return (int)len;
    }
    return -ENOENT;
}

struct tw_name *tw_name_find(struct tw_dom *d, uint64_t id)
{
    if (id == 0)
        return NULL;
    for (uint32_t k = 0; k < d->names_cap; k++) {
        struct tw_name *e = NAME(d, (uint32_t)((id + k) % d->names_cap));
        uint64_t cur = LD_ACQ(&e->id);
        if (cur == 0)
            return NULL;
        if (cur == id)
            return LD_ACQ(&e->ready) ? e : NULL;
    }
    return NULL;
}

int tw_name_set_codec(struct tw_dom *d, uint64_t id, uint32_t codec)
{
    if (id == 0 || codec == TW_CODEC_RAW || codec > TW_CODEC_MAX)
        return -EINVAL;
    struct tw_name *e = tw_name_find(d, id);
    if (e == NULL)
        return -ENOENT;
    uint32_t expect = TW_CODEC_RAW;
    /* The first declaration wins: only a name still raw (0) takes a codec,
     * and one that has one keeps it for the life of the segment. acq_rel:
     * pairs with the acquire in tw_name_codec and in racing setters. */
    if (CAS(&e->codec, &expect, codec, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return (int)codec;
    /* expect: what the winner recorded - read from the segment, so checked */
    return expect <= TW_CODEC_MAX ? (int)expect : -EUCLEAN;
}

int tw_name_codec(struct tw_dom *d, uint64_t id)
{
    if (id == 0)
        return -EINVAL;
    struct tw_name *e = tw_name_find(d, id);
    if (e == NULL)
        return -ENOENT;
    /* acquire: pairs with the CAS in tw_name_set_codec */
    uint32_t codec = LD_ACQ(&e->codec);
    return codec <= TW_CODEC_MAX ? (int)codec : -EUCLEAN;
}

