/*
 * taskwork.h - the kernel's task_work lists, rebuilt over POSIX shared memory:
 * the API. The shared layout, with its synchronization table, is tw_layout.h.
 *
 * Sources, by layer (bottom to top; a file calls only the layers below it,
 * reap.c may call every one):
 *   sys.c         clock, /proc, eventfd, pidfd, futex, tgkill
 *   segment.c     the segment's format and mapping, robust locks with
 *                 deadlines, callback names, fault injection
 *   life.c        liveness: robust "life" locks held for a whole registration
 *                 by one holder thread per process; death is a bit in shared
 *                 memory (FUTEX_OWNER_DIED, written by the kernel)
 *   sigwatch.c    TWA_SIGNAL is never stranded: a watcher thread in a task's
 *                 own process re-sends a signal its handler has not taken
 *   proc.c        the process table
 *   pool.c        the node pool (a tagged Treiber stack)
 *   deadletter.c  the dead letters
 *   keys.c        the key table of keyed adds
 *   task_work.c   the list operations of kernel/task_work.c: registration,
 *                 the add engine (tw_queue), run (detach, the batch path),
 *                 cancel, reading works
 *   reap.c        dead tasks and dead processes: reaping, reclaiming
 *
 * Conventions. Every function returns 0, a count or a bit mask (>= 0), or a
 * negative errno; none prints. A struct tw_dom is one process's view of a
 * mapped domain: its functions may be called from any thread, but the caller
 * serializes calls that change the view itself (tw_map, tw_attach,
 * tw_unmap). Errors common to most calls:
 *   -EINVAL      bad argument (index, mode)
 *   -ESRCH       the task exited, or (slot, gen) is an older registration
 *   -EOWNERDEAD  the task's process died: reap it (tw_reap), then it is ESRCH
 *   -E2BIG       payload larger than the domain's payload_size
 *   -ENOMEM      the pool is empty
 *   -EPERM       not the task's own process
 *   -EUCLEAN     the segment is inconsistent (bad index, walk too long)
 *   -ETIMEDOUT   a lock was not obtained in time (owner stuck or corrupt)
 *   -EUSERS      the process table is full of live processes
 */
#ifndef SHM_TASKWORK_H
#define SHM_TASKWORK_H

#include "tw_layout.h"

/* The process's node cache (pool.c; tw_layout.h TW_N_CACHED): process-local,
 * inside the view. `lock` is 0 or the fork epoch tag of the thread using it;
 * a thread (or a signal handler) that finds it busy uses the shared free list
 * instead. ent[]: gen<<32 | node, each CACHED in entry `proc` with that gen
 * when it was put there (checked by CAS when taken: another process may have
 * taken it since). Zeroed memory is an empty cache. */
struct tw_pool_cache {
    uint32_t lock;
    uint32_t epoch;            /* the fork epoch the contents belong to          */
    int32_t  proc;             /* the process entry the contents are CACHED in   */
    uint32_t n;
    uint64_t ent[TW_CACHE_MAX];
};

/* Process-local view of a mapped domain. Sizes are copied from the header once
 * it is validated; later reads of the segment never change them. */
struct tw_dom {
    char    *base;
    uint64_t size;
    uint32_t max_tasks, pool_size, payload_size, node_size, max_procs, names_cap;
    uint32_t record_origin;
    uint32_t origin_off;       /* offset of origin inside a node                 */
    uint32_t payload_off;      /* offset of payload inside a node                */
    int32_t  my_proc;          /* this process's proc index, or -1               */
    int32_t  my_pid;
    uint64_t my_start;
    uint64_t slots_off, procs_off, names_off, nodes_off;
    int64_t  lock_timeout_ns;
    uint32_t out_cap, out_rec_size;   /* the outcome ring (tw_layout.h)          */
    uint64_t out_off;
    struct tw_pool_cache cache;       /* free nodes this process holds (pool.c)  */
};

/* What a reader gets for one work (copied out while the node is owned). */
struct tw_work_info {
    uint32_t node;
    uint32_t gen;
    uint64_t func_id;
    uint64_t enqueued_ns;
    int32_t  sender_pid;
    uint32_t target;
    uint32_t target_gen;
    uint32_t payload_len;
    uint32_t origin_len;
    uint32_t state;
    uint32_t reason;
    uint64_t name_id;
};

/* What one tw_reap / tw_proc_reclaim did. */
struct tw_reap_info {
    uint32_t orphaned;         /* works filed as dead letters (reason ORPHANED)  */
    uint32_t interrupted;      /* started works, now ALLOC by the caller         */
    uint32_t cancelled;        /* unlinked by a canceller that died              */
    uint32_t leaked;           /* never pushed: back to the pool                 */
    uint32_t settled;          /* pushed by a dead adder: left queued            */
    uint32_t refiled;          /* a dead re-queuer's dead letter, filed again    */
};

/* ======================================================================== */
/* sys.c                                                                     */

/**
 * tw_proc_start_ticks() - when process @pid started.
 * @pid: a process id.
 *
 * Context: any. Return: field 22 of /proc/@pid/stat (clock ticks since boot),
 * or 0 if it cannot be read (no such process).
 */
uint64_t tw_proc_start_ticks(int pid);
/**
 * tw_eventfd_write() - add 1 to an eventfd.
 * @efd: the eventfd.
 *
 * Context: async-signal-safe. Return: 0 (also when the counter is full: it
 * is readable already), or -errno.
 */
int  tw_eventfd_write(int efd);
/**
 * tw_eventfd_drain() - read an eventfd (non-blocking) to zero.
 * @efd: the eventfd, opened O_NONBLOCK.
 *
 * Return: 1 if it was readable, 0 if not, or -errno.
 */
int  tw_eventfd_drain(int efd);
/**
 * tw_pidfd_send() - pidfd_send_signal(2).
 * @pidfd: the process's pidfd. @signum: the signal.
 *
 * Return: 0, or -errno.
 */
int  tw_pidfd_send(int pidfd, int signum);
/**
 * tw_pidfd_getfd() - pidfd_getfd(2): a copy of another process's descriptor.
 * @pidfd: the process's pidfd. @targetfd: its descriptor number.
 *
 * Return: the new descriptor (the caller closes it), or -errno.
 */
int  tw_pidfd_getfd(int pidfd, int targetfd);

/* ======================================================================== */
/* segment.c                                                                 */

