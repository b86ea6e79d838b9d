// SPDX-License-Identifier: MIT
/*
 * task_work.c - kernel/task_work.c over POSIX shared memory.
 *
 * A task's list is a LIFO of pool nodes whose head is slot.head. The slot's
 * registration generation lives in the upper half of that word, so a push
 * aimed at an older registration of a reused slot can never succeed: the
 * generation is part of the value compare-and-swap compares.
 *
 * Ownership: every node carries an owner word (gen | state | aux). Each
 * transition is made by the party that owns the node at that moment, or by
 * compare-and-swap where two parties may race for it (an adder marking its
 * pushed node against the runner, a canceller or a reaper taking it).
 *
 * Functions return 0, a count or a bit mask (>= 0), or -errno:
 *   -ESRCH      the task exited (or the handle is for an older registration)
 *   -EOWNERDEAD the task's process died (tw_add): reap it, report ESRCH
 *   -EINVAL     bad argument (notify mode, index)
 *   -E2BIG      payload larger than the domain's payload_size
 *   -ENOMEM     the pool is empty
 *   -EPERM      not the task's own process
 *   -EUCLEAN    the segment is inconsistent (bad index, walk too long)
 *   -ETIMEDOUT  a lock was not obtained in time (owner stuck or corrupt)
 *   -EUSERS     the process table is full of live processes
 *
 * Layer: task_work. Calls sys, segment, life, sigwatch, the process table,
 * the pool, the dead letters, the key table; never reap.c.
 */
#include "tw_internal.h"

#include <linux/futex.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


static void recover_cancelling(struct tw_dom *d, uint32_t slot, struct tw_slot *s);

/* ------------------------------------------------------------------------ */
/* tasks: registration and exit, ordered by the slot's life lock              */

/*
 * Claim a slot: FREE or EXITED. Its life lock is taken first, by this
 * process's holder thread, and kept for the registration's whole life: that
 * lock (not a pid) is what says the task lives. Under it the slot is filled,
 * then a new head (new generation, empty list) and the RUNNING state are
 * published. Dead tasks' slots are reaped before (tw_reap) and so are
 * EXITED here. Returns the slot.
 */
int tw_register(struct tw_dom *d, const char *name, uint64_t name_id, int32_t signum,
                int32_t efd, uint32_t uid, uint64_t now_ns, uint32_t *gen_out)
{
    int pid = getpid();
    int r = tw_proc_claim(d);   /* now, so tw_add_nmi never needs to */
    if (r < 0)
        return r;
    uint64_t start = tw_proc_start_ticks(pid);
    for (uint32_t i = 0; i < d->max_tasks; i++) {
        struct tw_slot *s = SLOT(d, i);
        uint32_t st = LD_ACQ(&s->state);
        if (st != TW_SLOT_FREE && st != TW_SLOT_EXITED)
            continue;
        if (tw_life_hold(&s->life) < 0)
            continue;               /* an exit or a reap is finishing there */
        st = LD_ACQ(&s->state);
        if (st != TW_SLOT_FREE && st != TW_SLOT_EXITED) {
            tw_life_release(&s->life);
            continue;
        }
        /* Release: a reader that sees CLAIMING under a held life lock knows
         * the slot is being registered (by a live process). */
        ST_REL(&s->state, TW_SLOT_CLAIMING);
        tw_killpoint(TW_KP_IN_REGISTER);
        uint32_t gen = LD_RLX(&s->gen) + 1;
        if (gen == 0)
            gen = 1;
        ST_RLX(&s->pid, pid);
        ST_RLX(&s->start_ticks, start);
        s->registered_ns = now_ns;
        s->signum = signum;
        s->efd = efd;
        s->uid = uid;
        s->name_id = name_id;
        s->lock_recovered = 0;
        memset(s->fd_token, 0, sizeof(s->fd_token));
        memset(s->name, 0, sizeof(s->name));
        if (name)
            strncpy(s->name, name, sizeof(s->name) - 1);
        memset(&s->c, 0, sizeof(s->c));
        memset(&s->latency, 0, sizeof(s->latency));
        memset(&s->duration, 0, sizeof(s->duration));
        ST_RLX(&s->flags, 0u);
        /* Release: readers of gen (dom.task(), tasks()) see the fields above. */
        ST_REL(&s->gen, gen);
        /* Release: a pusher that acquires this head sees the fields above. An
         * adder still holding the old generation fails its CAS from now on. */
        ST_REL(&s->head, HEAD(gen, TW_NIL));
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
    if (H_GEN(h) != gen || idx_closed(H_IDX(h)))
        return -ESRCH;
    return 0;
}

/* After exit (the head holds the exited sentinel): EXITED, then let go of the
 * life lock; the slot may now be claimed again. */
int tw_release_slot(struct tw_dom *d, uint32_t slot, uint32_t gen)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    if (LD_ACQ(&s->gen) != gen || LD_RLX(&s->pid) != d->my_pid)
        return -ESRCH;
    ST_RLX(&s->c.queued, 0);
    /* Release, before the unlock: whoever then takes the life lock (a new
     * registrant) or sees it free (tw_slot_dead) sees EXITED. */
    ST_REL(&s->state, TW_SLOT_EXITED);
    tw_life_release(&s->life);
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

/* Set the notify flag of mode; perform the notification when the flag was
 * clear and the caller gave us the descriptor. Returns TW_DUE_* | TW_DONE_*. */
static int notify(struct tw_slot *s, int mode, int efd, int pidfd, int signum)
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
        /* Arm NOTIFY_SIGNAL and, when this add turns it 0->1, step the
         * signal sequence in the same word, by one CAS (acq_rel: pairs with
         * tw_flags_clear() of the runner, as the fetch_or of RESUME; a CAS
         * that leaves the word as it was is still the read-modify-write that
         * orders our push before the runner's clear). From this instant
         * the signal is owed (sequence != sig_ack) even if we are preempted
         * or die before the send below: the watcher sends it for us
         * (sigwatch.c). Had the count been a second step, every add that
         * coalesced into our armed flag meanwhile would wait on nothing. */
        old = LD_RLX(&s->flags);
        {
            uint32_t nw;
            do
                nw = (old & TW_F_NOTIFY_SIGNAL) ? old
                                                : (old | TW_F_NOTIFY_SIGNAL) + TW_F_SIGSEQ_ONE;
            while (!__atomic_compare_exchange_n(&s->flags, &old, nw, 1, __ATOMIC_ACQ_REL,
                                                __ATOMIC_RELAXED));
        }
        if (!(old & TW_F_NOTIFY_SIGNAL)) {
            due |= TW_DUE_SIGNAL;
            tw_killpoint(TW_KP_IN_NOTIFY);
            ADD_RLX(&s->c.signals_sent, 1);     /* statistics only */
            if (pidfd >= 0 && tw_pidfd_send(pidfd, signum) == 0)
                due |= TW_DONE_SIGNAL;
            /* The task's watcher sleeps on this word: wake it, so an owed
             * signal is sent again even if the task stays idle. */
            if (old & TW_F_SIGWATCH)
                tw_sigwatch_kick(&s->flags);
            /* wait() is blocked (or about to block) in select(): set on
             * the same word before its last look, so either that look saw
             * NOTIFY_SIGNAL or this fetch_or sees WAITING. Wake it as for
             * RESUME; the handler may be deferred (README "TWA_SIGNAL is
             * never stranded"). */
            if (old & TW_F_WAITING) {
                due |= TW_DUE_EVENTFD;
                if (efd >= 0 && tw_eventfd_write(efd) == 0)
                    due |= TW_DONE_EVENTFD;
            }
        }
        break;
    case TW_TWA_SIGNAL_NO_IPI:
        __atomic_fetch_or(&s->flags, TW_F_NOTIFY_SIGNAL, __ATOMIC_ACQ_REL);
        break;
    default:
        break;
    }
    return due;
}

