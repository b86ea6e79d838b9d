/*
 * tw_internal.h - what the native sources share and Python never sees:
 * addressing, atomics, and the helpers each layer offers the layers above
 * it, grouped by layer from the bottom (sys.c) to the top (reap.c).
 */
#ifndef SHM_TASKWORK_INTERNAL_H
#define SHM_TASKWORK_INTERNAL_H

#define _GNU_SOURCE
#include "taskwork.h"

#include <errno.h>
#include <time.h>

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

/* The key tags (tw_layout.h "Key tags"): a key's 16-bit tag, and their size. */
#define TW_KEY_TAG(key)       ((uint64_t)(((key) ^ ((key) >> 16) ^ ((key) >> 32) ^ \
                                           ((key) >> 48)) & 0xffffu))
#define TW_KEY_TAGS_SIZE      ((uint64_t)TW_KEYS_CAP * 2u)
#define CAS(p, e, v, so, fo) __atomic_compare_exchange_n((p), (e), (v), 0, (so), (fo))
#define ADD_RLX(p, v)    __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)

#define MAX_TASKS_LIMIT  4096u
#define MAX_POOL_LIMIT   (1u << 24)
#define MAX_PAYLOAD      (1u << 20)
#define MAX_PROCS_LIMIT  65536u
#define DEFAULT_LOCK_TIMEOUT_NS (2LL * 1000 * 1000 * 1000)
#define POP_RETRIES      (1u << 22)

/* The owner aux of a node fsck or a reaper holds outside any process entry. */
#define AUX_NOBODY       0xffffffu

/* ---- addressing: every index is checked against the local view's sizes ---- */

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

/* A head index that accepts no more work: the exited sentinel, or dead. */
static inline int idx_closed(uint32_t idx) { return idx != TW_NIL && (idx & TW_DEAD_BIT); }
/* The list a dead head still carries (TW_NIL if none). */
static inline uint32_t dead_list(uint32_t idx)
{
    return (idx == TW_EXITED || idx == TW_DEAD_EMPTY) ? TW_NIL : (idx & ~TW_DEAD_BIT);
}
static inline uint32_t dead_of(uint32_t idx)
{
    return idx == TW_NIL ? TW_DEAD_EMPTY : (idx | TW_DEAD_BIT);
}

/*
 * The layers, bottom to top. A file calls only the files of the layers below
 * its own (reap.c, the top, may call every one). The one way up: the process
 * table and the key table settle a dead process's entry through
 * tw_dead_proc_ops, which reap.c fills in when the library is loaded.
 *
 *   sys.c        the system: clock, /proc, eventfd, pidfd, futex, tgkill
 *   segment.c    format, map, names, robust locks, fault injection
 *   life.c       life locks: liveness of tasks and processes; unmapping
 *   sigwatch.c   the watcher of owed TWA_SIGNAL signals
 *   proc.c       the process table
 *   pool.c       the node pool (tagged Treiber stack)
 *   deadletter.c the dead-letter list
 *   keys.c       the key table of keyed adds
 *   task_work.c  tasks, the add engine, run, cancel, reading works
 *   reap.c       dead tasks and dead processes
 */

/* ---- sys.c ---- */
/* Start a detached thread running fn(NULL) with every signal blocked (it
 * inherits a full mask: no signal meant for Python's handler lands there),
 * with a small stack. 0 or -errno. */
int  tw_thread_start_quiet(void *(*fn)(void *));
uint64_t tw_now_mono(void);
/* Wake every waiter on a futex word (shared: it may be in the segment). */
void tw_futex_wake(uint32_t *word);
/* Sleep while *word == val, at most rel (shared futex). */
void tw_futex_wait(uint32_t *word, uint32_t val, const struct timespec *rel);
/* The same, returning 0, -EAGAIN (*word != val), -ETIMEDOUT or -EINTR. */
int  tw_futex_wait_rc(uint32_t *word, uint32_t val, const struct timespec *rel);
/* Send signum to thread tid of process pid: 0 or -errno. */
int  tw_tgkill(int pid, int tid, int signum);

/* ---- segment.c ---- */
/* The name-table entry of a name id, or NULL (none, or not yet written). */
struct tw_name *tw_name_find(struct tw_dom *d, uint64_t id);

