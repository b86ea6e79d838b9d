// SPDX-License-Identifier: MIT
/*
 * deadletter.c - the domain's dead letters.
 *
 * Layer: dead letters. Calls sys, segment, life, the process table, the pool.
 *
 * Dead letters are a list under dl_lock. Filing marks the node, then links it;
 * taking unlinks it, then marks it; whoever next gets dl_lock with EOWNERDEAD
 * links every DEADLETTER node that is on no list (dl_recover).
 */
#include "tw_internal.h"

#include <stdlib.h>
#include <string.h>

/* A filer or taker died holding dl_lock: every node marked DEADLETTER must be
 * on the list, exactly once, and dl_count must say how many. O(pool), rare. */
static void dl_recover(struct tw_dom *d)
{
    struct tw_header *h = HDR(d);
    uint8_t *linked = calloc(d->pool_size, 1);
    if (!linked)
        return;
    uint32_t count = 0, prev = TW_NIL;
    for (uint32_t cur = (uint32_t)LD_RLX(&h->dl_head); cur != TW_NIL;) {
        if (!node_ok(d, cur) || linked[cur]) {
            /* out of range or a cycle: cut the list here */
            if (prev == TW_NIL)
                ST_REL(&h->dl_head, (uint64_t)TW_NIL);
            else
                ST_REL(&NODE(d, prev)->next, TW_NIL);
            break;
        }
        linked[cur] = 1;
        count++;
        prev = cur;
        cur = LD_RLX(&NODE(d, cur)->next);
    }
    for (uint32_t i = 0; i < d->pool_size; i++) {
        struct tw_node *n = NODE(d, i);
        if (linked[i] || O_STATE(LD_ACQ(&n->owner)) != TW_N_DEADLETTER)
            continue;
        ST_RLX(&n->next, (uint32_t)LD_RLX(&h->dl_head));
        ST_REL(&h->dl_head, (uint64_t)i);
        count++;
    }
    ST_REL(&h->dl_count, (uint64_t)count);
    free(linked);
}

int tw_dl_lock(struct tw_dom *d)
{
    uint32_t recovered = 0;
    int r = tw_lock(&HDR(d)->dl_lock, d->lock_timeout_ns, &recovered);
    if (r == 0 && recovered)
        dl_recover(d);
    return r;
}

void tw_dl_unlock(struct tw_dom *d)
{
    pthread_mutex_unlock(&HDR(d)->dl_lock);
}

int tw_dl_file_locked(struct tw_dom *d, uint32_t node, uint64_t expect, uint32_t reason,
                      uint32_t slot, uint64_t name_id)
{
    return tw_dl_file_locked_ex(d, node, expect, reason, slot, name_id, 1);
}

int tw_dl_file_locked_ex(struct tw_dom *d, uint32_t node, uint64_t expect, uint32_t reason,
                         uint32_t slot, uint64_t name_id, int settle)
{
    struct tw_header *h = HDR(d);
    struct tw_node *n = NODE(d, node);
    /* Mark first (acq_rel CAS: whoever else wants the node - an adder's
     * mark_queued, another reaper - loses), then link. A death between the
     * two leaves a DEADLETTER node on no list, which dl_recover links. */
    if (!CAS(&n->owner, &expect, OWNER(O_GEN(expect), TW_N_DEADLETTER, slot), __ATOMIC_ACQ_REL,
             __ATOMIC_RELAXED))
        return 0;
    n->reason = reason;
    n->name_id = name_id;
    tw_killpoint(TW_KP_IN_DL_FILE);
    ST_RLX(&n->next, (uint32_t)LD_RLX(&h->dl_head));
    /* Release: readers of the list without the lock (tools) see a whole node. */
    ST_REL(&h->dl_head, (uint64_t)node);
    ADD_RLX(&h->dl_count, 1);
    /* A dead letter is final for the work that became it: its outcome
     * (dead_letter, or failed with its error) is written by its filer. */
    if (settle)
        tw_outcome_letter(d, node, O_GEN(expect), reason);
    return 1;
}