/* ------------------------------------------------------------------------ */
/* add                                                                        */

static int tw_check_notify(int notify_mode, int is_current)
{
    int mode = notify_mode & ~TW_TWA_FLAGS;
    int flags = notify_mode & TW_TWA_FLAGS;
    if (notify_mode < 0 || mode > TW_TWA_NMI_CURRENT || (flags & ~TW_TWAF_NO_ALLOC))
        return -EINVAL;
    if (mode == TW_TWA_NMI_CURRENT && !is_current)
        return -EINVAL;
    return mode;
}

/* Count v in a task histogram (one writer: the task's runner) and in the same
 * histogram of the work's callback name, if the name table has it. */
static void hist_note(struct tw_dom *d, struct tw_slot *s, uint64_t func_id, int duration,
                      uint64_t v)
{
    struct tw_name *e = tw_name_find(d, func_id);
    tw_hist_add_own(duration ? &s->duration : &s->latency, v);
    if (e)
        tw_hist_add(duration ? &e->duration : &e->latency, v);
}

static void tw_fill_node(struct tw_dom *d, struct tw_node *n, uint32_t slot, uint32_t gen,
                        uint64_t func_id, const char *payload, uint32_t len, const char *origin,
                      uint32_t origin_len, uint64_t now_ns, uint32_t track)
{
    /* Before the push (release CAS): whoever takes the node sees it. */
    n->track = track;
    n->func_id = func_id;
    n->payload_len = len;
    n->enqueued_ns = now_ns ? now_ns : tw_now_mono();
    n->sender_pid = d->my_pid;
    n->target = slot;
    n->target_gen = gen;
    n->reason = TW_R_NONE;
    n->note = 0;
    n->name_id = 0;
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
 * reachable since the push, so the runner (detach), a canceller, a reaper or
 * fsck may have taken it by CAS already - then this CAS fails and the node is
 * theirs. The generation in the expected word keeps us from touching a later
 * life of the node (run, freed and allocated again meanwhile).
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
 * Returns 0, or -ESRCH when the head is closed (exited or dead) or holds
 * another generation. Lock-free: a failed CAS means another adder pushed, or
 * the runner detached (head went to NIL or EXITED), or a reaper closed it;
 * either way we retry on the value the CAS gave back.
 */
static int push_chain(struct tw_slot *s, uint32_t gen, uint32_t first, struct tw_node *last)
{
    uint64_t head = LD_RLX(&s->head);
    do {
        if (H_GEN(head) != gen || idx_closed(H_IDX(head)))
            return -ESRCH;
        ST_RLX(&last->next, H_IDX(head));
        /* release: the node's fields and owner word are visible to whoever
         * acquires the head (detach, cancel, reap). */
    } while (!CAS(&s->head, &head, HEAD(gen, first), __ATOMIC_RELEASE, __ATOMIC_RELAXED));
    return 0;
}

/*
 * May (slot, gen) take a work now? 0, -ESRCH (exited, closed, or another
 * registration), -EINVAL (no such slot), or -EOWNERDEAD: the one load that
 * sees death on the add path - the kernel set FUTEX_OWNER_DIED in the life
 * word when the task's holder thread died. (While a reaper holds the lock
 * the bit is clear, but the reaper closed the head before it took the lock,
 * so the push fails instead.) Every add path asks this before it takes a node.
 */
static int tw_target_open(struct tw_dom *d, uint32_t slot, uint32_t gen)
{
    int r = tw_slot_check(d, slot, gen);
    if (r)
        return r;
    if (__builtin_expect(tw_life_word(&SLOT(d, slot)->life) & FUTEX_OWNER_DIED, 0))
        return -EOWNERDEAD;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* the add engine: every add path is tw_queue() with a request               */

/* Payload i of a request: the one payload, payloads[i], or buf[offs[i] ..
 * offs[i+1]). */
static inline __attribute__((always_inline)) const char *req_payload(const struct tw_add_req *r,
                                                                    uint32_t i)
{
    if (r->offs)
        return r->payload + r->offs[i];
    return r->payloads ? r->payloads[i] : r->payload;
}

static inline __attribute__((always_inline)) uint32_t req_len(const struct tw_add_req *r,
                                                             uint32_t i)
{
    if (r->offs)
        return r->offs[i + 1] - r->offs[i];
    return r->lens ? r->lens[i] : r->len;
}

/* The packed result of an add of one node: gen (32 bits) | node (24 bits,
 * MAX_POOL_LIMIT) | due (4 bits), < 2^60. */
static inline int64_t packed(uint32_t ngen, uint32_t idx, int64_t due)
{
    return (int64_t)(((uint64_t)ngen << 28) | ((uint64_t)idx << 4) | (uint64_t)due);
}

/* Take the dead letter r->src (gen r->src_gen) for a re-queue: it becomes
 * ours (ALLOC) with a new generation and r's target; its payload stays.
 * 1 taken, 0 not there (-ENOENT to the caller), -errno. */
static int take_src(struct tw_dom *d, const struct tw_add_req *r, uint32_t *old_target,
                    uint32_t *old_gen)
{
    int rc = tw_dl_take(d, r->src, r->src_gen);
    if (rc <= 0)
        return rc;
    struct tw_node *n = NODE(d, r->src);
    /* Its outcome first, while the node still has its old generation: a
     * reader of the old id finds the node (ours, pending) or the record
     * naming the new id, never neither. */
    tw_outcome_requeued(d, r->src, r->src_gen, r->src_gen + 1, r->retry);
    /* Release: whoever reads the owner word (a reclaimer, fsck) sees the new
     * generation only after the take; the node keeps its dead-letter reason
     * until the push, so if we die before it, it goes back to the dead
     * letters, never to the pool. */
    ST_REL(&n->owner, OWNER(r->src_gen + 1, TW_N_ALLOC, (uint32_t)d->my_proc));
    tw_outcome_wake(d, r->src);   /* a waiter of the old id reads its record now */
    *old_target = n->target;
    *old_gen = n->target_gen;
    n->target = r->slot;
    n->target_gen = r->gen;
    n->enqueued_ns = r->now_ns ? r->now_ns : tw_now_mono();
    return 1;
}

/*
 * The engine. Steps, each the same for every kind of add:
 *   check    the notify mode and the payload sizes
 *   open     the target accepts work (tw_target_open)
 *   take     nodes from the pool (count of them), or the dead letter src
 *   fill     target, callback, payload, origin
 *   key      record (key -> node) before the push, once per key
 *   push     one lock-free CAS for the whole chain (or file the node as a
 *            dead letter: to_deadletter)
 *   undo     a failed push gives the nodes back (or files src again, or
 *            voids the key) - nothing queued, nothing leaked
 *   mark     ALLOC(me) -> QUEUED(slot), counters, notify
 * always_inline: each thin wrapper below compiles to the engine with its
 * constant request fields folded in, so the lean add keeps its short path.
 */
static inline __attribute__((always_inline)) int64_t queue(struct tw_dom *d,
                                                          const struct tw_add_req *r)
{
    const int requeue = r->src != TW_NIL, dl = r->to_deadletter;
    const int single = !r->payloads && !r->offs;   /* one payload (or src) */
    const uint32_t cnt = single ? 1 : r->count;
    uint32_t origin_len = r->origin_len;
    uint64_t now_ns = r->now_ns;
    int mode = TW_TWA_NONE, rc;

    if (r->key_info)
        memset(r->key_info, 0, sizeof(*r->key_info));
    if (r->key_info && r->key == 0)
        return -EINVAL;
    /* check */
    if (!dl) {
        mode = tw_check_notify(r->notify, r->is_current);
        if (mode < 0)
            return mode;
    }
    if (requeue) {
        if (!node_ok(d, r->src) || !slot_ok(d, r->slot))
            return -EINVAL;
    } else if (single) {
        if (r->len > d->payload_size)
            return -E2BIG;
    } else {
        for (uint32_t i = 0; i < cnt; i++)
            if ((r->offs && r->offs[i + 1] < r->offs[i]) || req_len(r, i) > d->payload_size)
                return r->offs && r->offs[i + 1] < r->offs[i] ? -EINVAL : -E2BIG;
        if (!now_ns)
            now_ns = tw_now_mono();   /* one clock read for the whole batch */
    }
    /* open; a re-queue takes its dead letter first, then looks (and files
     * it again if the target takes no work) */
    uint32_t old_target = 0, old_gen = 0;
    if (requeue) {
        rc = take_src(d, r, &old_target, &old_gen);
        if (rc <= 0)
            return rc == 0 ? -ENOENT : rc;
    } else if (!dl) {
        rc = tw_target_open(d, r->slot, r->gen);
        if (rc || cnt == 0)
            return rc;
    }
    if (r->key_info) {
        rc = tw_proc_claim(d);                   /* the key entry names our process */
        if (rc < 0)
            return rc;
    }
    if (r->notify & TW_TWAF_NO_ALLOC)
        origin_len = 0;

    /* take + fill: the chain newest first (payload cnt-1 at the head, as if
     * each had been added in order) */
    uint32_t first = TW_NIL, lastidx = TW_NIL, ngen = 0;
    if (requeue) {
        first = lastidx = r->src;
        ngen = r->src_gen + 1;
    } else {
        for (uint32_t i = 0; i < cnt; i++) {
            uint32_t idx;
            rc = tw_pool_pop(d, &idx);
            if (rc) {
                /* Give back what we took. The indices come from work_ids_out,
                 * not from the nodes' ->next: those are in the segment, where
                 * anything may have changed. */
                for (uint32_t k = 0; k < i; k++)
                    tw_pool_push(d, (uint32_t)r->work_ids_out[k]);
                return rc;
            }
            if (single && !dl)
                tw_killpoint(TW_KP_AFTER_ALLOC);
            struct tw_node *n = NODE(d, idx);
            tw_fill_node(d, n, dl ? 0 : r->slot, dl ? 0 : r->gen, r->func_id,
                         req_payload(r, i), req_len(r, i), r->origin, origin_len, now_ns,
                         r->track ? TW_T_TRACKED : TW_T_NONE);
            ngen = O_GEN(LD_RLX(&n->owner));
            if (!single) {
                n->next = first;
                r->work_ids_out[i] = ((uint64_t)ngen << 32) | idx;
            } else if (r->work_ids_out) {
                r->work_ids_out[0] = ((uint64_t)ngen << 32) | idx;
            }
            if (first == TW_NIL)
                lastidx = idx;
            first = idx;
        }
        if (!single)
            tw_killpoint(TW_KP_AFTER_ALLOC);
    }

    /* key: record before the push */
    int entry = -1;
    uint64_t word = 0;
    if (r->key_info) {
        rc = tw_key_reserve(d, r->key, first, ngen, dl ? TW_K_DEADLETTER : TW_K_QUEUED,
                            dl ? 0 : r->slot, r->key_info, &entry, &word);
        if (rc != 0) {
            tw_pool_push(d, first);              /* recorded before, or an error */
            return rc == 1 ? 0 : rc;
        }
        tw_killpoint(TW_KP_KEY_RESERVED);
    }

    /* push (or file) */
    struct tw_slot *s = dl ? NULL : SLOT(d, r->slot);
    if (dl) {
        rc = tw_dl_file(d, first, LD_RLX(&NODE(d, first)->owner), TW_R_ORPHANED, 0,
                        r->name_id);
        rc = rc == 1 ? 0 : rc < 0 ? rc : -EAGAIN;
    } else {
        /* A re-queued node was opened after its take. Pushed while still
         * ALLOC(me): if we die before the push, the node is plainly ours and
         * on no list (given back, or filed again, when our process entry is
         * reclaimed); if we die after it, that reclaim finds it linked and
         * finishes mark_queued() for us. */
        rc = requeue ? tw_target_open(d, r->slot, r->gen) : 0;
        if (rc == 0)
            rc = push_chain(s, r->gen, first, NODE(d, lastidx));
    }

    /* undo */
    if (rc) {
        if (entry >= 0)
            tw_key_finish(d, entry, word, TW_K_VOID);   /* before the node can be reused */
        if (requeue) {
            struct tw_node *n = NODE(d, first);
            n->target = old_target;
            n->target_gen = old_gen;
            int fr = tw_dl_file(d, first, OWNER(ngen, TW_N_ALLOC, (uint32_t)d->my_proc),
                                n->reason ? n->reason : TW_R_ORPHANED,
                                slot_ok(d, old_target) ? old_target : 0, n->name_id);
            return fr < 0 ? fr : rc;
        }
        if (single)
            tw_pool_push(d, first);              /* never reachable: still only ours */
        else
            for (uint32_t k = 0; k < cnt; k++)
                tw_pool_push(d, (uint32_t)r->work_ids_out[k]);
        return rc;
    }
    if (!dl)
        tw_killpoint(TW_KP_AFTER_PUSH);

    /* mark */
    int64_t due = 0;
    if (!dl) {
        if (single)
            mark_queued(d, first, ngen, r->slot);
        else
            for (uint32_t k = 0; k < cnt; k++)
                mark_queued(d, (uint32_t)r->work_ids_out[k], (uint32_t)(r->work_ids_out[k] >> 32),
                            r->slot);
        ADD_RLX(&s->c.added, cnt);
        note_queued(s, cnt);
        due = notify(s, mode, r->efd, r->pidfd, r->signum);
    }
    if (entry >= 0) {
        tw_killpoint(TW_KP_KEY_PUSHED);
        tw_key_finish(d, entry, word, dl ? TW_K_DEADLETTER : TW_K_QUEUED);
        tw_key_fill_info(d, entry, r->key_info, 1);
        r->key_info->work = ((uint64_t)ngen << 32) | first;
        r->key_info->state = dl ? TW_K_DEADLETTER : TW_K_QUEUED;
        if (!dl)
            r->key_info->slot = r->slot;
    }
    return packed(ngen, first, due);
}

int64_t tw_queue(struct tw_dom *d, const struct tw_add_req *r)
{
    return queue(d, r);
}

/* A request without a source node: new nodes from the pool. */
#define REQ(...) ((struct tw_add_req){ .src = TW_NIL, __VA_ARGS__ })
#define REQ_SRC(...) ((struct tw_add_req){ __VA_ARGS__ })

int64_t tw_add(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
               const char *payload, uint32_t len, int notify_mode, const char *origin,
               uint32_t origin_len, int efd, int pidfd, int signum, uint64_t now_ns,
               int is_current)
{
    const struct tw_add_req r = REQ(.slot = slot, .gen = gen, .func_id = func_id,
                                    .payload = payload, .len = len, .notify = notify_mode,
                                    .is_current = is_current & 1,
                                    .track = (is_current & TW_ADD_TRACK) != 0, .origin = origin,
                                    .origin_len = origin_len, .efd = efd, .pidfd = pidfd,
                                    .signum = signum, .now_ns = now_ns);
    return queue(d, &r);
}

int64_t tw_add_h(const struct tw_handle *h, int64_t func_id, const char *payload,
                 uint32_t len, int notify_mode, int flags, int64_t now_ns)
{
    if (__builtin_expect(h->d == NULL, 0))
        return -EBADF;
    const int cur = h->current != 0;
    const struct tw_add_req r = REQ(.slot = h->slot, .gen = h->gen,
                                    .func_id = (uint64_t)func_id,
                                    .payload = payload, .len = len, .notify = notify_mode,
                                    .is_current = cur, .track = (flags & TW_ADD_TRACK) != 0,
                                    .efd = cur ? h->own_efd : h->efd,
                                    .pidfd = cur ? -1 : h->pidfd, .signum = h->signum,
                                    .now_ns = (uint64_t)now_ns);
    return queue(h->d, &r);
}

int tw_add_many(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
                const char *const *payloads, const uint32_t *lens, uint32_t cnt,
                int notify_mode, const char *origin, uint32_t origin_len, int efd,
                int pidfd, int signum, uint64_t now_ns, int is_current,
                uint64_t *work_ids_out)
{
    const struct tw_add_req r = REQ(.slot = slot, .gen = gen, .func_id = func_id,
                                    .payloads = payloads, .lens = lens, .count = cnt,
                                    .notify = notify_mode, .is_current = is_current & 1,
                                    .track = (is_current & TW_ADD_TRACK) != 0,
                                    .origin = origin, .origin_len = origin_len, .efd = efd,
                                    .pidfd = pidfd, .signum = signum, .now_ns = now_ns,
                                    .work_ids_out = work_ids_out);
    int64_t rc = queue(d, &r);
    return rc < 0 ? (int)rc : (int)(rc & 0xf);
}

int tw_add_many_flat(const struct tw_handle *h, int64_t func_id, const char *buf,
                     const uint32_t *offs, uint32_t n, int notify_mode, int flags,
                     int64_t now_ns, uint64_t *work_ids_out)
{
    if (h->d == NULL)
        return -EBADF;
    const int cur = h->current != 0;
    const struct tw_add_req r = REQ(.slot = h->slot, .gen = h->gen,
                                    .func_id = (uint64_t)func_id,
                                    .payload = buf, .offs = offs, .count = n,
                                    .notify = notify_mode, .is_current = cur,
                                    .track = (flags & TW_ADD_TRACK) != 0,
                                    .efd = cur ? h->own_efd : h->efd,
                                    .pidfd = cur ? -1 : h->pidfd, .signum = h->signum,
                                    .now_ns = (uint64_t)now_ns, .work_ids_out = work_ids_out);
    int64_t rc = queue(h->d, &r);
    return rc < 0 ? (int)rc : (int)(rc & 0xf);
}

int tw_add_nmi(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
               const char *payload, uint32_t len, int efd, uint64_t now_ns,
               uint64_t *work_id_out)
{
    if (!slot_ok(d, slot) || SLOT(d, slot)->pid != d->my_pid || d->my_proc < 0)
        return -EINVAL;
    const struct tw_add_req r = REQ(.slot = slot, .gen = gen, .func_id = func_id,
                                    .payload = payload, .len = len,
                                    .notify = TW_TWA_NMI_CURRENT, .is_current = 1, .efd = efd, .pidfd = -1,
                                    .now_ns = now_ns, .work_ids_out = work_id_out);
    int64_t rc = queue(d, &r);
    return rc < 0 ? (int)rc : (int)(rc & 0xf);
}

int64_t tw_add_keyed(struct tw_dom *d, uint64_t key, uint32_t slot, uint32_t gen,
                     uint64_t func_id, const char *payload, uint32_t len, int notify_mode,
                     int efd, int pidfd, int signum, uint64_t now_ns, int is_current,
                     struct tw_key_info *info)
{
    const struct tw_add_req r = REQ(.slot = slot, .gen = gen, .func_id = func_id,
                                    .payload = payload, .len = len, .notify = notify_mode,
                                    .is_current = is_current & 1,
                                    .track = (is_current & TW_ADD_TRACK) != 0, .efd = efd, .pidfd = pidfd,
                                    .signum = signum, .now_ns = now_ns, .key = key,
                                    .key_info = info);
    int64_t rc = queue(d, &r);
    return rc < 0 ? rc : (rc & 0xf);
}

int tw_deadletter_keyed(struct tw_dom *d, uint64_t key, uint64_t func_id, const char *payload,
                        uint32_t len, uint64_t name_id, uint64_t now_ns,
                        struct tw_key_info *info)
{
    const struct tw_add_req r = REQ(.func_id = func_id, .payload = payload, .len = len,
                                    .now_ns = now_ns, .key = key, .key_info = info,
                                    .to_deadletter = 1, .name_id = name_id);
    int64_t rc = queue(d, &r);
    if (rc < 0)
        return (int)rc;
    return info->fresh ? 1 : 0;
}

int64_t tw_requeue(struct tw_dom *d, uint32_t node, uint32_t gen, uint32_t slot, uint32_t tgen,
                   int notify_mode, int efd, int pidfd, int signum, uint64_t now_ns,
                   int is_current)
{
    const struct tw_add_req r = REQ_SRC(.slot = slot, .gen = tgen, .notify = notify_mode,
                                    .is_current = is_current & 1,
                                    .retry = (is_current & TW_ADD_RETRY) != 0,
                                    .track = (is_current & TW_ADD_TRACK) != 0, .efd = efd, .pidfd = pidfd,
                                    .signum = signum, .now_ns = now_ns, .src = node,
                                    .src_gen = gen);
    return queue(d, &r);
}

#undef REQ
#undef REQ_SRC

/* ------------------------------------------------------------------------ */
/* run                                                                        */

/* out[0..a) then out[a..a+b): make it out[a..a+b) then out[0..a). */
static void rotate(uint32_t *out, uint32_t a, uint32_t b)
{
    uint32_t i, j, t;
    for (i = 0, j = a - 1; a && i < j; i++, j--) { t = out[i]; out[i] = out[j]; out[j] = t; }
    for (i = a, j = a + b - 1; b && i < j; i++, j--) { t = out[i]; out[i] = out[j]; out[j] = t; }
    for (i = 0, j = a + b - 1; a + b && i < j; i++, j--) { t = out[i]; out[i] = out[j]; out[j] = t; }
}

/*
 * Detach the whole list (task_work_run's first half).
 *
 * An empty list needs no lock: when the task is exiting it is closed with the
 * exited sentinel (the kernel's work_exited) so that every later add fails
 * with -ESRCH; otherwise there is nothing to do.
 *
 * A non-empty list is taken under pi_lock - the kernel takes and releases
 * it after its xchg to synchronize with task_work_cancel(); taking it around
 * the detach gives the same guarantee (no canceller is inside the batch) and
 * more: each node is marked DETACHED before the head lets go of it, so a
 * process that dies here leaves every node findable (linked, or DETACHED),
 * and a lock that cannot be had in time leaves the list as it was. The
 * detaching CAS races only with adders: a push makes it fail, and the round
 * repeats for the nodes pushed meanwhile (which are newer: they go first).
 * The batch's indices are written to out[], newest first. Returns the count.
 */
int tw_detach(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *out, uint32_t max)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    if (LD_RLX(&s->pid) != d->my_pid)
        return -EPERM;
    uint64_t head = LD_ACQ(&s->head);
    while (H_GEN(head) == gen && H_IDX(head) == TW_NIL) {
        if (!(LD_ACQ(&s->flags) & TW_F_EXITING))
            return 0;
        /* acq_rel: release orders our exit decision for later adders. */
        if (CAS(&s->head, &head, HEAD(gen, TW_EXITED), __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 0;
    }
    if (H_GEN(head) != gen)
        return -ESRCH;
    if (idx_closed(H_IDX(head)))
        return 0;

    /* Synchronize with tw_cancel(). On timeout nothing was taken. */
    int r = tw_lock(&s->pi_lock, d->lock_timeout_ns, &s->lock_recovered);
    if (r)
        return r;
    if (LD_ACQ(&s->lock_recovered))
        recover_cancelling(d, slot, s);
    uint32_t n = 0, stop = TW_NIL;
    head = LD_ACQ(&s->head);
    for (;;) {
        uint32_t first = H_IDX(head), k = 0;
        if (H_GEN(head) != gen) {
            r = -ESRCH;
            goto undo;
        }
        if (first == TW_NIL || idx_closed(first))
            break;                      /* a canceller emptied it before we came */
        /* Mark the nodes pushed since the last round (all of them the first
         * time): each is QUEUED; CANCELLING left by a canceller that died in
         * the lock; or ALLOC, its adder's mark_queued() still to come - the
         * CAS settles the race with that adder's CAS. */
        for (uint32_t cur = first; cur != stop; k++) {
            if (cur == TW_NIL || !node_ok(d, cur) || n + k >= max || n + k >= d->pool_size) {
                n += k;
                r = -EUCLEAN;
                goto undo;
            }
            struct tw_node *nd = NODE(d, cur);
            uint64_t o = LD_ACQ(&nd->owner);
            do {
                if (!tw_linked_state(d, nd, o, slot, gen)) {
                    n += k;
                    r = -EUCLEAN;
                    goto undo;
                }
            } while (!CAS(&nd->owner, &o, OWNER(O_GEN(o), TW_N_DETACHED, slot),
                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
            out[n + k] = cur;
            cur = LD_ACQ(&nd->next);
        }
        rotate(out, n, k);              /* the newer nodes go first */
        n += k;
        tw_killpoint(TW_KP_IN_DETACH);
        /* acq_rel: acquire pairs with the release CAS of push_chain (node
         * contents); a failure means an adder pushed: mark its nodes too. */
        if (CAS(&s->head, &head, HEAD(gen, TW_NIL), __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            break;
        stop = first;
    }
    pthread_mutex_unlock(&s->pi_lock);
    __atomic_sub_fetch(&s->c.queued, (int64_t)n, __ATOMIC_RELAXED);
    tw_killpoint(TW_KP_AFTER_DETACH);
    return (int)n;

undo:
    /* Nothing was detached (no round's CAS succeeded): every node marked
     * here is still linked, so it is QUEUED again. */
    for (uint32_t i = 0; i < n; i++) {
        struct tw_node *nd = NODE(d, out[i]);
        uint64_t o = LD_ACQ(&nd->owner);
        if (O_STATE(o) == TW_N_DETACHED && O_AUX(o) == slot)
            ST_REL(&nd->owner, OWNER(O_GEN(o), TW_N_QUEUED, slot));
    }
    pthread_mutex_unlock(&s->pi_lock);
    return r;
}

void tw_copy_info(struct tw_dom *d, uint32_t idx, struct tw_node *n, uint64_t owner,
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
    wi->reason = LD_RLX(&n->reason);
    wi->name_id = LD_RLX(&n->name_id);
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
 * Finish `done`, a work whose callback ran outside the batch run path (an
 * async callback, a callback unknown here): free it, or file it as a dead
 * letter when its callback is unknown here (TW_OUT_UNKNOWN). One clock read:
 * its callback's duration, counted for the task and for the callback's name.
 * On an error nothing is done: the node stays RUNNING, the caller's.
 */
int tw_step(struct tw_dom *d, uint32_t slot, uint32_t done, int outcome, uint32_t next,
            struct tw_work_info *wi, char *payload_out, char *origin_out)
{
    if (!slot_ok(d, slot) || (done != TW_NIL && !node_ok(d, done)) || next != TW_NIL)
        return -EINVAL;
    if (done == TW_NIL)
        return 0;
    struct tw_slot *s = SLOT(d, slot);
    struct tw_node *n = NODE(d, done);
    uint64_t o = LD_ACQ(&n->owner);
    if (O_STATE(o) != TW_N_RUNNING || O_AUX(o) != slot)
        return -EUCLEAN;
    if (outcome == TW_OUT_UNKNOWN) {
        int r = tw_dl_file(d, done, o, TW_R_UNKNOWN, slot, LD_RLX(&s->name_id));
        if (r < 0)
            return r;   /* dl_lock stuck: the node stays RUNNING, ours */
        ADD_RLX(&s->c.unknown, 1);
        return 0;
    }
    /* its callback ran: read the node before it goes back to the pool */
    uint64_t now = tw_now_mono(), started = n->started_ns;
    hist_note(d, s, n->func_id, 1, now > started ? now - started : 0);
    ADD_RLX(&s->c.run, 1);
    if (outcome == TW_OUT_ERROR)
        ADD_RLX(&s->c.errors, 1);
    /* a tracked work the caller did not settle (tw_settle): no result */
    tw_outcome_settle_node(d, done, O_GEN(o), outcome == TW_OUT_ERROR ? TW_O_FAILED : TW_O_RAN,
                           NULL, 0);
    tw_pool_push(d, done);
    return 0;
}

/*
 * The batch run path (see taskwork.h): tw_run_load, the caller's stores,
 * tw_run_finish. Between load and finish the nodes are the runner's alone:
 * DETACHED (out of every list: cancel cannot reach them) until the caller's
 * store makes each RUNNING, just before its callback. A reaper that finds
 * the task dead in between sees exactly which works had started.
 */
static int ours(struct tw_dom *d, uint32_t slot, uint32_t node, uint32_t state, uint64_t *o)
{
    if (!node_ok(d, node))
        return 0;
    /* Acquire: pairs with the release of the transition that made the node
     * ours (the detach's CAS, or our own stores of the run loop). Only the
     * runner changes a DETACHED, RUNNING or DONE node of a live task. */
    *o = LD_ACQ(&NODE(d, node)->owner);
    return O_STATE(*o) == state && O_AUX(*o) == slot;
}

int tw_run_load(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t k,
                uint64_t *rec, char *parea, char *oarea, uint8_t *outcome)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    uint64_t now = tw_now_mono();   /* one clock read: every work's start */
    uint64_t poff = 0, tracked = 0;
    for (uint32_t i = 0; i < k; i++) {
        uint64_t o;
        if (!ours(d, slot, nodes[i], TW_N_DETACHED, &o))
            return -EUCLEAN;
        struct tw_node *n = NODE(d, nodes[i]);
        struct tw_work_info wi;
        tw_copy_info(d, nodes[i], n, o, &wi, parea + poff,
                     oarea ? oarea + (uint64_t)i * TW_ORIGIN_LEN : NULL);
        uint64_t lat = now > wi.enqueued_ns ? now - wi.enqueued_ns : 0;
        hist_note(d, s, wi.func_id, 0, lat);
        /* ours (DETACHED): read back by tw_step for an async callback */
        n->started_ns = now;
#define R(f) rec[(uint64_t)(f) * k + i]
        R(TW_REC_ID) = ((uint64_t)O_GEN(o) << 32) | nodes[i];
        R(TW_REC_FUNC) = wi.func_id;
        R(TW_REC_ENQ) = wi.enqueued_ns;
        /* ours (DETACHED): its adder wrote track before its push */
        uint64_t tr = LD_RLX(&n->track) == TW_T_TRACKED;
        tracked += tr;
        R(TW_REC_SENDER) = (uint32_t)wi.sender_pid | ((uint64_t)(oarea ? wi.origin_len : 0) << 32) |
                           (tr << 62);
        R(TW_REC_OWNER_AT) = (uint64_t)((char *)&n->owner - d->base) / sizeof(uint64_t);
        R(TW_REC_RUNNING) = OWNER(O_GEN(o), TW_N_RUNNING, slot);
        R(TW_REC_POFF) = poff;
#undef R
        poff += wi.payload_len;
        outcome[i] = TW_OUT_OK;
    }
    rec[(uint64_t)TW_REC_POFF * k + k] = poff;   /* the end of the last payload */
    rec[(uint64_t)TW_REC_WORDS * k + 1] = tracked;
    return (int)k;
}

/* DETACHED -> RUNNING through a native call: for machines where a plain
 * store is not a release store. */
int tw_run_start(struct tw_dom *d, uint32_t slot, uint32_t node)
{
    uint64_t o;
    if (!slot_ok(d, slot) || !ours(d, slot, node, TW_N_DETACHED, &o))
        return -EUCLEAN;
    /* Release: pairs with the reaper's acquire load; from here a reaper
     * reports the work interrupted, not orphaned. */
    ST_REL(&NODE(d, node)->owner, OWNER(O_GEN(o), TW_N_RUNNING, slot));
    return 0;
}

int tw_run_start_many(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t k)
{
    uint64_t o;
    if (!slot_ok(d, slot))
        return -EINVAL;
    for (uint32_t i = 0; i < k; i++)
        if (!ours(d, slot, nodes[i], TW_N_DETACHED, &o))
            return -EUCLEAN;
    for (uint32_t i = 0; i < k; i++) {
        struct tw_node *n = NODE(d, nodes[i]);
        o = LD_RLX(&n->owner);
        /* Release: pairs with the reaper's acquire load; from here a reaper
     * reports the work interrupted, not orphaned. */
        ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_RUNNING, slot));
    }
    return (int)k;
}

int tw_run_finish(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t k,
                  const uint8_t *outcome, const uint64_t *end_ns)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    uint64_t now = end_ns ? 0 : tw_now_mono();
    uint64_t done = 0, errs = 0, prev_end = 0;
    int bad = 0;
    for (uint32_t i = 0; i < k; i++) {
        uint64_t o;
        if (outcome[i] != TW_OUT_OK && outcome[i] != TW_OUT_ERROR)
            continue;
        if (!ours(d, slot, nodes[i], TW_N_DONE, &o) && !ours(d, slot, nodes[i], TW_N_RUNNING, &o)) {
            bad = 1;
            continue;
        }
        struct tw_node *n = NODE(d, nodes[i]);
        uint64_t started = n->started_ns, dur;
        if (end_ns) {
            uint64_t from = prev_end > started ? prev_end : started;
            dur = end_ns[i] > from ? end_ns[i] - from : 0;
            prev_end = end_ns[i];
        } else {
            dur = now > started ? (now - started) / k : 0;
        }
        hist_note(d, s, n->func_id, 1, dur);
        done++;
        errs += outcome[i] == TW_OUT_ERROR;
        /* A tracked work the run loop did not settle itself (tw_settle: a
         * batch callback's, one cut short): its outcome, with no result. */
        if (__builtin_expect(LD_RLX(&n->track) == TW_T_TRACKED, 0))
            tw_outcome_settle_node(d, nodes[i], O_GEN(o),
                                   outcome[i] == TW_OUT_ERROR ? TW_O_FAILED : TW_O_RAN, NULL, 0);
        tw_pool_push(d, nodes[i]);
    }
    ADD_RLX(&s->c.run, done);
    if (errs)
        ADD_RLX(&s->c.errors, errs);
    return bad ? -EUCLEAN : (int)done;
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
 * Races: under pi_lock only adders change the list, and only at the head (a
 * push), so the CAS on the head may fail because of a push, and we continue
 * from the value the CAS returned, as the kernel does. A CAS on an interior
 * ->next cannot fail (only cancellers change those, and we hold the lock) but
 * is kept a CAS for symmetry with the kernel. A run detaches under the same
 * lock, so a work is either on the list here or in a batch out of our reach:
 * once a run has taken a work it cannot be cancelled.
 */
int tw_cancel(struct tw_dom *d, uint32_t slot, uint32_t gen, int mode, uint64_t key,
              struct tw_work_info *wi, char *payload_out, char *origin_out)
{
    if (!slot_ok(d, slot) || (mode != TW_MATCH_EXACT && mode != TW_MATCH_FUNC))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    if (tw_proc_claim(d) < 0)
        return -EUSERS;
    int r = tw_lock(&s->pi_lock, d->lock_timeout_ns, &s->lock_recovered);
    if (r)
        return r;
    uint64_t head = LD_ACQ(&s->head);
    uint32_t *pprev = NULL;           /* NULL: the head word */
    uint32_t cur = H_IDX(head);
    uint32_t found = TW_NIL;
    uint64_t owner = 0;
    if (H_GEN(head) != gen) {
        r = -ESRCH;
        goto out;
    }
    for (uint32_t steps = 0; cur != TW_NIL && !idx_closed(cur); steps++) {
        if (!node_ok(d, cur) || steps > 2 * d->pool_size) {
            r = -EUCLEAN;
            goto out;
        }
        struct tw_node *n = NODE(d, cur);
        uint64_t o = LD_ACQ(&n->owner);
        /* DETACHED and still linked: marked by a runner that died before its
         * detaching CAS (we got its pi_lock with EOWNERDEAD). The run took
         * it; the reaper files it. Not cancellable, like any detached work. */
        if (!matches(n, cur, mode, key) ||
            (O_STATE(o) == TW_N_DETACHED && O_AUX(o) == slot)) {
            pprev = &n->next;
            cur = LD_ACQ(pprev);
            continue;
        }
        /* Mark first: if we die between here and the unlink, the runner (or
         * reaper) that next takes this lock (EOWNERDEAD) finds the mark and
         * settles it. CAS, not a store: the node may still be ALLOC, its
         * adder about to make it QUEUED (mark_queued); whoever's CAS comes
         * second fails. */
        do {
            if (!tw_linked_state(d, n, o, slot, gen)) {
                r = -EUCLEAN;
                goto out;
            }
        } while (!CAS(&n->owner, &o, OWNER(O_GEN(o), TW_N_CANCELLING, slot), __ATOMIC_ACQ_REL,
                      __ATOMIC_ACQUIRE));
        /* restore value if the unlink loses: the node is linked, so QUEUED */
        o = OWNER(O_GEN(o), TW_N_QUEUED, slot);
        tw_killpoint(TW_KP_IN_PI_LOCK);
        uint32_t nx = LD_ACQ(&n->next);
        if (pprev == NULL) {
            uint64_t expect = HEAD(gen, cur);
            if (!CAS(&s->head, &expect, HEAD(gen, nx), __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                /* Raced with add (a push): start again from what the head
                 * holds now. */
                ST_REL(&n->owner, o);
                if (H_GEN(expect) != gen)
                    break;
                cur = H_IDX(expect);
                continue;
            }
        } else {
            uint32_t expect = cur;
            if (!CAS(pprev, &expect, nx, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                ST_REL(&n->owner, o);
                cur = expect;
                continue;
            }
        }
        /* Unlinked: the node is ours. Its outcome first, while it still
         * reads as being cancelled (a reader never sees it pending again). */
        tw_outcome_settle_node(d, cur, O_GEN(o), TW_O_CANCELLED, NULL, 0);
        owner = OWNER(O_GEN(o), TW_N_ALLOC, (uint32_t)d->my_proc);
        ST_REL(&n->owner, owner);
        found = cur;
        break;
    }
    r = 0;
out:
    pthread_mutex_unlock(&s->pi_lock);
    if (r < 0 || found == TW_NIL)
        return r;
    tw_copy_info(d, found, NODE(d, found), owner, wi, payload_out, origin_out);
    __atomic_sub_fetch(&s->c.queued, 1, __ATOMIC_RELAXED);
    ADD_RLX(&s->c.cancelled, 1);
    tw_pool_push(d, found);
    return 1;
}

/* A snapshot of the pending works, newest first, taken under pi_lock. */
int tw_snapshot(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *nodes, uint32_t *gens,
                uint32_t max)
{
    return tw_snapshot_within(d, slot, gen, nodes, gens, max, d->lock_timeout_ns);
}

/*
 * The same snapshot for a reader that may wait at most timeout_ns (<= 0: only
 * try) for pi_lock while another process holds it: -ETIMEDOUT then, at once.
 * Whoever can write the segment can make the lock look held for ever; a
 * reader bounds its wait and reports the slot unreadable instead (README,
 * Security). The walk itself is bounded by the pool size, as in every list
 * walk here.
 */
static int lock_try_only(pthread_mutex_t *m, uint32_t *recovered)
{
    /* tw_lock's first step (segment.c) without its wait: no clock read and
     * no futex call, for a reader whose budget is spent. Busy: -ETIMEDOUT. */
    if (!tw_mutex_sane(m))
        return -EUCLEAN;
    int r = pthread_mutex_trylock(m);
    if (r == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        ST_REL(recovered, 1u);
        return 0;
    }
    if (r == 0)
        return 0;
    return r == EBUSY ? -ETIMEDOUT : -EUCLEAN;
}

int tw_snapshot_within(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *nodes,
                       uint32_t *gens, uint32_t max, int64_t timeout_ns)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    int r = timeout_ns > 0 ? tw_lock(&s->pi_lock, timeout_ns, &s->lock_recovered)
                           : lock_try_only(&s->pi_lock, &s->lock_recovered);
    if (r)
        return r;
    uint64_t head = LD_ACQ(&s->head);
    uint32_t n = 0;
    if (H_GEN(head) != gen) {
        r = -ESRCH;
        goto out;
    }
    for (uint32_t cur = H_IDX(head); cur != TW_NIL && !idx_closed(cur);) {
        if (!node_ok(d, cur) || n >= d->pool_size) {
            r = -EUCLEAN;
            goto out;
        }
        struct tw_node *nd = NODE(d, cur);
        if (nodes && n < max) {
            nodes[n] = cur;
            gens[n] = O_GEN(LD_ACQ(&nd->owner));
        }
        n++;
        cur = LD_ACQ(&nd->next);
    }
    r = (int)n;
out:
    pthread_mutex_unlock(&s->pi_lock);
    return r;
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
    tw_copy_info(d, node, n, o, wi, payload_out, origin_out);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (LD_RLX(&n->owner) != o)
        return -ESTALE;
    return 0;
}


/* May a node with owner word o be linked on the list of (slot, gen)? */
int tw_linked_state(struct tw_dom *d, struct tw_node *n, uint64_t o, uint32_t slot, uint32_t gen)
{
    uint32_t st = O_STATE(o);
    if (st == TW_N_QUEUED || st == TW_N_CANCELLING)
        return O_AUX(o) == slot;
    if (st == TW_N_ALLOC)   /* pushed, not yet marked by its adder */
        return LD_RLX(&n->target) == slot && LD_RLX(&n->target_gen) == gen;
    return 0;
}

/* Mark in `linked` every node on the list from `from` (bounded walk). */
static void mark_list(struct tw_dom *d, uint8_t *linked, uint32_t from)
{
    for (uint32_t cur = from, k = 0; cur != TW_NIL && !idx_closed(cur) && k <= d->pool_size;
         k++) {
        if (!node_ok(d, cur) || linked[cur])
            return;                         /* out of range, or a cycle */
        linked[cur] = 1;
        cur = LD_ACQ(&NODE(d, cur)->next);
    }
}

/*
 * A canceller died holding pi_lock (we were told by EOWNERDEAD). It may have
 * left a node CANCELLING: still linked (it is a queued work again) or
 * unlinked (nobody else will ever see it: give it back to the pool and count
 * it cancelled). Called by the task's own runner with pi_lock held before it
 * detaches, so "linked" is decidable: the list is all there is.
 */
static void recover_cancelling(struct tw_dom *d, uint32_t slot, struct tw_slot *s)
{
    /* One pass over the list into a bitmap, then one over the pool: O(pool)
     * however many nodes a dead canceller (or a scribbler) left marked. */
    uint8_t *linked = calloc(d->pool_size, 1);
    if (!linked || tw_proc_claim(d) < 0) {
        free(linked);
        return;                             /* lock_recovered stays set: next run */
    }
    mark_list(d, linked, H_IDX(LD_ACQ(&s->head)));
    for (uint32_t i = 0; i < d->pool_size; i++) {
        struct tw_node *n = NODE(d, i);
        uint64_t o = LD_ACQ(&n->owner);
        if (O_STATE(o) != TW_N_CANCELLING || O_AUX(o) != slot)
            continue;
        /* We hold pi_lock, so no live canceller owns this mark. */
        if (linked[i]) {
            ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_QUEUED, slot));
        } else {
            ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_ALLOC, (uint32_t)d->my_proc));
            ADD_RLX(&s->c.cancelled, 1);
            tw_outcome_settle_node(d, i, O_GEN(o), TW_O_CANCELLED, NULL, 0);
            tw_pool_push(d, i);
        }
    }
    free(linked);
    ST_REL(&s->lock_recovered, 0u);
}


