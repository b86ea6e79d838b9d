/*
 * tw_layout.h - the shared layout of a domain: every struct and constant that
 * lives in the segment, and who may write each field, with what ordering.
 * The API (taskwork.h) includes it.
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
 *   cache refill/flush   the process's cache lock    pop, push (a batch pop or
 *   (batch pop/push)     (process-local, only tried) push is one free-list CAS)
 *   cache take/give      the process's cache lock    everything; a steal makes
 *                                                    the take's CAS fail
 *   steal (pool dry)     nothing (owner-word CAS)    everything
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
 *   slot.flags SIGSEQ     bits 16-31: the signal sequence. A TWA_SIGNAL
 *                         adder arms NOTIFY_SIGNAL by CAS (acq_rel); the one
 *                         that turns it 0->1 steps the sequence in the same
 *                         CAS, so the signal is owed from the instant the flag
 *                         makes later adders coalesce: an adder preempted or
 *                         killed before its send strands nothing. 16 bits
 *                         wrap only after 65,536 arm/clear cycles, each a
 *                         run of the task's, between two looks of its watcher
 *   c.signals_sent        relaxed fetch_add by the adder that armed the
 *                         sequence; statistics only
 *   c.sig_ack             the task's signal handler, at its entry: release
 *                         store of the sequence it read (acquire); a handler
 *                         that could not run the list stores sequence - 1, so
 *                         the signal stays owed
 *
 * Lost wake-ups, case by case (the notify bit is the only thing an adder
 * looks at before it decides to notify):
 *
 *   who sleeps / defers        how an add after the runner's last look wakes it
 *   -------------------------  ---------------------------------------------------
 *   a run (lazy clear)         the adder's fetch_or comes after the clear: it sees
 *                              the bit clear and notifies; or before: the detach
 *                              after the clear sees its push. The run returns
 *                              only from a look that found the list empty and
 *                              the bit still clear: a bit re-armed after the
 *                              clear whose work was cancelled before the look
 *                              is cleared again, never left armed with its
 *                              signal taken
 *   wait() in select, RESUME   clear + drain + look before select (as above)
 *   wait() in select, SIGNAL   WAITING is set before the look; an adder that
 *                              turns NOTIFY_SIGNAL 0->1 after the look sees
 *                              WAITING and writes the eventfd
 *   CPython defers the handler the signal was caught before the main thread
 *   (signal caught just before entered a blocking call: nothing interrupts it,
 *   a blocking system call)    and NOTIFY_SIGNAL stays set so adders coalesce.
 *                              The signal is *owed* (NOTIFY_SIGNAL set, sig_ack
 *                              != the sequence, works queued); the watcher
 *                              thread re-sends it to the main thread with
 *                              tgkill after TW_SIG_RESEND_NS, then at growing
 *                              intervals: the call returns EINTR, CPython runs
 *                              the owed handler (README "TWA_SIGNAL is never
 *                              stranded")
 *   slot counters         relaxed fetch_add; statistics only
 *   slot histograms       latency and duration (struct tw_hist), written only
 *                         by the task's runner (tw_run_load, tw_run_finish,
 *                         tw_step): relaxed load + store
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
 *                         seq_cst stores before its free-list CAS, ~0 after.
 *                         count<<32 | first: a batch names its whole chain
 *                         (linked before the store), so a FREE node on no
 *                         list is always covered by a live intent or dead
 *   node.owner CACHED     FREE -> CACHED(me): release store after the batch
 *                         pop's CAS; ALLOC/DONE/.. -> CACHED(me): release store
 *                         by the owner that frees it; CACHED(me) -> ALLOC(me),
 *                         CACHED(p) -> ALLOC(me) (steal), CACHED(p) ->
 *                         CACHED(p|HELD) (flush; a reclaimer of dead p): CAS
 *                         acq_rel on the exact word (gen included), so the
 *                         owner's take and a thief's never both succeed;
 *                         HELD -> FREE: release store before the push CAS
 *
 * What crash safety costs per work (locked read-modify-write instructions;
 * release/acquire loads and stores are plain moves on x86). The per-process
 * node cache takes allocation off the shared free list:
 *
 *   add, cache hit       cache lock CAS; owner CAS CACHED -> ALLOC (a steal
 *                        may have taken it); task-list push CAS; mark CAS
 *                        ALLOC -> QUEUED; c.added and c.queued fetch_adds;
 *                        notify fetch_or (TWA_RESUME/SIGNAL). The cache lock's
 *                        release is a store. 6-7 in all
 *   add, cache refill    + 1/16 of a batch pop: intent claim CAS, two seq_cst
 *                        intent stores (xchg), free-list CAS
 *   run (per work)       DETACHED mark CAS; per batch: pi_lock lock + unlock,
 *                        detach CAS, c.queued and c.run fetch_adds; RUNNING and
 *                        DONE are stores; the free: cache lock CAS (owner store
 *                        CACHED, lock release store); every 16th free flushes:
 *                        per node a HELD CAS (FREE is a store), per 16 an
 *                        intent claim CAS, two intent xchgs, one free-list CAS.
 *                        About 3 per work plus the batch's share
 *
 * Before the cache each allocation and each free cost four (intent claim CAS,
 * intent xchg, free-list CAS, intent xchg). What it costs instead: cached
 * nodes are free but not on the free list (another process takes them only
 * when the list is empty, with a scan of the owner words), and a dead
 * process's cache is given back when its entry is reclaimed.
 *
 * Every value read from the segment is treated as hostile: indices are
 * bounds-checked, walks are bounded by pool_size, locks are taken with a
 * deadline. Functions return 0 / a positive count, or -errno; they never print.
 */