/**
 * tw_layout_size() - bytes a domain of these sizes needs.
 * @max_tasks, @pool_size, @payload_size, @max_procs, @names_cap: the sizes.
 * @record_origin: 1 if every node keeps an origin of TW_ORIGIN_LEN bytes.
 * @outcomes: outcome records kept (the ring of tw_layout.h, "outcome records").
 *
 * Return: the size in bytes (the caller checks the limits with tw_format).
 */
uint64_t tw_layout_size(uint32_t max_tasks, uint32_t pool_size, uint32_t payload_size,
                        uint32_t max_procs, uint32_t names_cap, uint32_t record_origin,
                        uint32_t outcomes);
/**
 * tw_outcome_rec_size() - bytes of one outcome record for @payload_size.
 * @payload_size: the domain's payload size (a result has as much room).
 *
 * Return: sizeof(struct tw_outcome) + @payload_size, rounded up to 64.
 */
uint32_t tw_outcome_rec_size(uint32_t payload_size);
/**
 * tw_format() - lay out a new domain in @base.
 * @base: zeroed memory of at least tw_layout_size() bytes, not yet visible
 *        under the domain's name. @size: its size.
 * @max_tasks ... @outcomes: as tw_layout_size(). @now_ns: creation time.
 *
 * Writes the header (the magic last), the slots, the process table, the
 * name table and the free list of every node; initializes the robust locks.
 * Context: the creator alone. Return: 0, -EINVAL (a size out of its limits,
 * or @size too small), or -errno from a lock's initialization.
 */
int  tw_format(void *base, uint64_t size, uint32_t max_tasks, uint32_t pool_size,
               uint32_t payload_size, uint32_t max_procs, uint32_t names_cap,
               uint32_t record_origin, uint32_t outcomes, uint64_t now_ns);
/**
 * tw_map() - map the domain in descriptor @fd and validate it (tw_attach).
 * @d: the view to fill. @fd: the shared-memory object. @size: its size.
 *
 * Return: 0, -EUCLEAN/-EPROTO as tw_attach(), or -errno from mmap.
 */
int  tw_map(struct tw_dom *d, int fd, uint64_t size);
/**
 * tw_attach() - validate a mapped domain and fill the view @d.
 * @d: the view. @base: the mapping. @size: its size.
 *
 * Every size in the header is checked against its limit and against @size;
 * @d keeps copies, so later scribbles on the header cannot move its bounds.
 * Return: 0, -EPROTO (another layout version), -EUCLEAN (bad magic, sizes
 * or offsets).
 */
int  tw_attach(struct tw_dom *d, void *base, uint64_t size);
/**
 * tw_layout_version() - TW_LAYOUT_VERSION of this build.
 */
uint32_t tw_layout_version(void);
/**
 * tw_node_header_size() - sizeof(struct tw_node) in this build.
 */
uint32_t tw_node_header_size(void);
/**
 * tw_name_put() - record callback name @name under @id in the name table.
 * @d: the domain. @id: the name's id (non-zero). @name, @len: the name.
 *
 * Return: 0 (recorded, or already there), -EINVAL (@id 0), -ENAMETOOLONG
 * (@len >= TW_FUNC_NAME_LEN), -ENOSPC (the table is full).
 */
int  tw_name_put(struct tw_dom *d, uint64_t id, const char *name, uint32_t len);
/**
 * tw_name_get() - the callback name recorded under @id.
 * @d: the domain. @id: the id. @out, @cap: where the name goes.
 *
 * Return: its length, -EINVAL, or -ENOENT (not recorded, or not whole yet).
 */
int  tw_name_get(struct tw_dom *d, uint64_t id, char *out, uint32_t cap);
/**
 * tw_name_set_codec() - record the codec callback @id declares (TW_CODEC_*).
 * @d: the domain. @id: a name already recorded by tw_name_put().
 * @codec: TW_CODEC_JSON, TW_CODEC_PICKLE or TW_CODEC_MSGPACK.
 *
 * The first declaration wins: a name takes a codec once (CAS from
 * TW_CODEC_RAW) and keeps it for the life of the segment.
 *
 * Return: the codec the name has after the call - @codec if this call
 * recorded it or it was there already, another one if a process declared
 * that one first - or -EINVAL (@id 0, @codec raw or unknown), -ENOENT (the
 * name is not recorded, or not whole yet), -EUCLEAN (the recorded codec is
 * no TW_CODEC_* value: scribbled).
 */
int  tw_name_set_codec(struct tw_dom *d, uint64_t id, uint32_t codec);
/**
 * tw_name_codec() - the codec recorded for callback @id.
 * @d: the domain. @id: the name's id.
 *
 * Return: TW_CODEC_* (TW_CODEC_RAW: none declared), -EINVAL (@id 0),
 * -ENOENT (the name is not recorded), -EUCLEAN (not a TW_CODEC_* value).
 */
int  tw_name_codec(struct tw_dom *d, uint64_t id);
/**
 * tw_fsck_lock() - take the domain's fsck lock (one repairing fsck at a time).
 * @d: the domain.
 *
 * Return: 0, -ETIMEDOUT, or -EUCLEAN (the lock was scribbled). A lock whose
 * holder died is taken over.
 */
int  tw_fsck_lock(struct tw_dom *d);
/**
 * tw_fsck_unlock() - release the fsck lock taken by tw_fsck_lock().
 */
void tw_fsck_unlock(struct tw_dom *d);
/**
 * tw_killpoint_set() - arm a kill point (fault injection) in this process.
 * @point: TW_KP_*. @countdown: the pass that kills (1: the next one); a
 * negative one stops the process (SIGSTOP) there instead of killing it.
 */
void tw_killpoint_set(int point, int64_t countdown);
/**
 * tw_killpoint_get() - the armed kill point (TW_KP_NONE if none).
 */
int  tw_killpoint_get(void);
/**
 * tw_killpoint() - pass kill point @point: the armed pass SIGKILLs (or
 * SIGSTOPs) this process. Context: async-signal-safe.
 */
void tw_killpoint(int point);

/* ======================================================================== */
/* life.c                                                                    */

/**
 * tw_unmap() - let go of every life lock this process holds in @d, then
 * unmap it.
 * @d: the view (its base is NULL afterwards).
 *
 * Context: no other thread uses @d any more (tw_sigwatch_del() first).
 */
