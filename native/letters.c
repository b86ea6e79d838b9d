/*
 * letters.c - a live runner files works as dead letters (README "Workers in
 * production"): works a stopping worker could not run in its drain time
 * (TW_R_SHUTDOWN), and works whose callback raised once their retries were
 * spent (TW_R_FAILED), with the error kept beside the payload.
 *
 * Layer: above the dead-letter list (deadletter.c) and the pool. The
 * runner owns the nodes it detached (DETACHED, aux = its slot) and those whose
 * callback it started (RUNNING): each is filed by a CAS on its owner word
 * from exactly the value the runner left there, so a reaper that finds the
 * runner dead and this call never both file one.
 */
#include "tw_internal.h"

#include <string.h>

int tw_file_taken(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t n,
                  uint32_t reason, const char *errtext, uint32_t errlen, uint32_t attempt)
{
    if (!slot_ok(d, slot) || (reason != TW_R_SHUTDOWN && reason != TW_R_FAILED))
        return -EINVAL;
    struct tw_slot *s = SLOT(d, slot);
    uint64_t name_id = LD_RLX(&s->name_id);
    int filed = 0;
    int r = tw_dl_lock(d);
    if (r)
        return r;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t idx = nodes[k];
        if (!node_ok(d, idx))
            continue;
        struct tw_node *nd = NODE(d, idx);
        /* Acquire: pairs with our own release stores of DETACHED/RUNNING;
         * anything else (a reaper took it) is not ours to file. */
        uint64_t o = LD_ACQ(&nd->owner);
        uint32_t st = O_STATE(o);
        if ((st != TW_N_DETACHED && st != TW_N_RUNNING) || O_AUX(o) != slot)
            continue;
        uint32_t room = d->payload_size > nd->payload_len ? d->payload_size - nd->payload_len : 0;
        uint32_t elen = errtext ? (errlen < room ? errlen : room) : 0;
        if (elen > 0xffff)
            elen = 0xffff;
        /* Written while the node is still ours, before the CAS publishes it
         * as a letter (release in tw_dl_file_locked's list link). */
        if (elen)
            memcpy((char *)nd + d->payload_off + nd->payload_len, errtext, elen);
        nd->note = ((attempt & 0xffff) << 16) | elen;
        /* A failed work filed with no error is filed to be queued again at
         * once (a retry): not its end, so its outcome is not settled. */
        filed += tw_dl_file_locked_ex(d, idx, o, reason, slot, name_id,
                                      !(reason == TW_R_FAILED && errtext == NULL));
    }
    tw_dl_unlock(d);
    return filed;
}

int tw_node_note(struct tw_dom *d, uint32_t node)
{
    if (!node_ok(d, node))
        return -EINVAL;
    return (int)(LD_RLX(&NODE(d, node)->note) & 0x7fffffff);
}

int tw_node_error(struct tw_dom *d, uint32_t node, uint32_t gen, char *out, uint32_t max)
{
    if (!node_ok(d, node))
        return -EINVAL;
    struct tw_node *nd = NODE(d, node);
    uint64_t o = LD_ACQ(&nd->owner);
    if (O_GEN(o) != gen || O_STATE(o) != TW_N_DEADLETTER)
        return -ENOENT;
    uint32_t len = LD_RLX(&nd->payload_len), elen = LD_RLX(&nd->note) & 0xffff;
    /* Every length read from the segment is checked against the node. */
    if (len > d->payload_size || elen > d->payload_size - len)
        return -EUCLEAN;
    if (elen > max)
        elen = max;
    memcpy(out, (char *)nd + d->payload_off + len, elen);
    /* The node changed under us: what we copied is not its error. */
    if (LD_ACQ(&nd->owner) != o)
        return -ENOENT;
    return (int)elen;
}

int tw_slot_counter_add(struct tw_dom *d, uint32_t slot, uint32_t which, uint64_t n)
{
    if (!slot_ok(d, slot) || which > TW_C_INTERRUPTED)
        return -EINVAL;
    uint64_t *c = &SLOT(d, slot)->c.added;
    /* Relaxed: a statistic; readers tolerate a moment's lag. */
    ADD_RLX(&c[which], n);
    return 0;
}
