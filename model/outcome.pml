/*
 * outcome.pml - a tracked work's outcome record, for spin.
 *
 * What it models. One tracked work on a task's list (native/outcome.c and
 * native/tw_layout.h, "outcome records"). The actors:
 *   - the runner detaches it (QUEUED -> DETACHED), starts it (-> RUNNING),
 *     runs the callback, settles it (writes the record, then SETTLED, then
 *     wakes), stores DONE and frees the node. The runner may die at any step
 *     (-DKILL, the default): its process is gone, and the reaper takes over;
 *   - a canceller that may unlink the work while it is QUEUED (it then owns
 *     it, settles it cancelled, and frees it);
 *   - the reaper, which acts only once the runner is dead: a QUEUED or
 *     DETACHED node is filed as a dead letter (and its filing settles it), a
 *     RUNNING one is settled interrupted, a DONE one settled ran if its
 *     runner died before settling (a record is written only while the node
 *     is TRACKED: exactly once);
 *   - a waiter, which sets its wake bit, looks (the record first if the
 *     node said settled, the node otherwise), and sleeps on the wake word
 *     while the outcome is not final: a guarded wait that only a settler's
 *     exchange-and-wake (or a changed word) ends.
 *
 * Checked: at most one record is ever written (exactly once, whoever
 * settles); the record is true (ran only if the callback returned, cancelled
 * only if it never started, interrupted only if it started, dead_letter only
 * if it never started); the waiter never sleeps for good once the work is
 * settled (an invalid end state otherwise) and the work is always settled in
 * the end (asserted at the end). -DNOWAKEBIT drops the waiter's bit: the
 * waiter sleeps on a word the settler never changes, and the settler's wake
 * reaches only a waiter already asleep, so a waiter that looked before the
 * record and went to sleep after the wake is lost; make model-check requires
 * that spin finds it (an invalid end state). -DNOKILL: the runner never dies.
 */

#define N_QUEUED    1
#define N_DETACHED  2
#define N_RUNNING   3
#define N_DONE      4
#define N_FREE      5
#define N_CANCELLING 6
#define N_LETTER    7

#define O_NONE      0
#define O_RAN       1
#define O_CANCELLED 2
#define O_LETTER    3
#define O_INTERRUPTED 4

byte node = N_QUEUED;
bit tracked = 1;          /* TRACKED (1) or SETTLED (0) */
byte record = O_NONE;     /* the one record of this work */
byte records = 0;         /* how many were written */
bit word = 0;             /* the node's wake word (bit 0: a waiter sleeps) */
bit sleeping = 0, woken = 0;   /* the kernel's futex queue of that word */
bit dead = 0;             /* the runner's process died */
bit started = 0, returned = 0;
bit waiter_done = 0;

/* FUTEX_WAKE: wakes whoever sleeps on the word now */
inline futex_wake() {
    atomic { if :: sleeping -> woken = 1 :: else -> skip fi }
}

/* settle: write the record if still tracked (the caller owns the node),
 * mark SETTLED, then exchange the wake word with 0 and wake if the bit was
 * set. -DNOWAKEBIT: there is no bit; the settler always wakes. */
inline settle(o) {
    if
    :: tracked ->
        atomic { records++; record = o; assert(records == 1) };
        tracked = 0;
#ifndef NOWAKEBIT
        atomic { if :: word -> word = 0; futex_wake() :: else -> skip fi }
#else
        futex_wake()
#endif
    :: else -> skip
    fi
}

active proctype runner() {
    if
    :: atomic { node == N_QUEUED -> node = N_DETACHED }
    :: atomic { node != N_QUEUED -> goto out }
    fi;
#ifndef NOKILL
    if :: skip :: atomic { dead = 1; goto out } fi;
#endif
    node = N_RUNNING;
    started = 1;
#ifndef NOKILL
    if :: skip :: atomic { dead = 1; goto out } fi;
#endif
    returned = 1;             /* the callback ran to its end */
#ifndef NOKILL
    if :: skip :: atomic { dead = 1; goto out } fi;
#endif
    settle(O_RAN);
#ifndef NOKILL
    if :: skip :: atomic { dead = 1; goto out } fi;
#endif
    node = N_DONE;
#ifndef NOKILL
    if :: skip :: atomic { dead = 1; goto out } fi;
#endif
    node = N_FREE;
out:
    skip
}

active proctype canceller() {
    if
    :: atomic { node == N_QUEUED -> node = N_CANCELLING };
       settle(O_CANCELLED);
       node = N_FREE
    :: skip
    fi
}

active proctype reaper() {
end: dead;                /* acts only on a dead runner */
    if
    :: atomic { (node == N_QUEUED || node == N_DETACHED) -> node = N_LETTER };
       settle(O_LETTER)
    :: atomic { node == N_RUNNING -> node = N_FREE };
       settle(O_INTERRUPTED)
    :: atomic { node == N_DONE -> node = N_FREE };
       settle(O_RAN)
    :: atomic { (node == N_FREE || node == N_LETTER || node == N_CANCELLING) -> skip }
    fi
}

active proctype waiter() {
    do
    ::
#ifndef NOWAKEBIT
        word = 1;             /* seq_cst fetch_or */
#endif
        if
        :: tracked == 0 -> break      /* the record is there: final */
        :: else ->
            /* FUTEX_WAIT(word, what we left in it): sleeps only if the word
             * still holds it, atomically with joining the queue */
            atomic {
#ifndef NOWAKEBIT
                if :: word == 1 -> sleeping = 1 :: else -> skip fi
#else
                if :: word == 0 -> sleeping = 1 :: else -> skip fi
#endif
            };
            if
            :: sleeping -> woken; atomic { sleeping = 0; woken = 0 }
            :: else -> skip
            fi
        fi
    od;
    waiter_done = 1
}

/* the end: whatever happened, the work was settled once, truthfully */
active proctype check() {
    waiter_done && tracked == 0 && (node == N_FREE || node == N_LETTER);
    assert(records == 1);
    assert(record != O_RAN || returned);
    assert(record != O_CANCELLED || !started);
    assert(record != O_INTERRUPTED || started);
    assert(record != O_LETTER || !started)
}
