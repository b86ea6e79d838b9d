/*
 * signal.pml - TWA_SIGNAL delivery to a task whose process runs CPython, for spin.
 *
 * What it models. Adders push works onto a task's list and notify it through
 * the slot's flag word: the adder whose CAS turns NOTIFY_SIGNAL from 0 to 1
 * steps the signal sequence `sent` in the same word, then sends the task's
 * signal to its process; an adder that finds WAITING set also writes the
 * task's eventfd. An adder may die (SIGKILL, or a preemption that outlasts
 * everything else) between its arming and its send. The task's process is
 * three actors:
 *   - the kernel, which delivers a pending signal to the main thread at any
 *     moment. The C-level handler CPython installs only sets `tripped`; a
 *     signal delivered while the main thread is inside a blocking system call
 *     also makes the call return EINTR, one delivered at any other moment
 *     does nothing more;
 *   - the main thread, which loops: at a bytecode boundary, if `tripped`,
 *     clear it and run the Python handler; then enter a blocking call, either
 *     one only a signal interrupts (readline() on a terminal: read(2)) or
 *     wait() (select(2) on the eventfd). The Python handler stores in `ack`
 *     the value of `sent` it loaded at its entry, detaches the whole list,
 *     runs it, clears NOTIFY_SIGNAL and looks at the head once more: works
 *     found there are run the same way. A handler that cannot run the list
 *     (a lock timeout, an error) leaves the flag set and stores an `ack` that
 *     differs from `sent`: the signal stays owed. wait() sets WAITING, runs
 *     the works if NOTIFY_SIGNAL is set, else blocks in select on the
 *     eventfd and looks again when select returns; it returns once something
 *     ran (by itself or by the handler), clearing WAITING on its way out;
 *   - the watcher, a thread with every signal blocked (so the kernel never
 *     picks it for the process's signal): while NOTIFY_SIGNAL is set, works
 *     are queued and `ack` != `sent`, it sends the signal again to the main
 *     thread (tgkill).
 * The bug this fix answers: a signal delivered after the main thread's last
 * check and before it enters read(2) only sets `tripped`; the call then blocks
 * with nothing pending, NOTIFY_SIGNAL stays set, every later add coalesces
 * into it and sends nothing.
 *
 * Checked: every work pushed runs exactly once (a work's bit is asserted
 * clear in `ranmask` before it is set, and all bits are set at the end); and
 * no stranding: the blocking calls are guarded waits that return only on
 * EINTR (or, for wait(), on the eventfd), so a main thread blocked for good
 * while works are queued is a deadlock, i.e. an invalid end state. The one
 * legitimate end is the main thread blocked with every adder done and the
 * list empty: the model then leaves through `done` and checks the counts; the
 * kernel and the watcher wait at `end` labels.
 *
 * Builds. make model-check runs, each with errors 0: deaths and failures
 * (-DMAXCANCEL=0), cancels (-DMAXDEATH=0 -DMAXFAIL=0), and 3 adders of 1
 * work with none of the three; and requires these to fail: -DNOWATCH, -DSPLITSEQ,
 * -DACKLOG, -DOLDEXIT (each with the others' faults off). The default build
 * has all three faults (about 10^8 states, 5 GB: too big for every run).
 *   (default)            NA adders of NPER works each (-DNA=, -DNPER=; 2 of 2
 *                        by default); at most MAXDEATH adders die between
 *                        their arming and their send, MAXCANCEL works are
 *                        cancelled by their adder, MAXFAIL handlers fail.
 *   -DNOWATCH -DMAXFAIL=0  no watcher and no failing handler: spin finds the
 *                        deferral above (the signal delivered between the last
 *                        check and read(2)) as an invalid end state.
 *   -DACKLOG             a failing handler only logs and its entry's ack
 *                        stands, as before the fix: spin finds the stranding
 *                        even with the watcher.
 *   -DOLDEXIT            a run that returns after one clear and one look, as
 *                        before: spin finds the works stranded behind an
 *                        adder whose work was cancelled after it re-armed the
 *                        flag (the handler nested in the run took the
 *                        signal; the flag stays armed, later adds coalesce).
 *   -DSPLITSEQ           the count a second step after the fetch-or that
 *                        arms the flag, as before the sequence moved into
 *                        the flags word: spin finds the works stranded
 *                        behind an adder that died between the two (adds
 *                        coalesce into its flag, the watcher sees no debt).
 *   -DFINE               split, as in the code, the watcher's test and its
 *                        send, which the default build takes as one step. It
 *                        finds nothing more (errors 0 at NA=2, NPER=2).
 *
 * What it abstracts. The list is a bit mask (bit = one work): a push is one
 * atomic OR and the detach one exchange; the lock-free algorithms behind them
 * are checked in taskwork.pml. A cancel is one step against the detach (both
 * hold the list lock in the code). Running a batch is one step: nothing another
 * actor reads changes meanwhile. The kernel's pending signal is one bit
 * (standard signals do not queue). Bytecode boundaries are placed where the
 * main thread is outside a run, and inside one after each batch and after
 * each clear: a handler that enters there takes the signal and leaves the
 * works to the run (nested()), which looks at the head again before it
 * returns. A handler fails before it detaches anything (the lock it could
 * not take guards the detach), at most MAXFAIL times in one execution of the
 * model. The resend by an adder that finds the acknowledgement lagging is
 * left out: the watcher alone must suffice. RESUME works, other threads of
 * the task's process, critical() blocks and callbacks are left out.
 *
 * What it cannot express. Promela has no clock. The watcher acts "when the
 * condition has held for longer than a bound"; here it may act at any moment
 * the condition holds, and only then, so every ordering of resends the real
 * watcher can produce is among those spin explores (with -DFINE, also a resend
 * decided just before the condition stopped holding), and so are many it
 * cannot (a resend at once). What the model proves is that a state with works
 * queued and the main thread blocked is never final: the watcher can act,
 * and its signal interrupts the call. It cannot state that this happens
 * within 100 ms, because that depends on the watcher's period, the scheduler,
 * and how long the handler and the works take (real time). Rate limiting is the same kind of property: it bounds how
 * often resends happen per unit of time, and a model without time can only
 * allow a resend or not; it allows them whenever the condition holds, which
 * covers every rate-limited schedule. The 100 ms bound and the absence of a
 * resend storm are for the tests to measure.
 */