#ifndef SHM_TASKWORK_LAYOUT_H
#define SHM_TASKWORK_LAYOUT_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>

#define TW_MAGIC              "SHMTWRK\x01"
#define TW_LAYOUT_VERSION     12u

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
#define TW_F_BITS             0xffffu /* the flag bits; above them:               */
#define TW_F_SIGSEQ_SHIFT     16    /* the signal sequence (16 bits, wrapping):  */
#define TW_F_SIGSEQ_ONE       0x10000u /* stepped by the add that arms NOTIFY_SIGNAL */

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
#define TW_N_CACHED           8u  /* aux = proc entry: free, in that process's
                                     node cache (pool.c). Counted free. With
                                     TW_CACHE_HELD in aux: being flushed by it
                                     (nobody else may take it)                  */

/* The per-process node cache (pool.c, docs/architecture.md "The node cache").
 * A process keeps up to TW_CACHE_MAX free nodes CACHED in its own name, takes
 * them from the free list TW_CACHE_BATCH at a time (one CAS) and gives them
 * back TW_CACHE_BATCH at a time (one CAS). A process that finds the free list
 * and its own cache empty takes a node from any other process's cache by CAS
 * on its owner word (CACHED without HELD), so the pool runs dry only when
 * every node is in use. */
#define TW_CACHE_MAX          32  /* nodes a process caches at most           */
#define TW_CACHE_BATCH        16  /* taken / given back with one free-list CAS */
#define TW_CACHE_HELD         0x800000u

/* Why a node is a dead letter (node.reason); non-zero on an ALLOC node: a
 * dead letter being re-queued, which goes back to the dead letters if its
 * re-queuer dies before the push. */
#define TW_R_NONE             0u
#define TW_R_UNKNOWN          1u  /* its callback was unknown in the runner    */
#define TW_R_ORPHANED         2u  /* its task died before running it           */
#define TW_R_INTERRUPTED      3u  /* its task died in its callback; the reaper
                                     died too before it could report it        */
#define TW_R_SHUTDOWN         4u  /* its task stopped (serve's drain deadline)
                                     before running it                         */
#define TW_R_FAILED           5u  /* its callback raised, retries spent        */

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
#define TW_KP_MID_POP         5  /* a node taken: from the free list (CAS done,
                                    owner not yet written), or from the
                                    process's cache (owner just written ALLOC,
                                    not yet returned to the adder)             */
