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
/* An intent: the chain of n nodes linked by ->next from first (tw_layout.h). */
#define INTENT(n, first) HEAD((n), (first))

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

/* A bad index read from the free list: read the head again. Still the same
 * head (nothing moved under us): the list itself is corrupt, 1. Moved: the
 * read raced a pop or push; *head is the new one, 0 (retry from it). */
static inline int stable_bad_head(struct tw_header *h, uint64_t *head)
{
    uint64_t again = LD_ACQ(&h->free_head);
    if (again == *head)
        return 1;
    *head = again;
    return 0;
}

static inline void intent_set(uint64_t *w, uint64_t v) { __atomic_store_n(w, v, __ATOMIC_SEQ_CST); }
static inline void intent_done(uint64_t *w) { __atomic_store_n(w, ~0ull, __ATOMIC_SEQ_CST); }

/*
 * Pop one node from the shared free list. The head is tag<<32 | idx and every
 * successful change bumps the tag, so a CAS built on a stale read (the node
 * was popped, reused and pushed back meanwhile) fails instead of installing a
 * stale ->next (ABA). The intent is published before the CAS so that fsck,
 * seeing a FREE node outside the list, can tell "popped by a live process
 * that has not yet written the owner word" from "popped by a process that
 * died".
 */
static int pop_shared(struct tw_dom *d, uint32_t *out)
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
            if (stable_bad_head(h, &head)) {
                r = -EUCLEAN;   /* a stable head with a bad link: corrupt */
                break;
            }
            continue;
        }
        /* Intent before the CAS; seq_cst so fsck's reads order after it. */
        intent_set(intent, INTENT(1, idx));
        /* May read a ->next that a concurrent pop-reuse-push rewrote: then the
         * tag has moved and the CAS below fails. */
        uint32_t next = LD_RLX(&NODE(d, idx)->next);
        uint64_t nh = HEAD(H_GEN(head) + 1, next);
        if (next != TW_NIL && !node_ok(d, next)) {
            if (stable_bad_head(h, &head)) {
                r = -EUCLEAN;   /* a stable head with a bad link: corrupt */
                break;
            }
            continue;
        }
        /* acq_rel: acquire pairs with the release CAS of the pushes (the
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

/* Push one node we own (any state, ours alone) onto the shared free list. The
 * intent (as for a pop) tells fsck that this FREE node outside the list is in
 * flight, not leaked. */
