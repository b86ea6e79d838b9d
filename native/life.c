// SPDX-License-Identifier: MIT
/*
 * life.c - death is seen in shared memory.
 *
 * Each registration (task slot) and each process-table entry has a "life
 * lock" in the segment: a robust futex (struct tw_life), held for as long as
 * its owner lives. When a thread dies holding a robust futex, the kernel
 * itself writes FUTEX_OWNER_DIED into the futex word (get_robust_list(2)),
 * so every other process can tell a dead task from the segment alone, with
 * one load: no signal, no /proc, no fsck pass.
 *
 * A robust futex belongs to a thread, not a process, and a Python program's
 * threads come and go. So one holder thread per process, started on first
 * use, takes and gives back every life lock of the process. It blocks every
 * signal, never runs Python and never waits on anything but its requests: it
 * lives exactly as long as the process (exec and death end it, and then the
 * kernel marks its words).
 *
 * The holder keeps its own robust list (set_robust_list(2) with a private
 * head) instead of glibc's: glibc's robust mutexes link through pointers
 * stored inside the mutex - in the segment, where anyone who can write the
 * domain could aim glibc's unlink at this process's memory. Here the holder
 * records what it holds in private memory and only ever writes the links in
 * the segment (rewriting them all from that record on every change), never
 * follows them. A scribbled link can at most mislead the kernel's walk when
 * the holder dies, and the kernel marks only words that hold the dying
 * thread's TID.
 *
 * Callers reach the holder through a request slot guarded by two
 * process-local mutexes; fork() gets a fresh, empty holder in the child (the
 * child holds nothing: the parent's locks stay the parent's).
 *
 * Layer: life. Calls sys, segment.
 */
#include "tw_internal.h"

#include <linux/futex.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define HOLD_MAX 4096          /* life locks one process may hold at once */

enum { OP_HOLD = 1, OP_RELEASE = 2, OP_RELEASE_RANGE = 3 };

static struct {
    pthread_mutex_t call;       /* one request at a time                     */
    pthread_mutex_t mu;         /* guards the fields below                   */
    pthread_cond_t  cv;
    pid_t           pid;        /* the process the thread runs in; 0: none   */
    unsigned        req, done;  /* request / completion counters             */
    int             op, result;
    struct tw_life  *l;
    const char      *lo, *hi;
} H = { .call = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER,
        .cv = PTHREAD_COND_INITIALIZER };

/* The holder thread's own state (touched by it alone, or after fork). */
static struct robust_list_head rhead;
static struct tw_life *held[HOLD_MAX];
static int nheld;
static uint32_t my_tid;

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void atfork_prepare(void)
{
    pthread_mutex_lock(&H.call);
    pthread_mutex_lock(&H.mu);
}

static void atfork_parent(void)
{
    pthread_mutex_unlock(&H.mu);
    pthread_mutex_unlock(&H.call);
}

/* The child has no holder thread and holds no life lock. */
static void atfork_child(void)
{
    pthread_mutex_init(&H.call, NULL);
    pthread_mutex_init(&H.mu, NULL);
    pthread_cond_init(&H.cv, NULL);
    H.pid = 0;
    H.req = H.done = 0;
    nheld = 0;
}