#define TW_KP_IN_CALLBACK     6  /* (python side) callback started              */
#define TW_KP_IN_CLAIM        7  /* proc entry locked, pid not yet stored       */
#define TW_KP_IN_REGISTER     8  /* slot claimed, registration not published    */
#define TW_KP_IN_REAP         9  /* reaper holds a dead task's life lock        */
#define TW_KP_IN_DL_FILE      10 /* dl_lock held, node marked, not yet linked   */
#define TW_KP_IN_DETACH       11 /* pi_lock held, batch marked, not detached    */
#define TW_KP_KEY_RESERVED    12 /* key entry RESERVED, node not yet pushed     */
#define TW_KP_KEY_PUSHED      13 /* keyed node pushed, key entry not yet final  */
#define TW_KP_MID_BATCH_POP   14 /* cache refill: free-list CAS done, the batch's
                                    owner words not yet CACHED                 */
#define TW_KP_MID_BATCH_PUSH  15 /* cache flush: the chain's owner words FREE,
                                    free-list CAS not yet done                 */
#define TW_KP_IN_NOTIFY       16 /* TWA_SIGNAL: NOTIFY_SIGNAL armed 0->1 (the
                                    sequence stepped), the signal not sent     */

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
    uint32_t out_cap;          /* outcome records (the "outcomes" option)       */
    uint64_t out_off;          /* the outcome ring (struct tw_outcome[out_cap]) */
    uint64_t out_seq;          /* settles so far: the next record's sequence    */
    uint32_t out_rec_size;     /* sizeof(struct tw_outcome) + payload_size, 64-aligned */
    uint32_t out_pad;
    pthread_mutex_t dl_lock;   /* robust, process-shared */
    pthread_mutex_t fsck_lock; /* one repairing fsck at a time */
    pthread_mutex_t keys_lock; /* one key reservation at a time (tw_add_keyed) */
    char     pad[64];
};

/* Counter numbers for tw_slot_counter_add: the fields of struct tw_counters,
 * in order. */
#define TW_C_ADDED 0
#define TW_C_RUN 1
#define TW_C_CANCELLED 2
#define TW_C_ORPHANED 3
#define TW_C_ERRORS 4
#define TW_C_UNKNOWN 5
#define TW_C_SIGNALS 6
#define TW_C_RESUMES 7
#define TW_C_INTERRUPTED 8

struct tw_counters {
    uint64_t added, run, cancelled, orphaned, errors, unknown;
    uint64_t signals_sent, resumes_sent, interrupted;
    int64_t  queued;           /* approximate: +1 per push, -n per detach/cancel */
    uint64_t max_pending;      /* high-water mark of queued                      */
    uint64_t sig_ack;          /* the signal sequence the handler last took      */
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
 * A histogram kept by the runner: enqueue-to-start latency and
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
     * signal handler interrupting an add): claimed by CAS from ~0, then
     * count<<32 | first: the chain of `count` nodes (1..TW_CACHE_MAX) linked
     * by ->next from `first` that is being popped or pushed (one node: count
     * 1), back to ~0 when done. A reader follows at most count links, each
     * bounds-checked; a count out of range reads as 1.                      */
    uint64_t intent[TW_INTENTS];
    struct tw_life life;       /* held while the process has the entry           */
};

struct tw_name {
    uint64_t id;               /* 0 = empty; claimed by CAS                      */
    uint32_t ready;            /* release store after name is written            */
    uint32_t len;
    uint32_t codec;            /* TW_CODEC_*: how the callback reads its payload;
                                  CAS from 0 (raw) by the first process that
                                  declares one for the name                       */
    uint32_t codec_pad;
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
    uint32_t note;             /* attempt << 16 | error length (TW_R_FAILED)     */
    uint64_t name_id;          /* a dead letter's task name (name table id)      */
    uint64_t started_ns;       /* when its callback started (RUNNING)            */
    uint32_t track;            /* TW_T_*: is its outcome recorded (track=True)   */
    uint32_t wake;             /* futex word: bit 0 set by a waiter of its outcome */
    /* then: char origin[TW_ORIGIN_LEN] if record_origin; then the payload       */
};

#define TW_NODE_HDR  ((uint32_t)sizeof(struct tw_node))