void tw_pool_push_shared(struct tw_dom *d, uint32_t idx)
{
    struct tw_header *h = HDR(d);
    struct tw_node *n = NODE(d, idx);
    /* No intent word (no process entry, or a stuck segment): the push still
     * happens; only a death in the next few instructions would then leave
     * the node for fsck to miss. */
    uint64_t *intent = intent_claim(d);
    if (intent)
        intent_set(intent, INTENT(1, idx));
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

/*
 * Batch pop (a cache refill): detach a run of up to max nodes from the head
 * with one CAS, and make each CACHED in our entry. The walk follows at most
 * max links from the head, each bounds-checked; the links it reads may be
 * stale (a concurrent pop took the head, reused a node and pushed it back,
 * rewriting its ->next), but any change of the list changes the head's tag,
 * so the CAS succeeds only if nothing was popped or pushed since our read of
 * the head: then every link we followed was the list's own (a node's ->next
 * is written only by its owner, and a node on the list has none), and the
 * CAS takes exactly nodes[0..k-1] and installs the list that followed them.
 * The intent names the chain (k, nodes[0]) before the CAS: until each owner
 * word says CACHED, fsck finds these FREE nodes outside the list protected
 * by it; a death after the CAS leaves them FREE outside the list with a dead
 * entry's intent (tw_proc_settle finds them), or CACHED in the dead entry.
 * Returns k (0: the list is empty) or -errno.
 */
static int pop_batch(struct tw_dom *d, uint32_t *nodes, uint32_t *gens, uint32_t max)
{
    uint64_t *intent = intent_claim(d);
    if (!intent)
        return d->my_proc < 0 ? -EUSERS : -ETIMEDOUT;
    uint32_t pi = (uint32_t)d->my_proc;
    struct tw_header *h = HDR(d);
    uint64_t head = LD_ACQ(&h->free_head);
    int r = -ETIMEDOUT;
    for (uint32_t tries = 0; tries < POP_RETRIES; tries++) {
        uint32_t cur = H_IDX(head), k = 0, next = TW_NIL;
        int bad = 0;
        if (cur == TW_NIL) {
            r = 0;
            break;
        }
        while (k < max) {
            if (!node_ok(d, cur)) {
                bad = 1;
                break;
            }
            nodes[k++] = cur;
            /* relaxed: the acquire load (or failed CAS) of the head that the
             * push of this node's successor released makes ->next visible;
             * a link read after a concurrent change is caught by the CAS. */
            next = LD_RLX(&NODE(d, cur)->next);
            if (next == TW_NIL)
                break;
            cur = next;
        }
        if (!bad && next != TW_NIL && !node_ok(d, next))
            bad = 1;
        if (bad) {
            if (stable_bad_head(h, &head)) {
                r = -EUCLEAN;   /* a stable head with a bad link: corrupt */
                break;
            }
            continue;
        }
        /* Intent before the CAS (seq_cst): the chain we are about to take. */
        intent_set(intent, INTENT(k, nodes[0]));
        /* acq_rel: acquire pairs with the release CAS of every push before
         * it (all changes of the head are RMWs: one release sequence). */
        if (CAS(&h->free_head, &head, HEAD(H_GEN(head) + 1, next), __ATOMIC_ACQ_REL,
                __ATOMIC_ACQUIRE)) {
            tw_killpoint(TW_KP_MID_BATCH_POP);
            for (uint32_t j = 0; j < k; j++) {
                struct tw_node *n = NODE(d, nodes[j]);
                uint64_t o = LD_RLX(&n->owner);
                gens[j] = O_GEN(o);
                /* Ours now, in our cache: release pairs with fsck's and a
                 * thief's acquire load of the owner word. */
                ST_REL(&n->owner, OWNER(gens[j], TW_N_CACHED, pi));
            }
            r = (int)k;
            break;
        }
    }
    intent_done(intent);
    return r;
}

/*
 * Batch push (a cache flush): give back nodes[0..k-1], all HELD by us (CACHED
 * with TW_CACHE_HELD, ours alone), as one chain with one CAS. The chain is
 * linked first, then the intent names it, then the owner words say FREE: a
 * FREE node outside the list is always covered by the intent (fsck follows
 * its links, which no one else writes while the intent stands). Only the
 * tail's ->next is rewritten on a retry, and the intent's walk stops before
 * it. A death before the CAS leaves each node CACHED (HELD) in our entry or
 * FREE outside the list under a dead entry's intent: tw_proc_settle gives
 * back both kinds.
 */
static void push_batch(struct tw_dom *d, const uint32_t *nodes, uint32_t k)
{
    struct tw_header *h = HDR(d);
    for (uint32_t j = 0; j + 1 < k; j++)
        ST_RLX(&NODE(d, nodes[j])->next, nodes[j + 1]);
    uint64_t *intent = intent_claim(d);
    if (intent)
        intent_set(intent, INTENT(k, nodes[0]));   /* seq_cst: after the links */
    for (uint32_t j = 0; j < k; j++) {
        struct tw_node *n = NODE(d, nodes[j]);
        uint64_t o = LD_RLX(&n->owner);
        ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_FREE, 0));
    }
    tw_killpoint(TW_KP_MID_BATCH_PUSH);
    struct tw_node *tail = NODE(d, nodes[k - 1]);
    uint64_t head = LD_RLX(&h->free_head);
    do {
        ST_RLX(&tail->next, H_IDX(head));
        /* release: publishes the links and the FREE owner words to the pops
         * that acquire this head. */
    } while (!CAS(&h->free_head, &head, HEAD(H_GEN(head) + 1, nodes[0]), __ATOMIC_ACQ_REL,
                  __ATOMIC_RELAXED));
    if (intent)
        intent_done(intent);
}

/* ------------------------------------------------------------------------ */
/* the per-process node cache                                                 */

/* Bumped in the child of every fork(): a cache whose epoch differs was filled
 * by the parent (its nodes are CACHED in the parent's entry, not ours), and a
 * cache lock held with an older epoch's tag was held by a parent's thread
 * that does not exist here. */
static uint32_t fork_epoch = 1;

static void pool_atfork_child(void)
{
    __atomic_store_n(&fork_epoch, LD_RLX(&fork_epoch) + 1, __ATOMIC_RELAXED);
}

__attribute__((constructor)) static void pool_register_atfork(void)
{
    pthread_atfork(NULL, NULL, pool_atfork_child);
}

/*
 * Take the process's cache, or NULL if another thread of ours (or the code a
 * signal handler interrupted) is using it: the caller then uses the shared
 * free list, so a handler never waits for, nor corrupts, the code it
 * interrupted. Contents left by a parent process (fork) or filed under an
 * entry we no longer have are dropped, not used: their owner words name
 * another entry, and the CAS that takes a node would fail anyway.
 */
