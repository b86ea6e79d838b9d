/*
 * progress.c - what runs are doing now, for readers (README "Workers in
 * production": works in progress are visible).
 *
 * Layer: a reader above the segment (it calls nothing). It only loads: no
 * lock, no store. A run
 * takes works off a task's list (DETACHED), starts them (RUNNING) and marks
 * each one that returned (DONE) with single stores into its owner word; the
 * slot's counters move when the run frees its chunk. So the owner words say,
 * at any instant, how many works each task has taken and not finished, and
 * how many finished since its counters last moved.
 */
#include "tw_internal.h"

int tw_progress(struct tw_dom *d, uint32_t nslots, uint32_t *running, uint32_t *done,
                uint64_t *oldest_enq)
{
    if (nslots > d->max_tasks)
        nslots = d->max_tasks;
    for (uint32_t s = 0; s < nslots; s++) {
        running[s] = done[s] = 0;
        oldest_enq[s] = 0;
    }
    /* Bounded: one pass over the pool. */
    for (uint32_t i = 0; i < d->pool_size; i++) {
        struct tw_node *n = NODE(d, i);
        /* Acquire: pairs with the runner's release of each transition; the
         * fields read below were written before the node was detached. */
        uint64_t o = LD_ACQ(&n->owner);
        uint32_t st = O_STATE(o), slot = O_AUX(o);
        if ((st != TW_N_DETACHED && st != TW_N_RUNNING && st != TW_N_DONE) || slot >= nslots)
            continue;
        uint32_t tgen = LD_RLX(&n->target_gen);
        uint64_t enq = LD_RLX(&n->enqueued_ns);
        /* The node moved on while we read it: it is not the work we saw. */
        if (LD_ACQ(&n->owner) != o || tgen != LD_ACQ(&SLOT(d, slot)->gen))
            continue;
        if (st == TW_N_DONE) {
            done[slot]++;
        } else {
            running[slot]++;
            if (!oldest_enq[slot] || enq < oldest_enq[slot])
                oldest_enq[slot] = enq;
        }
    }
    return (int)nslots;
}

int tw_running_nodes(struct tw_dom *d, uint32_t slot, uint32_t *nodes, uint32_t *gens,
                     uint32_t max)
{
    if (!slot_ok(d, slot))
        return -EINVAL;
    /* Acquire: pairs with tw_register's release of the generation. */
    uint32_t sgen = LD_ACQ(&SLOT(d, slot)->gen);
    uint32_t n = 0;
    /* Bounded: one pass over the pool. */
    for (uint32_t i = 0; i < d->pool_size && n < max; i++) {
        struct tw_node *nd = NODE(d, i);
        uint64_t o = LD_ACQ(&nd->owner);
        uint32_t st = O_STATE(o);
        if ((st != TW_N_DETACHED && st != TW_N_RUNNING) || O_AUX(o) != slot ||
            LD_RLX(&nd->target_gen) != sgen)
            continue;
        nodes[n] = i;
        gens[n] = O_GEN(o);
        n++;
    }
    return (int)n;
}