void tw_unmap(struct tw_dom *d);
/**
 * tw_slot_dead() - did the task in @slot die (and was not reaped yet)?
 * @d: the domain. @slot: the slot.
 *
 * One acquire load of the slot's life word. Return: 1 dead (or being
 * reaped), 0 alive, free or exited, -EINVAL.
 */
int  tw_slot_dead(struct tw_dom *d, uint32_t slot);
/**
 * tw_proc_dead() - did the process of process-table entry @i die holding it?
 * @d: the domain. @i: the entry.
 *
 * Return: 1 dead, 0 alive or free, -EINVAL.
 */
int  tw_proc_dead(struct tw_dom *d, uint32_t i);

/* ======================================================================== */
/* sigwatch.c: TWA_SIGNAL is never stranded
 *
 * A signal sent to a task is *owed* while NOTIFY_SIGNAL is set, the task's
 * handler has not acknowledged it (c.sig_ack != the signal sequence the
 * arming adder stepped in the flags word, tw_layout.h) and works are queued.
 * The watcher, a thread of the task's own process with every signal
 * blocked, sends an owed signal again to the thread that runs the handler
 * (tgkill) once it has been owed for TW_SIG_RESEND_NS, then after intervals
 * that double up to TW_SIG_RESEND_MAX_NS: never a storm.
 */
#define TW_SIG_RESEND_NS      20000000LL    /* 20 ms                             */
#define TW_SIG_RESEND_MAX_NS  1000000000LL  /* 1 s                               */
#define TW_SIG_TICK_NS        10000000LL    /* the watcher's poll while armed    */
#define TW_SIG_LINGER_NS      1000000000LL  /* idle this long: sleep on a futex  */
#define TW_SIG_WATCH_MAX      64            /* watched slots per process         */

/**
 * tw_sig_ack() - the task's signal handler took the signals sent so far (it
 * stores the sequence in the flags word).
 * @d: the domain. @slot: the task's slot. @ok: 1 at the handler's entry; 0
 * when the handler could not run the list (a lock timeout, an error): the
 * signal stays owed and the watcher sends it again.
 *
 * Context: async-signal-safe (loads and one store). Return: 0, or -EINVAL.
 */
int  tw_sig_ack(struct tw_dom *d, uint32_t slot, int ok);
/**
 * tw_sig_owed() - is a signal owed to the task right now (the watcher's
 * verdict: NOTIFY_SIGNAL set, the sequence not acknowledged, works queued)?
 * @d: the domain. @slot: the task's slot.
 *
 * Context: any process; loads only. Return: 1 owed, 0 not, or -EINVAL.
 */
int  tw_sig_owed(struct tw_dom *d, uint32_t slot);
/**
 * tw_sigwatch_add() - watch a slot of this process's for owed signals.
 * @d: the domain (stays mapped until tw_sigwatch_del()). @slot, @gen: the
 * registration. @signum: its signal. @tid: the thread to signal (the one
 * Python runs handlers in: the main thread).
 *
 * Starts the watcher thread on first use (every signal blocked). Return: 0,
 * -EINVAL (bad slot or signal), -ENOSPC (TW_SIG_WATCH_MAX slots watched),
 * -errno from pthread_create.
 */
int  tw_sigwatch_add(struct tw_dom *d, uint32_t slot, uint32_t gen, int signum, int tid);
/**
 * tw_sigwatch_del() - stop watching a slot of @d (every slot of @d if @slot
 * is UINT32_MAX).
 *
 * When it returns the watcher no longer reads the slot: the caller may unmap
 * the domain. Waits for the watcher at most ~1 s. Return: the number of
 * entries removed.
 */
int  tw_sigwatch_del(struct tw_dom *d, uint32_t slot);

/* ======================================================================== */
/* proc.c: the process table                                                 */

/**
 * tw_proc_claim() - this process's entry in the process table.
 * @d: the domain.
 *
 * Claims one on first use (a free entry, else one a dead process left,
 * settled first); every pop or push of the pool needs it. A forked child
 * claims its own.
 * Return: the entry's index, or -EUSERS (every entry held by a live process).
 */
int  tw_proc_claim(struct tw_dom *d);
/**
 * tw_proc_release() - give back this process's entry: its node cache to the
 * free list, then pid, then its life lock. Context: no pool operation of
 * this process is in flight.
 */
void tw_proc_release(struct tw_dom *d);
/**
 * tw_proc_info() - pid and start time recorded in entry @i.
 * @d: the domain. @i: the entry. @pid, @start: filled (pid 0: free).
 *
 * Return: 0, or -EINVAL.
 */
int  tw_proc_info(struct tw_dom *d, uint32_t i, uint64_t *pid, uint64_t *start);
/**
 * tw_proc_busy() - has entry @i a free-list operation in flight (an intent)?
 *
 * Return: 1, 0, or -EINVAL.
 */
int  tw_proc_busy(struct tw_dom *d, uint32_t i);

/* ======================================================================== */
/* pool.c: the node pool                                                     */

/*
 * Allocation goes through a per-process node cache (tw_layout.h "the
 * per-process node cache"): nodes a process holds there are CACHED in its
 * entry's name and count as free; any process whose pool is otherwise empty
 * may take them. The cache is given back by tw_proc_release().
 */
/**
 * tw_pool_free_count() - nodes free, CACHED (in a process's node cache) or
 * DONE (run, on their way back).
 *
 * A racy count (statistics). Return: the count.
 */
int  tw_pool_free_count(struct tw_dom *d);
/**
 * tw_node_state() - the owner word of @node.
 * @d: the domain. @node: the node. @owner_out: gen<<32 | state<<24 | aux.
 *
 * Return: 0, or -EINVAL.
 */
int  tw_node_state(struct tw_dom *d, uint32_t node, uint64_t *owner_out);
/**
 * tw_free_node() - give back to the pool a node the caller owns (ALLOC by
 * this process: an interrupted work after tw_reap(), a leak tw_free_leaks()
 * found).
 *
 * Return: 0, or -EINVAL.
 */
int  tw_free_node(struct tw_dom *d, uint32_t node);
/**
 * tw_free_leaks() - FREE nodes on no free list that no live process moves.
 * @d: the domain. @proc_dead: per process entry, 1 if its intents do not
 * protect anything (NULL: all do). @out, @max: the nodes found.
 * @tries: walks attempted before giving up on a free list that never holds
 * still.
 *
 * Context: hold the fsck lock. Return: the number found, -EAGAIN (the list
 * never held still), -EUCLEAN (the free list is broken), -ENOMEM.
 */
