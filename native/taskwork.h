/*
 * taskwork.h - the kernel's task_work lists, rebuilt over POSIX shared memory.
 *
 * Sources, by concept:
 *   task_work.c  the list operations of kernel/task_work.c: add, run (detach,
 *                step), cancel; registration and exit of a task
 *   pool.c       the node pool (a tagged Treiber stack), the process table
 *   life.c       liveness: robust "life" locks held for a whole registration
 *                by one holder thread per process; death is a bit in shared
 *                memory (FUTEX_OWNER_DIED, written by the kernel)
 *   reap.c       dead tasks and processes: reaping, dead letters, fsck's tools
 *   segment.c    the segment's format, robust locks with deadlines, names,
 *                fault injection
 *   sigwatch.c   TWA_SIGNAL is never stranded: a watcher thread in a task's
 *                own process re-sends a signal its handler has not taken
 *
 * Synchronization table (which operation may run beside which):
 *
 *   operation            needs                       may run beside
 *   -------------------  --------------------------  ------------------------------
 *   tw_add / add_many    nothing (Treiber push)      everything
 *   detach (run)         the task's process; pi_lock add (a push makes it retry)
 *   cancel_*             the task's pi_lock          add
 *   free-list pop        nothing (tagged head)       pop, push
 *   free-list push       nothing (tagged head)       pop, push
 *   dead-letter ops      dl_lock                     everything else
 *   register / exit      the slot's life lock        everything; the life lock
 *                                                    orders every state change
 *   reap (a dead task)   its life lock (EOWNERDEAD), add (fails: head closed),
 *                        then pi_lock, then dl_lock  other reapers (they back off)
 *   proc-entry reclaim   the entry's life lock       everything; fsck_lock for a
 *                                                    free-list check
 *   fsck repair          fsck_lock                   everything; it reaps as above
 *
 *   keyed add reserve    keys_lock (lookup + claim   everything; the push after
 *                        of a ring entry)            it is lock-free as in tw_add
 *
 * Lock order: keys_lock (never held across another lock) ; life (trylock
 * only) -> pi_lock -> dl_lock; fsck_lock -> life.
 * Every lock in the segment is robust and taken with a CLOCK_MONOTONIC
 * deadline, or only tried: nothing waits forever.
 *
 * One line per shared field: who writes it, with what ordering.
 *
 *   hdr.magic..sizes      creator, before the segment is linked under its name
 *   hdr.free_head         pop/push: CAS acq_rel, (tag<<32 | idx); tag++ on every
 *                         change so a stale CAS fails (no ABA)
 *   hdr.dl_head/dl_count  under dl_lock, release stores
 *   slot.life             robust futex (struct tw_life): taken by CAS by the
 *                         registrant's holder thread for the registration's
 *                         life; by a reaper's holder after death. The word is
 *                         the owner's TID; the kernel sets FUTEX_OWNER_DIED in
 *                         it when that thread dies: adders read it with one
 *                         acquire load
 *   slot.state            under the life lock, release stores
 *   slot.head             (gen<<32 | idx). add: CAS release (pairs with the
 *                         acquire loads of detach, cancel and reap). detach:
 *                         CAS acq_rel under pi_lock. cancel: CAS acq_rel under
 *                         pi_lock. A reaper closes it with CAS (dead bit).
 *   slot.flags            fetch_or by notifiers (acq_rel), fetch_and by the
 *                         runner. Lazy clear: NOTIFY_* stays set while a run
 *                         goes on (adders then write no eventfd); the run
 *                         clears it after its last detach found the list
 *                         empty, then detaches once more. Lost wake-up: an
 *                         add's push precedes its fetch_or; if that fetch_or
 *                         comes after our clear it sees the bit clear and
 *                         notifies; if before, the push precedes our clear
 *                         (acq_rel), so the detach after the clear sees it.
 *                         wait() keeps NOTIFY_RESUME set while it spins (it
 *                         watches the head) and does clear, drain, look once
 *                         more before it returns or blocks
 *   slot.flags SIGWATCH   fetch_or by the task's signal watcher before it
 *                         sleeps on the flags word (futex); fetch_and when it
 *                         wakes. An adder whose fetch_or turns NOTIFY_SIGNAL
 *                         0->1 and sees SIGWATCH in the old value wakes it
 *   slot.flags WAITING    fetch_or by wait() before it blocks in select(),
 *                         fetch_and after. An adder whose fetch_or turns
 *                         NOTIFY_SIGNAL 0->1 and sees WAITING in the old value
 *                         writes the eventfd too: one atomic word, so either
 *                         wait()'s look after its fetch_or sees NOTIFY_SIGNAL,
 *                         or the adder sees WAITING (no lost wake-up)
 *   c.signals_sent        fetch_add (release) by the adder that turned
 *                         NOTIFY_SIGNAL 0->1, before it sends the signal
 *   c.sig_ack             the task's signal handler, at its entry: release
 *                         store of the signals_sent it read (acquire); a
 *                         handler that could not run the list stores a value
 *                         != signals_sent, so the signal stays owed
 *
 * Lost wake-ups, case by case (the notify bit is the only thing an adder
 * looks at before it decides to notify):
 *
 *   who sleeps / defers        how an add after the runner's last look wakes it
 *   -------------------------  ---------------------------------------------------
 *   a run (lazy clear)         the adder's fetch_or comes after the clear: it sees
 *                              the bit clear and notifies; or before: the detach
 *                              after the clear sees its push
 *   wait() in select, RESUME   clear + drain + look before select (as above)
 *   wait() in select, SIGNAL   WAITING is set before the look; an adder that
 *                              turns NOTIFY_SIGNAL 0->1 after the look sees
 *                              WAITING and writes the eventfd
 *   CPython defers the handler the signal was caught before the main thread
 *   (signal caught just before entered a blocking call: nothing interrupts it,
 *   a blocking system call)    and NOTIFY_SIGNAL stays set so adders coalesce.
 *                              The signal is *owed* (NOTIFY_SIGNAL set, sig_ack
 *                              != signals_sent, works queued); the watcher
 *                              thread re-sends it to the main thread with
 *                              tgkill after TW_SIG_RESEND_NS, then at growing
 *                              intervals: the call returns EINTR, CPython runs
 *                              the owed handler (README "TWA_SIGNAL is never
 *                              stranded")
 *   slot counters         relaxed fetch_add; statistics only
 *   slot histograms       latency and duration (struct tw_hist), written only
 *                         by the task's runner in tw_step: relaxed load + store
 *   name histograms       the same per callback name, by every runner: relaxed
 *                         fetch_add. Statistics only (a reader sums the buckets
 *                         for the count)
 *   tw_run_* records      process-local (the runner's buffers), never shared
 *   node.started_ns       the runner, plain store while it owns the node
 *                         (DETACHED), before the release store that makes it
 *                         RUNNING; read back by the same runner when it finishes
 *   node.owner            (gen<<32 | state<<24 | aux): release store by the owner
 *                         of the node at each transition, CAS where two parties
 *                         may race; acquire load by everyone else. The batch
 *                         run path's DETACHED -> RUNNING -> DONE are single
 *                         aligned 8-byte stores by the runner (x86: release)
 *   node.next             written by the node's owner before it publishes the node
 *                         (release CAS of the push), by cancel under pi_lock,
 *                         and by dead-letter filing under dl_lock
 *   node payload, meta    written before the push; read by runner after acquire
 *   proc.life             robust futex: held by the process's holder thread while
 *                         the entry is claimed (before pid is stored, until after
 *                         it is cleared)
 *   key.word (state)      RESERVED: release store under keys_lock, after the
 *                         entry's other fields; RESERVED -> QUEUED/DEADLETTER/
 *                         VOID: CAS acq_rel by the reserver, a resolver
 *                         (tw_key_lookup) or a reclaimer (settle_node)
 *   hdr.keys_next         under keys_lock
 *   proc.intent[k]        claimed by CAS from ~0 by one pop/push of the process;
 *                         seq_cst stores before its free-list CAS, ~0 after
 *
 * Every value read from the segment is treated as hostile: indices are
 * bounds-checked, walks are bounded by pool_size, locks are taken with a
 * deadline. Functions return 0 / a positive count, or -errno; they never print.
 */
