// SPDX-License-Identifier: MIT
/*
 * keys.c - idempotent adds: a work queued at most once per key, across the
 * adder's own death.
 *
 * The problem (the Redis bridge): a process takes a message, adds
 * its work, then acknowledges the message. Killed between the add and the
 * acknowledgement, its successor gets the message again and must not queue
 * the work a second time - but the work may have run and its node been
 * freed meanwhile, so the lists cannot tell. The key table can:
 *
 *   1. pop a node (ALLOC(me), as in tw_add)
 *   2. under keys_lock: look the key up; if unknown, take a ring entry and
 *      publish RESERVED(key, node, gen, me) with a release store
 *   3. push the node (tw_push_node: lock-free, as tw_add)
 *   4. CAS the entry RESERVED -> QUEUED
 *
 * A successor that finds RESERVED decides from the node's owner word:
 *   - still ALLOC at the recorded generation: the push has not been proven.
 *     If the reserver is alive, it is adding right now (-EBUSY). If it is
 *     dead, its process entry is reclaimed (tw_proc_reclaim), which under the
 *     target's pi_lock either finds the node linked (QUEUED) or not; a node
 *     never pushed goes back to the pool and tw_keys_settle() makes the entry
 *     VOID first, so the successor adds it anew.
 *   - anything else (QUEUED, running, run and freed, reused, a dead letter):
 *     it left the reserver's hands, and the only way out that was no push
 *     (the reclaim above) would have made the entry VOID before the node
 *     moved. So it was pushed: the entry becomes what the reserver wanted.
 *
 * The entry outlives the work. Eviction is by ring position (see taskwork.h):
 * a key is remembered until TW_KEYS_CAP newer keyed adds.
 *
 * Layer: key table. Calls sys, segment, life, the process table; reclaims a
 * dead reserver's process entry through tw_dead_proc_ops. The keyed adds
 * themselves (steps 1 and 3) are the add engine's (task_work.c).
 */
#include "tw_internal.h"

#include <string.h>

static inline struct tw_key *KEY(struct tw_dom *d, uint32_t i)
{
    /* Right after the nodes (tw_attach checked keys_off says so). */
    return (struct tw_key *)(d->base + d->nodes_off + (uint64_t)d->pool_size * d->node_size +
                             (uint64_t)(i % TW_KEYS_CAP) * sizeof(struct tw_key));
}

/* The tag words (tw_layout.h "Key tags"): right after the entries. */
static inline uint64_t *TAGS(struct tw_dom *d)
{
    return (uint64_t *)((char *)KEY(d, 0) + (uint64_t)TW_KEYS_CAP * sizeof(struct tw_key));
}

#define K_ST(w)        ((uint32_t)((w) & 0xff))
#define K_SEQ(w)       ((w) >> 8)
#define K_WORD(seq, st) (((uint64_t)(seq) << 8) | (st))

/* word (RESERVED) -> the same reservation in state st. Races with the
 * reserver, resolvers and reclaimers: the first CAS wins, the others fail
 * on a word that is no longer RESERVED (or is a later reservation). */