int  tw_free_leaks(struct tw_dom *d, const uint8_t *proc_dead, uint32_t *out, uint32_t max,
                   uint32_t tries);
/**
 * tw_scan_owners() - copy every node's owner word into @out (pool_size of
 * them). Return: pool_size.
 */
int  tw_scan_owners(struct tw_dom *d, uint64_t *out);

/* ======================================================================== */
/* deadletter.c                                                              */

/**
 * tw_dl_list() - the dead letters, newest first.
 * @d: the domain. @out, @max: the nodes (at most @max written).
 *
 * Context: takes dl_lock. Return: the number of dead letters (may exceed
 * @max), -ETIMEDOUT, -EUCLEAN.
 */
int  tw_dl_list(struct tw_dom *d, uint32_t *out, uint32_t max);
/**
 * tw_dl_take() - unlink dead letter (@node, @gen) and make it the caller's
 * (ALLOC), keeping its reason: should the caller die holding it, it goes
 * back to the dead letters, never to the pool.
 *
 * Return: 1 taken, 0 not there (taken by someone else), -EINVAL, -EUSERS,
 * -ETIMEDOUT, -EUCLEAN.
 */
int  tw_dl_take(struct tw_dom *d, uint32_t node, uint32_t gen);
/**
 * tw_dl_done() - a taken dead letter is done.
 * @d: the domain. @node: a node tw_dl_take() gave the caller.
 * @outcome: TW_OUT_UNKNOWN files it again (its callback is still unknown
 * here); anything else gives it back to the pool.
 *
 * Return: 0, -EINVAL, -EUCLEAN (not the caller's), -ETIMEDOUT.
 */
int  tw_dl_done(struct tw_dom *d, uint32_t node, int outcome);

/* ======================================================================== */
/* keys.c: the key table of keyed adds (see tw_layout.h)                     */

/**
 * tw_key_lookup() - what the key table says of @key.
 * @d: the domain. @key: the key. @info: filled when recorded.
 *
 * A RESERVED entry is resolved: a dead reserver's process entry is
 * reclaimed, which settles it.
 * Return: 1 (@info filled: QUEUED or DEADLETTER), 0 unknown or VOID,
 * -EBUSY (a live process is adding it), -errno.
 */
int  tw_key_lookup(struct tw_dom *d, uint64_t key, struct tw_key_info *info);
/**
 * tw_keys_used() - key entries that are neither EMPTY nor VOID.
 */
int  tw_keys_used(struct tw_dom *d);

/* ======================================================================== */
/* task_work.c: tasks                                                        */

/**
 * tw_register() - register the calling process as a task.
 * @d: the domain. @name: the task's name (NULL: none). @name_id: its id in
 * the name table. @signum: its TWA_SIGNAL signal. @efd: its eventfd (a
 * descriptor number in this process). @uid: its user. @now_ns: now.
 * @gen_out: the registration's generation.
 *
 * Claims a FREE or EXITED slot: its life lock first (held for the whole
 * registration by this process's holder thread), then the fields, then a
 * new head (new generation, empty list) and RUNNING.
 * Return: the slot, -ENOSPC (no free slot), -EUSERS.
 */
int  tw_register(struct tw_dom *d, const char *name, uint64_t name_id, int32_t signum,
                 int32_t efd, uint32_t uid, uint64_t now_ns, uint32_t *gen_out);
/**
 * tw_slot_check() - does (@slot, @gen) take work (its head is open)?
 *
 * Return: 0, -ESRCH, -EINVAL.
 */
int  tw_slot_check(struct tw_dom *d, uint32_t slot, uint32_t gen);
/**
 * tw_release_slot() - after exit (the head holds the exited sentinel): the
 * slot becomes EXITED and its life lock is let go; it may be claimed again.
 *
 * Context: the task's own process. Return: 0, -EINVAL, -ESRCH.
 */
int  tw_release_slot(struct tw_dom *d, uint32_t slot, uint32_t gen);
/**
 * tw_flags_get() - the slot's flags (TW_F_*), acquire. 0 for a bad slot.
 */
uint32_t tw_flags_get(struct tw_dom *d, uint32_t slot);
/**
 * tw_flags_set() - fetch_or @bits into the slot's flags (acq_rel).
 * Return: the old flags (0 for a bad slot).
 */
uint32_t tw_flags_set(struct tw_dom *d, uint32_t slot, uint32_t bits);
/**
 * tw_flags_clear() - fetch_and ~@bits on the slot's flags (acq_rel). The
 * runner clears NOTIFY_* before it detaches: an adder that pushes after the
 * detach sees the bit clear and notifies again.
 * Return: the old flags (0 for a bad slot).
 */
uint32_t tw_flags_clear(struct tw_dom *d, uint32_t slot, uint32_t bits);

/* ======================================================================== */
/* task_work.c: add                                                          */

/* What an add reports back (bit mask, >= 0). */
#define TW_DUE_EVENTFD        0x1  /* NOTIFY_RESUME went 0->1: write the eventfd   */
#define TW_DUE_SIGNAL         0x2  /* NOTIFY_SIGNAL went 0->1: send the signal     */
#define TW_DONE_EVENTFD       0x4  /* ...and the add wrote it itself               */
#define TW_DONE_SIGNAL        0x8  /* ...and the add sent it itself                */

/*
 * The lean add: what never changes for a handle is packed once in a
 * struct tw_handle (the caller keeps it; the native side only reads it).
 */
struct tw_handle {
    struct tw_dom *d;
    uint32_t slot, gen;
    int32_t  signum, own_efd;
    int32_t  current;          /* 1: this process is the task's registrant:
                                  notify through own_efd (TWA_NMI_CURRENT ok) */
    int32_t  efd, pidfd;       /* another process's task: its eventfd and pidfd
                                  as this process holds them (-1: none yet)     */
    int32_t  pad;
};
/*
 * The add engine: every add entry point below is tw_queue() with one of
 * these requests. Fields a path does not use stay zero, except src (TW_NIL:
 * no source node), efd and pidfd (-1: none).
 */
/* Track each work's outcome (add(..., track=True)): the flags argument of
 * tw_add_h and tw_add_many_flat; OR-ed into the is_current argument of
 * tw_add, tw_add_many and tw_add_keyed. Not a notify flag: those are the
 * kernel's. */
