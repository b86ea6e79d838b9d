// SPDX-License-Identifier: MIT
/*
 * outcome.c - what became of a tracked work (docs/contract.md "Outcomes").
 *
 * The kernel's caller owns its callback_head and learns nothing back; a
 * tracked work's outcome is written once, by whoever settles the work, into
 * a ring of records in the segment, and its waiters sleep on a futex word of
 * the work's node until then. tw_layout.h ("outcome records") has the
 * layout and the wake-up rule.
 *
 * Who settles, and where (each owns the node exclusively when it does):
 *   ran, failed      the runner: tw_settle() before its DONE store, or
 *                    tw_run_finish()/tw_step() for a work it left unsettled
 *   cancelled        the canceller, after the unlink (tw_cancel); a reaper
 *                    or the runner recovering a dead canceller's node
 *   dead_letter,     whoever files the node (tw_dl_file_locked_ex): a
 *   failed           reaper (orphaned), the runner (shutdown, unknown
 *                    callback, retries spent)
 *   interrupted      the reaper of a task that died in the callback
 *   retried_as       the re-queuer of a dead letter (take_src): a new record
 *                    for the old id, naming the new one
 * The record is written before the node leaves the states a reader reads
 * as pending or running, so a reader that finds neither the node (same
 * generation, tracked) nor a record knows the record was reused.
 *
 * Layer: above the pool (reads nodes), below the dead letters and the run
 * path, which call it.
 */
#include "tw_internal.h"

#include <string.h>

static inline struct tw_outcome *REC(struct tw_dom *d, uint64_t s)
{
    return (struct tw_outcome *)(d->base + d->out_off + (s % d->out_cap) * d->out_rec_size);
}

static inline char *REC_DATA(struct tw_outcome *e) { return (char *)(e + 1); }

int tw_outcome_final(uint32_t outcome)
{
    return outcome >= TW_O_RAN && outcome <= TW_O_INTERRUPTED;
}

/*
 * Append one record. The settle number s comes from one fetch_add on
 * out_seq (relaxed: the entry's own seq orders its contents). The entry is
 * taken by CAS from any value below 2s+1 - a settler lapped by out_cap newer
 * ones finds a larger seq and gives up: its record would already be evicted.
 * Release store of 2s+2 publishes the whole record (pairs with the reader's
 * acquire load of seq).
 */