#ifndef SHM_TASKWORK_H
#define SHM_TASKWORK_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>

#define TW_MAGIC              "SHMTWRK\x01"
#define TW_LAYOUT_VERSION     9u

/* Notify modes: the kernel's values (include/linux/task_work.h). */
#define TW_TWA_NONE           0
#define TW_TWA_RESUME         1
#define TW_TWA_SIGNAL         2
#define TW_TWA_SIGNAL_NO_IPI  3
#define TW_TWA_NMI_CURRENT    4
#define TW_TWA_FLAGS          0xff00
#define TW_TWAF_NO_ALLOC      0x0100

/* 32-bit list indices. NIL ends a list; EXITED is the work_exited sentinel:
 * "all we need is ->next == NULL" becomes "all we need is a value no node has".
 * A head whose index has the DEAD bit is closed too: its task died, and the
 * index below the bit (DEAD_EMPTY: none) is the list a reaper will settle. */
#define TW_NIL                0xffffffffu
#define TW_EXITED             0xfffffffeu
#define TW_DEAD_EMPTY         0xfffffffdu
#define TW_DEAD_BIT           0x80000000u

/* Slot flag bits (TIF_* and PF_EXITING). */
#define TW_F_NOTIFY_RESUME    0x1u
#define TW_F_NOTIFY_SIGNAL    0x2u
#define TW_F_EXITING          0x4u
#define TW_F_DIED             0x8u  /* it ended by death, and was reaped        */
#define TW_F_SIGWATCH         0x10u /* the task's signal watcher sleeps on flags  */
#define TW_F_WAITING          0x20u /* wait() is (about to be) blocked in select  */

