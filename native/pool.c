// SPDX-License-Identifier: MIT
/*
 * pool.c - the node pool.
 *
 * Layer: pool. Calls sys, segment, life, the process table.
 *
 * The pool is a Treiber stack of free nodes with a tagged head. Every pop or
 * push publishes an intent word in the process's entry of the process table
 * first, so fsck (or the process that reclaims a dead process's entry) can
 * tell a node a live process is moving from one a dead process dropped.
 */
#include "tw_internal.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* the pool: a Treiber stack with a tagged head                               */

/* A placeholder no node index can equal (its low half is TW_NIL). */
#define INTENT_CLAIMED HEAD(0xfffffffeu, TW_NIL)

/*
 * Claim one intent word of our process entry. All TW_INTENTS busy (that many
 * threads, or a signal handler on top of them, are moving nodes right now):
 * wait for one, yielding; each is held for a few instructions. NULL only
 * with no process entry, or after the lock deadline (a stuck segment).
 */
static uint64_t *intent_claim(struct tw_dom *d)
{
    int pi = tw_proc_claim(d);
    if (pi < 0)
        return NULL;
    struct tw_proc *me = PROC(d, (uint32_t)pi);
    uint64_t deadline = 0;
    for (uint32_t spin = 0;; spin++) {
        for (int k = 0; k < TW_INTENTS; k++) {
            uint64_t expect = ~0ull;
            if (LD_RLX(&me->intent[k]) == ~0ull &&
                CAS(&me->intent[k], &expect, INTENT_CLAIMED, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
                return &me->intent[k];
        }
        if (spin < 64)
            continue;
        uint64_t now = tw_now_mono();
        if (!deadline)
            deadline = now + (uint64_t)d->lock_timeout_ns;
        else if (now > deadline)
            return NULL;
        sched_yield();
    }
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
int tw_pool_pop(struct tw_dom *d, uint32_t *out)
{
    uint64_t *intent = intent_claim(d);
    if (!intent)
        return d->my_proc < 0 ? -EUSERS : -ETIMEDOUT;
    int pi = d->my_proc;
    struct tw_header *h = HDR(d);
    uint64_t head = LD_ACQ(&h->free_head);
    int r = -ETIMEDOUT;
    for (uint32_t tries = 0; tries < POP_RETRIES; tries++) {
        uint32_t idx = H_IDX(head);
        if (idx == TW_NIL) {
            r = -ENOMEM;
            break;
        }
        if (!node_ok(d, idx)) {
            uint64_t again = LD_ACQ(&h->free_head);
            if (again == head) {
                r = -EUCLEAN;
                break;
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
                r = -EUCLEAN;   /* a stable head with a bad link: corrupt */
                break;
            }
            head = again;
            continue;
        }
        /* acq_rel: acquire pairs with the release CAS of tw_pool_push (the
         * node's ->next and owner were written before it was pushed). */
        if (CAS(&h->free_head, &head, nh, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            tw_killpoint(TW_KP_MID_POP);
            struct tw_node *n = NODE(d, idx);
            uint64_t o = LD_RLX(&n->owner);
            /* The node is ours now: a new generation for a new life. Release:
             * pairs with fsck's acquire load of the owner word. */
            ST_REL(&n->owner, OWNER(O_GEN(o) + 1, TW_N_ALLOC, (uint32_t)pi));
            *out = idx;
            r = 0;
            break;
        }
    }
    intent_done(intent);
    return r;
}

/* Push a node we own back onto the free list. The intent (as for a pop) tells
 * fsck that this FREE node outside the list is in flight, not leaked. */
void tw_pool_push(struct tw_dom *d, uint32_t idx)
{
    struct tw_header *h = HDR(d);
    struct tw_node *n = NODE(d, idx);
    /* No intent word (no process entry, or a stuck segment): the push still
     * happens; only a death in the next few instructions would then leave
     * the node for fsck to miss. */
    uint64_t *intent = intent_claim(d);
    if (intent)
        intent_set(intent, HEAD(0xffffffffu, idx));
    uint64_t o = LD_RLX(&n->owner);
    n->reason = TW_R_NONE;
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
    tw_pool_push(d, node);
    return 0;
}

int tw_pool_free_count(struct tw_dom *d)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < d->pool_size; i++)
        if (O_STATE(LD_RLX(&NODE(d, i)->owner)) == TW_N_FREE ||
            O_STATE(LD_RLX(&NODE(d, i)->owner)) == TW_N_DONE)
            n++;   /* DONE: run, on its way back to the free list */
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

/* Is node reachable from `from` (walk bounded by the pool size)? */
int tw_reachable(struct tw_dom *d, uint32_t from, uint32_t node)
{
    for (uint32_t cur = from, k = 0; cur != TW_NIL && !idx_closed(cur) && k <= d->pool_size;
         k++) {
        if (!node_ok(d, cur))
            return 0;
        if (cur == node)
            return 1;
        cur = LD_ACQ(&NODE(d, cur)->next);
    }
    return 0;
}

/*
 * Find FREE nodes that are on no free list and that no live process is
 * pushing or popping: left by a process that died between its pop CAS and its
 * owner store, or between its owner store and its push CAS. The walk is
 * validated: the head (with its tag) must be unchanged from before the walk
 * until after the last read, so no pop or push happened meanwhile. Intents
 * are read before and after the owner words (see tw_pool_pop/push for why
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
    int ret = -EAGAIN;
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
            ret = -EUCLEAN;
            break;
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
        ret = (int)n;
        break;
    }
    free(mark);
    return ret;
}