#ifndef NA
#define NA     2                 /* adders (1 to 3)                          */
#endif
#ifndef NPER
#define NPER   2                 /* works per adder (NA * NPER <= 8)         */
#endif
#ifndef MAXFAIL
#define MAXFAIL 1                /* handler failures in one run              */
#endif
#ifndef MAXDEATH
#define MAXDEATH 1               /* adders that die between arming and send  */
#endif
#ifndef MAXCANCEL
#define MAXCANCEL 1              /* works their adder cancels                */
#endif

#define NS  1                    /* NOTIFY_SIGNAL                            */
#define WT  2                    /* WAITING                                  */

byte head = 0;                   /* the task's list: one bit per queued work */
byte flags = 0;
byte sent = 0;                   /* signals sent by adders                   */
byte ack = 0;                    /* `sent` as the last handler entry saw it  */
byte adders_done = 0;
byte pushed = 0;                 /* every work ever pushed (a bit each)      */
byte deaths = 0;
byte cancels = 0;

bool sig_pending = 0;            /* a signal sent, not yet delivered         */
bool tripped = 0;                /* CPython: a Python handler is owed        */
bool in_call = 0;                /* the main thread is inside a blocking call */
bool eintr = 0;                  /* a signal was delivered during that call  */
bool efd = 0;                    /* the eventfd is readable                  */

#define quiet (adders_done == NA && head == 0)

/* a handler nested in a run (a bytecode boundary inside it): it takes the
   signal and leaves the works to the run (_rerun, which the run's next
   detach answers) */
inline nested() {
    if
    :: atomic { tripped -> tripped = 0 }; ack = sent
    :: else
    fi
}

/* detach all and run them until a look finds the list empty; the lazy
   clear of NOTIFY_SIGNAL on the way out, then one more look */
inline run_works() {
    cleared = 0;
    do
    :: atomic {
           batch = head; head = 0;                 /* xchg: the list is ours */
           /* run them: nothing another actor reads changes, so one step */
           assert((ranmask & batch) == 0);         /* each work runs once */
           ranmask = ranmask | batch
       };
       if
       :: batch != 0 -> cleared = 0; batch = 0; nested()
       :: else ->                                  /* the look found nothing */
#ifdef OLDEXIT
          if                                       /* one clear, one look */
          :: cleared -> break
          :: else
          fi;
          cleared = 1;
#endif
          if
          :: flags & NS ->                         /* fetch_and: an add after */
             flags = flags & ~NS; nested()         /* this signals again */
          :: else -> break                         /* empty and clear: return */
          fi
       fi
    od;
    cleared = 0
}