/* ---- outcome records (outcome.c) ----
 *
 * A tracked work (add(..., track=True)) has node.track = TW_T_TRACKED from
 * its fill until whoever settles it - the runner (ran, failed), a canceller
 * (cancelled), a dead-letter filing (dead_letter, failed), a reaper
 * (interrupted, dead_letter) - writes its outcome record and stores
 * TW_T_SETTLED. While it is pending or running its outcome is read from the
 * node itself (owner word, same generation); once settled, from its record.
 *
 * The records are a ring of out_cap entries in settle order: settle number s
 * (a fetch_add on hdr.out_seq) writes entry s % out_cap, so a record stays
 * readable until out_cap newer tracked works have settled (docs/contract.md
 * "Outcomes"). Each entry is a seqlock: seq = 2s+1 while its writer fills it,
 * 2s+2 when it is whole; a writer takes the entry by CAS from any value below
 * 2s+1, so a late writer never overwrites a newer record, and a writer that
 * dies mid-record leaves an odd seq that readers skip.
 *
 * A waiter sets bit 0 of node.wake, looks once more, and sleeps on the word
 * (FUTEX_WAIT, in bounded slices); a settler publishes the record, then
 * exchanges the word with 0 and wakes every sleeper if the bit was set. One
 * word, seq_cst on both sides: either the settler sees the bit, or the
 * waiter's look sees the record (no lost wake-up).
 */
#define TW_T_NONE             0u  /* untracked: nothing is recorded              */
#define TW_T_TRACKED          1u  /* tracked, not settled yet                     */
#define TW_T_SETTLED          2u  /* its record is written                        */

#define TW_O_PENDING          0u
#define TW_O_RUNNING          1u
#define TW_O_RAN              2u  /* its callback returned; data: the result      */
#define TW_O_FAILED           3u  /* it raised (retries spent); data: the error   */
#define TW_O_CANCELLED        4u
#define TW_O_DEAD_LETTER      5u  /* orphaned, shutdown or unknown callback       */
#define TW_O_INTERRUPTED      6u  /* its task died in its callback                */
#define TW_O_RETRIED          7u  /* not final: queued again as retried_as        */

#define TW_OUTCOMES_DEFAULT   4096u
#define TW_OUTCOMES_LIMIT     (1u << 20)

struct tw_outcome {
    uint64_t seq;              /* seqlock: 2s+1 writing, 2s+2 whole, 0 never used */
    uint64_t work;             /* gen<<32 | node: the settled work's id          */
    uint64_t retried_as;       /* the id it was queued again as (0: none)        */
    uint64_t settled_ns;       /* CLOCK_MONOTONIC                                */
    uint32_t outcome;          /* TW_O_*                                         */
    uint32_t len;              /* bytes of data (<= payload_size)                */
    uint32_t slot;             /* the task it was for                            */
    uint32_t pad;
    /* then payload_size bytes: the result (ran) or "Type: message" (failed) */
};

/* Codecs a callback may declare (name table, tw_name.codec). */
#define TW_CODEC_RAW          0u
#define TW_CODEC_JSON         1u
#define TW_CODEC_PICKLE       2u
#define TW_CODEC_MSGPACK      3u
#define TW_CODEC_MAX          3u   /* a larger value read from a name is scribbled */

/* ---- the key table (keys.c) ----
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
/*
 * Key tags: right after the key table, 64-aligned, TW_KEYS_CAP 16-bit tags
 * (TW_KEY_TAG of entry i's key in lane i % 4 of 64-bit word i / 4: 8 KiB, so
 * a lookup compares four entries per load instead of reading 160 KiB of
 * entries). Invariant: a tag is rewritten only under keys_lock while its
 * entry is EMPTY (before the RESERVED store that publishes the key), so the
 * tag of every findable entry matches its key. Finders use the tag to skip,
 * never to decide: an entry whose tag matches is read and compared in full.
 * Tag words are read and written whole (64-bit atomics).
 */
/* (TW_KEY_TAG and TW_KEY_TAGS_SIZE: tw_internal.h) */
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

#endif