/* Slot states. */
#define TW_SLOT_FREE          0u
#define TW_SLOT_CLAIMING      1u
#define TW_SLOT_RUNNING       2u
#define TW_SLOT_EXITING       3u
#define TW_SLOT_EXITED        4u
#define TW_SLOT_REAPING       5u  /* dead; a reaper holds its life lock     */

/* Node ownership states (bits 24..31 of the low half of node.owner). */
#define TW_N_FREE             0u  /* on the free list (or being popped)          */
#define TW_N_ALLOC            1u  /* aux = proc index of the allocating process;
                                     also just after its push, until the adder's
                                     CAS makes it QUEUED (or a runner, canceller,
                                     reaper or fsck takes it by CAS first)       */
#define TW_N_QUEUED           2u  /* aux = task slot; linked from slot.head      */
#define TW_N_CANCELLING       3u  /* aux = task slot; a canceller holds pi_lock  */
#define TW_N_DETACHED         4u  /* aux = task slot; in a run batch, not started */
#define TW_N_RUNNING          5u  /* aux = task slot; its callback has started   */
#define TW_N_DEADLETTER       6u  /* on the domain's dead-letter list            */
#define TW_N_DONE             7u  /* aux = task slot; its callback returned: the
                                     runner gives it back (tw_run_finish), or a
                                     reaper does if the runner died. Counted free */

/* Why a node is a dead letter (node.reason); non-zero on an ALLOC node: a
 * dead letter being re-queued, which goes back to the dead letters if its
 * re-queuer dies before the push. */
#define TW_R_NONE             0u
#define TW_R_UNKNOWN          1u  /* its callback was unknown in the runner    */
#define TW_R_ORPHANED         2u  /* its task died before running it           */
#define TW_R_INTERRUPTED      3u  /* its task died in its callback; the reaper
                                     died too before it could report it        */

/* What tw_add reports back (bit mask, >= 0). */
#define TW_DUE_EVENTFD        0x1  /* NOTIFY_RESUME went 0->1: write the eventfd   */
#define TW_DUE_SIGNAL         0x2  /* NOTIFY_SIGNAL went 0->1: send the signal     */
#define TW_DONE_EVENTFD       0x4  /* ...and tw_add wrote it itself                */
#define TW_DONE_SIGNAL        0x8  /* ...and tw_add sent it itself                 */

#define TW_NAME_LEN           48
#define TW_FUNC_NAME_LEN      112
#define TW_ORIGIN_LEN         128
#define TW_FD_TOKEN_LEN       16

/* Kill points for fault injection (SHM_TASKWORK_KILLPOINT=name[:n][:stop]):
 * the n-th pass SIGKILLs the process, or with ":stop" SIGSTOPs it there. */
#define TW_KP_NONE            0
#define TW_KP_AFTER_ALLOC     1  /* node allocated, not pushed                  */
#define TW_KP_AFTER_PUSH      2  /* pushed, notification not sent               */
#define TW_KP_AFTER_DETACH    3  /* batch detached and marked, nothing run      */
#define TW_KP_IN_PI_LOCK      4  /* cancel holds pi_lock, node marked, linked   */
#define TW_KP_MID_POP         5  /* free-list CAS done, owner not yet written   */
#define TW_KP_IN_CALLBACK     6  /* (python side) callback started              */
#define TW_KP_IN_CLAIM        7  /* proc entry locked, pid not yet stored       */
#define TW_KP_IN_REGISTER     8  /* slot claimed, registration not published    */
#define TW_KP_IN_REAP         9  /* reaper holds a dead task's life lock        */
#define TW_KP_IN_DL_FILE      10 /* dl_lock held, node marked, not yet linked   */
#define TW_KP_IN_DETACH       11 /* pi_lock held, batch marked, not detached    */
#define TW_KP_KEY_RESERVED    12 /* key entry RESERVED, node not yet pushed     */
#define TW_KP_KEY_PUSHED      13 /* keyed node pushed, key entry not yet final  */