/* the Python-level handler */
inline handler() {
    s = sent;
    if
    :: fails < MAXFAIL ->                          /* it cannot run the list */
       fails++;
#ifdef ACKLOG
       ack = s                                     /* before the fix: logged */
#else
       ack = s - 1                                 /* != sent (sent >= s): owed */
#endif
    :: true ->
       ack = s;                                    /* signals up to s taken */
       run_works()
    fi;
    if
    :: flags & WT -> efd = 1                       /* wake a wait() in select */
    :: else
    fi;
    s = 0
}

/* a bytecode boundary: CPython runs owed Python handlers here */
inline boundary() {
    if
    :: atomic { tripped -> tripped = 0 }; handler()
    :: else
    fi
}

proctype adder(byte first) {
    byte j = 0, old;
    do
    :: j == NPER -> break
    :: j < NPER ->
       atomic {                                    /* the push */
           head = head | (1 << (first + j));
           pushed = pushed | (1 << (first + j))
       };
#ifdef SPLITSEQ
       atomic { old = flags; flags = flags | NS }; /* fetch_or, after the push */
#else
       atomic {                                    /* the arming CAS: the flag */
           old = flags; flags = flags | NS;        /* and the sequence in one */
           if                                      /* word, one step */
           :: !(old & NS) -> sent++
           :: else
           fi
       };
#endif
       if
       :: !(old & NS) ->                           /* flag 0 -> 1: send */
          if
          :: deaths < MAXDEATH -> deaths++; goto dead  /* killed before the send */
          :: true
          fi;
#ifdef SPLITSEQ
          sent++;
#endif
          sig_pending = 1
       :: else                                     /* coalesced */
       fi;
       if
       :: old & WT -> efd = 1                      /* wake wait() */
       :: else
       fi;
       /* cancel it, if the task has not taken it yet (under the list lock:
          one step against the detach) */
       if
       :: atomic { cancels < MAXCANCEL && (head & (1 << (first + j))) ->
              head = head & ~(1 << (first + j));
              pushed = pushed & ~(1 << (first + j)); cancels++ }
       :: true
       fi;
       j++
    od;
dead:
    old = 0;
    adders_done++                                  /* adds nothing more */
}

/* the kernel: delivers the pending signal to the main thread (the watcher
   blocks every signal) and interrupts its blocking call if it is in one */
proctype kernel() {
end:
    do
    :: atomic {
           sig_pending -> sig_pending = 0; tripped = 1;
           if
           :: in_call -> eintr = 1
           :: else
           fi
       }
    od
}

proctype watcher() {
end:
    do
#ifdef FINE
    :: ((flags & NS) && ack != sent && head != 0) ->  /* owed, works queued */
       sig_pending = 1                              /* tgkill(main thread) */
#else
    :: atomic {
           ((flags & NS) && ack != sent && head != 0) -> /* owed, works queued */
           sig_pending = 1                          /* tgkill(main thread) */
       }
#endif
    od
}

proctype main_thread() {
    byte s, batch, before;
    bool cleared;
    byte ranmask = 0;                              /* works run */
    byte fails = 0;                                /* handler failures */
    do
    :: boundary();
       if
       :: /* readline(): read(2), which only a signal interrupts; on EINTR
             CPython runs the handlers (the boundary above) and reads again */
          in_call = 1;
          if
          :: eintr -> skip
          :: quiet -> goto done                    /* blocked for good with
                                                      nothing queued: legitimate */
          fi;
          atomic { in_call = 0; eintr = 0 }        /* EINTR returned */
       :: /* wait() */
          flags = flags | WT;                      /* fetch_or: adders now
                                                      write the eventfd */
          before = ranmask;
          do
          :: boundary();
             if
             :: ranmask != before -> break         /* the handler ran some */
             :: else
             fi;
             if
             :: flags & NS -> run_works(); break
             :: else
             fi;
             in_call = 1;                          /* select on the eventfd */
             if
             :: eintr -> skip
             :: efd -> skip
             :: quiet -> goto done                 /* as for readline() */
             fi;
             atomic { in_call = 0; eintr = 0 };
             efd = 0                               /* drain; the flags decide */
          od;
          flags = flags & ~WT;                     /* fetch_and, on the way out */
          before = 0
       fi
    od;
done:
    assert(head == 0 && ranmask == pushed)         /* every work pushed ran */
}

init {
    atomic {
        run kernel();
#ifndef NOWATCH
        run watcher();
#endif
        run main_thread();
        run adder(0);
#if NA > 1
        run adder(NPER);
#endif
#if NA > 2
        run adder(2 * NPER);
#endif
    }
}
