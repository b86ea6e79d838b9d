// SPDX-License-Identifier: MIT
/*
 * taskwork.c - kernel/task_work.c over POSIX shared memory.
 *
 * A task's list is a LIFO of pool nodes whose head is slot.head. The slot's
 * registration generation lives in the upper half of that word, so a push
 * aimed at an older registration of a reused slot can never succeed: the
 * generation is part of the value compare-and-swap compares.
 *
 * Ownership: every node carries an owner word (gen | state | aux). Each
 * transition is made by the party that owns the node at that moment, or by
 * compare-and-swap where two parties may race for it (an adder whose push
 * failed against fsck reclaiming a dead task's nodes). fsck reads the words to
 * find what a dead process held; nothing else depends on them.
 *
 * Functions return 0, a count or a bit mask (>= 0), or -errno:
 *   -ESRCH   the task exited (or the handle is for an older registration)
 *   -EINVAL  bad argument (notify mode, index)
 *   -E2BIG   payload larger than the domain's payload_size
 *   -ENOMEM  the pool is empty
 *   -EPERM   not the task's own process
 *   -EUCLEAN the segment is inconsistent (bad index, walk too long)
 *   -ETIMEDOUT a lock was not obtained in time (owner stuck or corrupt)
 *   -EUSERS  the process table is full
 */
#define _GNU_SOURCE
#include "taskwork.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

#define OWNER(gen, st, aux) \
    (((uint64_t)(uint32_t)(gen) << 32) | ((uint64_t)((st) & 0xff) << 24) | ((aux) & 0xffffffu))
#define O_GEN(o)   ((uint32_t)((o) >> 32))
#define O_STATE(o) ((uint32_t)(((o) >> 24) & 0xff))
#define O_AUX(o)   ((uint32_t)((o) & 0xffffff))
#define HEAD(gen, idx) (((uint64_t)(uint32_t)(gen) << 32) | (uint32_t)(idx))
#define H_GEN(h)   ((uint32_t)((h) >> 32))
#define H_IDX(h)   ((uint32_t)(h))

#define LD_ACQ(p)        __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LD_RLX(p)        __atomic_load_n((p), __ATOMIC_RELAXED)
#define ST_REL(p, v)     __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define ST_RLX(p, v)     __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define CAS(p, e, v, so, fo) __atomic_compare_exchange_n((p), (e), (v), 0, (so), (fo))
#define ADD_RLX(p, v)    __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)

#define MAX_TASKS_LIMIT  4096u
#define MAX_POOL_LIMIT   (1u << 24)
#define MAX_PAYLOAD      (1u << 20)
#define MAX_PROCS_LIMIT  65536u
#define DEFAULT_LOCK_TIMEOUT_NS (2LL * 1000 * 1000 * 1000)
#define POP_RETRIES      (1u << 22)

/* ------------------------------------------------------------------------ */
/* fault injection                                                           */

static int kp_point = -1;          /* -1: not yet read from the environment */
static int64_t kp_count;

static void kp_init(void)
{
    static const char *names[] = { "", "after_alloc", "after_push", "after_detach",
                                   "in_pi_lock", "mid_pop", "in_callback" };
    const char *env = getenv("SHM_TASKWORK_KILLPOINT");
    kp_point = TW_KP_NONE;
    kp_count = 1;
    if (!env || !*env)
        return;
    for (int i = 1; i < (int)(sizeof(names) / sizeof(names[0])); i++) {
        size_t n = strlen(names[i]);
        if (strncmp(env, names[i], n) == 0 && (env[n] == 0 || env[n] == ':')) {
            kp_point = i;
            if (env[n] == ':')
                kp_count = strtoll(env + n + 1, NULL, 10);
            if (kp_count < 1)
                kp_count = 1;
        }
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
    if (__builtin_expect(kp_point == point, 0) && --kp_count <= 0)
        kill(getpid(), SIGKILL);
}

/* ------------------------------------------------------------------------ */
/* addressing: every index is checked against the sizes of the local view    */

static inline struct tw_header *HDR(struct tw_dom *d) { return (struct tw_header *)d->base; }

static inline struct tw_slot *SLOT(struct tw_dom *d, uint32_t i)
{
    return (struct tw_slot *)(d->base + d->slots_off + (uint64_t)i * sizeof(struct tw_slot));
}

static inline struct tw_proc *PROC(struct tw_dom *d, uint32_t i)
{
    return (struct tw_proc *)(d->base + d->procs_off + (uint64_t)i * sizeof(struct tw_proc));
}

static inline struct tw_name *NAME(struct tw_dom *d, uint32_t i)
{
    return (struct tw_name *)(d->base + d->names_off + (uint64_t)i * sizeof(struct tw_name));
}

static inline struct tw_node *NODE(struct tw_dom *d, uint32_t i)
{
    return (struct tw_node *)(d->base + d->nodes_off + (uint64_t)i * d->node_size);
}

static inline int node_ok(struct tw_dom *d, uint32_t i) { return i < d->pool_size; }
static inline int slot_ok(struct tw_dom *d, uint32_t i) { return i < d->max_tasks; }

static uint64_t now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------------ */
/* robust locks, never waited on forever                                      */

static int mutex_init_robust(pthread_mutex_t *m)
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

/*
 * Take a robust mutex with a deadline. EOWNERDEAD: the previous owner died
 * inside its critical section; the state it guarded is consistent at every
 * step (each change there is a single compare-and-swap), so we mark the mutex
 * consistent - without that call it would be ENOTRECOVERABLE forever - and
 * report the recovery through *recovered so the task's runner can look for
 * a node the dead owner was cancelling.
 */
static int lock_deadline(pthread_mutex_t *m, int64_t timeout_ns, uint32_t *recovered)
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
        if (mutex_init_robust(&t) == 0) {
            ST_RLX(&robust_kind, t.__data.__kind);
            pthread_mutex_destroy(&t);
        }
    }
    if (LD_RLX(&m->__data.__kind) != LD_RLX(&robust_kind))
        return -EUCLEAN;
#endif
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ns / 1000000000LL;
    ts.tv_nsec += timeout_ns % 1000000000LL;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    int r = pthread_mutex_timedlock(m, &ts);
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
    return lock_deadline(&HDR(d)->fsck_lock, d->lock_timeout_ns, NULL);
}

void tw_fsck_unlock(struct tw_dom *d)
{
    pthread_mutex_unlock(&HDR(d)->fsck_lock);
}

/* ------------------------------------------------------------------------ */
/* segment                                                                    */

static uint64_t align64(uint64_t x) { return (x + 63) & ~63ull; }

static uint32_t node_size_for(uint32_t payload_size, uint32_t record_origin)
{
    return (uint32_t)align64(TW_NODE_HDR + (record_origin ? TW_ORIGIN_LEN : 0) + payload_size);
}

uint32_t tw_layout_version(void) { return TW_LAYOUT_VERSION; }
uint32_t tw_node_header_size(void) { return TW_NODE_HDR; }

uint64_t tw_layout_size(uint32_t max_tasks, uint32_t pool_size, uint32_t payload_size,
                        uint32_t max_procs, uint32_t names_cap, uint32_t record_origin)
{
    uint64_t off = align64(sizeof(struct tw_header));
    off += align64((uint64_t)max_tasks * sizeof(struct tw_slot));
    off += align64((uint64_t)max_procs * sizeof(struct tw_proc));
    off += align64((uint64_t)names_cap * sizeof(struct tw_name));
    off += (uint64_t)pool_size * node_size_for(payload_size, record_origin);
    return off;
}

static int sizes_ok(uint32_t max_tasks, uint32_t pool_size, uint32_t payload_size,
                    uint32_t max_procs, uint32_t names_cap)
{
    return max_tasks >= 1 && max_tasks <= MAX_TASKS_LIMIT && pool_size >= 1 &&
           pool_size <= MAX_POOL_LIMIT && payload_size <= MAX_PAYLOAD && max_procs >= 1 &&
           max_procs <= MAX_PROCS_LIMIT && names_cap >= 1 && names_cap <= (1u << 20);
}

