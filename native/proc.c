// SPDX-License-Identifier: MIT
/*
 * proc.c - the process table.
 *
 * Layer: process table. Calls sys, segment, life; reaches the settling of a
 * dead process's entry (reap.c) only through tw_dead_proc_ops.
 *
 * Each process that moves nodes claims one entry: its life lock (held by the
 * process's holder thread) says the process lives, and its intent words say
 * which node a free-list operation in flight is moving (pool.c).
 */
#include "tw_internal.h"

#include <linux/futex.h>
#include <string.h>
#include <unistd.h>

struct tw_dead_proc_ops tw_dead_proc_ops;

/* Take entry i if its life lock can be had: free, or left by a dead process
 * (then what that process held is settled first, see tw_proc_settle). 1: it
 * is ours. */
static int proc_take(struct tw_dom *d, uint32_t i, int pid)
{
    struct tw_proc *p = PROC(d, i);
    int r = tw_life_hold(&p->life);
    if (r < 0)
        return 0;                         /* held by a live process (or corrupt) */
    /* We hold the entry's life lock: nobody else may claim it, and its pid
     * (if any) is a process that died holding it. */
    if (LD_ACQ(&p->pid) != 0) {
        struct tw_reap_info info;
        memset(&info, 0, sizeof(info));
        if (!tw_dead_proc_ops.settle || tw_dead_proc_ops.settle(d, i, 0, &info) < 0) {
            d->my_proc = -1;
            tw_life_release(&p->life);    /* try again later; still dead */
            return 0;
        }
        ADD_RLX(&HDR(d)->procs_reclaimed, 1);
    } else {
        for (int k = 0; k < TW_INTENTS; k++)
            ST_RLX(&p->intent[k], ~0ull);
    }
    tw_killpoint(TW_KP_IN_CLAIM);
    ST_RLX(&p->start_ticks, d->my_start);
    /* Release: the intents reset above are seen by whoever judges the entry
     * by its pid. */
    ST_REL(&p->pid, (uint64_t)pid);
    d->my_proc = (int32_t)i;
    return 1;
}

/*
 * Claim (or find) this process's entry in the process table. The entry holds
 * the intents of free-list operations in flight, so a node popped by a
 * process that then died can be told from one another process is popping.
 * Free entries first; then entries of dead processes, reclaimed here (no
 * fsck needed for a table full of the dead).
 */
int tw_proc_claim(struct tw_dom *d)
{
    if (d->my_proc >= 0)              /* reset to -1 in a forked child */
        return d->my_proc;
    int pid = getpid();
    if (d->my_pid != pid) {
        d->my_pid = pid;
        d->my_start = tw_proc_start_ticks(pid);
    }
    for (uint32_t i = 0; i < d->max_procs; i++) {
        struct tw_proc *p = PROC(d, i);
        /* Free: no pid and nobody holding (or about to store a pid). */
        if (LD_ACQ(&p->pid) == 0 && !(tw_life_word(&p->life) & FUTEX_TID_MASK) &&
            proc_take(d, i, pid))
            return (int)i;
    }
    for (uint32_t i = 0; i < d->max_procs; i++)
        if (tw_proc_dead(d, i) == 1 && proc_take(d, i, pid))
            return (int)i;
    return -EUSERS;
}

void tw_proc_release(struct tw_dom *d)
{
    if (d->my_proc >= 0 && d->my_pid == getpid()) {
        /* Our cached nodes are CACHED in this entry: back to the free list
         * first, or they would name an entry that is no longer ours. */
        tw_pool_cache_flush(d);
        struct tw_proc *p = PROC(d, (uint32_t)d->my_proc);
        /* No operation of ours is in flight, so no intent word is set. The
         * pid goes first: a reader that sees the lock free sees pid 0. */
        ST_RLX(&p->start_ticks, 0);
        ST_REL(&p->pid, 0);
        tw_life_release(&p->life);
    }
    d->my_proc = -1;
}

int tw_proc_info(struct tw_dom *d, uint32_t i, uint64_t *pid, uint64_t *start)
{
    if (i >= d->max_procs)
        return -EINVAL;
    struct tw_proc *p = PROC(d, i);
    *pid = LD_ACQ(&p->pid);
    *start = LD_ACQ(&p->start_ticks);
    return 0;
}

/* 1 if entry i has a free-list operation in flight (an intent word set). */
int tw_proc_busy(struct tw_dom *d, uint32_t i)
{
    if (i >= d->max_procs)
        return -EINVAL;
    for (int k = 0; k < TW_INTENTS; k++)
        if (LD_ACQ(&PROC(d, i)->intent[k]) != ~0ull)
            return 1;
    return 0;
}