#define TW_ADD_TRACK    2
/* OR-ed into tw_requeue's is_current by a runner queueing again a work whose
 * callback raised (a retry: it is not the work's end, so its outcome is not
 * settled; the waiter follows it). Without it a re-queued letter's outcome
 * stays final and names the new work (retried_as). */
#define TW_ADD_RETRY    4

struct tw_add_req {
    uint32_t slot, gen;        /* the target registration                       */
    uint64_t func_id;
    /* the payloads: one (payload, len); count of them (payloads[i], lens[i]);
     * or one flat buffer (payload, offs[0..count]: payload i is
     * payload[offs[i] .. offs[i+1])) */
    const char *payload;
    uint32_t len;
    uint32_t count;            /* with payloads or offs                         */
    const char *const *payloads;
    const uint32_t *lens;
    const uint32_t *offs;
    int32_t  notify;           /* TWA_* | TWAF_*                                */
    int32_t  is_current;       /* the caller's own task (TWA_NMI_CURRENT)       */
    const char *origin;        /* recorded if the domain records origins        */
    uint32_t origin_len;
    int32_t  efd, pidfd, signum;  /* how to notify: -1 = leave it to the caller */
    uint64_t now_ns;           /* the enqueue time; 0: read the clock           */
    uint64_t key;              /* with key_info: queue at most once per key     */
    struct tw_key_info *key_info;
    uint32_t to_deadletter;    /* file as a dead letter (needs a key), no task  */
    uint32_t src;              /* re-queue the dead letter (src, src_gen);      */
    uint32_t src_gen;          /*   TW_NIL: take new nodes from the pool        */
    uint32_t track;            /* record each work's outcome (TW_T_TRACKED)     */
    uint32_t retry;            /* src: a runner's retry (TW_ADD_RETRY)          */
    uint32_t pad;
    uint64_t name_id;          /* to_deadletter: the task name's id             */
    uint64_t *work_ids_out;    /* gen<<32 | node of each work (count of them)   */
};
/**
 * tw_queue() - queue works on a task (or file one as a dead letter).
 * @d: the domain.
 * @r: the request (see struct tw_add_req).
 *
 * Checks the notify mode and the payload sizes, checks that the target
 * takes work, takes the nodes (or the dead letter @r->src), fills them,
 * records the key, pushes them with one lock-free CAS, and notifies. A
 * failure after the nodes were taken gives them back (or files the dead
 * letter again, or voids the key): nothing queued, nothing leaked.
 *
 * Context: any thread of any process; lock-free unless @r has a key
 * (keys_lock) or a source node (dl_lock). Async-signal-safe for one
 * payload, no key, no source node, on the caller's own task whose process
 * entry is claimed (tw_add_nmi()).
 * Return: (gen << 28) | (node << 4) | TW_DUE_*|TW_DONE_* of the newest work
 * (the work id gen<<32|node comes back in the return value, so the hot path
 * has no out-parameter a signal handler could overwrite); 0 for count 0 or
 * for a key recorded before (@r->key_info says what and where); -EINVAL,
 * -E2BIG, -ESRCH, -EOWNERDEAD, -ENOMEM, -EUSERS, -ENOENT (the dead letter is
 * gone), -EBUSY or -ENOSPC (key table), -ETIMEDOUT.
 */
int64_t tw_queue(struct tw_dom *d, const struct tw_add_req *r);
/**
 * tw_add() - task_work_add(): queue one work on (@slot, @gen).
 * @d: the domain. @slot, @gen: the task. @func_id: the callback's name id.
 * @payload, @len: the payload. @notify: TWA_* | TWAF_* (TWAF_NO_ALLOC: no
 * origin). @origin, @origin_len: where it was added (if recorded).
 * @efd, @pidfd: the task's eventfd / pidfd in this process (-1: the caller
 * notifies, as the TW_DUE_* bits say). @signum: the task's signal.
 * @now_ns: enqueue time (0: read the clock). @is_current: the caller's own
 * task (TWA_NMI_CURRENT needs it).
 *
 * Context: any thread of any process; lock-free. Return: as tw_queue().
 */
int64_t tw_add(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
               const char *payload, uint32_t len, int notify, const char *origin,
               uint32_t origin_len, int efd, int pidfd, int signum, uint64_t now_ns,
               int is_current);
/**
 * tw_add_h() - tw_add() through a handle: the lean add. No origin; how to
 * notify is the handle's (own_efd when current, else efd/pidfd).
 * @func_id: the callback id as a signed 64-bit value (the same bits: Python
 * converts a signed int without the slow path an unsigned one takes).
 * @flags: 0 or TW_ADD_TRACK. @now_ns: the enqueue time (0: read the clock).
 *
 * Context: as tw_add(). Return: as tw_add(); -EBADF if the handle's domain
 * was closed (h->d NULL).
 */
int64_t tw_add_h(const struct tw_handle *h, int64_t func_id, const char *payload,
                 uint32_t len, int notify, int flags, int64_t now_ns);
/**
 * tw_add_many() - queue @n works with one push and one notification.
 * @payloads, @lens: payload i. @work_ids_out: gen<<32 | node of work i.
 * The other arguments as tw_add(). One clock read for the batch.
 *
 * All or nothing: payload n-1 ends at the head, as if each had been added
 * in order. Return: the TW_DUE_*|TW_DONE_* bits (0 for @n 0), or -errno as
 * tw_add() (nothing queued).
 */
int  tw_add_many(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
                 const char *const *payloads, const uint32_t *lens, uint32_t n,
                 int notify, const char *origin, uint32_t origin_len, int efd,
                 int pidfd, int signum, uint64_t now_ns, int is_current,
                 uint64_t *work_ids_out);
/**
 * tw_add_many_flat() - tw_add_many() through a handle, from one flat
 * buffer: payload i is @buf[@offs[i] .. @offs[i+1]). Notified as
 * tw_add_h(); @func_id, @flags and @now_ns as tw_add_h().
 *
 * Return: as tw_add_many(); -EINVAL if an offset goes backwards.
 */
int  tw_add_many_flat(const struct tw_handle *h, int64_t func_id, const char *buf,
                      const uint32_t *offs, uint32_t n, int notify, int flags,
                      int64_t now_ns, uint64_t *work_ids_out);