static struct tw_pool_cache *cache_take(struct tw_dom *d)
{
    struct tw_pool_cache *c = &d->cache;
    uint32_t epoch = LD_RLX(&fork_epoch), tag = epoch * 2 + 1;
    uint32_t cur = LD_RLX(&c->lock);
    if (cur == tag)
        return NULL;
    /* 0: free; another value: held by a thread of the process we were forked
     * from (it does not run here). acquire: pairs with cache_give's release,
     * so the previous user's ent[] and owner stores are seen. */
    if (!CAS(&c->lock, &cur, tag, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return NULL;
    if (c->epoch != epoch || c->proc != d->my_proc || c->n > TW_CACHE_MAX) {
        c->n = 0;
        c->epoch = epoch;
        c->proc = d->my_proc;
    }
    return c;
}

static inline void cache_give(struct tw_pool_cache *c)
{
    ST_REL(&c->lock, 0u);   /* release: our ent[] changes to the next user */
}

/* Flush the k oldest entries of a cache we hold. Each node is first made
 * HELD by CAS (a thief may have taken it: then its entry is just dropped),
 * so no one else touches it while we link the chain. */
static void cache_flush(struct tw_dom *d, struct tw_pool_cache *c, uint32_t k)
{
    uint32_t nodes[TW_CACHE_MAX], m = 0, pi = (uint32_t)c->proc;
    if (k > c->n)
        k = c->n;
    for (uint32_t j = 0; j < k; j++) {
        uint32_t idx = H_IDX(c->ent[j]), gen = H_GEN(c->ent[j]);
        if (!node_ok(d, idx))
            continue;
        uint64_t expect = OWNER(gen, TW_N_CACHED, pi);
        if (CAS(&NODE(d, idx)->owner, &expect, OWNER(gen, TW_N_CACHED, pi | TW_CACHE_HELD),
                __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            nodes[m++] = idx;
    }
    memmove(c->ent, c->ent + k, (c->n - k) * sizeof(c->ent[0]));
    c->n -= k;
    if (m)
        push_batch(d, nodes, m);
}

/* Take a node from any process's cache (the free list and our cache are
 * empty): CAS on its owner word, CACHED (not HELD) -> ALLOC by us. Its
 * owner's cache entry goes stale; that process's CAS on it fails later. One
 * bounded pass over the pool, only when the pool is otherwise dry. */
static int steal(struct tw_dom *d, uint32_t *out)
{
    uint32_t pi = (uint32_t)d->my_proc;
    for (uint32_t i = 0; i < d->pool_size; i++) {
        struct tw_node *n = NODE(d, i);
        uint64_t o = LD_ACQ(&n->owner);
        if (O_STATE(o) != TW_N_CACHED || (O_AUX(o) & TW_CACHE_HELD))
            continue;
        if (CAS(&n->owner, &o, OWNER(O_GEN(o) + 1, TW_N_ALLOC, pi), __ATOMIC_ACQ_REL,
                __ATOMIC_RELAXED)) {
            tw_killpoint(TW_KP_MID_POP);
            *out = i;
            return 0;
        }
    }
    return -ENOMEM;
}

/*
 * Allocate a node: ALLOC by our entry, its generation bumped. From our cache
 * (refilled from the free list TW_CACHE_BATCH at a time), else from the
 * shared list (cache busy: another thread, or the code a signal handler
 * interrupted), else from another process's cache.
 */
int tw_pool_pop(struct tw_dom *d, uint32_t *out)
{
    int pi = tw_proc_claim(d);
    if (pi < 0)
        return pi;
    struct tw_pool_cache *c = cache_take(d);
    int r;
    if (!c) {
        r = pop_shared(d, out);
    } else {
        r = -ENOMEM;
        for (;;) {
            if (c->n == 0) {
                uint32_t nodes[TW_CACHE_BATCH], gens[TW_CACHE_BATCH];
                int k = pop_batch(d, nodes, gens, TW_CACHE_BATCH);
                if (k <= 0) {
                    r = k == 0 ? -ENOMEM : k;
                    break;
                }
                /* newest last: ent[n-1] is taken first, in list order */
                for (int j = k - 1; j >= 0; j--)
                    c->ent[c->n++] = HEAD(gens[j], nodes[j]);
            }
            uint64_t e = c->ent[--c->n];
            uint32_t idx = H_IDX(e), gen = H_GEN(e);
            if (!node_ok(d, idx))
                continue;
            struct tw_node *n = NODE(d, idx);
            uint64_t expect = OWNER(gen, TW_N_CACHED, (uint32_t)pi);
            /* CACHED in our entry, same generation -> ALLOC, a new generation
             * for a new life. Fails if another process took it (steal): the
             * entry was stale. acq_rel: pairs with fsck's and thieves' loads. */
            if (CAS(&n->owner, &expect, OWNER(gen + 1, TW_N_ALLOC, (uint32_t)pi),
                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
                cache_give(c);
                tw_killpoint(TW_KP_MID_POP);
                *out = idx;
                return 0;
            }
        }
        cache_give(c);
    }
    if (r == -ENOMEM)
        r = steal(d, out);
    return r;
}

/*
 * Give back a node we own (ALLOC by us, or DONE/RUNNING in our run, or taken
 * by CAS from a dead owner): into our cache, CACHED in our entry (one store:
 * the node never stops being owned); a full cache first gives its oldest
 * TW_CACHE_BATCH back to the free list with one CAS. Cache busy or no entry:
 * straight onto the free list.
 */
void tw_pool_push(struct tw_dom *d, uint32_t idx)
{
    struct tw_pool_cache *c = d->my_proc >= 0 ? cache_take(d) : NULL;
    if (!c) {
        tw_pool_push_shared(d, idx);
        return;
    }
    if (c->n >= TW_CACHE_MAX)
        cache_flush(d, c, TW_CACHE_BATCH);
    struct tw_node *n = NODE(d, idx);
    uint64_t o = LD_RLX(&n->owner);
    n->reason = TW_R_NONE;
    /* release: the node's fields (reason) before the owner word that says it
     * is free; pairs with the acquire of the CAS that takes it. */
    ST_REL(&n->owner, OWNER(O_GEN(o), TW_N_CACHED, (uint32_t)c->proc));
    c->ent[c->n++] = HEAD(O_GEN(o), idx);
    cache_give(c);
}

/* Give the whole cache back to the free list (close, exit, before the
 * process entry is released). Waits (yielding, up to the lock deadline) for a
 * thread that is using it. */
void tw_pool_cache_flush(struct tw_dom *d)
{
    if (d->my_proc < 0 || !d->base)
        return;
    uint64_t deadline = 0;
    for (;;) {
        struct tw_pool_cache *c = cache_take(d);
        if (c) {
            while (c->n)
                cache_flush(d, c, TW_CACHE_BATCH);
            cache_give(c);
            return;
        }
        uint64_t now = tw_now_mono();
        if (!deadline)
            deadline = now + (uint64_t)d->lock_timeout_ns;
        else if (now > deadline)
            return;
        sched_yield();
    }
}

/* A node CACHED in dead entry `proc` (owner word o): give it back to the free
 * list. Made HELD first by CAS (a thief may take it meanwhile: then it is
 * not ours to give, 0); a HELD one was being flushed by the dead process and
 * is the entry's alone. The caller holds the dead entry's life lock. */
int tw_pool_uncache(struct tw_dom *d, uint32_t node, uint64_t o)
{
    if (!node_ok(d, node) || O_STATE(o) != TW_N_CACHED)
        return 0;
    struct tw_node *n = NODE(d, node);
    if (!(O_AUX(o) & TW_CACHE_HELD) &&
        !CAS(&n->owner, &o, OWNER(O_GEN(o), TW_N_CACHED, O_AUX(o) | TW_CACHE_HELD),
             __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return 0;
    tw_pool_push_shared(d, node);
    return 1;
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
    for (uint32_t i = 0; i < d->pool_size; i++) {
        uint32_t st = O_STATE(LD_RLX(&NODE(d, i)->owner));
        /* DONE: run, on its way back; CACHED: free in a process's cache (any
         * adder may still get it, see steal()) */
        if (st == TW_N_FREE || st == TW_N_DONE || st == TW_N_CACHED)
            n++;
    }
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
                    if (in == ~0ull)
                        continue;
                    /* the chain it names: count nodes from its first, each
                     * link bounds-checked. Links read after the operation
                     * ended may lead elsewhere: that only protects more. */
                    uint32_t cnt = H_GEN(in), cur = H_IDX(in);
                    if (cnt < 1 || cnt > TW_CACHE_MAX)
                        cnt = 1;
                    for (uint32_t j = 0; j < cnt && node_ok(d, cur); j++) {
                        if (!mark[cur])
                            mark[cur] = 2;
                        cur = LD_ACQ(&NODE(d, cur)->next);
                    }
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