/* The histogram bucket of v (ns): its bit length less TW_HIST_SHIFT, clamped. */
static inline unsigned tw_hist_bucket(uint64_t v)
{
    unsigned b = v < (1ull << TW_HIST_SHIFT) ? 0u
               : (unsigned)(64 - __builtin_clzll(v)) - TW_HIST_SHIFT;
    return b < TW_HIST_BUCKETS ? b : TW_HIST_BUCKETS - 1;
}

/* Count v in a histogram any runner may write (a callback name's): relaxed
 * fetch-adds, statistics only. */
static inline void tw_hist_add(struct tw_hist *h, uint64_t v)
{
    __atomic_fetch_add(&h->bucket[tw_hist_bucket(v)], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&h->sum_ns, v, __ATOMIC_RELAXED);
}

/* Count v in a histogram only one runner writes (a task's: its own process,
 * one thread at a time): relaxed load and store, no locked instruction.
 * Readers see each word whole, never torn. */
static inline void tw_hist_add_own(struct tw_hist *h, uint64_t v)
{
    uint64_t *c = &h->bucket[tw_hist_bucket(v)];
    __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&h->sum_ns, __atomic_load_n(&h->sum_ns, __ATOMIC_RELAXED) + v,
                     __ATOMIC_RELAXED);
}
int  tw_mutex_init_robust(pthread_mutex_t *m);
/* 1 if m still has the type tw_format gave it (glibc keeps the type inside
 * the mutex, i.e. in the segment; garbage there can make glibc abort). */
int  tw_mutex_sane(pthread_mutex_t *m);
/* Lock with a CLOCK_MONOTONIC deadline. EOWNERDEAD is made consistent and
 * reported through *recovered (if given): 0, -ETIMEDOUT or -EUCLEAN. */
int  tw_lock(pthread_mutex_t *m, int64_t timeout_ns, uint32_t *recovered);

/* ---- life.c ---- */
/* The word of a life lock: the owner's TID, FUTEX_OWNER_DIED, or 0. */
static inline uint32_t tw_life_word(struct tw_life *l)
{
    /* Acquire: pairs with the kernel's store at the owner's death and with
     * the holder's CAS. */
    return __atomic_load_n(&l->word, __ATOMIC_ACQUIRE);
}
int  tw_word_dead(uint32_t w);
/* Take a life lock in this process's holder thread: 0 (it was free), 1 (its
 * last holder died: taken over), -EBUSY (a live holder has it), -errno. It
 * stays held until tw_life_release(l), or until this process dies. */
int  tw_life_hold(struct tw_life *l);
int  tw_life_release(struct tw_life *l);
/* Let go of every life lock the holder holds inside [base, base+size). */
void tw_life_release_range(const void *base, uint64_t size);
int  tw_slot_dead_s(struct tw_slot *s);

/* ---- sigwatch.c ---- */
/* Wake this slot's watcher (an adder saw TW_F_SIGWATCH as it armed the flag). */
void tw_sigwatch_kick(uint32_t *flags);

/* ---- proc.c ---- */
/* How the process table and the key table settle a dead process's entry
 * (reap.c's tw_proc_settle and tw_proc_reclaim). NULL members: such an
 * entry is left alone. */
struct tw_dead_proc_ops {
    int (*settle)(struct tw_dom *d, uint32_t i, int fsck_locked, struct tw_reap_info *info);
    int (*reclaim)(struct tw_dom *d, uint32_t i, int fsck_locked, struct tw_reap_info *info);
};
extern struct tw_dead_proc_ops tw_dead_proc_ops;

/* ---- outcome.c (the ring of tw_layout.h "outcome records") ---- */
/* Settle tracked node (node, gen), owned by the caller: write its record,
 * mark it SETTLED, wake its waiters. 1 settled, 0 untracked or settled. */
int  tw_outcome_settle_node(struct tw_dom *d, uint32_t node, uint32_t gen, uint32_t outcome,
                            const char *data, uint32_t len);
/* The same for a node just filed as a dead letter for `reason` (failed:
 * with the error kept beside its payload). */
int  tw_outcome_letter(struct tw_dom *d, uint32_t node, uint32_t gen, uint32_t reason);
/* A dead letter (node, old_gen), ours, is about to be queued again as
 * new_gen: record that for the old id, and track the new work. */
