/*
 * sigwatch.c - TWA_SIGNAL is never stranded (README "TWA_SIGNAL is never
 * stranded").
 *
 * The kernel's TWA_SIGNAL cannot be lost: the task runs its works at its next
 * return to user mode. CPython runs a Python signal handler only when its main
 * thread next checks for signals. A task's signal caught just before the main
 * thread enters a blocking system call (read, select, sleep, a lock wait)
 * leaves the handler owed with nothing pending: the call is not interrupted,
 * and while NOTIFY_SIGNAL stays set every later adder coalesces into it and
 * sends nothing. The same happens when another thread of the process, one
 * that does not block the signal, catches it.
 *
 * Acknowledgement. The adder that arms NOTIFY_SIGNAL 0->1 steps the signal
 * sequence in the same CAS on the flags word (tw_layout.h, "slot.flags
 * SIGSEQ"); the task's handler stores, at its entry, the sequence it read
 * into c.sig_ack (tw_sig_ack). A signal is *owed* while
 *
 *     NOTIFY_SIGNAL is set  &&  c.sig_ack != the sequence  &&  works queued
 *
 * The flag and the sequence change in one atomic step, so there is no moment
 * at which the flag makes adders coalesce while the signal is not yet owed:
 * an adder preempted (or killed) between its arming and its send strands
 * nothing, the watcher sends the signal for it.
 *
 * The watcher. One thread per process (started by the first tw_sigwatch_add,
 * every signal blocked, never runs Python) checks the watched slots. A slot
 * owed for TW_SIG_RESEND_NS gets its signal again, sent with tgkill(2) to the
 * thread that runs Python's handlers; the blocking call returns EINTR and
 * CPython runs the owed handler. While it stays owed (the main thread is in a
 * long native call, or the signal is blocked), the interval doubles up to
 * TW_SIG_RESEND_MAX_NS: a rate limit, never a storm. A handler that enters
 * while a callback runs or inside critical() acknowledges too: those delays
 * are the task's own, not a lost signal.
 *
 * Sleeping. While some watched slot has NOTIFY_SIGNAL set, or did within
 * TW_SIG_LINGER_NS, the watcher polls every TW_SIG_TICK_NS (a few loads per
 * slot). After that, a watcher of a single slot sets TW_F_SIGWATCH in the
 * slot's flags and sleeps on the flags word (a shared futex); the adder whose
 * fetch_or turns NOTIFY_SIGNAL 0->1 and finds SIGWATCH set wakes it (one
 * FUTEX_WAKE, only for the first signal after an idle second). A watcher of
 * several slots keeps polling.
 *
 * Layer: sigwatch. Calls sys, segment, life.
 */
#include "tw_internal.h"

#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct watch {
    struct tw_dom *d;
    uint32_t slot, gen;
    int signum;
    pid_t tid;
    uint64_t owed_sent;        /* the signal sequence when this episode began   */
    uint64_t owed_since;       /* 0: not owed                                   */
    uint64_t next_ns;          /* the next resend is due then                   */
    uint64_t interval;
};

static struct {
    pthread_mutex_t mu;        /* guards everything below                       */
    pthread_cond_t  cv;        /* CLOCK_MONOTONIC; entries changed, or acks     */
    pid_t pid;                 /* the process the thread runs in; 0: none       */
    int n;
    struct watch w[TW_SIG_WATCH_MAX];
    uint64_t armed_ns;         /* the last time a watched NOTIFY_SIGNAL was set  */
    uint32_t *sleeping_on;     /* the futex word the thread sleeps on, or NULL  */
} W = { .mu = PTHREAD_MUTEX_INITIALIZER };

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* Called by an adder (notify() in task_work.c) that turned NOTIFY_SIGNAL 0->1
 * and saw TW_F_SIGWATCH in the old flags. */
void tw_sigwatch_kick(uint32_t *flags)
{
    tw_futex_wake(flags);
}

/* The child of a fork() has no watcher thread and watches nothing: its
 * parent's registrations are not its own. */
static void atfork_child(void)
{
    pthread_mutex_init(&W.mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&W.cv, &ca);
    pthread_condattr_destroy(&ca);
    W.pid = 0;
    W.n = 0;
    W.sleeping_on = NULL;
}

static void init(void)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&W.cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_atfork(NULL, NULL, atfork_child);
}