struct tw_header {
    char     magic[8];
    uint32_t layout_version;
    uint32_t node_size;
    uint32_t header_size;
    uint32_t slot_size;
    uint32_t max_tasks;
    uint32_t pool_size;
    uint32_t payload_size;
    uint32_t max_procs;
    uint32_t names_cap;
    uint32_t record_origin;
    uint64_t slots_off;
    uint64_t procs_off;
    uint64_t names_off;
    uint64_t nodes_off;
    uint64_t total_size;
    uint64_t created_ns;
    uint64_t free_head;        /* tag<<32 | idx */
    uint64_t dl_head;          /* idx (u32) under dl_lock */
    uint64_t dl_count;
    uint64_t fsck_runs;
    uint64_t reaped;           /* dead tasks reaped (by anyone)                 */
    uint64_t procs_reclaimed;  /* process-table entries of dead processes reused */
    uint64_t keys_off;         /* the key table (struct tw_key[TW_KEYS_CAP])     */
    uint64_t keys_next;        /* next ring position; under keys_lock           */
    uint32_t keys_cap;
    uint32_t keys_pad;
    uint64_t reserved[1];
    pthread_mutex_t dl_lock;   /* robust, process-shared */
    pthread_mutex_t fsck_lock; /* one repairing fsck at a time */
    pthread_mutex_t keys_lock; /* one key reservation at a time (tw_add_keyed) */
    char     pad[64];
};

struct tw_counters {
    uint64_t added, run, cancelled, orphaned, errors, unknown;
    uint64_t signals_sent, resumes_sent, interrupted;
    int64_t  queued;           /* approximate: +1 per push, -n per detach/cancel */
    uint64_t max_pending;      /* high-water mark of queued                      */
    uint64_t sig_ack;          /* the signals_sent the handler last took         */
    uint64_t signals_resent;   /* owed signals the watcher sent again            */
};

/*
 * A life lock: a bare robust futex. `word` is 0 (free) or the TID of the
 * holder thread of the process that holds it; when that thread dies the
 * kernel sets FUTEX_OWNER_DIED in it (and clears the TID). `next` links the
 * holder thread's robust list (set_robust_list(2)): the holder only ever
 * writes these links, from its own private record of what it holds, and never
 * follows them - a scribbled link can mislead the kernel's walk at the
 * holder's death, never make a live process write through it.
 */
struct tw_life {
    uint32_t word;
    uint32_t pad;
    uint64_t next;
};

/*
 * A histogram kept by the runner (SPEC §11): enqueue-to-start latency and
 * callback duration, per task (in its slot) and per callback name (in the
 * name table). Bucket b counts the values v (nanoseconds) whose bit length
 * minus TW_HIST_SHIFT is b, clamped: bucket 0 is v < 2^10 ns (1.024 us),
 * bucket b is [2^(b+9), 2^(b+10)) ns, the last one everything from 2^36 ns
 * (68.7 s) on. One clock read and a few relaxed increments per work.
 */
#define TW_HIST_BUCKETS 28
#define TW_HIST_SHIFT   10
struct tw_hist {
    uint64_t bucket[TW_HIST_BUCKETS];
    uint64_t sum_ns;
};

struct tw_slot {
    uint64_t head;             /* gen<<32 | idx (TW_NIL, TW_EXITED, dead or a node) */
    uint32_t state;
    uint32_t gen;
    uint32_t flags;
    int32_t  pid;
    uint64_t start_ticks;      /* /proc/PID/stat field 22 of the registrant      */
    uint64_t registered_ns;
    int32_t  signum;
    int32_t  efd;              /* the eventfd's number in the task's process     */
    uint32_t uid;
    uint32_t lock_recovered;   /* set by whoever got EOWNERDEAD on pi_lock       */
    uint64_t name_id;          /* the task name's id in the name table           */
    uint8_t  fd_token[TW_FD_TOKEN_LEN]; /* where the task hands out its eventfd  */
    char     name[TW_NAME_LEN];
    struct tw_counters c;
    struct tw_hist latency;    /* enqueue -> callback start, this registration   */
    struct tw_hist duration;   /* callback start -> return                       */
    pthread_mutex_t pi_lock;   /* robust, process-shared                         */
    struct tw_life life;       /* held while the registrant lives                */
    char     pad[64];
};