void tw_outcome_requeued(struct tw_dom *d, uint32_t node, uint32_t old_gen, uint32_t new_gen,
                         int retry);
/* Wake the waiters of node (after tw_outcome_requeued and the new generation). */
void tw_outcome_wake(struct tw_dom *d, uint32_t node);
/* File a node as a dead letter under dl_lock (deadletter.c); settle: 0 for
 * a filing that is not the work's end (a retry queues it again at once). */
int  tw_dl_file_locked_ex(struct tw_dom *d, uint32_t node, uint64_t expect, uint32_t reason,
                          uint32_t slot, uint64_t name_id, int settle);

/* ---- pool.c ---- */
/* Allocate a node (ALLOC by our entry, new generation): from the process's
 * cache, else the free list, else another process's cache. 0 or -errno
 * (-ENOMEM: every node is in use). Async-signal-safe. */
int  tw_pool_pop(struct tw_dom *d, uint32_t *out);
/* Give back a node we own: into the process's cache (CACHED), or onto the
 * free list if the cache is busy. Async-signal-safe. */
void tw_pool_push(struct tw_dom *d, uint32_t idx);
/* Onto the shared free list, bypassing the cache (reclaiming a dead entry's
 * nodes: they must not land in a cache the reclaimer is about to scan). */
void tw_pool_push_shared(struct tw_dom *d, uint32_t idx);
/* Give the process's whole cache back to the free list (before the process
 * entry is released). */
void tw_pool_cache_flush(struct tw_dom *d);
/* A node CACHED by a dead entry (owner word o): back to the free list. 1
 * given back, 0 not (someone took it first). Hold the entry's life lock. */
int  tw_pool_uncache(struct tw_dom *d, uint32_t node, uint64_t o);
int  tw_reachable(struct tw_dom *d, uint32_t from, uint32_t node);

/* ---- deadletter.c ---- */
int  tw_dl_lock(struct tw_dom *d);
void tw_dl_unlock(struct tw_dom *d);
/* File node (owner word expect) as a dead letter; hold dl_lock. 1 filed, 0
 * the owner word changed (someone else has the node). */
int  tw_dl_file_locked(struct tw_dom *d, uint32_t node, uint64_t expect, uint32_t reason,
                       uint32_t slot, uint64_t name_id);
int  tw_dl_file(struct tw_dom *d, uint32_t node, uint64_t expect, uint32_t reason,
                uint32_t slot, uint64_t name_id);

/* ---- keys.c ---- */
/* Look key up and, if unknown, reserve a ring entry for (node, gen) with the
 * final state want: 1 recorded before (info filled), 0 reserved (*entry,
 * *word: the RESERVED word), -errno. */
int  tw_key_reserve(struct tw_dom *d, uint64_t key, uint32_t node, uint32_t gen,
                    uint32_t want, uint32_t slot, struct tw_key_info *info, int *entry,
                    uint64_t *word);
/* RESERVED (word) -> state, unless a resolver or reclaimer got there first. */
void tw_key_finish(struct tw_dom *d, int entry, uint64_t word, uint32_t state);
void tw_key_fill_info(struct tw_dom *d, int entry, struct tw_key_info *info, uint32_t fresh);
/* A reclaimer gives back (VOID) or files (DEADLETTER) the node of a dead
 * reserver: settle the key entry that names it, before the node moves. */
void tw_keys_settle(struct tw_dom *d, uint32_t node, uint32_t gen, uint32_t state);

/* ---- task_work.c ---- */
void tw_copy_info(struct tw_dom *d, uint32_t idx, struct tw_node *n, uint64_t owner,
                  struct tw_work_info *wi, char *payload_out, char *origin_out);
/* May a node with owner word o be linked on the list of (slot, gen)? */
int  tw_linked_state(struct tw_dom *d, struct tw_node *n, uint64_t o, uint32_t slot,
                     uint32_t gen);

/* ---- reap.c ---- */
/* Settle what the dead process of entry i held (hold its life lock): the
 * nodes it was popping or pushing, then the nodes it had allocated. Adopts
 * the entry as d->my_proc if the caller has none. 0, or -EAGAIN (the free
 * list never held still: try later). */
int  tw_proc_settle(struct tw_dom *d, uint32_t i, int fsck_locked, struct tw_reap_info *info);

#endif