static void deadline_in(struct timespec *ts, int64_t ns)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ns / 1000000000LL;
    ts->tv_nsec += ns % 1000000000LL;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* The slot's signal, as the watcher judges it: -1 NOTIFY_SIGNAL clear; 0 set
 * but taken by the handler, or nothing queued; 1 owed, *seq the sequence. */
static int owed(struct tw_slot *s, uint32_t *seq)
{
    /* Acquire: pairs with the adder's arming CAS (acq_rel), which follows
     * its push: the flag and the sequence come from one word. */
    uint32_t f = LD_ACQ(&s->flags);
    if (!(f & TW_F_NOTIFY_SIGNAL))
        return -1;
    *seq = f >> TW_F_SIGSEQ_SHIFT;
    /* Acquire: pairs with the handler's release store. A stale ack only
     * delays the verdict by one tick. */
    uint32_t ack = (uint32_t)(LD_ACQ(&s->c.sig_ack) & (TW_F_SIGSEQ_ONE - 1));
    uint32_t idx = H_IDX(LD_ACQ(&s->head));
    return *seq != ack && idx != TW_NIL && !idx_closed(idx);
}

int tw_sig_owed(struct tw_dom *d, uint32_t slot)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    uint32_t seq;
    return owed(SLOT(d, slot), &seq) == 1;
}

/* Check one entry; W.mu held. Returns 1 if its NOTIFY_SIGNAL is set. */
static int check(struct watch *w, uint64_t now)
{
    struct tw_slot *s = SLOT(w->d, w->slot);
    /* Acquire: pairs with tw_register's release of gen; a reused slot is
     * someone else's registration, never ours to signal. */
    if (LD_ACQ(&s->gen) != w->gen) {
        w->owed_since = 0;
        return 0;
    }
    uint32_t sent;
    int o = owed(s, &sent);
    if (o <= 0) {
        w->owed_since = 0;     /* clear; or taken, or nothing waits on it */
        return o == 0;
    }
    if (!w->owed_since || w->owed_sent != sent) {
        /* A new episode: the handler may still run by itself. */
        w->owed_since = now;
        w->owed_sent = sent;
        w->interval = TW_SIG_RESEND_NS;
        w->next_ns = now + TW_SIG_RESEND_NS;
        return 1;
    }
    if (now >= w->next_ns) {
        if (tw_tgkill(W.pid, w->tid, w->signum) == 0) {
            ADD_RLX(&s->c.signals_resent, 1);
        }
        /* Rate limit: two resends a TW_SIG_RESEND_NS apart (a resend that
         * itself lands just before a blocking call is rare), then doubling. */
        if (now - w->owed_since > 2 * (uint64_t)TW_SIG_RESEND_NS && w->interval < TW_SIG_RESEND_MAX_NS)
            w->interval *= 2;
        w->next_ns = now + w->interval;
    }
    return 1;
}

static void *watcher_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&W.mu);
    for (;;) {
        if (W.n == 0) {
            pthread_cond_wait(&W.cv, &W.mu);
            continue;
        }
        uint64_t now = tw_now_mono();
        int armed = 0;
        for (int i = 0; i < W.n; i++)
            armed |= check(&W.w[i], now);
        if (armed)
            W.armed_ns = now;
        if (armed || W.n > 1 || now - W.armed_ns < (uint64_t)TW_SIG_LINGER_NS) {
            struct timespec ts;
            deadline_in(&ts, TW_SIG_TICK_NS);
            pthread_cond_timedwait(&W.cv, &W.mu, &ts);
            continue;
        }
        /* Idle for a second, one slot: sleep on its flags word. acq_rel:
         * pairs with the adders' fetch_or - an adder after this sees
         * SIGWATCH and wakes us; one before it shows in the value. */
        struct tw_slot *s = SLOT(W.w[0].d, W.w[0].slot);
        uint32_t val = __atomic_or_fetch(&s->flags, TW_F_SIGWATCH, __ATOMIC_ACQ_REL);
        if (val & TW_F_NOTIFY_SIGNAL) {
            __atomic_fetch_and(&s->flags, ~TW_F_SIGWATCH, __ATOMIC_ACQ_REL);
            W.armed_ns = now;
            continue;
        }
        uint32_t *word = &s->flags;
        W.sleeping_on = word;
        pthread_mutex_unlock(&W.mu);
        /* Bounded, so a word whose mapping went away under us (EFAULT is
         * returned at once; a remapped address would never be woken) costs
         * at most this long. A change of any bit returns at once (EAGAIN). */
        struct timespec rel = { 60, 0 };
        tw_futex_wait(word, val, &rel);
        pthread_mutex_lock(&W.mu);
        if (W.sleeping_on == word) {
            /* Still ours (tw_sigwatch_del clears sleeping_on before the slot
             * may go away): stop asking adders to wake us. */
            __atomic_fetch_and(word, ~TW_F_SIGWATCH, __ATOMIC_ACQ_REL);
            W.sleeping_on = NULL;
        }
        W.armed_ns = tw_now_mono();   /* linger: poll for a while first */
        pthread_cond_broadcast(&W.cv);
    }
    return NULL;
}