#define TW_INTENTS 8
struct tw_proc {
    uint64_t pid;              /* 0 = free; stored after life is locked          */
    uint64_t start_ticks;
    /* One word per free-list operation in flight in this process (threads, a
     * signal handler interrupting an add): claimed by CAS from ~0, then the
     * node being popped/pushed (low 32 bits), back to ~0 when done.           */
    uint64_t intent[TW_INTENTS];
    struct tw_life life;       /* held while the process has the entry           */
};

struct tw_name {
    uint64_t id;               /* 0 = empty; claimed by CAS                      */
    uint32_t ready;            /* release store after name is written            */
    uint32_t len;
    char     name[TW_FUNC_NAME_LEN];
    struct tw_hist latency;    /* works of this callback, every task             */
    struct tw_hist duration;
};

struct tw_node {
    uint64_t owner;            /* gen<<32 | state<<24 | aux                      */
    uint32_t next;             /* list link or free-list link                    */
    uint32_t payload_len;
    uint64_t func_id;
    uint64_t enqueued_ns;
    int32_t  sender_pid;
    uint32_t target;           /* slot index                                     */
    uint32_t target_gen;
    uint32_t origin_len;
    uint32_t reason;           /* TW_R_*: why it is (or was) a dead letter       */
    uint32_t reserved;
    uint64_t name_id;          /* a dead letter's task name (name table id)      */
    uint64_t started_ns;       /* when its callback started (RUNNING)            */
    /* then: char origin[TW_ORIGIN_LEN] if record_origin; then the payload       */
};

#define TW_NODE_HDR  ((uint32_t)sizeof(struct tw_node))

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

/* ---- segment (segment.c) ---- */
uint64_t tw_layout_size(uint32_t max_tasks, uint32_t pool_size, uint32_t payload_size,
                        uint32_t max_procs, uint32_t names_cap, uint32_t record_origin);
int  tw_format(void *base, uint64_t size, uint32_t max_tasks, uint32_t pool_size,
               uint32_t payload_size, uint32_t max_procs, uint32_t names_cap,
               uint32_t record_origin, uint64_t now_ns);
int  tw_map(struct tw_dom *d, int fd, uint64_t size);
int  tw_attach(struct tw_dom *d, void *base, uint64_t size);
void tw_unmap(struct tw_dom *d);
uint32_t tw_layout_version(void);
uint32_t tw_node_header_size(void);
int  tw_name_put(struct tw_dom *d, uint64_t id, const char *name, uint32_t len);
int  tw_name_get(struct tw_dom *d, uint64_t id, char *out, uint32_t cap);

/* ---- liveness (life.c) ---- */
int  tw_slot_dead(struct tw_dom *d, uint32_t slot);
int  tw_proc_dead(struct tw_dom *d, uint32_t i);

/* ---- processes (pool.c) ---- */
uint64_t tw_proc_start_ticks(int pid);
int  tw_proc_claim(struct tw_dom *d);
void tw_proc_release(struct tw_dom *d);
int  tw_proc_info(struct tw_dom *d, uint32_t i, uint64_t *pid, uint64_t *start);
int  tw_proc_busy(struct tw_dom *d, uint32_t i);

/* ---- tasks (task_work.c) ---- */
int  tw_register(struct tw_dom *d, const char *name, uint64_t name_id, int32_t signum,
                 int32_t efd, uint32_t uid, uint64_t now_ns, uint32_t *gen_out);
int  tw_slot_check(struct tw_dom *d, uint32_t slot, uint32_t gen);
int  tw_release_slot(struct tw_dom *d, uint32_t slot, uint32_t gen);

/* ---- add (task_work.c) ---- */
/* Returns -errno, or (gen << 28) | (node << 4) | TW_DUE_*|TW_DONE_* bits: the
 * work id (gen<<32|node) comes back in the return value, so the hot path has
 * no out-parameter a signal handler could overwrite. -EOWNERDEAD: the task's
 * process is dead (its head is now closed): reap it, then report ESRCH. */
int64_t tw_add(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
               const char *payload, uint32_t len, int notify, const char *origin,
               uint32_t origin_len, int efd, int pidfd, int signum, uint64_t now_ns,
               int is_current);
int  tw_add_many(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
                 const char *const *payloads, const uint32_t *lens, uint32_t n,
                 int notify, const char *origin, uint32_t origin_len, int efd,
                 int pidfd, int signum, uint64_t now_ns, int is_current,
                 uint64_t *work_ids_out);