static void register_atfork(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* Rewrite the robust list from the private record: head -> held[n-1] ->
 * ... -> held[0] -> head. Each link is written, none is read. */
static void relink(void)
{
    struct robust_list *prev = &rhead.list;
    for (int i = nheld - 1; i >= 0; i--) {
        struct robust_list *e = (struct robust_list *)&held[i]->next;
        __atomic_store_n(&prev->next, e, __ATOMIC_RELEASE);
        prev = e;
    }
    __atomic_store_n(&prev->next, &rhead.list, __ATOMIC_RELEASE);
}

/* Runs in the holder thread, H.mu held. */
static int hold(struct tw_life *l)
{
    if (nheld >= HOLD_MAX)
        return -EMFILE;
    /* A death between the CAS and the relink must still mark the word: the
     * kernel looks at list_op_pending too. */
    rhead.list_op_pending = (struct robust_list *)&l->next;
    uint32_t w = __atomic_load_n(&l->word, __ATOMIC_ACQUIRE);
    int r;
    for (;;) {
        if ((w & FUTEX_TID_MASK) != 0) {
            r = -EBUSY;                     /* a live holder (or our own) */
            break;
        }
        /* Free (0), or its holder died (OWNER_DIED): ours now. acq_rel:
         * pairs with the release of the previous holder and with the
         * kernel's marking. */
        if (CAS(&l->word, &w, my_tid, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            r = (w & FUTEX_OWNER_DIED) ? 1 : 0;
            held[nheld++] = l;
            relink();
            break;
        }
    }
    rhead.list_op_pending = NULL;
    return r;
}

static void drop(int i)
{
    struct tw_life *l = held[i];
    rhead.list_op_pending = (struct robust_list *)&l->next;
    held[i] = held[--nheld];
    relink();
    /* Release: whoever takes it next sees what we wrote under it. */
    __atomic_store_n(&l->word, 0u, __ATOMIC_RELEASE);
    rhead.list_op_pending = NULL;
}

static int perform(void)
{
    if (H.op == OP_HOLD)
        return hold(H.l);
    if (H.op == OP_RELEASE) {
        for (int i = 0; i < nheld; i++)
            if (held[i] == H.l) {
                drop(i);
                return 0;
            }
        return -ENOENT;
    }
    /* OP_RELEASE_RANGE */
    for (int i = nheld - 1; i >= 0; i--)
        if ((const char *)held[i] >= H.lo && (const char *)held[i] < H.hi)
            drop(i);
    return 0;
}

static void *holder_main(void *arg)
{
    (void)arg;
    my_tid = (uint32_t)syscall(SYS_gettid);
    rhead.list.next = &rhead.list;
    rhead.futex_offset = (long)offsetof(struct tw_life, word) - (long)offsetof(struct tw_life, next);
    rhead.list_op_pending = NULL;
    long sr = syscall(SYS_set_robust_list, &rhead, sizeof(rhead));
    pthread_mutex_lock(&H.mu);
    for (;;) {
        while (H.done == H.req)
            pthread_cond_wait(&H.cv, &H.mu);
        H.result = sr == 0 ? perform() : -ENOSYS;
        H.done = H.req;
        pthread_cond_broadcast(&H.cv);
    }
    return NULL;
}

/* Start the holder in this process if it is not running. H.mu held. It is
 * created with every signal blocked, so it inherits a full mask: the task's
 * signal always goes to a thread that can run Python's handler. */
static int ensure_holder(void)
{
    pid_t me = getpid();
    if (H.pid == me)
        return 0;
    int r = tw_thread_start_quiet(holder_main);
    if (r < 0)
        return r;
    H.pid = me;
    return 0;
}

/* One request, answered within a deadline (the holder never blocks on a
 * lock: it only tries, so the deadline is a safety net, not a wait). */
static int request(int op, struct tw_life *l, const void *lo, uint64_t size)
{
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&H.call);
    pthread_mutex_lock(&H.mu);
    int r = 0;
    if (op != OP_HOLD && H.pid != getpid()) {
        r = op == OP_RELEASE ? -ENOENT : 0;     /* no holder: nothing held */
        goto out;
    }
    r = ensure_holder();
    if (r)
        goto out;
    H.op = op;
    H.l = l;
    H.lo = lo;
    H.hi = (const char *)lo + size;
    unsigned ticket = ++H.req;
    pthread_cond_broadcast(&H.cv);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);   /* pthread_cond_timedwait's clock */
    ts.tv_sec += 10;
    while (H.done != ticket) {
        if (pthread_cond_timedwait(&H.cv, &H.mu, &ts) == ETIMEDOUT && H.done != ticket) {
            r = -ETIMEDOUT;
            goto out;
        }
    }
    r = H.result;
out:
    pthread_mutex_unlock(&H.mu);
    pthread_mutex_unlock(&H.call);
    return r;
}

int tw_life_hold(struct tw_life *l) { return request(OP_HOLD, l, NULL, 0); }
int tw_life_release(struct tw_life *l) { return request(OP_RELEASE, l, NULL, 0); }
void tw_life_release_range(const void *base, uint64_t size)
{
    (void)request(OP_RELEASE_RANGE, NULL, base, size);
}

/* ------------------------------------------------------------------------ */
/* reading death from the segment                                            */

/* Dead: the kernel marked it (its holder died), or nobody holds it. */
int tw_word_dead(uint32_t w)
{
    return (w & FUTEX_OWNER_DIED) || !(w & FUTEX_TID_MASK);
}

/* A task is dead when its slot is in a live state but its life lock says
 * its holder died (or nobody holds it). REAPING counts as dead whoever holds
 * the lock: the slot's process is gone, a reaper is settling its works. */
int tw_slot_dead_s(struct tw_slot *s)
{
    uint32_t st = LD_ACQ(&s->state);
    if (st == TW_SLOT_REAPING)
        return 1;
    if (st != TW_SLOT_CLAIMING && st != TW_SLOT_RUNNING && st != TW_SLOT_EXITING)
        return 0;
    if (!tw_word_dead(tw_life_word(&s->life)))
        return 0;
    /* An exit stores EXITED before it unlocks: a word we saw unlocked by an
     * exit comes with that state (acquire load above), so look again. */
    return LD_ACQ(&s->state) == st;
}

int tw_slot_dead(struct tw_dom *d, uint32_t slot)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    return tw_slot_dead_s(SLOT(d, slot));
}

/* A process entry is dead when it names a pid but its life lock is not held
 * by a live thread. Claim locks before it stores the pid, release clears the
 * pid before it unlocks, so a word seen unlocked by a release comes with a
 * pid of 0 on the second look. (Whoever acts on it re-checks under the lock.) */
int tw_proc_dead(struct tw_dom *d, uint32_t i)
{
    if (i >= d->max_procs)
        return -EINVAL;
    struct tw_proc *p = PROC(d, i);
    uint64_t pid = LD_ACQ(&p->pid);
    if (!pid || !tw_word_dead(tw_life_word(&p->life)))
        return 0;
    return LD_ACQ(&p->pid) == pid;
}

/* Unmap. The holder thread must first let go of every life lock in the
 * mapping: glibc keeps held robust mutexes on a per-thread list that it walks
 * on unlock, and the kernel walks it when the thread dies; an entry in
 * memory that is gone would break both. */
void tw_unmap(struct tw_dom *d)
{
    if (d->base) {
        tw_life_release_range(d->base, d->size);
        munmap(d->base, d->size);
    }
    d->base = NULL;
    d->size = 0;
}
