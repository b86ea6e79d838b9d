// SPDX-License-Identifier: MIT
/*
 * reap.c - what dead processes leave behind, settled by whoever notices.
 *
 * A dead task (its life lock says FUTEX_OWNER_DIED) is reaped by the first
 * process that notices: an adder, a reader of the task table, a registrant,
 * fsck. The reaper closes the head (adds fail from then on), takes the life
 * lock (EOWNERDEAD: it is now the only reaper), takes pi_lock, and moves
 * every node the task held: pending or detached-not-started works to the
 * dead letters as "orphaned", started works out as "interrupted" (the caller
 * reports them and gives them back; they are never run again). Each move is
 * a compare-and-swap on the node's exact owner word, so a reaper that dies
 * half-way leaves a state the next one finishes, and no work lands twice.
 *
 * A dead process's entry in the process table is reclaimed the same way by
 * the next process that needs an entry (or by fsck): nodes it had allocated
 * and pushed are queued works (their mark is finished for it), nodes it had
 * not pushed and nodes in its cache (CACHED in its entry) go back to the
 * pool, and the nodes it was moving on the free list (one, or a cache
 * batch) are found by a validated walk of that list.
 *
 * Layer: reap, the top. May call every other file. It installs
 * tw_dead_proc_ops, through which the process table and the key table
 * settle a dead process's entry they meet.
 */
#include "tw_internal.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* task lists after a death                                                   */

/* Close the head of a dead registration: the dead bit keeps the list it
 * held for the reaper, and makes every push fail from now on. Done before the
 * life lock is taken: once a reaper holds it, its word no longer shows the
 * death, and adders look only at the word and the head. acq_rel: pairs with
 * the release CAS of push_chain. */
static void close_head(struct tw_slot *s)
{
    uint64_t head = LD_ACQ(&s->head);
    while (!idx_closed(H_IDX(head)) &&
           !CAS(&s->head, &head, HEAD(H_GEN(head), dead_of(H_IDX(head))), __ATOMIC_ACQ_REL,
                __ATOMIC_ACQUIRE))
        ;
}

/*
 * Reap a dead task (see the top of this file). orphans[] receives the nodes
 * filed as dead letters, interrupted[] the started works, which are now ALLOC
 * by the caller: read them, then give them back with tw_free_node(). max
 * should be pool_size (a larger batch is settled all the same; only the
 * lists are cut). Returns 1 if we reaped it, 0 if it was not dead (or is
 * reaped already), 2 if another live process is reaping it, or -errno.
 */