/* Async-signal-safe: the own task, RESUME flag + write of the own eventfd. */
int  tw_add_nmi(struct tw_dom *d, uint32_t slot, uint32_t gen, uint64_t func_id,
                const char *payload, uint32_t len, int efd, uint64_t now_ns,
                uint64_t *work_id_out);

/* ---- run (task_work.c) ---- */
uint32_t tw_flags_clear(struct tw_dom *d, uint32_t slot, uint32_t bits);
uint32_t tw_flags_get(struct tw_dom *d, uint32_t slot);
uint32_t tw_flags_set(struct tw_dom *d, uint32_t slot, uint32_t bits);
int  tw_detach(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *out, uint32_t max);
/* outcome of a finished work */
#define TW_OUT_OK       0
#define TW_OUT_ERROR    1
#define TW_OUT_UNKNOWN  2  /* callback unknown here: the node goes to the dead letters */
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
 * (TW_ORIGIN_LEN each); it counts the enqueue-to-start
 * latency with one clock read for the whole batch and zeroes outcome[0..k).
 * Nothing changes state: the works stay DETACHED, not started.
 *
 * The caller then starts each work by storing its RUNNING word into the
 * segment's word at its OWNER_AT (a 64-bit index from the base): that is
 * the DETACHED -> RUNNING transition of tw_step, one aligned 8-byte store on
 * a node only the runner may change while the task lives (x86-64: a plain
 * store is a release store; elsewhere the caller uses tw_run_start). From it
 * on the work counts as started, exactly as before: a reaper reports it
 * interrupted, a not yet started one orphaned. When its callback returns the
 * caller stores RUNNING + TW_DONE_DELTA (RUNNING -> DONE): the
 * node counts free from then on (stats), and a reaper gives it back without
 * reporting it. Release again: the callback's effects come first.
 *
 * tw_run_finish ends nodes[0..k): each RUNNING node of this slot whose
 * outcome is TW_OUT_OK or TW_OUT_ERROR is counted and returned to the pool;
 * (RUNNING or DONE) TW_OUT_SKIP and TW_OUT_UNKNOWN nodes are left alone (not started; scheduled
 * on a loop; or to be filed as a dead letter through tw_step). end_ns[i], if
 * given, is when work i's callback returned (its start: the previous one's
 * end); without it each work is counted the batch's mean duration.
 * Returns the number of works finished, or -EUCLEAN if a node was not ours
 * (those are left alone; the rest is finished).
 */
#define TW_REC_WORDS    8
#define TW_REC_ID       0   /* gen<<32 | node: the work id                    */
#define TW_REC_FUNC     1
#define TW_REC_ENQ      2
#define TW_REC_SENDER   3   /* origin_len<<32 | sender_pid (origin at i * TW_ORIGIN_LEN) */
#define TW_REC_OWNER_AT 4   /* the node's owner word, in 64-bit words from base */
#define TW_REC_RUNNING  5   /* the owner value that makes it RUNNING          */
#define TW_REC_POFF     6   /* payload offsets in parea: k + 1 of them        */
#define TW_OUT_SKIP     3
#define TW_DONE_DELTA   ((TW_N_DONE - TW_N_RUNNING) << 24)
int  tw_run_load(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t k,
                 uint64_t *rec, char *parea, char *oarea, uint8_t *outcome);
int  tw_run_start(struct tw_dom *d, uint32_t slot, uint32_t node);
/* tw_run_start for nodes[0..k) at once (a batch callback's works): all or,
 * if one is not DETACHED here, none (-EUCLEAN). */
int  tw_run_start_many(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t k);
int  tw_run_finish(struct tw_dom *d, uint32_t slot, const uint32_t *nodes, uint32_t k,
                   const uint8_t *outcome, const uint64_t *end_ns);

/*
 * The lean add: what never changes for a handle is packed once in a
 * struct tw_handle (the caller keeps it; the native side only reads it).
 * tw_add_h is tw_add with the clock read in C when now_ns is 0, the origin
 * off, and the descriptors from the handle: efd/pidfd for a peer, own_efd
 * when is_current. Same return value as tw_add.
 */
struct tw_handle {
    struct tw_dom *d;
    uint32_t slot, gen;
    int32_t  signum, own_efd;
};
int64_t tw_add_h(const struct tw_handle *h, uint64_t func_id, const char *payload,
                 uint32_t len, int notify, int efd, int pidfd, int is_current,
                 uint64_t now_ns);