static void finish(struct tw_key *k, uint64_t word, uint32_t st)
{
    uint64_t expect = word;
    CAS(&k->word, &expect, K_WORD(K_SEQ(word), st), __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

static int keys_lock(struct tw_dom *d)
{
    return tw_lock(&HDR(d)->keys_lock, d->lock_timeout_ns, NULL);
}

static void keys_unlock(struct tw_dom *d) { pthread_mutex_unlock(&HDR(d)->keys_lock); }

/* The newest entry for key that is not VOID or EMPTY, or -1. Hold keys_lock
 * (or accept a stale answer). The walk is bounded: TW_KEYS_CAP / 4 tag words,
 * and a full look only at the entries whose tag matches. */
static int find(struct tw_dom *d, uint64_t key)
{
    const uint64_t ones = 0x0001000100010001ull, highs = 0x8000800080008000ull;
    const uint64_t tag = TW_KEY_TAG(key), spread = tag * ones;
    uint64_t *tags = TAGS(d);
    int best = -1;
    uint64_t best_seq = 0;
    for (uint32_t w = 0; w < TW_KEYS_CAP / 4; w++) {
        /* Relaxed: a tag only says where to look (tw_layout.h "Key tags").
         * Four words at a time, one branch: a lane equal to tag makes its
         * word's test nonzero (no false negative). */
        if (w % 4 == 0) {
            uint64_t x0 = LD_RLX(&tags[w]) ^ spread, x1 = LD_RLX(&tags[w + 1]) ^ spread,
                     x2 = LD_RLX(&tags[w + 2]) ^ spread, x3 = LD_RLX(&tags[w + 3]) ^ spread;
            if (!((((x0 - ones) & ~x0) | ((x1 - ones) & ~x1) | ((x2 - ones) & ~x2) |
                   ((x3 - ones) & ~x3)) & highs)) {
                w += 3;
                continue;
            }
        }
        uint64_t x = LD_RLX(&tags[w]) ^ spread;
        if (!((x - ones) & ~x & highs))
            continue;
        for (uint32_t lane = 0; lane < 4; lane++) {
            if ((x >> (16 * lane)) & 0xffff)
                continue;
            uint32_t i = w * 4 + lane;
            struct tw_key *k = KEY(d, i);
            /* Acquire: pairs with reserve()'s release of RESERVED, so the key
             * read below is the reservation's. */
            uint64_t wd = LD_ACQ(&k->word);
            uint32_t st = K_ST(wd);
            if (st == TW_K_EMPTY || st == TW_K_VOID || LD_RLX(&k->key) != key)
                continue;
            uint64_t seq = K_SEQ(wd);
            if (best < 0 || seq > best_seq) {
                best = (int)i;
                best_seq = seq;
            }
        }
    }
    return best;
}

/* Under keys_lock, entry i EMPTY: its tag becomes key's. Whole-word
 * relaxed stores; the RESERVED store that follows (a release) publishes it
 * with the entry. */
static void set_tag(struct tw_dom *d, uint32_t i, uint64_t key)
{
    uint64_t *word = &TAGS(d)[i / 4];
    unsigned shift = 16 * (i % 4);
    uint64_t v = LD_RLX(word);
    v = (v & ~(0xffffull << shift)) | (TW_KEY_TAG(key) << shift);
    ST_RLX(word, v);
}

/* Try to make a RESERVED entry final (see the essay above). 1: final (read it
 * again), 0: a live process is adding it, -EAGAIN: a reclaim ran or is
 * running; look again. */
static int resolve(struct tw_dom *d, struct tw_key *k, uint64_t word)
{
    uint64_t work = LD_RLX(&k->work);
    uint32_t node = (uint32_t)work, gen = (uint32_t)(work >> 32), proc = LD_RLX(&k->proc);
    if (!node_ok(d, node) || proc >= d->max_procs) {
        finish(k, word, TW_K_VOID);
        return 1;
    }
    /* Acquire: pairs with the release of whoever moved the node on (push,
     * detach, pool push after tw_keys_settle's CAS). */
    uint64_t o = LD_ACQ(&NODE(d, node)->owner);
    if (O_GEN(o) == gen && O_STATE(o) == TW_N_ALLOC) {
        if (O_AUX(o) == AUX_NOBODY)
            return -EAGAIN;                 /* a reclaimer is settling it */
        if (O_AUX(o) != proc)
            return -EAGAIN;
        if (tw_proc_dead(d, proc) != 1)
            return 0;                       /* its adder lives: in flight */
        struct tw_reap_info info;
        int r = tw_dead_proc_ops.reclaim ? tw_dead_proc_ops.reclaim(d, proc, 0, &info) : -EAGAIN;
        return r < 0 && r != -EAGAIN ? r : -EAGAIN;
    }
    finish(k, word, LD_RLX(&k->want));      /* fails if a reclaimer voided it */
    return 1;
}

void tw_keys_settle(struct tw_dom *d, uint32_t node, uint32_t gen, uint32_t state)
{
    uint64_t work = ((uint64_t)gen << 32) | node;
    for (uint32_t i = 0; i < TW_KEYS_CAP; i++) {
        struct tw_key *k = KEY(d, i);
        uint64_t w = LD_ACQ(&k->word);
        if (K_ST(w) != TW_K_RESERVED || LD_RLX(&k->work) != work)
            continue;
        finish(k, w, state);
    }
}

static void fill_info(struct tw_key *k, struct tw_key_info *info, uint32_t fresh)
{
    info->work = LD_RLX(&k->work);
    info->state = K_ST(LD_ACQ(&k->word));
    info->slot = LD_RLX(&k->slot);
    info->fresh = fresh;
}

int tw_key_lookup(struct tw_dom *d, uint64_t key, struct tw_key_info *info)
{
    memset(info, 0, sizeof(*info));
    for (int tries = 0; tries < 64; tries++) {
        int i = find(d, key);
        if (i < 0)
            return 0;
        struct tw_key *k = KEY(d, (uint32_t)i);
        uint64_t w = LD_ACQ(&k->word);
        if (K_ST(w) != TW_K_RESERVED) {
            fill_info(k, info, 0);
            if (info->state == TW_K_VOID)
                continue;                   /* voided since find(): look again */
            if (LD_RLX(&k->key) != key)
                continue;                   /* evicted and reused meanwhile */
            return 1;
        }
        int r = resolve(d, k, w);
        if (r == 0)
            return -EBUSY;
        if (r < 0 && r != -EAGAIN)
            return r;
    }
    return -EBUSY;
}

/*
 * A RESERVED entry whose node already left its reserver (pushed; the
 * reserver died before its last CAS, and nobody looked the key up since) is
 * final: make it so, lock-free, so that it can be evicted. 1 if it was.
 */
static int settled_elsewhere(struct tw_dom *d, struct tw_key *k, uint64_t word)
{
    uint64_t work = LD_RLX(&k->work);
    uint32_t node = (uint32_t)work;
    if (!node_ok(d, node))
        return 1;
    uint64_t o = LD_ACQ(&NODE(d, node)->owner);
    if (O_GEN(o) == (uint32_t)(work >> 32) && O_STATE(o) == TW_N_ALLOC)
        return 0;                           /* not pushed yet, or being settled */
    finish(k, word, LD_RLX(&k->want));
    return K_ST(LD_ACQ(&k->word)) != TW_K_RESERVED;
}

/*
 * Under keys_lock: the key is not recorded (lookup said 0); take the next
 * ring entry that is not RESERVED and publish RESERVED. Returns the entry
 * index or -ENOSPC.
 */
static int reserve(struct tw_dom *d, uint64_t key, uint32_t node, uint32_t gen, uint32_t want,
                   uint32_t slot, uint64_t *word_out)
{
    struct tw_header *h = HDR(d);
    for (uint32_t tries = 0; tries < TW_KEYS_CAP; tries++) {
        uint64_t seq = h->keys_next++;
        struct tw_key *k = KEY(d, (uint32_t)(seq % TW_KEYS_CAP));
        uint64_t w = LD_ACQ(&k->word);
        if (K_ST(w) == TW_K_RESERVED && !settled_elsewhere(d, k, w))
            continue;                       /* in flight: never evicted */
        /* EMPTY first: not findable while rewritten. A late finish() of the
         * evicted reservation fails: its seq is not ours. */
        ST_REL(&k->word, K_WORD(seq + 1, TW_K_EMPTY));
        set_tag(d, (uint32_t)(seq % TW_KEYS_CAP), key);
        k->key = key;
        k->work = ((uint64_t)gen << 32) | node;
        k->proc = (uint32_t)d->my_proc;
        k->want = want;
        k->slot = slot;
        /* Release: a finder that sees RESERVED sees the fields above. */
        *word_out = K_WORD(seq + 1, TW_K_RESERVED);
        ST_REL(&k->word, *word_out);
        return (int)(seq % TW_KEYS_CAP);
    }
    return -ENOSPC;
}

/* Look key up and, if unknown, reserve it for node; keys_lock held inside.
 * 1: recorded before (info), 0: reserved (*entry), -errno. */
int tw_key_reserve(struct tw_dom *d, uint64_t key, uint32_t node, uint32_t gen,
                             uint32_t want, uint32_t slot, struct tw_key_info *info, int *entry,
                             uint64_t *word)
{
    for (int tries = 0; tries < 64; tries++) {
        /* Under the lock: two reservers of one key are serialized here, and
         * a key nobody recorded (the common case) costs one find. */
        int r = keys_lock(d);
        if (r)
            return r;
        int i = find(d, key);
        if (i < 0) {
            r = reserve(d, key, node, gen, want, slot, word);
            keys_unlock(d);
            if (r < 0)
                return r;
            *entry = r;
            return 0;
        }
        keys_unlock(d);
        /* Recorded: resolve it (a RESERVED entry may need its dead
         * reserver reclaimed, which is done outside keys_lock). 0: voided
         * meanwhile, so look again. */
        r = tw_key_lookup(d, key, info);
        if (r != 0)
            return r;
    }
    return -EBUSY;
}

int tw_keys_used(struct tw_dom *d)
{
    int n = 0;
    for (uint32_t i = 0; i < TW_KEYS_CAP; i++) {
        uint32_t st = K_ST(LD_ACQ(&KEY(d, i)->word));
        n += st != TW_K_EMPTY && st != TW_K_VOID;
    }
    return n;
}

void tw_key_finish(struct tw_dom *d, int entry, uint64_t word, uint32_t state)
{
    finish(KEY(d, (uint32_t)entry), word, state);
}

void tw_key_fill_info(struct tw_dom *d, int entry, struct tw_key_info *info, uint32_t fresh)
{
    fill_info(KEY(d, (uint32_t)entry), info, fresh);
}