/**
 * tw_add_nmi() - TWA_NMI_CURRENT: queue on the caller's own task from a
 * signal handler: RESUME flag, and the write of @efd.
 * @work_id_out: gen<<32 | node (may be NULL).
 *
 * Context: async-signal-safe: no lock, no allocation beyond the lock-free
 * pool, no stdio. The process entry was claimed at registration.
 * Return: the TW_DUE_*|TW_DONE_* bits, -EINVAL (not this process's task),
 * or -errno as tw_add().
 */
int  tw_add_nmi(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
                const char *payload, uint32_t len, int efd, uint64_t now_ns,
                uint64_t *work_id_out);
/**
 * tw_add_keyed() - tw_add(), at most once per @key across the adder's own
 * death: (key -> node) is recorded in the key table before the push.
 * @key: non-zero. @info: what the table says (fresh: this call queued it).
 *
 * Return: the TW_DUE_*|TW_DONE_* bits (fresh), 0 (recorded before: @info
 * says what and where), -EINVAL (@key 0), -EBUSY (a live process is adding
 * this key right now), -ENOSPC (every ring entry is RESERVED), or -errno as
 * tw_add().
 */
int64_t tw_add_keyed(struct tw_dom *d, uint64_t key, uint32_t slot, uint32_t gen,
                     uint64_t func_id, const char *payload, uint32_t len, int notify,
                     int efd, int pidfd, int signum, uint64_t now_ns, int is_current,
                     struct tw_key_info *info);
/**
 * tw_deadletter_keyed() - file a work as a dead letter (reason ORPHANED,
 * task name @name_id), at most once per @key.
 *
 * Return: 1 filed, 0 recorded before (@info), -EINVAL, -E2BIG, -EBUSY,
 * -ENOSPC, -EAGAIN (the node changed hands while filed), -errno.
 */
int  tw_deadletter_keyed(struct tw_dom *d, uint64_t key, uint64_t func_id, const char *payload,
                         uint32_t len, uint64_t name_id, uint64_t now_ns,
                         struct tw_key_info *info);
/**
 * tw_requeue() - queue dead letter (@node, @gen) on (@slot, @tgen), with a
 * new generation (a new work id), exactly once: the take is exclusive, and
 * the node keeps its dead-letter reason until the push.
 *
 * Return: as tw_add(); -ENOENT (taken by someone else); -ESRCH or
 * -EOWNERDEAD when the target takes no work (the dead letter is filed
 * again).
 */
int64_t tw_requeue(struct tw_dom *d, uint32_t node, uint32_t gen, uint32_t slot, uint32_t tgen,
                   int notify, int efd, int pidfd, int signum, uint64_t now_ns, int is_current);

/* ======================================================================== */
/* task_work.c: run                                                          */

/* outcome of a finished work */
#define TW_OUT_OK       0
#define TW_OUT_ERROR    1
#define TW_OUT_UNKNOWN  2  /* callback unknown here: the node goes to the dead letters */

/**
 * tw_detach() - task_work_run()'s first half: take the whole list.
 * @d: the domain. @slot, @gen: the caller's own task. @out, @max: the
 * batch, newest first.
 *
 * An empty list needs no lock (an EXITING task's is closed with the exited
 * sentinel: later adds fail with -ESRCH). A non-empty one is taken under
 * pi_lock, each node marked DETACHED before the head lets go of it.
 * Context: the task's own process. Return: the count, -EPERM, -ESRCH,
 * -ETIMEDOUT (nothing taken), -EUCLEAN.
 */
int  tw_detach(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *out, uint32_t max);
/**
 * tw_step() - finish @done, a RUNNING work of @slot whose callback ran
 * outside the batch run path (an async callback), or that is unknown here.
 * @outcome: TW_OUT_OK or TW_OUT_ERROR (freed and counted), TW_OUT_UNKNOWN
 * (filed as a dead letter, reason UNKNOWN). @next: TW_NIL. @done TW_NIL:
 * nothing to do. @wi, @payload_out, @origin_out: unused.
 *
 * Context: the task's runner. Return: 0, -EINVAL, -EUCLEAN (@done is not a
 * RUNNING work of @slot), -ETIMEDOUT (dl_lock: nothing done).
 */
int  tw_step(struct tw_dom *d, uint32_t slot, uint32_t done, int outcome,
             uint32_t next, struct tw_work_info *wi, char *payload_out, char *origin_out);

/*
 * The batch run path: one native call loads a batch, the caller runs its
 * callbacks with no native call per work, one native call finishes it.
 *
 * tw_run_load copies what the callbacks need out of nodes[0..k) (DETACHED,
 * this slot: the caller's own, detached by tw_detach) into rec[] (TW_REC_WORDS
 * words per work, as arrays: field f of work i at rec[f * k + i], so that the
 * caller converts only the arrays it needs), the payloads into parea (work i
 * at rec[POFF*k + i] .. rec[POFF*k + i + 1]) and the origins into oarea
 * (TW_ORIGIN_LEN each); it counts the enqueue-to-start latency with one
 * clock read for the whole batch and zeroes outcome[0..k). Nothing changes
 * state: the works stay DETACHED, not started.
 *
 * The caller then starts each work by storing its RUNNING word into the
 * segment's word at its OWNER_AT (a 64-bit index from the base): the
 * DETACHED -> RUNNING transition, one aligned 8-byte store on a node only
 * the runner may change while the task lives (x86-64: a plain store is a
 * release store; elsewhere the caller uses tw_run_start). From then on the
 * work counts as started: a reaper reports it interrupted, a not yet started
 * one orphaned. When its callback returns the caller stores RUNNING +
 * TW_DONE_DELTA (RUNNING -> DONE): the node counts free from then on
 * (stats), and a reaper gives it back without reporting it. Release again:
 * the callback's effects come first.
 *
 * tw_run_finish ends nodes[0..k): each RUNNING or DONE node of this slot
 * whose outcome is TW_OUT_OK or TW_OUT_ERROR is counted and returned to the
 * pool; TW_OUT_SKIP and TW_OUT_UNKNOWN nodes are left alone (not started;
 * scheduled on a loop; or to be filed as a dead letter through tw_step).
 * end_ns[i], if given, is when work i's callback returned (its start: the
 * previous one's end); without it each work is counted the batch's mean
 * duration.
 */