int tw_format(void *base, uint64_t size, uint32_t max_tasks, uint32_t pool_size,
              uint32_t payload_size, uint32_t max_procs, uint32_t names_cap,
              uint32_t record_origin, uint64_t now_ns)
{
    if (!sizes_ok(max_tasks, pool_size, payload_size, max_procs, names_cap))
        return -EINVAL;
    if (size < tw_layout_size(max_tasks, pool_size, payload_size, max_procs, names_cap,
                              record_origin))
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
    h->total_size = off;
    h->created_ns = now_ns;
    h->dl_head = TW_NIL;
    int r = mutex_init_robust(&h->dl_lock);
    if (!r)
        r = mutex_init_robust(&h->fsck_lock);
    if (r)
        return r;

    for (uint32_t i = 0; i < max_tasks; i++) {
        struct tw_slot *s = (struct tw_slot *)(b + h->slots_off + (uint64_t)i * sizeof(*s));
        memset(s, 0, sizeof(*s));
        s->head = HEAD(0, TW_EXITED);
        s->efd = -1;
        r = mutex_init_robust(&s->pi_lock);
        if (r)
            return r;
    }
    for (uint32_t i = 0; i < max_procs; i++) {
        struct tw_proc *p = (struct tw_proc *)(b + h->procs_off + (uint64_t)i * sizeof(*p));
        p->pid = 0;
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
             nc = h->names_cap, ro = h->record_origin;
    if (ro > 1 || !sizes_ok(mt, ps, pl, mp, nc) || h->node_size != node_size_for(pl, ro))
        return -EUCLEAN;
    uint64_t need = tw_layout_size(mt, ps, pl, mp, nc, ro);
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
    d->base = base;
    d->size = size;
    d->max_tasks = mt;
    d->pool_size = ps;
    d->payload_size = pl;
    d->node_size = h->node_size;
    d->max_procs = mp;
    d->names_cap = nc;
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

void tw_unmap(struct tw_dom *d)
{
    if (d->base)
        munmap(d->base, d->size);
    d->base = NULL;
    d->size = 0;
}

/* ------------------------------------------------------------------------ */
/* processes                                                                  */

uint64_t tw_proc_start_ticks(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');   /* comm may hold spaces and parentheses */
    if (!p)
        return 0;
    /* after ')' come fields 3.. ; starttime is field 22 */
    int field = 2;
    for (p++; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return strtoull(p, NULL, 10);
}

/* Claim (or find) this process's entry in the process table. The entry holds
 * the intent of a free-list pop in flight, so fsck can tell a node popped by
 * a process that then died from one another process is still popping. */
int tw_proc_claim(struct tw_dom *d)
{
    if (d->my_proc >= 0)              /* reset to -1 in a forked child */
        return d->my_proc;
    int pid = getpid();
    if (d->my_pid != pid) {
        d->my_pid = pid;
        d->my_start = tw_proc_start_ticks(pid);
    }
    for (uint32_t i = 0; i < d->max_procs; i++) {
        struct tw_proc *p = PROC(d, i);
        uint64_t expect = 0;
        /* Claim a free entry. Pairs with the release store of tw_proc_free(). */
        if (LD_RLX(&p->pid) == 0 &&
            CAS(&p->pid, &expect, (uint64_t)pid, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            for (int k = 0; k < TW_INTENTS; k++)
                ST_RLX(&p->intent[k], ~0ull);
            ST_REL(&p->start_ticks, d->my_start);
            d->my_proc = (int32_t)i;
            return (int)i;
        }
    }
    return -EUSERS;
}

void tw_proc_release(struct tw_dom *d)
{
    if (d->my_proc >= 0 && d->my_pid == getpid()) {
        struct tw_proc *p = PROC(d, (uint32_t)d->my_proc);
        /* Release: pairs with the acquire CAS of the next tw_proc_claim();
         * no operation of ours is in flight, so no intent word is set. */
        ST_RLX(&p->start_ticks, 0);
        ST_REL(&p->pid, 0);
    }
    d->my_proc = -1;
}

int tw_proc_info(struct tw_dom *d, uint32_t i, uint64_t *pid, uint64_t *start)
{
    if (i >= d->max_procs)
        return -EINVAL;
    struct tw_proc *p = PROC(d, i);
    *pid = LD_ACQ(&p->pid);
    *start = LD_ACQ(&p->start_ticks);
    return 0;
}

/* fsck: free the entry of a dead process, only if it still names that pid. */
int tw_proc_free(struct tw_dom *d, uint32_t i, uint64_t pid)
{
    if (i >= d->max_procs)
        return -EINVAL;
    struct tw_proc *p = PROC(d, i);
    for (int k = 0; k < TW_INTENTS; k++)
        ST_RLX(&p->intent[k], ~0ull);
    uint64_t expect = pid;
    return CAS(&p->pid, &expect, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED) ? 0 : -EBUSY;
}

/* ------------------------------------------------------------------------ */
/* the pool: a Treiber stack with a tagged head                               */

/* A placeholder no node index can equal (its low half is TW_NIL). */
#define INTENT_CLAIMED HEAD(0xfffffffeu, TW_NIL)

/* Claim one intent word of our process entry; NULL if all are in use (more
 * than TW_INTENTS pool operations in flight in one process at once). */
static uint64_t *intent_claim(struct tw_dom *d)
{
    int pi = tw_proc_claim(d);
    if (pi < 0)
        return NULL;
    struct tw_proc *me = PROC(d, (uint32_t)pi);
    for (uint32_t spin = 0; spin < 1000000; spin++) {
        for (int k = 0; k < TW_INTENTS; k++) {
            uint64_t expect = ~0ull;
            if (LD_RLX(&me->intent[k]) == ~0ull &&
                CAS(&me->intent[k], &expect, INTENT_CLAIMED, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
                return &me->intent[k];
        }
    }
    return NULL;
}

static inline void intent_set(uint64_t *w, uint64_t v) { __atomic_store_n(w, v, __ATOMIC_SEQ_CST); }
static inline void intent_done(uint64_t *w) { __atomic_store_n(w, ~0ull, __ATOMIC_SEQ_CST); }

/*
 * Pop one node. The head is tag<<32 | idx and every successful change bumps
 * the tag, so a CAS built on a stale read (the node was popped, reused and
 * pushed back meanwhile) fails instead of installing a stale ->next (ABA).
 * The intent is published before the CAS so that fsck, seeing a FREE node
 * outside the list, can tell "popped by a live process that has not yet
 * written the owner word" from "popped by a process that died".
 */
static int pool_pop(struct tw_dom *d, uint32_t *out)
{
    uint64_t *intent = intent_claim(d);
    if (!intent)
        return d->my_proc < 0 ? -EUSERS : -EBUSY;
    int pi = d->my_proc;
    struct tw_header *h = HDR(d);
    uint64_t head = LD_ACQ(&h->free_head);
    for (uint32_t tries = 0; tries < POP_RETRIES; tries++) {
        uint32_t idx = H_IDX(head);
        if (idx == TW_NIL) {
            intent_done(intent);
            return -ENOMEM;
        }
        if (!node_ok(d, idx)) {
            uint64_t again = LD_ACQ(&h->free_head);
            if (again == head) {
                intent_done(intent);
                return -EUCLEAN;
            }
            head = again;
            continue;
        }
        /* Intent before the CAS; seq_cst so fsck's reads order after it. */
        intent_set(intent, head);
        /* May read a ->next that a concurrent pop-reuse-push rewrote: then the
         * tag has moved and the CAS below fails. */
        uint32_t next = LD_RLX(&NODE(d, idx)->next);
        uint64_t nh = HEAD(H_GEN(head) + 1, next);
        if (next != TW_NIL && !node_ok(d, next)) {
            uint64_t again = LD_ACQ(&h->free_head);
            if (again == head) {
                intent_done(intent);
                return -EUCLEAN;    /* a stable head with a bad link: corrupt */
            }
            head = again;
            continue;
        }
        /* acq_rel: acquire pairs with the release CAS of pool_push (the node's
         * ->next and owner were written before it was pushed). */
        if (CAS(&h->free_head, &head, nh, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            tw_killpoint(TW_KP_MID_POP);
            struct tw_node *n = NODE(d, idx);
            uint64_t o = LD_RLX(&n->owner);
            /* The node is ours now: a new generation for a new life. Release:
             * pairs with fsck's acquire load of the owner word. */
            ST_REL(&n->owner, OWNER(O_GEN(o) + 1, TW_N_ALLOC, (uint32_t)pi));
            intent_done(intent);
            *out = idx;
            return 0;
        }
    }
    intent_done(intent);
    return -ETIMEDOUT;
}

/* Push a node we own back onto the free list. The intent (as for a pop) tells
 * fsck that this FREE node outside the list is in flight, not leaked. */
static void pool_push(struct tw_dom *d, uint32_t idx)
{
    struct tw_header *h = HDR(d);
    struct tw_node *n = NODE(d, idx);
    /* No intent word (table full): the push still happens; only a death in
     * the next few instructions would then leave the node for fsck to miss. */
    uint64_t *intent = intent_claim(d);
    if (intent)
        intent_set(intent, HEAD(0xffffffffu, idx));
    uint64_t o = LD_RLX(&n->owner);
    ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_FREE, 0));
    uint64_t head = LD_RLX(&h->free_head);
    do {
        ST_RLX(&n->next, H_IDX(head));
        /* release: publishes ->next and the FREE owner word to the next pop. */
    } while (!CAS(&h->free_head, &head, HEAD(H_GEN(head) + 1, idx), __ATOMIC_ACQ_REL,
                  __ATOMIC_RELAXED));
    if (intent)
        intent_done(intent);
}

int tw_free_node(struct tw_dom *d, uint32_t node)
{
    if (!node_ok(d, node))
        return -EINVAL;
    pool_push(d, node);
    return 0;
}

int tw_pool_free_count(struct tw_dom *d)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < d->pool_size; i++)
        if (O_STATE(LD_RLX(&NODE(d, i)->owner)) == TW_N_FREE)
            n++;
    return (int)n;
}

int tw_node_state(struct tw_dom *d, uint32_t node, uint64_t *owner_out)
{
    if (!node_ok(d, node))
        return -EINVAL;
    *owner_out = LD_ACQ(&NODE(d, node)->owner);
    return 0;
}

int tw_scan_owners(struct tw_dom *d, uint64_t *out)
{
    for (uint32_t i = 0; i < d->pool_size; i++)
        out[i] = LD_ACQ(&NODE(d, i)->owner);
    return (int)d->pool_size;
}

/* ------------------------------------------------------------------------ */
/* tasks                                                                      */

/*
 * Claim a slot: FREE or EXITED -> CLAIMING by CAS, fill it, then publish a new
 * head (new generation, empty list) and the RUNNING state. Returns the slot.
 */
int tw_register(struct tw_dom *d, const char *name, int32_t signum, int32_t efd,
                uint32_t uid, uint64_t now_ns, uint32_t *gen_out)
{
    int pid = getpid();
    uint64_t start = tw_proc_start_ticks(pid);
    for (uint32_t i = 0; i < d->max_tasks; i++) {
        struct tw_slot *s = SLOT(d, i);
        uint32_t st = LD_ACQ(&s->state);
        if (st != TW_SLOT_FREE && st != TW_SLOT_EXITED)
            continue;
        /* Claim the slot. acq_rel: acquire pairs with the release store of
         * EXITED (tw_release_slot / tw_release_exited) by its last owner;
         * losing the CAS means another registrant claimed it first. */
        if (!CAS(&s->state, &st, TW_SLOT_CLAIMING, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            continue;
        uint32_t gen = LD_RLX(&s->gen) + 1;
        if (gen == 0)
            gen = 1;
        /* A runner killed between its exchange and its marking left the
         * count odd; the new registration has no batch in flight. */
        uint32_t q = LD_RLX(&s->detach_seq);
        if (q & 1)
            ST_RLX(&s->detach_seq, q + 1);
        ST_RLX(&s->pid, pid);
        ST_RLX(&s->start_ticks, start);
        s->registered_ns = now_ns;
        s->signum = signum;
        s->efd = efd;
        s->uid = uid;
        s->lock_recovered = 0;
        memset(s->name, 0, sizeof(s->name));
        if (name)
            strncpy(s->name, name, sizeof(s->name) - 1);
        memset(&s->c, 0, sizeof(s->c));
        ST_RLX(&s->flags, 0u);
        /* Release: readers of gen (dom.task(), tasks()) see the fields above. */
        ST_REL(&s->gen, gen);
        /* Release: a pusher that acquires this head sees the fields above. An
         * adder still holding the old generation fails its CAS from now on. */
        ST_REL(&s->head, HEAD(gen, TW_NIL));
        /* Release: fsck and tools judge a RUNNING slot by pid/start above. */
        ST_REL(&s->state, TW_SLOT_RUNNING);
        *gen_out = gen;
        return (int)i;
    }
    return -ENOSPC;
}

int tw_slot_check(struct tw_dom *d, uint32_t slot, uint32_t gen)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    uint64_t h = LD_ACQ(&SLOT(d, slot)->head);
    if (H_GEN(h) != gen || H_IDX(h) == TW_EXITED)
        return -ESRCH;
    return 0;
}

/* After exit: the head holds the sentinel; the slot may now be claimed again. */
int tw_release_slot(struct tw_dom *d, uint32_t slot, uint32_t gen)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    if (LD_ACQ(&s->gen) != gen)
        return -ESRCH;
    uint32_t st = LD_ACQ(&s->state);
    /* Release: pairs with the acquire of tw_register's claim; the head holds
     * the exited sentinel already, so a new owner starts from a clean list. */
    if (st == TW_SLOT_RUNNING || st == TW_SLOT_EXITING)
        CAS(&s->state, &st, TW_SLOT_EXITED, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    return 0;
}

int tw_slot_counter_add(struct tw_dom *d, uint32_t slot, uint32_t which, uint64_t n)
{
    if (!slot_ok(d, slot) || which > TW_C_RESUMES)
        return -EINVAL;
    uint64_t *c = &SLOT(d, slot)->c.added;
    ADD_RLX(&c[which], n);
    return 0;
}

uint32_t tw_flags_get(struct tw_dom *d, uint32_t slot)
{
    return slot_ok(d, slot) ? LD_ACQ(&SLOT(d, slot)->flags) : 0;
}

uint32_t tw_flags_set(struct tw_dom *d, uint32_t slot, uint32_t bits)
{
    return slot_ok(d, slot) ? __atomic_fetch_or(&SLOT(d, slot)->flags, bits, __ATOMIC_ACQ_REL)
                            : 0;
}

/* The runner clears NOTIFY_* before it detaches: an adder that pushes after the
 * detach sees the bit clear and notifies again, so no wake-up is lost. */
uint32_t tw_flags_clear(struct tw_dom *d, uint32_t slot, uint32_t bits)
{
    return slot_ok(d, slot) ? __atomic_fetch_and(&SLOT(d, slot)->flags, ~bits, __ATOMIC_ACQ_REL)
                            : 0;
}

/* ------------------------------------------------------------------------ */
/* notifications                                                              */

int tw_eventfd_write(int efd)
{
    uint64_t one = 1;
    if (write(efd, &one, sizeof(one)) == sizeof(one))
        return 0;
    return errno == EAGAIN ? 0 : -errno;   /* EAGAIN: counter full, already readable */
}

int tw_eventfd_drain(int efd)
{
    uint64_t v;
    if (read(efd, &v, sizeof(v)) == sizeof(v))
        return 1;
    return errno == EAGAIN ? 0 : -errno;
}

int tw_pidfd_send(int pidfd, int signum)
{
    if (syscall(SYS_pidfd_send_signal, pidfd, signum, NULL, 0) == 0)
        return 0;
    return -errno;
}

int tw_pidfd_getfd(int pidfd, int targetfd)
{
    long r = syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
    return r < 0 ? -errno : (int)r;
}

/* Set the notify flag of mode; perform the notification when the flag was
 * clear and the caller gave us the descriptor. Returns TW_DUE_* | TW_DONE_*. */
static int notify(struct tw_dom *d, struct tw_slot *s, int mode, int efd, int pidfd, int signum)
{
    int due = 0;
    uint32_t old;
    switch (mode) {
    case TW_TWA_RESUME:
    case TW_TWA_NMI_CURRENT:
        /* acq_rel: pairs with tw_flags_clear() of the runner. The push above
         * happened before; a runner that clears after this sees the work. */
        old = __atomic_fetch_or(&s->flags, TW_F_NOTIFY_RESUME, __ATOMIC_ACQ_REL);
        if (!(old & TW_F_NOTIFY_RESUME)) {
            due |= TW_DUE_EVENTFD;
            ADD_RLX(&s->c.resumes_sent, 1);
            if (efd >= 0 && tw_eventfd_write(efd) == 0)
                due |= TW_DONE_EVENTFD;
        }
        break;
    case TW_TWA_SIGNAL:
        old = __atomic_fetch_or(&s->flags, TW_F_NOTIFY_SIGNAL, __ATOMIC_ACQ_REL);
        if (!(old & TW_F_NOTIFY_SIGNAL)) {
            due |= TW_DUE_SIGNAL;
            ADD_RLX(&s->c.signals_sent, 1);
            if (pidfd >= 0 && tw_pidfd_send(pidfd, signum) == 0)
                due |= TW_DONE_SIGNAL;
        }
        break;
    case TW_TWA_SIGNAL_NO_IPI:
        __atomic_fetch_or(&s->flags, TW_F_NOTIFY_SIGNAL, __ATOMIC_ACQ_REL);
        break;
    default:
        break;
    }
    (void)d;
    return due;
}

/* ------------------------------------------------------------------------ */
/* add                                                                        */

static int check_notify(int notify, int is_current)
{
    int mode = notify & ~TW_TWA_FLAGS;
    int flags = notify & TW_TWA_FLAGS;
    if (notify < 0 || mode > TW_TWA_NMI_CURRENT || (flags & ~TW_TWAF_NO_ALLOC))
        return -EINVAL;
    if (mode == TW_TWA_NMI_CURRENT && !is_current)
        return -EINVAL;
    return mode;
}

static void fill_node(struct tw_dom *d, struct tw_node *n, uint32_t slot, uint32_t gen,
                      uint64_t func_id, const char *payload, uint32_t len, const char *origin,
                      uint32_t origin_len, uint64_t now_ns)
{
    n->func_id = func_id;
    n->payload_len = len;
    n->enqueued_ns = now_ns ? now_ns : now_mono();
    n->sender_pid = d->my_pid;
    n->target = slot;
    n->target_gen = gen;
    n->origin_len = 0;
    if (d->record_origin && origin && origin_len) {
        if (origin_len > TW_ORIGIN_LEN)
            origin_len = TW_ORIGIN_LEN;
        memcpy((char *)n + d->origin_off, origin, origin_len);
        n->origin_len = origin_len;
    }
    if (len)
        memcpy((char *)n + d->payload_off, payload, len);
}

/*
 * After a successful push: ALLOC(me) -> QUEUED(slot). The node has been
 * reachable since the push, so the runner (detach), a canceller or fsck may
 * have taken it by CAS already - then this CAS fails and the node is theirs.
 * The generation in the expected word keeps us from touching a later life of
 * the node (run, freed and allocated again meanwhile).
 */
static void mark_queued(struct tw_dom *d, uint32_t idx, uint32_t gen, uint32_t slot)
{
    uint64_t expect = OWNER(gen, TW_N_ALLOC, (uint32_t)d->my_proc);
    CAS(&NODE(d, idx)->owner, &expect, OWNER(gen, TW_N_QUEUED, slot), __ATOMIC_RELEASE,
        __ATOMIC_RELAXED);
}

/* Statistics only (relaxed): the high-water mark of pushes minus detaches. */
static void note_queued(struct tw_slot *s, uint32_t n)
{
    int64_t q = __atomic_add_fetch(&s->c.queued, (int64_t)n, __ATOMIC_RELAXED);
    uint64_t m = LD_RLX(&s->c.max_pending);
    while (q > 0 && (uint64_t)q > m &&
           !CAS(&s->c.max_pending, &m, (uint64_t)q, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

/*
 * Push the chain first..last (last->next is set here) onto the task's list.
 * Returns 0, or -ESRCH when the head holds the exited sentinel or another
 * generation. Lock-free: a failed CAS means another adder pushed, or the
 * runner detached (head went to NIL or EXITED); either way we retry on the
 * value the CAS gave back.
 */
static int push_chain(struct tw_slot *s, uint32_t gen, uint32_t first, struct tw_node *last)
{
    uint64_t head = LD_RLX(&s->head);
    do {
        if (H_GEN(head) != gen || H_IDX(head) == TW_EXITED)
            return -ESRCH;
        ST_RLX(&last->next, H_IDX(head));
        /* release: the node's fields and owner word are visible to whoever
         * acquires the head (detach, cancel). */
    } while (!CAS(&s->head, &head, HEAD(gen, first), __ATOMIC_RELEASE, __ATOMIC_RELAXED));
    return 0;
}

int64_t tw_add(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
               const char *payload, uint32_t len, int notify_mode, const char *origin,
               uint32_t origin_len, int efd, int pidfd, int signum, uint64_t now_ns,
               int is_current)
{
    int mode = check_notify(notify_mode, is_current);
    if (mode < 0)
        return mode;
    if (len > d->payload_size)
        return -E2BIG;
    int r = tw_slot_check(d, slot, gen);
    if (r)
        return r;
    if (notify_mode & TW_TWAF_NO_ALLOC)
        origin_len = 0;
    uint32_t idx;
    r = pool_pop(d, &idx);
    if (r)
        return r;
    tw_killpoint(TW_KP_AFTER_ALLOC);
    struct tw_node *n = NODE(d, idx);
    struct tw_slot *s = SLOT(d, slot);
    fill_node(d, n, slot, gen, func_id, payload, len, origin, origin_len, now_ns);
    uint64_t o = LD_RLX(&n->owner);
    /* Pushed while still ALLOC(me): if we die before the push, the node is
     * plainly ours and on no list (fsck gives it back); if we die after it,
     * fsck finds it linked and finishes mark_queued() for us. */
    r = push_chain(s, gen, idx, n);
    if (r) {
        pool_push(d, idx);      /* never reachable: still only ours */
        return r;
    }
    tw_killpoint(TW_KP_AFTER_PUSH);
    mark_queued(d, idx, O_GEN(o), slot);
    ADD_RLX(&s->c.added, 1);
    note_queued(s, 1);
    int due = notify(d, s, mode, efd, pidfd, signum);
    /* gen (32 bits) | node (24 bits, MAX_POOL_LIMIT) | due (4 bits): < 2^60 */
    return (int64_t)(((uint64_t)O_GEN(o) << 28) | ((uint64_t)idx << 4) | (uint64_t)due);
}

int tw_add_many(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
                const char *const *payloads, const uint32_t *lens, uint32_t cnt,
                int notify_mode, const char *origin, uint32_t origin_len, int efd,
                int pidfd, int signum, uint64_t now_ns, int is_current,
                uint64_t *work_ids_out)
{
    int mode = check_notify(notify_mode, is_current);
    if (mode < 0)
        return mode;
    for (uint32_t i = 0; i < cnt; i++)
        if (lens[i] > d->payload_size)
            return -E2BIG;
    int r = tw_slot_check(d, slot, gen);
    if (r || cnt == 0)
        return r;
    if (notify_mode & TW_TWAF_NO_ALLOC)
        origin_len = 0;
    struct tw_slot *s = SLOT(d, slot);
    /* Build the chain newest-first: payloads[cnt-1] ends up at the head, as if
     * each had been added in order. */
    uint32_t first = TW_NIL, lastidx = TW_NIL;
    for (uint32_t i = 0; i < cnt; i++) {
        uint32_t idx;
        r = pool_pop(d, &idx);
        if (r) {
            /* Give back what we took: nothing queued, nothing leaked. The
             * indices come from work_ids_out, not from the nodes' ->next:
             * those are in the segment, where anything may have changed. */
            for (uint32_t k = 0; k < i; k++)
                pool_push(d, (uint32_t)work_ids_out[k]);
            return r;
        }
        struct tw_node *n = NODE(d, idx);
        fill_node(d, n, slot, gen, func_id, payloads[i], lens[i], origin, origin_len, now_ns);
        n->next = first;
        if (first == TW_NIL)
            lastidx = idx;
        first = idx;
        work_ids_out[i] = ((uint64_t)O_GEN(LD_RLX(&n->owner)) << 32) | idx;
    }
    tw_killpoint(TW_KP_AFTER_ALLOC);
    r = push_chain(s, gen, first, NODE(d, lastidx));
    if (r) {
        for (uint32_t k = 0; k < cnt; k++)
            pool_push(d, (uint32_t)work_ids_out[k]);
        return r;
    }
    tw_killpoint(TW_KP_AFTER_PUSH);
    for (uint32_t k = 0; k < cnt; k++)
        mark_queued(d, (uint32_t)work_ids_out[k], (uint32_t)(work_ids_out[k] >> 32), slot);
    ADD_RLX(&s->c.added, cnt);
    note_queued(s, cnt);
    return notify(d, s, mode, efd, pidfd, signum);
}

/*
 * TWA_NMI_CURRENT: async-signal-safe. No lock, no allocation beyond the
 * lock-free pool, no stdio: pop, push, fetch_or, write(2). Callable from a C
 * signal handler of the task's own process.
 */
int tw_add_nmi(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
               const char *payload, uint32_t len, int efd, uint64_t now_ns,
               uint64_t *work_id_out)
{
    if (!slot_ok(d, slot) || SLOT(d, slot)->pid != d->my_pid)
        return -EINVAL;
    int64_t r = tw_add(d, slot, gen, func_id, payload, len, TW_TWA_NMI_CURRENT, NULL, 0, efd, -1,
                       0, now_ns, 1);
    if (r < 0)
        return (int)r;
    if (work_id_out)
        *work_id_out = ((uint64_t)(r >> 28) << 32) | (((uint64_t)r >> 4) & 0xffffff);
    return (int)(r & 0xf);
}

/* ------------------------------------------------------------------------ */
/* run                                                                        */

/* Is node reachable from the head (walk bounded by the pool size)? */
static int reachable(struct tw_dom *d, uint32_t from, uint32_t node)
{
    for (uint32_t cur = from, k = 0; cur != TW_NIL && cur != TW_EXITED && k <= d->pool_size; k++) {
        if (!node_ok(d, cur))
            return 0;
        if (cur == node)
            return 1;
        cur = LD_ACQ(&NODE(d, cur)->next);
    }
    return 0;
}

/* May a node with owner word o be linked on the list of (slot, gen)? */
static int linked_state(struct tw_dom *d, struct tw_node *n, uint64_t o, uint32_t slot,
                        uint32_t gen)
{
    uint32_t st = O_STATE(o);
    if (st == TW_N_QUEUED || st == TW_N_CANCELLING)
        return O_AUX(o) == slot;
    if (st == TW_N_ALLOC)   /* pushed, not yet marked by its adder */
        return LD_RLX(&n->target) == slot && LD_RLX(&n->target_gen) == gen;
    return 0;
}

/*
 * A canceller died holding pi_lock (we were told by EOWNERDEAD). It may have
 * left a node CANCELLING: still linked (restore it to QUEUED; if it is in our
 * batch the batch walk does that) or unlinked (nobody else will ever see it:
 * give it back to the pool and count it cancelled). Called by the task's own
 * runner with pi_lock held and its batch in hand, so "linked" is decidable.
 */
static void mark_list(struct tw_dom *d, uint8_t *linked, uint32_t from)
{
    for (uint32_t cur = from, k = 0; cur != TW_NIL && cur != TW_EXITED && k <= d->pool_size; k++) {
        if (!node_ok(d, cur) || linked[cur])
            return;                         /* out of range, or a cycle */
        linked[cur] = 1;
        cur = LD_ACQ(&NODE(d, cur)->next);
    }
}

static void recover_cancelling(struct tw_dom *d, uint32_t slot, struct tw_slot *s,
                               uint32_t batch)
{
    /* One pass over each list into a bitmap, then one over the pool: O(pool)
     * however many nodes a dead canceller (or a scribbler) left marked. */
    uint8_t *linked = calloc(d->pool_size, 1);
    if (!linked || tw_proc_claim(d) < 0) {
        free(linked);
        return;                             /* lock_recovered stays set: next run */
    }
    mark_list(d, linked, batch);
    mark_list(d, linked, H_IDX(LD_ACQ(&s->head)));
    for (uint32_t i = 0; i < d->pool_size; i++) {
        struct tw_node *n = NODE(d, i);
        uint64_t o = LD_ACQ(&n->owner);
        if (O_STATE(o) != TW_N_CANCELLING || O_AUX(o) != slot)
            continue;
        /* We hold pi_lock, so no live canceller owns this mark: it is left
         * by one that died. Linked: it is still a queued work. Unlinked:
         * the dead canceller removed it, so it counts as cancelled. */
        if (linked[i]) {
            ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_QUEUED, slot));
        } else {
            ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_ALLOC, (uint32_t)d->my_proc));
            ADD_RLX(&s->c.cancelled, 1);
            pool_push(d, i);
        }
    }
    free(linked);
    ST_REL(&s->lock_recovered, 0u);
}

/*
 * Detach the whole list (task_work_run's first half). Exchange the head with
 * empty - or, when the list is already empty and the task is exiting, with the
 * exited sentinel so that every later add fails with -ESRCH.
 *
 * Then synchronize with tw_cancel(): a canceller that began its walk before our
 * exchange may still be unlinking a node of the batch. Taking and releasing
 * pi_lock waits for it; after that no canceller can reach the batch (it is no
 * longer reachable from the head). The batch's nodes are then DETACHED, and
 * their indices are written to out[], newest first. Returns their count.
 */
int tw_detach(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *out, uint32_t max)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    if (LD_RLX(&s->pid) != d->my_pid)
        return -EPERM;
    uint64_t head = LD_ACQ(&s->head), nh;
    uint32_t idx;
    /* Odd from before the exchange until the batch is marked: fsck, deciding
     * under pi_lock whether a node is linked, must not miss one that sits in
     * a batch we detached but have not marked yet (we would be waiting for
     * the lock it holds). seq_cst: ordered before the exchange below. */
    __atomic_add_fetch(&s->detach_seq, 1, __ATOMIC_SEQ_CST);
    do {
        if (H_GEN(head) != gen) {
            __atomic_add_fetch(&s->detach_seq, 1, __ATOMIC_RELEASE);
            return -ESRCH;
        }
        idx = H_IDX(head);
        if (idx == TW_EXITED)
            break;
        if (idx == TW_NIL) {
            if (!(LD_ACQ(&s->flags) & TW_F_EXITING))
                break;
            nh = HEAD(gen, TW_EXITED);
        } else {
            nh = HEAD(gen, TW_NIL);
        }
        /* acq_rel: acquire pairs with the release CAS of push_chain (node
         * contents); release orders our exit decision for later adders. */
    } while (!CAS(&s->head, &head, nh, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    if (idx == TW_NIL || idx == TW_EXITED) {
        __atomic_add_fetch(&s->detach_seq, 1, __ATOMIC_RELEASE);
        return 0;
    }

    /* Synchronize with tw_cancel(). */
    int r = lock_deadline(&s->pi_lock, d->lock_timeout_ns, &s->lock_recovered);
    if (r) {
        __atomic_add_fetch(&s->detach_seq, 1, __ATOMIC_RELEASE);
        return r;
    }
    if (LD_ACQ(&s->lock_recovered))
        recover_cancelling(d, slot, s, idx);
    uint32_t n = 0;
    uint32_t cur = idx;
    while (cur != TW_NIL) {
        if (!node_ok(d, cur) || n >= max || n >= d->pool_size) {
            pthread_mutex_unlock(&s->pi_lock);
            __atomic_add_fetch(&s->detach_seq, 1, __ATOMIC_RELEASE);
            return -EUCLEAN;
        }
        struct tw_node *nd = NODE(d, cur);
        uint64_t o = LD_ACQ(&nd->owner);
        /* QUEUED; CANCELLING left by a canceller that died in the lock;
         * or ALLOC: its adder pushed it and has not yet made it QUEUED (or
         * died first). The CAS settles the race with that adder's CAS. */
        do {
            if (!linked_state(d, nd, o, slot, gen)) {
                pthread_mutex_unlock(&s->pi_lock);
                __atomic_add_fetch(&s->detach_seq, 1, __ATOMIC_RELEASE);
                return -EUCLEAN;
            }
        } while (!CAS(&nd->owner, &o, OWNER(O_GEN(o), TW_N_DETACHED, slot), __ATOMIC_ACQ_REL,
                      __ATOMIC_ACQUIRE));
        out[n++] = cur;
        cur = LD_ACQ(&nd->next);
    }
    pthread_mutex_unlock(&s->pi_lock);
    __atomic_add_fetch(&s->detach_seq, 1, __ATOMIC_RELEASE);
    __atomic_sub_fetch(&s->c.queued, (int64_t)n, __ATOMIC_RELAXED);
    tw_killpoint(TW_KP_AFTER_DETACH);
    return (int)n;
}

static void copy_info(struct tw_dom *d, uint32_t idx, struct tw_node *n, uint64_t owner,
                      struct tw_work_info *wi, char *payload_out, char *origin_out)
{
    wi->node = idx;
    wi->gen = O_GEN(owner);
    wi->state = O_STATE(owner);
    wi->func_id = n->func_id;
    wi->enqueued_ns = n->enqueued_ns;
    wi->sender_pid = n->sender_pid;
    wi->target = n->target;
    wi->target_gen = n->target_gen;
    /* read once: the segment may change under us, the checks must hold */
    uint32_t len = LD_RLX(&n->payload_len), olen = LD_RLX(&n->origin_len);
    wi->payload_len = len <= d->payload_size ? len : d->payload_size;
    wi->origin_len = (d->record_origin && olen <= TW_ORIGIN_LEN) ? olen : 0;
    if (payload_out && wi->payload_len)
        memcpy(payload_out, (char *)n + d->payload_off, wi->payload_len);
    if (origin_out && wi->origin_len)
        memcpy(origin_out, (char *)n + d->origin_off, wi->origin_len);
}

/*
 * One step of task_work_run's second half: finish `done` (the callback of a
 * RUNNING node returned: free it, or move it to the dead letters when its
 * callback is unknown here) and begin `next` (DETACHED -> RUNNING, copied out
 * to wi/payload_out). Either may be TW_NIL. One native call per work.
 */
int tw_step(struct tw_dom *d, uint32_t slot, uint32_t done, int outcome, uint32_t next,
            struct tw_work_info *wi, char *payload_out, char *origin_out)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    if (done != TW_NIL) {
        if (!node_ok(d, done))
            return -EINVAL;
        struct tw_node *n = NODE(d, done);
        uint64_t o = LD_ACQ(&n->owner);
        if (O_STATE(o) != TW_N_RUNNING || O_AUX(o) != slot)
            return -EUCLEAN;
        if (outcome == TW_OUT_UNKNOWN) {
            int r = tw_dl_push(d, slot, done);
            if (r)
                return r;   /* dl_lock stuck: the node stays RUNNING, reported */
            ADD_RLX(&s->c.unknown, 1);
        } else {
            ADD_RLX(outcome == TW_OUT_ERROR ? &s->c.errors : &s->c.run, 1);
            if (outcome == TW_OUT_ERROR)
                ADD_RLX(&s->c.run, 1);
            pool_push(d, done);
        }
    }
    if (next != TW_NIL) {
        if (!node_ok(d, next))
            return -EINVAL;
        struct tw_node *n = NODE(d, next);
        uint64_t o = LD_ACQ(&n->owner);
        if (O_STATE(o) != TW_N_DETACHED || O_AUX(o) != slot)
            return -EUCLEAN;
        /* From here the work counts as started: cancel can no longer reach it
         * (it left the list at detach) and fsck reports it interrupted, not
         * orphaned, if we die. */
        ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_RUNNING, slot));
        copy_info(d, next, n, o, wi, payload_out, origin_out);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* cancel                                                                     */

#define TW_MATCH_EXACT 0   /* key = gen<<32 | node */
#define TW_MATCH_FUNC  1   /* key = func id        */

static int matches(struct tw_node *n, uint32_t idx, int mode, uint64_t key)
{
    if (mode == TW_MATCH_EXACT)
        return idx == (uint32_t)key && O_GEN(LD_ACQ(&n->owner)) == (uint32_t)(key >> 32);
    return n->func_id == key;
}

/*
 * task_work_cancel_match(): under pi_lock, walk from the head and unlink the
 * first match, newest first. Returns 1 and fills wi (and the payload) when a
 * work was removed, 0 when none matched, or -errno.
 *
 * Races: add only ever changes the head (a push), so the CAS on the head may
 * fail because of a push, or because the runner detached the list; in both
 * cases we continue from the value the CAS returned, as the kernel does. A
 * CAS on an interior ->next cannot fail (only cancellers change those, and we
 * hold the lock) but is kept a CAS for symmetry with the kernel. A node the
 * runner has detached but not yet marked (it waits for this lock) may still be
 * unlinked here: that is the kernel's "cancel before it runs" case.
 */
int tw_cancel(struct tw_dom *d, uint32_t slot, uint32_t gen, int mode, uint64_t key,
              struct tw_work_info *wi, char *payload_out, char *origin_out)
{
    if (!slot_ok(d, slot) || (mode != TW_MATCH_EXACT && mode != TW_MATCH_FUNC))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    int r = lock_deadline(&s->pi_lock, d->lock_timeout_ns, &s->lock_recovered);
    if (r)
        return r;
    if (tw_proc_claim(d) < 0) {
        pthread_mutex_unlock(&s->pi_lock);
        return -EUSERS;
    }
    uint64_t head = LD_ACQ(&s->head);
    uint32_t *pprev = NULL;           /* NULL: the head word */
    uint32_t cur = H_IDX(head);
    uint32_t found = TW_NIL;
    uint64_t owner = 0;
    if (H_GEN(head) != gen) {
        pthread_mutex_unlock(&s->pi_lock);
        return -ESRCH;
    }
    for (uint32_t steps = 0; cur != TW_NIL && cur != TW_EXITED; steps++) {
        if (!node_ok(d, cur) || steps > 2 * d->pool_size) {
            pthread_mutex_unlock(&s->pi_lock);
            return -EUCLEAN;
        }
        struct tw_node *n = NODE(d, cur);
        if (!matches(n, cur, mode, key)) {
            pprev = &n->next;
            cur = LD_ACQ(pprev);
            continue;
        }
        uint64_t o = LD_ACQ(&n->owner);
        /* Mark first: if we die between here and the unlink, the runner that
         * next takes this lock (EOWNERDEAD) finds the mark and settles it.
         * CAS, not a store: the node may still be ALLOC, its adder about to
         * make it QUEUED (mark_queued); whoever's CAS comes second fails. */
        do {
            if (!linked_state(d, n, o, slot, gen)) {
                pthread_mutex_unlock(&s->pi_lock);
                return -EUCLEAN;
            }
        } while (!CAS(&n->owner, &o, OWNER(O_GEN(o), TW_N_CANCELLING, slot), __ATOMIC_ACQ_REL,
                      __ATOMIC_ACQUIRE));
        /* restore value if the unlink loses: the node is linked, so QUEUED */
        o = OWNER(O_GEN(o), TW_N_QUEUED, slot);
        tw_killpoint(TW_KP_IN_PI_LOCK);
        uint32_t nx = LD_ACQ(&n->next);
        int ok;
        if (pprev == NULL) {
            uint64_t expect = HEAD(gen, cur);
            ok = CAS(&s->head, &expect, HEAD(gen, nx), __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
            if (!ok) {
                /* Raced with add (a push) or run (a detach): start again
                 * from what the head holds now. */
                ST_REL(&n->owner, o);
                if (H_GEN(expect) != gen)
                    break;
                cur = H_IDX(expect);
                continue;
            }
        } else {
            uint32_t expect = cur;
            ok = CAS(pprev, &expect, nx, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
            if (!ok) {
                ST_REL(&n->owner, o);
                cur = expect;
                continue;
            }
        }
        /* Unlinked: the node is ours. */
        owner = OWNER(O_GEN(o), TW_N_ALLOC, (uint32_t)d->my_proc);
        ST_REL(&n->owner, owner);
        found = cur;
        break;
    }
    pthread_mutex_unlock(&s->pi_lock);
    if (found == TW_NIL)
        return 0;
    struct tw_node *n = NODE(d, found);
    copy_info(d, found, n, owner, wi, payload_out, origin_out);
    __atomic_sub_fetch(&s->c.queued, 1, __ATOMIC_RELAXED);
    ADD_RLX(&s->c.cancelled, 1);
    pool_push(d, found);
    return 1;
}

/* A snapshot of the pending works, newest first, taken under pi_lock. */
int tw_snapshot(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *nodes, uint32_t *gens,
                uint32_t max)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    int r = lock_deadline(&s->pi_lock, d->lock_timeout_ns, &s->lock_recovered);
    if (r)
        return r;
    uint64_t head = LD_ACQ(&s->head);
    if (H_GEN(head) != gen) {
        pthread_mutex_unlock(&s->pi_lock);
        return -ESRCH;
    }
    uint32_t n = 0;
    for (uint32_t cur = H_IDX(head); cur != TW_NIL && cur != TW_EXITED;) {
        if (!node_ok(d, cur) || n >= d->pool_size) {
            pthread_mutex_unlock(&s->pi_lock);
            return -EUCLEAN;
        }
        struct tw_node *nd = NODE(d, cur);
        if (nodes && n < max) {
            nodes[n] = cur;
            gens[n] = O_GEN(LD_ACQ(&nd->owner));
        }
        n++;
        cur = LD_ACQ(&nd->next);
    }
    pthread_mutex_unlock(&s->pi_lock);
    return (int)n;
}

int tw_pending(struct tw_dom *d, uint32_t slot, uint32_t gen)
{
    return tw_snapshot(d, slot, gen, NULL, NULL, 0);
}

/* Copy a node out if it still has generation gen (seqlock-style: the owner
 * word is read before and after; a change means the copy may be torn). */
int tw_read_work(struct tw_dom *d, uint32_t node, uint32_t gen, struct tw_work_info *wi,
                 char *payload_out, char *origin_out)
{
    if (!node_ok(d, node))
        return -EINVAL;
    struct tw_node *n = NODE(d, node);
    uint64_t o = LD_ACQ(&n->owner);
    if (O_GEN(o) != gen)
        return -ESTALE;
    copy_info(d, node, n, o, wi, payload_out, origin_out);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (LD_RLX(&n->owner) != o)
        return -ESTALE;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* callback names: open addressing on the id, claimed by CAS                  */

int tw_name_put(struct tw_dom *d, uint64_t id, const char *name, uint32_t len)
{
    if (id == 0)
        return -EINVAL;
    if (len >= TW_FUNC_NAME_LEN)
        len = TW_FUNC_NAME_LEN - 1;
    for (uint32_t k = 0; k < d->names_cap; k++) {
        struct tw_name *e = NAME(d, (uint32_t)((id + k) % d->names_cap));
        uint64_t cur = LD_ACQ(&e->id);
        if (cur == 0) {
            uint64_t expect = 0;
            if (!CAS(&e->id, &expect, id, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                cur = expect;
            } else {
                cur = id;
            }
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

/* ------------------------------------------------------------------------ */
/* dead letters: a list under dl_lock (rare path)                              */

int tw_dl_push(struct tw_dom *d, uint32_t slot, uint32_t node)
{
    struct tw_header *h = HDR(d);
    if (!node_ok(d, node))
        return -EINVAL;
    int r = lock_deadline(&h->dl_lock, d->lock_timeout_ns, NULL);
    if (r)
        return r;
    struct tw_node *n = NODE(d, node);
    uint64_t o = LD_ACQ(&n->owner);
    /* Links change only under dl_lock; the release stores let fsck and the
     * tools, which read owner words without the lock, see a whole node. */
    n->next = (uint32_t)LD_RLX(&h->dl_head);
    ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_DEADLETTER, slot));
    ST_REL(&h->dl_head, (uint64_t)node);
    ADD_RLX(&h->dl_count, 1);
    pthread_mutex_unlock(&h->dl_lock);
    return 0;
}

int tw_dl_list(struct tw_dom *d, uint32_t *out, uint32_t max)
{
    struct tw_header *h = HDR(d);
    int r = lock_deadline(&h->dl_lock, d->lock_timeout_ns, NULL);
    if (r)
        return r;
    uint32_t n = 0;
    for (uint32_t cur = (uint32_t)LD_RLX(&h->dl_head); cur != TW_NIL;) {
        if (!node_ok(d, cur) || n >= d->pool_size) {
            pthread_mutex_unlock(&h->dl_lock);
            return -EUCLEAN;
        }
        if (n < max)
            out[n] = cur;
        n++;
        cur = NODE(d, cur)->next;
    }
    pthread_mutex_unlock(&h->dl_lock);
    return (int)n;
}

/* Unlink one dead letter (node, gen) and make it ours (ALLOC). 1 if taken. */
int tw_dl_take(struct tw_dom *d, uint32_t node, uint32_t gen)
{
    struct tw_header *h = HDR(d);
    if (!node_ok(d, node))
        return -EINVAL;
    if (tw_proc_claim(d) < 0)
        return -EUSERS;
    int r = lock_deadline(&h->dl_lock, d->lock_timeout_ns, NULL);
    if (r)
        return r;
    uint32_t prev = TW_NIL, steps = 0;
    for (uint32_t cur = (uint32_t)LD_RLX(&h->dl_head); cur != TW_NIL; steps++) {
        if (!node_ok(d, cur) || steps > d->pool_size) {
            pthread_mutex_unlock(&h->dl_lock);
            return -EUCLEAN;
        }
        struct tw_node *n = NODE(d, cur);
        if (cur == node) {
            uint64_t o = LD_ACQ(&n->owner);
            if (O_GEN(o) != gen || O_STATE(o) != TW_N_DEADLETTER)
                break;
            if (prev == TW_NIL)
                ST_REL(&h->dl_head, (uint64_t)n->next);
            else
                NODE(d, prev)->next = n->next;
            ST_REL(&n->owner, OWNER(gen, TW_N_ALLOC, (uint32_t)d->my_proc));
            __atomic_sub_fetch(&h->dl_count, 1, __ATOMIC_RELAXED);
            pthread_mutex_unlock(&h->dl_lock);
            return 1;
        }
        prev = cur;
        cur = n->next;
    }
    pthread_mutex_unlock(&h->dl_lock);
    return 0;
}

/* A taken dead letter is done: free it, or put it back if still unknown. */
int tw_dl_done(struct tw_dom *d, uint32_t node, int outcome)
{
    if (!node_ok(d, node))
        return -EINVAL;
    struct tw_node *n = NODE(d, node);
    uint64_t o = LD_ACQ(&n->owner);
    if (O_STATE(o) != TW_N_ALLOC)
        return -EUCLEAN;
    if (outcome == TW_OUT_UNKNOWN)
        return tw_dl_push(d, n->target < d->max_tasks ? n->target : 0, node);
    pool_push(d, node);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* fsck primitives                                                            */

/*
 * fsck: a task's process is gone. Put the exited sentinel in its head (every
 * later add fails with -ESRCH, exactly as after task_work_run() on exit) and
 * take pi_lock once, so any canceller inside has finished (or died: then the
 * lock is recovered). Returns the index of the list that was pending (TW_NIL
 * if none); its nodes stay owned by the slot for tw_reclaim().
 */
int tw_mark_exited(struct tw_dom *d, uint32_t slot, uint32_t gen)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    __atomic_fetch_or(&s->flags, TW_F_EXITING, __ATOMIC_ACQ_REL);
    uint64_t head = LD_ACQ(&s->head);
    do {
        if (H_GEN(head) != gen)
            return -ESRCH;
        /* acq_rel: pairs with the release CAS of push_chain. */
    } while (!CAS(&s->head, &head, HEAD(gen, TW_EXITED), __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    uint32_t st = LD_ACQ(&s->state);
    if (st == TW_SLOT_RUNNING || st == TW_SLOT_CLAIMING)
        ST_REL(&s->state, TW_SLOT_EXITING);
    int r = lock_deadline(&s->pi_lock, d->lock_timeout_ns, &s->lock_recovered);
    if (r)
        return r;
    ST_REL(&s->lock_recovered, 0u);
    pthread_mutex_unlock(&s->pi_lock);
    return 0;
}

int tw_release_exited(struct tw_dom *d, uint32_t slot, uint32_t gen)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    if (LD_ACQ(&s->gen) != gen)
        return -ESRCH;
    s->c.queued = 0;
    /* Release: the slot may be claimed again (pairs with tw_register). */
    ST_REL(&s->state, TW_SLOT_EXITED);
    return 0;
}

/* Give a node back to the pool if its owner word is still expect_owner. The
 * CAS decides against a live party racing for the same node (an adder whose
 * push failed). 1 if reclaimed, 0 if the word had changed. */
int tw_reclaim(struct tw_dom *d, uint32_t node, uint64_t expect_owner)
{
    if (!node_ok(d, node))
        return -EINVAL;
    struct tw_node *n = NODE(d, node);
    uint64_t expect = expect_owner;
    if (!CAS(&n->owner, &expect, OWNER(O_GEN(expect_owner), TW_N_ALLOC, 0xffffffu),
             __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return 0;
    pool_push(d, node);
    return 1;
}

/*
 * fsck: node is ALLOC by a process that died (expect_owner). Either it never
 * left that process (died before or during its push: give it back, 1), or
 * its push happened and only mark_queued() is missing (it is a queued work:
 * make it QUEUED, 2). Which one is decided under the target's pi_lock, so no
 * canceller moves links meanwhile, and with the target's detach_seq even and
 * unchanged around the walk, so no detached batch is hiding it. 0: the owner
 * word changed meanwhile (someone took the node); -EAGAIN: a detach was in
 * flight, try again later. Hold the fsck lock.
 */
int tw_fsck_settle(struct tw_dom *d, uint32_t node, uint64_t expect_owner)
{
    if (!node_ok(d, node))
        return -EINVAL;
    struct tw_node *n = NODE(d, node);
    uint32_t tgt = LD_RLX(&n->target), tgen = LD_RLX(&n->target_gen);
    if (!slot_ok(d, tgt))
        return tw_reclaim(d, node, expect_owner);
    struct tw_slot *s = SLOT(d, tgt);
    uint64_t head = LD_ACQ(&s->head);
    /* Not the live list of that registration: nobody will ever run it. */
    if (H_GEN(head) != tgen || H_IDX(head) == TW_EXITED)
        return tw_reclaim(d, node, expect_owner);
    int r = lock_deadline(&s->pi_lock, d->lock_timeout_ns, &s->lock_recovered);
    if (r)
        return r;
    int ret;
    uint32_t s1 = __atomic_load_n(&s->detach_seq, __ATOMIC_SEQ_CST);
    if (LD_ACQ(&n->owner) != expect_owner) {
        ret = 0;
    } else if (s1 & 1) {
        ret = -EAGAIN;
    } else {
        int linked = reachable(d, H_IDX(LD_ACQ(&s->head)), node);
        if (__atomic_load_n(&s->detach_seq, __ATOMIC_SEQ_CST) != s1) {
            ret = -EAGAIN;
        } else if (linked) {
            uint64_t expect = expect_owner;
            ret = CAS(&n->owner, &expect, OWNER(O_GEN(expect_owner), TW_N_QUEUED, tgt),
                      __ATOMIC_ACQ_REL, __ATOMIC_RELAXED) ? 2 : 0;
        } else {
            ret = tw_reclaim(d, node, expect_owner);
        }
    }
    pthread_mutex_unlock(&s->pi_lock);
    return ret;
}

/*
 * Find FREE nodes that are on no free list and that no live process is
 * pushing or popping: left by a process that died between its pop CAS and its
 * owner store, or between its owner store and its push CAS. The walk is
 * validated: the head (with its tag) must be unchanged from before the walk
 * until after the last read, so no pop or push happened meanwhile. Intents
 * are read before and after the owner words (see pool_pop/pool_push for why
 * both). Returns the number of nodes written to out, or -EAGAIN if the list
 * never held still for `tries` attempts. Hold the fsck lock.
 */
int tw_free_leaks(struct tw_dom *d, const uint8_t *proc_dead, uint32_t *out, uint32_t max,
                  uint32_t tries)
{
    struct tw_header *h = HDR(d);
    uint8_t *mark = calloc(d->pool_size, 1);
    if (!mark)
        return -ENOMEM;
    for (uint32_t t = 0; t < tries; t++) {
        memset(mark, 0, d->pool_size);
        uint64_t h0 = __atomic_load_n(&h->free_head, __ATOMIC_SEQ_CST);
        uint32_t k = 0, bad = 0;
        for (uint32_t cur = H_IDX(h0); cur != TW_NIL; k++) {
            if (!node_ok(d, cur) || k > d->pool_size || mark[cur]) {
                bad = 1;
                break;
            }
            mark[cur] = 1;
            cur = LD_ACQ(&NODE(d, cur)->next);
        }
        if (__atomic_load_n(&h->free_head, __ATOMIC_SEQ_CST) != h0)
            continue;
        if (bad) {
            free(mark);
            return -EUCLEAN;
        }
        /* 2 = protected by a live process's intent */
        for (int pass = 0; pass < 2; pass++) {
            for (uint32_t i = 0; i < d->max_procs; i++) {
                struct tw_proc *p = PROC(d, i);
                if (!LD_ACQ(&p->pid) || (proc_dead && proc_dead[i]))
                    continue;
                for (int w = 0; w < TW_INTENTS; w++) {
                    uint64_t in = __atomic_load_n(&p->intent[w], __ATOMIC_SEQ_CST);
                    if (in != ~0ull && node_ok(d, H_IDX(in)) && !mark[H_IDX(in)])
                        mark[H_IDX(in)] = 2;
                }
            }
            if (pass == 0) {
                for (uint32_t i = 0; i < d->pool_size; i++)
                    if (!mark[i] && O_STATE(LD_ACQ(&NODE(d, i)->owner)) != TW_N_FREE)
                        mark[i] = 3;   /* owned: not a free-list question */
            }
        }
        if (__atomic_load_n(&h->free_head, __ATOMIC_SEQ_CST) != h0)
            continue;
        uint32_t n = 0;
        for (uint32_t i = 0; i < d->pool_size && n < max; i++)
            if (!mark[i])
                out[n++] = i;
        free(mark);
        return (int)n;
    }
    free(mark);
    return -EAGAIN;
}