/* add_many from one flat buffer: payload i is buf[offs[i] .. offs[i+1]). */
int  tw_add_many_flat(const struct tw_handle *h, uint64_t func_id, const char *buf,
                      const uint32_t *offs, uint32_t n, int notify, int efd, int pidfd,
                      int is_current, uint64_t now_ns, uint64_t *work_ids_out);

/*
 * The add engine: every add path above (tw_add, tw_add_h, tw_add_many,
 * tw_add_many_flat, tw_add_nmi, tw_add_keyed, tw_deadletter_keyed,
 * tw_requeue) is tw_queue() with one of these requests. Fields a path does
 * not use stay zero, except src (TW_NIL: no source node), efd and pidfd (-1).
 */
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
    uint32_t pad;
    uint64_t name_id;          /* to_deadletter: the task name's id             */
    uint64_t *work_ids_out;    /* gen<<32 | node of each work (count of them)   */
};
/**
 * tw_queue() - queue works on a task (or file one as a dead letter).
 * @d: the domain.
 * @r: the request (see struct tw_add_req).
 *
 * Checks the notify mode and the payload sizes, checks that the target takes
 * work, takes the nodes (or the dead letter @r->src), fills them, records
 * the key, pushes them with one lock-free CAS, and notifies. A failure after
 * the nodes were taken gives them back (or files the dead letter again, or
 * voids the key): nothing queued, nothing leaked.
 *
 * Context: any thread of any process; async-signal-safe for a request of
 * one payload, no key, no source node, on the caller's own task whose
 * process entry is claimed (tw_add_nmi()).
 * Return: (gen << 28) | (node << 4) | TW_DUE_*|TW_DONE_* bits of the newest
 * work; 0 for a key recorded before (@r->key_info says what and where) or
 * for count 0; or -EINVAL, -E2BIG, -ESRCH, -EOWNERDEAD, -ENOMEM, -EUSERS,
 * -ENOENT (the dead letter is gone), -EBUSY/-ENOSPC (key table), -errno.
 */
int64_t tw_queue(struct tw_dom *d, const struct tw_add_req *r);

/* ---- cancel (task_work.c) ---- */
int  tw_cancel(struct tw_dom *d, uint32_t slot, uint32_t gen, int mode, uint64_t key,
               struct tw_work_info *wi, char *payload_out, char *origin_out);
int  tw_snapshot(struct tw_dom *d, uint32_t slot, uint32_t gen, uint32_t *nodes,
                 uint32_t *gens, uint32_t max);
int  tw_pending(struct tw_dom *d, uint32_t slot, uint32_t gen);

/* ---- reading nodes ---- */
int  tw_read_work(struct tw_dom *d, uint32_t node, uint32_t gen, struct tw_work_info *wi,
                  char *payload_out, char *origin_out);

/* ---- reaping and dead letters (reap.c) ---- */
int  tw_reap(struct tw_dom *d, uint32_t slot, uint32_t *orphans, uint32_t *interrupted,
             uint32_t max, struct tw_reap_info *info);
int  tw_proc_reclaim(struct tw_dom *d, uint32_t i, int fsck_locked, struct tw_reap_info *info);
int  tw_dl_list(struct tw_dom *d, uint32_t *out, uint32_t max);
int  tw_dl_take(struct tw_dom *d, uint32_t node, uint32_t gen);
int  tw_dl_done(struct tw_dom *d, uint32_t node, int outcome);
int64_t tw_requeue(struct tw_dom *d, uint32_t node, uint32_t gen, uint32_t slot, uint32_t tgen,
                   int notify, int efd, int pidfd, int signum, uint64_t now_ns, int is_current);

/* ---- pool / stats / fsck (pool.c, reap.c) ---- */
int  tw_pool_free_count(struct tw_dom *d);
int  tw_node_state(struct tw_dom *d, uint32_t node, uint64_t *owner_out);
int  tw_free_node(struct tw_dom *d, uint32_t node);
int  tw_free_leaks(struct tw_dom *d, const uint8_t *proc_dead, uint32_t *out, uint32_t max,
                   uint32_t tries);
int  tw_fsck_lock(struct tw_dom *d);
void tw_fsck_unlock(struct tw_dom *d);
int  tw_scan_owners(struct tw_dom *d, uint64_t *out);

/* ---- notifications (task_work.c) ---- */
int  tw_eventfd_write(int efd);
int  tw_eventfd_drain(int efd);
int  tw_pidfd_send(int pidfd, int signum);
int  tw_pidfd_getfd(int pidfd, int targetfd);