#define TW_REC_WORDS    8
#define TW_REC_ID       0   /* gen<<32 | node: the work id                    */
#define TW_REC_FUNC     1
#define TW_REC_ENQ      2
#define TW_REC_SENDER   3   /* tracked<<62 | origin_len<<32 | sender_pid (origin at
                               i * TW_ORIGIN_LEN); tracked: its outcome is
                               recorded (tw_settle before its DONE store) */
#define TW_REC_OWNER_AT 4   /* the node's owner word, in 64-bit words from base */
#define TW_REC_RUNNING  5   /* the owner value that makes it RUNNING          */
#define TW_REC_POFF     6   /* payload offsets in parea: k + 1 of them        */
#define TW_OUT_SKIP     3
#define TW_DONE_DELTA   ((TW_N_DONE - TW_N_RUNNING) << 24)
/**
 * tw_run_load() - copy a detached batch out for its callbacks (see above).
 * @d: the domain. @slot: the caller's own task. @nodes, @k: the batch.
 * @rec: TW_REC_WORDS * @k + 2 words; rec[TW_REC_WORDS * @k + 1] receives the
 * number of tracked works in the batch. @parea: room for @k payloads.
 * @oarea: @k * TW_ORIGIN_LEN bytes, or NULL (no origins). @outcome: @k.
 *
 * Context: the task's runner. Return: @k, -EINVAL, -EUCLEAN (a node is
 * not DETACHED for @slot; nothing is loaded after it).
 */
int  tw_run_load(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t k,
                 uint64_t *rec, char *parea, char *oarea, uint8_t *outcome);
/**
 * tw_run_start() - DETACHED -> RUNNING for @node with a release store, for
 * machines where a plain store is not one.
 *
 * Return: 0, or -EUCLEAN (not DETACHED for @slot).
 */
int  tw_run_start(struct tw_dom *d, uint32_t slot, uint32_t node);
/**
 * tw_run_start_many() - tw_run_start() for @nodes[0..@k) (a batch
 * callback's works): all, or none if one is not DETACHED here.
 *
 * Return: @k, -EINVAL, or -EUCLEAN (none started).
 */
int  tw_run_start_many(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t k);
/**
 * tw_run_finish() - end a batch (see above).
 * @outcome: per work, TW_OUT_*. @end_ns: per work, when its callback
 * returned, or NULL.
 *
 * Return: the number of works finished, -EINVAL, or -EUCLEAN if a node was
 * not ours (those are left alone; the rest is finished).
 */
int  tw_run_finish(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t k,
                   const uint8_t *outcome, const uint64_t *end_ns);

/* ======================================================================== */
/* outcome.c: what became of a tracked work (tw_layout.h "outcome records")  */

/* What a reader gets of one outcome. */
struct tw_outcome_info {
    uint64_t work;             /* the id asked about                             */
    uint64_t retried_as;       /* the id it was queued again as, or 0            */
    uint64_t settled_ns;       /* CLOCK_MONOTONIC; 0 while not settled           */
    uint32_t outcome;          /* TW_O_*                                         */
    uint32_t len;              /* bytes copied to data: result or error text     */
    uint32_t slot;             /* the task it was for                            */
    uint32_t reason;           /* TW_R_* of a dead letter; for ran, 1 if it has a
                                  result (data, maybe empty)                     */
};

/**
 * tw_outcome_final() - is @outcome one a work ends in?
 * @outcome: TW_O_*.
 *
 * Return: 1 for ran, failed, cancelled, dead_letter and interrupted; 0 for
 * pending, running and retried.
 */
int  tw_outcome_final(uint32_t outcome);
/**
 * tw_outcome_read() - the outcome of tracked work @work, now.
 * @d: the domain. @work: gen<<32 | node. @oi: filled. @data, @cap: room for
 * the result or error text (up to payload_size bytes).
 *
 * Lock-free: the node while it is pending or running, else its record (the
 * newest of that id: a re-queued letter's names the new id).
 * Context: any process. Return: TW_O_* (>= 0); -ENOENT (not tracked, or its
 * record was reused by out_cap newer settles); -EINVAL; -EUCLEAN (a record
 * says nonsense).
 */
int  tw_outcome_read(struct tw_dom *d, uint64_t work, struct tw_outcome_info *oi, char *data,
                     uint32_t cap);
/**
 * tw_outcome_wait() - tw_outcome_read(), sleeping at most @timeout_ns first
 * if the outcome is not final (a futex on the node's wake word, woken by
 * whoever settles it).
 * @timeout_ns: the most to sleep (<= 0: only look).
 *
 * Context: any thread; a signal ends the sleep. Return: as tw_outcome_read
 * after the sleep (final, retried, or still pending/running at the end of
 * @timeout_ns), or -EINTR if a signal ended it before a final outcome.
 */
int  tw_outcome_wait(struct tw_dom *d, uint64_t work, int64_t timeout_ns,
                     struct tw_outcome_info *oi, char *data, uint32_t cap);
/**
 * tw_settle() - the runner's record of its tracked RUNNING work @node:
 * @outcome TW_O_RAN (@data: the callback's result) or TW_O_FAILED (@data:
 * "Type: message"), @len bytes (cut to payload_size). Before the DONE store.
 *
 * Context: the task's runner. Return: 1 settled, 0 not tracked (or settled
 * already), -EINVAL, -EUCLEAN (not RUNNING for @slot).
 */
int  tw_settle(struct tw_dom *d, uint32_t slot, uint32_t node, uint32_t outcome,
               const char *data, uint32_t len);
/**
 * tw_outcome_tracked() - the track word of @node (TW_T_*), for its runner.
 *
 * Return: TW_T_*, or -EINVAL.
 */
int  tw_outcome_tracked(struct tw_dom *d, uint32_t node);

/* ======================================================================== */
/* task_work.c: cancel and reading                                           */

/**
 * tw_cancel() - task_work_cancel_match(): unlink the newest pending work of
 * (@slot, @gen) that matches.
 * @mode: 0 exact (@key = gen<<32 | node), 1 by callback (@key = func id).
 * @wi, @payload_out, @origin_out: the removed work (payload_size and
 * TW_ORIGIN_LEN bytes, or NULL).
 *
 * Under pi_lock: a work a run has detached is out of reach, as in the
 * kernel. Return: 1 removed (and given back to the pool), 0 none matched,
 * -EINVAL, -ESRCH, -EUSERS, -ETIMEDOUT, -EUCLEAN.
 */