/* Start the watcher in this process if it is not running. W.mu held. Every
 * signal is blocked in it, so no signal meant for Python lands there. */
static int ensure_thread(void)
{
    if (W.pid == getpid())
        return 0;
    int r = tw_thread_start_quiet(watcher_main);
    if (r < 0)
        return r;
    W.pid = getpid();
    W.armed_ns = tw_now_mono();
    return 0;
}

/* Wake a sleeping watcher (W.mu held): clearing SIGWATCH changes the word, so
 * a watcher between its unlock and its FUTEX_WAIT returns at once too. */
static void wake_sleeper(void)
{
    if (W.sleeping_on) {
        __atomic_fetch_and(W.sleeping_on, ~TW_F_SIGWATCH, __ATOMIC_ACQ_REL);
        tw_futex_wake(W.sleeping_on);
    }
    pthread_cond_broadcast(&W.cv);
}

int tw_sig_ack(struct tw_dom *d, uint32_t slot, int ok)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    /* Acquire: pairs with the adders' arming CAS; the sequence of every
     * signal sent so far is in the word. */
    uint32_t seq = LD_ACQ(&s->flags) >> TW_F_SIGSEQ_SHIFT;
    /* Release: the watcher that reads this ack (acquire) also sees the
     * handler's entry as done; a failed handler leaves it owed. */
    ST_REL(&s->c.sig_ack, (uint64_t)((ok ? seq : seq - 1) & (TW_F_SIGSEQ_ONE - 1)));
    return 0;
}

int tw_sigwatch_add(struct tw_dom *d, uint32_t slot, uint32_t gen, int signum, int tid)
{
    if (!slot_ok(d, slot) || signum <= 0 || signum >= NSIG || tid <= 0)
        return -EINVAL;
    pthread_once(&init_once, init);
    pthread_mutex_lock(&W.mu);
    int r = 0;
    int i;
    for (i = 0; i < W.n; i++)
        if (W.w[i].d == d && W.w[i].slot == slot)
            break;
    if (i == W.n) {
        if (W.n == TW_SIG_WATCH_MAX) {
            r = -ENOSPC;
            goto out;
        }
        W.n++;
    }
    r = ensure_thread();
    if (r < 0) {
        if (i == W.n - 1)
            W.n--;
        goto out;
    }
    memset(&W.w[i], 0, sizeof(W.w[i]));
    W.w[i].d = d;
    W.w[i].slot = slot;
    W.w[i].gen = gen;
    W.w[i].signum = signum;
    W.w[i].tid = tid;
    W.armed_ns = tw_now_mono();
    wake_sleeper();
out:
    pthread_mutex_unlock(&W.mu);
    return r;
}

int tw_sigwatch_del(struct tw_dom *d, uint32_t slot)
{
    pthread_once(&init_once, init);
    pthread_mutex_lock(&W.mu);
    int removed = 0;
    for (int i = 0; i < W.n;) {
        struct watch *w = &W.w[i];
        if (w->d == d && (w->slot == slot || slot == UINT32_MAX)) {
            uint32_t *flags = &SLOT(d, w->slot)->flags;
            if (W.sleeping_on == flags) {
                /* The watcher sleeps on this slot's word: wake it and wait
                 * until it has let go of the word (bounded: ~1 s). */
                for (int k = 0; k < 100 && W.sleeping_on == flags; k++) {
                    wake_sleeper();
                    struct timespec ts;
                    deadline_in(&ts, 10 * 1000 * 1000);
                    pthread_cond_timedwait(&W.cv, &W.mu, &ts);
                }
                W.sleeping_on = NULL;
            }
            W.w[i] = W.w[--W.n];
            removed++;
            continue;
        }
        i++;
    }
    pthread_cond_broadcast(&W.cv);
    pthread_mutex_unlock(&W.mu);
    return removed;
}