static void put(struct tw_dom *d, uint64_t work, uint32_t outcome, uint64_t retried_as,
                uint32_t slot, uint32_t reason, const char *data, uint32_t len)
{
    struct tw_header *h = HDR(d);
    uint64_t s = __atomic_fetch_add(&h->out_seq, 1, __ATOMIC_RELAXED);
    struct tw_outcome *e = REC(d, s);
    uint64_t old = LD_ACQ(&e->seq);
    do {
        if (old >= 2 * s + 1)
            return;
    } while (!CAS(&e->seq, &old, 2 * s + 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    if (len > d->payload_size)
        len = d->payload_size;
    e->work = work;
    e->retried_as = retried_as;
    e->settled_ns = tw_now_mono();
    e->outcome = outcome;
    e->len = data ? len : 0;
    e->slot = slot;
    e->pad = reason;
    if (data && len)
        memcpy(REC_DATA(e), data, len);
    ST_REL(&e->seq, 2 * s + 2);
}

/* Wake the waiters of node n, if any said they sleep (bit 0 of wake).
 * seq_cst exchange: pairs with the waiter's seq_cst fetch_or (tw_layout.h). */
static void wake(struct tw_node *n)
{
    if (__atomic_exchange_n(&n->wake, 0u, __ATOMIC_SEQ_CST) & 1u)
        tw_futex_wake(&n->wake);
}

int tw_outcome_settle_node(struct tw_dom *d, uint32_t node, uint32_t gen, uint32_t outcome,
                           const char *data, uint32_t len)
{
    struct tw_node *n = NODE(d, node);
    /* Acquire: the track word was written by the node's adder (before its
     * push) or by a re-queuer; the caller owns the node, so no one else
     * changes it now. Exactly once: only TRACKED is settled, and the store
     * of SETTLED below comes from the same owner. */
    if (LD_ACQ(&n->track) != TW_T_TRACKED)
        return 0;
    /* reason: a dead letter's TW_R_*; for ran, 1 if there is a result (a
     * callback that returned b"" has one; one that returned None has not) */
    uint32_t reason = outcome == TW_O_DEAD_LETTER ? LD_RLX(&n->reason)
                    : outcome == TW_O_RAN ? (data != NULL) : 0;
    put(d, ((uint64_t)gen << 32) | node, outcome, 0, LD_RLX(&n->target), reason, data, len);
    /* Release: a reader that sees SETTLED finds the record in the ring. */
    ST_REL(&n->track, TW_T_SETTLED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    wake(n);
    return 1;
}

int tw_outcome_letter(struct tw_dom *d, uint32_t node, uint32_t gen, uint32_t reason)
{
    struct tw_node *n = NODE(d, node);
    if (reason != TW_R_FAILED)
        return tw_outcome_settle_node(d, node, gen, TW_O_DEAD_LETTER, NULL, 0);
    /* A failed letter keeps its error beside its payload (letters.c). */
    uint32_t plen = LD_RLX(&n->payload_len), elen = LD_RLX(&n->note) & 0xffff;
    if (plen > d->payload_size || elen > d->payload_size - plen)
        elen = 0;
    return tw_outcome_settle_node(d, node, gen, TW_O_FAILED,
                                  (char *)n + d->payload_off + plen, elen);
}

void tw_outcome_requeued(struct tw_dom *d, uint32_t node, uint32_t old_gen, uint32_t new_gen)
{
    struct tw_node *n = NODE(d, node);
    uint32_t tr = LD_ACQ(&n->track);
    if (tr == TW_T_NONE)
        return;
    uint64_t old_id = ((uint64_t)old_gen << 32) | node, new_id = ((uint64_t)new_gen << 32) | node;
    uint32_t slot = LD_RLX(&n->target), reason = LD_RLX(&n->reason);
    if (tr == TW_T_TRACKED) {
        /* Never settled: a retry of a callback that raised (the runner
         * filed it only to queue it again), or a letter whose filer died
         * before its record. Not final: the waiter follows it. */
        put(d, old_id, TW_O_RETRIED, new_id, slot, reason, NULL, 0);
    } else {
        /* A settled dead letter queued again: its outcome stays, and names
         * the new work (docs/contract.md "Retried letters"). Appended, never
         * rewritten: a reader never sees a record change under it. */
        uint32_t plen = LD_RLX(&n->payload_len), elen = LD_RLX(&n->note) & 0xffff;
        int failed = reason == TW_R_FAILED;
        if (!failed || plen > d->payload_size || elen > d->payload_size - plen)
            elen = 0;
        put(d, old_id, failed ? TW_O_FAILED : TW_O_DEAD_LETTER, new_id, slot, reason,
            (char *)n + d->payload_off + plen, elen);
    }
    /* The new work is tracked as the old one was, and not settled yet. */
    ST_REL(&n->track, TW_T_TRACKED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    wake(n);
}

/* The newest whole record of `work`, newest first, at most out_cap of them.
 * A record overwritten while we copy it (its seq changed) is skipped. */
static int find(struct tw_dom *d, uint64_t work, struct tw_outcome_info *oi, char *data,
                uint32_t cap)
{
    uint64_t top = LD_ACQ(&HDR(d)->out_seq);
    for (uint64_t k = 0; k < d->out_cap && k < top; k++) {
        uint64_t s = top - 1 - k;
        struct tw_outcome *e = REC(d, s);
        uint64_t q = LD_ACQ(&e->seq);
        if (q != 2 * s + 2 || LD_RLX(&e->work) != work)
            continue;
        uint32_t outcome = LD_RLX(&e->outcome), len = LD_RLX(&e->len);
        if (len > d->payload_size)
            len = d->payload_size;      /* the segment may say anything */
        oi->work = work;
        oi->retried_as = LD_RLX(&e->retried_as);
        oi->settled_ns = LD_RLX(&e->settled_ns);
        oi->outcome = outcome;
        oi->slot = LD_RLX(&e->slot);
        oi->reason = LD_RLX(&e->pad);
        oi->len = len < cap ? len : cap;
        if (data && oi->len)
            memcpy(data, REC_DATA(e), oi->len);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LD_RLX(&e->seq) != q)
            continue;
        if (outcome > TW_O_RETRIED)
            return -EUCLEAN;
        return (int)outcome;
    }
    return -ENOENT;
}

static int read_outcome(struct tw_dom *d, uint64_t work, struct tw_outcome_info *oi, char *data,
                        uint32_t cap)
{
    uint32_t node = (uint32_t)work, gen = (uint32_t)(work >> 32);
    memset(oi, 0, sizeof(*oi));
    oi->work = work;
    if (!node_ok(d, node))
        return -EINVAL;
    struct tw_node *n = NODE(d, node);
    /* The node first, the ring second: a settler writes its record before
     * the node leaves the pending and running states, so "the node said
     * pending, the ring has nothing" is pending, and "the node has moved on,
     * the ring has nothing" means the record was reused. */
    uint64_t o = LD_ACQ(&n->owner);
    uint32_t tr = LD_ACQ(&n->track), st = O_STATE(o);
    int live = O_GEN(o) == gen && tr == TW_T_TRACKED;
    int r = find(d, work, oi, data, cap);
    if (r != -ENOENT)
        return r;
    /* A re-queue in flight: the record naming this id is written, the
     * node's new generation not yet stored (take_src). It is being queued. */
    if (O_GEN(o) + 1 == gen && st == TW_N_ALLOC && tr == TW_T_TRACKED)
        return TW_O_PENDING;
    if (!live)
        return -ENOENT;             /* untracked, or its record was reused */
    oi->slot = LD_RLX(&n->target);
    switch (st) {
    case TW_N_ALLOC: case TW_N_QUEUED: case TW_N_CANCELLING: case TW_N_DETACHED:
        return TW_O_PENDING;
    case TW_N_RUNNING: case TW_N_DONE:
        return TW_O_RUNNING;
    case TW_N_DEADLETTER: {
        /* Filed with no record. A live runner files a failed work with no
         * record only to queue it again at once (a retry): still running.
         * Otherwise (that runner died before the re-queue, or a filer died
         * before its record) the letter is its outcome. */
        oi->reason = LD_RLX(&n->reason);
        uint32_t by = O_AUX(o);
        if (oi->reason == TW_R_FAILED && slot_ok(d, by) &&
            LD_ACQ(&SLOT(d, by)->state) == TW_SLOT_RUNNING && !tw_slot_dead(d, by))
            return TW_O_RUNNING;
        return oi->reason == TW_R_FAILED ? TW_O_FAILED : TW_O_DEAD_LETTER;
    }
    default:
        return -ENOENT;
    }
}

int tw_outcome_read(struct tw_dom *d, uint64_t work, struct tw_outcome_info *oi, char *data,
                    uint32_t cap)
{
    int r = read_outcome(d, work, oi, data, cap);
    if (r >= 0)
        oi->outcome = (uint32_t)r;
    return r;
}

int tw_outcome_wait(struct tw_dom *d, uint64_t work, int64_t timeout_ns,
                    struct tw_outcome_info *oi, char *data, uint32_t cap)
{
    uint32_t node = (uint32_t)work;
    if (!node_ok(d, node))
        return -EINVAL;
    struct tw_node *n = NODE(d, node);
    /* Say we sleep, then look: seq_cst, pairs with the settler's exchange
     * (wake()). Either it sees our bit and wakes us, or our look sees its
     * record (published before its exchange). */
    uint32_t w = __atomic_or_fetch(&n->wake, 1u, __ATOMIC_SEQ_CST);
    int r = tw_outcome_read(d, work, oi, data, cap);
    if (r < 0 || tw_outcome_final((uint32_t)r) || r == TW_O_RETRIED || timeout_ns <= 0)
        return r;
    struct timespec ts = { timeout_ns / 1000000000LL, timeout_ns % 1000000000LL };
    /* Bounded by the caller's slice; a signal ends it early (EINTR), so a
     * Python handler runs between slices. */
    int fr = tw_futex_wait_rc(&n->wake, w, &ts);
    r = tw_outcome_read(d, work, oi, data, cap);
    if (r >= 0 && !tw_outcome_final((uint32_t)r) && r != TW_O_RETRIED && fr == -EINTR)
        return -EINTR;
    return r;
}

int tw_settle(struct tw_dom *d, uint32_t slot, uint32_t node, uint32_t outcome,
              const char *data, uint32_t len)
{
    if (!slot_ok(d, slot) || !node_ok(d, node) ||
        (outcome != TW_O_RAN && outcome != TW_O_FAILED))
        return -EINVAL;
    struct tw_node *n = NODE(d, node);
    /* Acquire: pairs with our own release store that made it RUNNING. Only
     * the runner of a live task changes its RUNNING node. */
    uint64_t o = LD_ACQ(&n->owner);
    if (O_STATE(o) != TW_N_RUNNING || O_AUX(o) != slot)
        return -EUCLEAN;
    return tw_outcome_settle_node(d, node, O_GEN(o), outcome, data, len);
}

int tw_outcome_tracked(struct tw_dom *d, uint32_t node)
{
    if (!node_ok(d, node))
        return -EINVAL;
    return (int)LD_ACQ(&NODE(d, node)->track);
}