int  tw_cancel(struct tw_dom *d, uint32_t slot, uint32_t gen, int mode, uint64_t key,
               struct tw_work_info *wi, char *payload_out, char *origin_out);
/**
 * tw_snapshot() - the pending works of (@slot, @gen), newest first, under
 * pi_lock.
 * @nodes, @gens, @max: at most @max of them (NULL: count only).
 *
 * Return: the number pending (may exceed @max), -EINVAL, -ESRCH,
 * -ETIMEDOUT, -EUCLEAN.
 */
int  tw_snapshot(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *nodes,
                 uint32_t *gens, uint32_t max);
/**
 * tw_snapshot_within() - tw_snapshot() waiting at most @timeout_ns (<= 0:
 * only trying) for the list lock another process holds.
 * Context: readers (status, list, export) that bound their total wait.
 * Return: as tw_snapshot(); -ETIMEDOUT past the deadline.
 */
int  tw_snapshot_within(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *nodes,
                        uint32_t *gens, uint32_t max, int64_t timeout_ns);
/**
 * tw_pending() - tw_snapshot() that only counts.
 */
int  tw_pending(struct tw_dom *d, uint32_t slot, uint32_t gen);
/**
 * tw_read_work() - copy @node out if it still has generation @gen.
 *
 * Seqlock-style: the owner word is read before and after the copy.
 * Return: 0, -EINVAL, -ESTALE (another generation, or it changed during
 * the copy).
 */
int  tw_read_work(struct tw_dom *d, uint32_t node, uint32_t gen, struct tw_work_info *wi,
                  char *payload_out, char *origin_out);

/* ======================================================================== */
/* reap.c                                                                    */

/**
 * tw_reap() - reap the dead task in @slot.
 * @orphans: nodes filed as dead letters (ORPHANED). @interrupted: started
 * works, now ALLOC by the caller: read them, then tw_free_node(). @max:
 * room in each (pool_size: every node listed; a larger batch is settled all
 * the same, only the lists are cut). @info: what was done.
 *
 * Closes the head, takes the life lock (EOWNERDEAD: the only reaper), then
 * pi_lock, then dl_lock. A reaper that dies half-way leaves a state the
 * next one finishes. Return: 1 reaped, 0 not dead (or reaped already), 2
 * another live process is reaping it, -errno.
 */
int  tw_reap(struct tw_dom *d, uint32_t slot, uint32_t *orphans, uint32_t *interrupted,
             uint32_t max, struct tw_reap_info *info);
/**
 * tw_proc_reclaim() - reclaim the entry of a dead process and leave it free:
 * nodes it pushed are queued works, nodes it had not pushed go back to the
 * pool (or to the dead letters), a node it was moving on the free list is
 * found by a validated walk.
 * @fsck_locked: the caller holds the fsck lock. @info: what was done.
 *
 * Return: 1 reclaimed, 0 not dead (or someone else took it), -EAGAIN (the
 * free list never held still: try again), -errno.
 */
int  tw_proc_reclaim(struct tw_dom *d, uint32_t i, int fsck_locked, struct tw_reap_info *info);

/* ======================================================================== */
/* progress.c - what runs are doing now, for readers (loads only)             */

/**
 * tw_progress() - works that runs have taken and not finished, per task.
 * @d: the domain. @nslots: the length of the arrays (at most max_tasks).
 * @running: out, per slot: works detached or started by a run of the
 * slot's current registration, not yet returned. @done: out, per slot:
 * works that returned and are not yet counted in the slot's counters.
 * @oldest_enq: out, per slot: the smallest enqueued_ns among the running
 * ones (0: none).
 *
 * Context: any process; loads only (no lock), one pass over the pool: a
 * snapshot that may be a moment old, never torn per node.
 * Return: the number of slots filled.
 */
int  tw_progress(struct tw_dom *d, uint32_t nslots, uint32_t *running, uint32_t *done,
                 uint64_t *oldest_enq);
/**
 * tw_running_nodes() - the nodes a run of @slot's registration has taken and
 * not finished (detached or started), with their generations.
 * Context: any process; loads only, one pass over the pool.
 * Return: the number written to @nodes/@gens (at most @max), or -EINVAL.
 */
int  tw_running_nodes(struct tw_dom *d, uint32_t slot, uint32_t *nodes, uint32_t *gens,
                      uint32_t max);

/* ======================================================================== */
/* letters.c - a live runner files its own works as dead letters             */

/**
 * tw_file_taken() - file works a run took and did not finish as dead letters.
 * @d: the domain. @slot: the runner's task. @nodes, @n: nodes of a batch the
 * runner detached (DETACHED) or whose callback it started (RUNNING).
 * @reason: TW_R_SHUTDOWN or TW_R_FAILED. @errtext, @errlen: for TW_R_FAILED,
 * the error kept with each letter (cut to the room left after its payload);
 * NULL/0 otherwise. @attempt: the attempt count kept with each letter.
 *
 * Context: the task's own process. Each node moves by CAS on its owner word
 * from the value the runner left there, so a reaper of a runner that died
 * meanwhile and this call never both file it.
 * Return: the number filed, or -errno (dl_lock).
 */
int  tw_file_taken(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t n,
                   uint32_t reason, const char *errtext, uint32_t errlen, uint32_t attempt);
/**
 * tw_node_note() - the attempt count and the error length kept in a node.
 * Return: (attempt << 16) | error length, or -EINVAL.
 */
int  tw_node_note(struct tw_dom *d, uint32_t node);
/**
 * tw_node_error() - the error a TW_R_FAILED letter keeps after its payload.
 * @node, @gen: the letter. @out, @max: where to copy it.
 * Return: its length, -ENOENT (not that letter any more), -EUCLEAN (lengths
 * out of range), -EINVAL.
 */
int  tw_node_error(struct tw_dom *d, uint32_t node, uint32_t gen, char *out, uint32_t max);
/**
 * tw_slot_counter_add() - add @n to counter @which (TW_C_*) of @slot.
 * Context: the task's own runner, for works it counts outside a chunk's
 * finish (a callback that raised is counted when it raises). Relaxed
 * fetch_add: statistics. Return: 0, or -EINVAL.
 */
int  tw_slot_counter_add(struct tw_dom *d, uint32_t slot, uint32_t which, uint64_t n);

#endif