int tw_reap(struct tw_dom *d, uint32_t slot, uint32_t *orphans, uint32_t *interrupted,
            uint32_t max, struct tw_reap_info *info)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    memset(info, 0, sizeof(*info));
    if (!tw_slot_dead_s(s))
        return 0;
    int r = tw_proc_claim(d);
    if (r < 0)
        return r;
    close_head(s);
    /* Become the reaper: our holder takes the life lock over (so that if
     * we die reaping, the next one to notice sees it and finishes). Only
     * tried: a live reaper holding it is at work. */
    r = tw_life_hold(&s->life);
    if (r == -EBUSY)
        return 2;
    if (r < 0)
        return r;
    uint32_t st = LD_ACQ(&s->state);
    if (st != TW_SLOT_CLAIMING && st != TW_SLOT_RUNNING && st != TW_SLOT_EXITING &&
        st != TW_SLOT_REAPING) {
        tw_life_release(&s->life);          /* reaped (or exited) meanwhile */
        return 0;
    }
    ST_REL(&s->state, TW_SLOT_REAPING);
    tw_killpoint(TW_KP_IN_REAP);

    /* No canceller inside from here; one that died there is recovered below
     * (its CANCELLING mark, linked or not). */
    uint32_t recovered = 0;
    r = tw_lock(&s->pi_lock, d->lock_timeout_ns, &recovered);
    if (r)
        goto out_life;
    uint8_t *linked = calloc(d->pool_size, 1);
    if (!linked) {
        r = -ENOMEM;
        goto out_pi;
    }
    r = tw_dl_lock(d);
    if (r)
        goto out_free;
    uint64_t head = LD_ACQ(&s->head);
    uint32_t gen = H_GEN(head);
    /* The list the head still carries: adders' nodes pushed but not yet
     * marked are queued works - finish their mark for them (their own CAS
     * then fails). Stops at a node a dead reaper already filed (its link now
     * leads into the dead letters); anything after it is QUEUED already. */
    for (uint32_t cur = dead_list(H_IDX(head)), k = 0;
         cur != TW_NIL && !idx_closed(cur) && k <= d->pool_size; k++) {
        if (!node_ok(d, cur) || linked[cur])
            break;
        struct tw_node *n = NODE(d, cur);
        uint64_t o = LD_ACQ(&n->owner);
        if (!tw_linked_state(d, n, o, slot, gen) && O_STATE(o) != TW_N_DETACHED)
            break;
        linked[cur] = 1;
        if (O_STATE(o) == TW_N_ALLOC)
            CAS(&n->owner, &o, OWNER(O_GEN(o), TW_N_QUEUED, slot), __ATOMIC_ACQ_REL,
                __ATOMIC_RELAXED);
        cur = LD_ACQ(&n->next);
    }
    /* Every node the task held, by its owner word. */
    uint64_t name_id = LD_RLX(&s->name_id);
    for (uint32_t i = 0; i < d->pool_size; i++) {
        struct tw_node *n = NODE(d, i);
        uint64_t o = LD_ACQ(&n->owner);
        uint32_t ost = O_STATE(o);
        if (ost == TW_N_DONE && O_AUX(o) == slot && LD_RLX(&n->target_gen) == gen) {
            /* Its callback returned; the runner died before giving it back.
             * It ran: counted run, freed, not reported. */
            /* settled by the runner, unless it died before it could; first,
             * while the node still says what it is (a reader never sees it
             * pending), as no one else writes a dead runner's node */
            tw_outcome_settle_node(d, i, O_GEN(o), TW_O_RAN, NULL, 0);
            if (CAS(&n->owner, &o, OWNER(O_GEN(o), TW_N_ALLOC, (uint32_t)d->my_proc),
                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
                ADD_RLX(&s->c.run, 1);
                tw_pool_push(d, i);
            }
            continue;
        }
        if (O_AUX(o) != slot || ost < TW_N_QUEUED || ost > TW_N_RUNNING ||
            LD_RLX(&n->target_gen) != gen)
            continue;
        if (ost == TW_N_RUNNING) {
            /* Started: it may have had effects. Never run again. Ours until
             * the caller has reported it; the reason says so, so that if we
             * die first it becomes a dead letter, not a silent free. (No one
             * else writes a dead runner's RUNNING node.) */
            n->reason = TW_R_INTERRUPTED;
            /* its callback had started: interrupted (unless the runner
             * settled it before it died: then that record stands). Before
             * the CAS, while the node still reads as running. */
            tw_outcome_settle_node(d, i, O_GEN(o), TW_O_INTERRUPTED, NULL, 0);
            if (CAS(&n->owner, &o, OWNER(O_GEN(o), TW_N_ALLOC, (uint32_t)d->my_proc),
                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
                if (info->interrupted < max)
                    interrupted[info->interrupted] = i;
                else
                    tw_pool_push(d, i);
                info->interrupted++;
            }
        } else if (ost == TW_N_CANCELLING && !linked[i]) {
            /* Unlinked by a canceller that died before it could give it back
             * (we hold pi_lock: no live canceller owns it). */
            tw_outcome_settle_node(d, i, O_GEN(o), TW_O_CANCELLED, NULL, 0);
            if (CAS(&n->owner, &o, OWNER(O_GEN(o), TW_N_ALLOC, (uint32_t)d->my_proc),
                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
                ADD_RLX(&s->c.cancelled, 1);
                tw_pool_push(d, i);
                info->cancelled++;
            }
        } else if (tw_dl_file_locked(d, i, o, TW_R_ORPHANED, slot, name_id) == 1) {
            /* Pending, or detached and not started: it never ran. */
            if (info->orphaned < max)
                orphans[info->orphaned] = i;
            info->orphaned++;
        }
    }
    tw_dl_unlock(d);
    ADD_RLX(&s->c.orphaned, info->orphaned);
    ADD_RLX(&s->c.interrupted, info->interrupted);
    ST_RLX(&s->c.queued, 0);
    ST_REL(&s->head, HEAD(gen, TW_EXITED));
    __atomic_fetch_or(&s->flags, TW_F_DIED, __ATOMIC_RELEASE);
    ST_REL(&s->lock_recovered, 0u);
    ADD_RLX(&HDR(d)->reaped, 1);
    r = 1;
out_free:
    free(linked);
out_pi:
    pthread_mutex_unlock(&s->pi_lock);
out_life:
    /* Release, before the unlock: EXITED, then free for a new registrant.
     * On an error the state stays REAPING and the lock unlocked: the task
     * still reads as dead, and the next one to notice tries again. */
    if (r == 1)
        ST_REL(&s->state, TW_SLOT_EXITED);
    tw_life_release(&s->life);
    return r;
}

/* ------------------------------------------------------------------------ */
/* process-table entries after a death                                        */

/*
 * A node ALLOC by a dead process (owner word o). Either it never left that
 * process (died before or during its push: give it back, 1), or its push
 * happened and only mark_queued() is missing (it is a queued work: make it
 * QUEUED, 2), or it was a dead letter being re-queued and never pushed (file
 * it again, 3). Linked or not is decided under the target's pi_lock, where
 * nothing but a push changes the list (a detach marks and detaches under
 * the lock, a reaper walks under it). 0: the owner word changed meanwhile.
 */
static int settle_node(struct tw_dom *d, uint32_t node, uint64_t o)
{
    struct tw_node *n = NODE(d, node);
    uint32_t tgt = LD_RLX(&n->target), tgen = LD_RLX(&n->target_gen);
    uint64_t mine = OWNER(O_GEN(o), TW_N_ALLOC, AUX_NOBODY);
    int linked = 0, r = 0;
    struct tw_slot *s = slot_ok(d, tgt) ? SLOT(d, tgt) : NULL;
    if (s) {
        r = tw_lock(&s->pi_lock, d->lock_timeout_ns, &s->lock_recovered);
        if (r)
            return r;
        uint64_t head = LD_ACQ(&s->head);
        uint32_t idx = H_IDX(head);
        if (H_GEN(head) == tgen && idx != TW_EXITED)
            linked = tw_reachable(d, idx_closed(idx) ? dead_list(idx) : idx, node);
    }
    uint64_t expect = o;
    if (linked) {
        r = CAS(&n->owner, &expect, OWNER(O_GEN(o), TW_N_QUEUED, tgt), __ATOMIC_ACQ_REL,
                __ATOMIC_RELAXED) ? 2 : 0;
    } else if (CAS(&n->owner, &expect, mine, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
        uint32_t reason = LD_RLX(&n->reason);
        if (reason != TW_R_NONE &&
            tw_dl_file(d, node, mine, reason, s ? tgt : 0, LD_RLX(&n->name_id)) == 1) {
            r = 3;
        } else {
            /* Never pushed: a keyed add that recorded this node is VOID
             * (said before the node can be allocated again). */
            tw_keys_settle(d, node, O_GEN(o), TW_K_VOID);
            tw_pool_push_shared(d, node);   /* not into our cache: see below */
            r = 1;
        }
    }
    if (s)
        pthread_mutex_unlock(&s->pi_lock);
    return r;
}

int tw_proc_settle(struct tw_dom *d, uint32_t i, int fsck_locked, struct tw_reap_info *info)
{
    struct tw_proc *p = PROC(d, i);
    int busy = 0;
    for (int k = 0; k < TW_INTENTS; k++)
        if (LD_ACQ(&p->intent[k]) != ~0ull)
            busy = 1;
    if (busy) {
        /* It died moving a node on the free list: find such nodes (a walk
         * of the list that must hold still), one fixer at a time. */
        if (!fsck_locked && tw_fsck_lock(d) < 0)
            return -EAGAIN;
        uint8_t *dead = calloc(d->max_procs, 1);
        uint32_t *out = calloc(d->pool_size, sizeof(uint32_t));
        int n = -ENOMEM;
        if (dead && out) {
            dead[i] = 1;
            n = tw_free_leaks(d, dead, out, d->pool_size, 64);
        }
        if (n >= 0) {
            /* The entry's intents no longer protect anything: from here its
             * words serve our own pushes (if we adopt it), and the nodes go
             * back while we still hold the fsck lock. */
            for (int k = 0; k < TW_INTENTS; k++)
                ST_RLX(&p->intent[k], ~0ull);
            if (d->my_proc < 0)
                d->my_proc = (int32_t)i;
            for (int k = 0; k < n; k++)
                tw_pool_push_shared(d, out[k]);
            info->leaked += (uint32_t)n;
        }
        free(dead);
        free(out);
        if (!fsck_locked)
            tw_fsck_unlock(d);
        if (n < 0)
            return n == -EUCLEAN ? -EUCLEAN : -EAGAIN;
    } else {
        for (int k = 0; k < TW_INTENTS; k++)
            ST_RLX(&p->intent[k], ~0ull);
        if (d->my_proc < 0)
            d->my_proc = (int32_t)i;    /* pool pushes below use this entry's intents */
    }
    /* Nodes go back straight to the free list (tw_pool_push_shared), never
     * through our own cache: we may have adopted entry i, and a node cached
     * in it would look like one of the dead process's. */
    for (uint32_t node = 0; node < d->pool_size; node++) {
        uint64_t o = LD_ACQ(&NODE(d, node)->owner);
        if (O_STATE(o) == TW_N_CACHED && (O_AUX(o) & ~TW_CACHE_HELD) == i) {
            /* Free, in the dead process's cache (or being flushed by it):
             * back to the pool. Not a leak: it was counted free all along. */
            tw_pool_uncache(d, node, o);
            continue;
        }
        if (O_STATE(o) != TW_N_ALLOC || O_AUX(o) != i)
            continue;
        switch (settle_node(d, node, o)) {
        case 1: info->leaked++; break;
        case 2: info->settled++; break;
        case 3: info->refiled++; break;
        default: break;
        }
    }
    return 0;
}

/*
 * fsck: reclaim the entry of a dead process and leave it free. Returns 1 if
 * reclaimed, 0 if it was not dead (or someone else took it), -EAGAIN if the
 * free list never held still (try again), or -errno.
 */
int tw_proc_reclaim(struct tw_dom *d, uint32_t i, int fsck_locked, struct tw_reap_info *info)
{
    memset(info, 0, sizeof(*info));
    if (i >= d->max_procs)
        return -EINVAL;
    if (tw_proc_dead(d, i) != 1 || (int32_t)i == d->my_proc)
        return 0;
    int r = tw_proc_claim(d);       /* our own entry first: pushes need one */
    if (r < 0)
        return r;
    struct tw_proc *p = PROC(d, i);
    if (tw_life_hold(&p->life) < 0)
        return 0;
    r = 0;
    if (LD_ACQ(&p->pid) != 0) {
        r = tw_proc_settle(d, i, fsck_locked, info);
        if (r == 0) {
            ST_RLX(&p->start_ticks, 0);
            ST_REL(&p->pid, 0);
            ADD_RLX(&HDR(d)->procs_reclaimed, 1);
            r = 1;
        }
    }
    tw_life_release(&p->life);
    return r;
}

__attribute__((constructor)) static void install_dead_proc_ops(void)
{
    tw_dead_proc_ops.settle = tw_proc_settle;
    tw_dead_proc_ops.reclaim = tw_proc_reclaim;
}