/* ---- TWA_SIGNAL is never stranded (sigwatch.c) ----
 *
 * A signal sent to a task is *owed* while NOTIFY_SIGNAL is set, the task's
 * handler has not acknowledged it (c.sig_ack != c.signals_sent) and works are
 * queued. The watcher, a thread of the task's own process with every signal
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
 * tw_sig_ack() - the task's signal handler took the signals sent so far.
 * @d: the domain. @slot: the task's slot. @ok: 1 at the handler's entry; 0
 * when the handler could not run the list (a lock timeout, an error): the
 * signal stays owed and the watcher sends it again.
 *
 * Async-signal-safe (loads and one store). Return: 0, or -EINVAL (bad slot).
 */
int  tw_sig_ack(struct tw_dom *d, uint32_t slot, int ok);
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

/* ---- fault injection (segment.c) ---- */
void tw_killpoint_set(int point, int64_t countdown);
int  tw_killpoint_get(void);
void tw_killpoint(int point);


/* ---- keyed adds: the key table (keys.c) ----
 *
 * An idempotent add for whoever must not queue a work twice across its own
 * crash (the Redis bridge): tw_add_keyed records (key -> node) in the domain's
 * key table BEFORE the push, so a later caller with the same key learns
 * "queued (maybe already run)" or "filed as a dead letter", never queues it
 * again, and a key whose adder died before the push is "never pushed" (VOID)
 * and may be added anew. The record outlives the work: it stays after the
 * node is run and freed.
 *
 * Eviction: the table is a ring of TW_KEYS_CAP entries. A reservation takes
 * the next ring position whose entry is not RESERVED; the key it held is
 * forgotten. So a key is remembered until TW_KEYS_CAP newer keyed adds were
 * made in the domain - a caller must not retry a key older than that.
 * Keys are 64-bit hashes chosen by the caller; 0 is not a key.
 */
#define TW_KEYS_CAP           4096
#define TW_K_EMPTY            0u  /* never used, or evicted                      */
#define TW_K_RESERVED         1u  /* recorded, push (or filing) in flight        */
#define TW_K_QUEUED           2u  /* pushed onto a task's list                   */
#define TW_K_DEADLETTER       3u  /* filed as a dead letter (no live task)       */
#define TW_K_VOID             4u  /* its adder failed or died before the push    */

struct tw_key {
    uint64_t key;
    uint64_t work;             /* gen<<32 | node of the keyed work               */
    uint64_t word;             /* seq<<8 | TW_K_* state. seq: the reservation's
                                  ring position + 1, so a CAS that finishes one
                                  reservation can never finish a later one of
                                  the same entry                                 */
    uint32_t proc;             /* the reserver's process entry                   */
    uint32_t want;             /* TW_K_QUEUED or TW_K_DEADLETTER                 */
    uint32_t slot;             /* target task slot (QUEUED)                      */
    uint32_t pad;
};

struct tw_key_info {
    uint64_t work;
    uint32_t state;            /* TW_K_QUEUED or TW_K_DEADLETTER                 */
    uint32_t fresh;            /* 1: this call queued it; 0: recorded before     */
    uint32_t slot;
    uint32_t pad;
};

/* Queue (slot, gen) <- work, once per key. Returns the TW_DUE/TW_DONE bits
 * (fresh) or 0 (already recorded: info says what and where), or -errno as
 * tw_add, or -EBUSY (a live process is adding this key right now), -ENOSPC
 * (every ring entry is RESERVED). */
int64_t tw_add_keyed(struct tw_dom *d, uint64_t key, uint32_t slot, uint32_t gen,
                     uint64_t func_id, const char *payload, uint32_t len, int notify,
                     int efd, int pidfd, int signum, uint64_t now_ns, int is_current,
                     struct tw_key_info *info);
/* File a work as a dead letter (reason ORPHANED, task name name_id), once per
 * key: 1 filed, 0 already recorded (info), -errno. */
int  tw_deadletter_keyed(struct tw_dom *d, uint64_t key, uint64_t func_id, const char *payload,
                         uint32_t len, uint64_t name_id, uint64_t now_ns,
                         struct tw_key_info *info);
/* What the table says of key: 1 (info filled), 0 unknown or VOID, -EBUSY (a
 * live process is adding it), -errno. Settles a dead reserver's entry. */
int  tw_key_lookup(struct tw_dom *d, uint64_t key, struct tw_key_info *info);
int  tw_keys_used(struct tw_dom *d);

#endif