int tw_dl_file(struct tw_dom *d, uint32_t node, uint64_t expect, uint32_t reason,
               uint32_t slot, uint64_t name_id)
{
    int r = tw_dl_lock(d);
    if (r)
        return r;
    r = tw_dl_file_locked(d, node, expect, reason, slot, name_id);
    tw_dl_unlock(d);
    return r;
}

int tw_dl_list(struct tw_dom *d, uint32_t *out, uint32_t max)
{
    struct tw_header *h = HDR(d);
    int r = tw_dl_lock(d);
    if (r)
        return r;
    uint32_t n = 0;
    for (uint32_t cur = (uint32_t)LD_RLX(&h->dl_head); cur != TW_NIL;) {
        if (!node_ok(d, cur) || n >= d->pool_size) {
            r = -EUCLEAN;
            goto out;
        }
        if (n < max)
            out[n] = cur;
        n++;
        cur = NODE(d, cur)->next;
    }
    r = (int)n;
out:
    tw_dl_unlock(d);
    return r;
}

/* Unlink one dead letter (node, gen) and make it ours (ALLOC), keeping its
 * reason (so that, should we die holding it, it goes back to the dead
 * letters rather than to the pool). 1 if taken, 0 if it is not there. */
int tw_dl_take(struct tw_dom *d, uint32_t node, uint32_t gen)
{
    struct tw_header *h = HDR(d);
    if (!node_ok(d, node))
        return -EINVAL;
    if (tw_proc_claim(d) < 0)
        return -EUSERS;
    int r = tw_dl_lock(d);
    if (r)
        return r;
    uint32_t prev = TW_NIL, steps = 0;
    r = 0;
    for (uint32_t cur = (uint32_t)LD_RLX(&h->dl_head); cur != TW_NIL; steps++) {
        if (!node_ok(d, cur) || steps > d->pool_size) {
            r = -EUCLEAN;
            break;
        }
        struct tw_node *n = NODE(d, cur);
        if (cur != node) {
            prev = cur;
            cur = n->next;
            continue;
        }
        uint64_t o = LD_ACQ(&n->owner);
        if (O_GEN(o) != gen || O_STATE(o) != TW_N_DEADLETTER)
            break;
        /* Unlink, then mark: a death between leaves a DEADLETTER node on
         * no list, which dl_recover links again (the take never happened). */
        if (prev == TW_NIL)
            ST_REL(&h->dl_head, (uint64_t)n->next);
        else
            ST_REL(&NODE(d, prev)->next, n->next);
        __atomic_sub_fetch(&h->dl_count, 1, __ATOMIC_RELAXED);
        if (n->reason == TW_R_NONE)
            n->reason = TW_R_ORPHANED;
        ST_REL(&n->owner, OWNER(gen, TW_N_ALLOC, (uint32_t)d->my_proc));
        r = 1;
        break;
    }
    tw_dl_unlock(d);
    return r;
}

/* A taken dead letter is done: free it (run or dropped), or file it again
 * (its callback is still unknown here). */
int tw_dl_done(struct tw_dom *d, uint32_t node, int outcome)
{
    if (!node_ok(d, node))
        return -EINVAL;
    struct tw_node *n = NODE(d, node);
    uint64_t o = LD_ACQ(&n->owner);
    if (O_STATE(o) != TW_N_ALLOC || O_AUX(o) != (uint32_t)d->my_proc)
        return -EUCLEAN;
    if (outcome == TW_OUT_UNKNOWN) {
        uint32_t t = LD_RLX(&n->target);
        int r = tw_dl_file(d, node, o, LD_RLX(&n->reason), slot_ok(d, t) ? t : 0,
                           LD_RLX(&n->name_id));
        return r < 0 ? r : 0;
    }
    tw_pool_push(d, node);
    return 0;
}
