/*
 * taskwork.pml - the list algorithms of native/task_work.c (the push of the add
 * engine tw_queue, detach, cancel), native/reap.c (reaping) and native/pool.c
 * (the free list), for spin.
 *
 * Part 1 (task list, a task that may die): adders check the task's life word
 * (one load), then push with compare-and-swap on the head (no lock), then mark
 * their node queued by CAS. The runner takes pi_lock, marks the nodes it is
 * about to take DETACHED, detaches them with a CAS on the head (a push makes
 * it fail: it marks the new nodes and tries again), releases the lock and
 * runs the batch. A canceller walks from the head under pi_lock and unlinks
 * its target with CAS. The runner may die at any step (holding pi_lock or
 * not): its life word then says OWNER_DIED, and a reaper closes the head
 * (a dead bit that keeps the list), takes the life lock over, takes pi_lock
 * (robust: a dead holder's lock is taken over), finishes the adders' marks on
 * the closed list, and files every node the task held: pending or detached
 * ones as orphaned, started ones as interrupted; DONE ones (run, not yet
 * given back by the batch run path) are freed unreported.
 * Checked: every add that returned success ends exactly one way - run,
 * cancelled, orphaned, or interrupted (a started work that may also have
 * run) - and every refused add queued nothing; a cancelled node is never
 * run; walks stay in bounds.
 *
 * Part 2 (free list): a Treiber stack whose head carries a tag bumped on every
 * change. Poppers read head and ->next, then CAS; pushers link and CAS.
 * Checked: a node is never owned by two processes at once (the ABA case a
 * stale ->next would cause). Build with -DNOTAG to see spin find the ABA.
 *
 * make model-check runs both parts (-DFREELIST selects part 2) with safety and
 * end-state checks.
 */

#define NIL   255
#define DEADB 128        /* the dead bit of a head index                   */
#define DEMPTY 254       /* dead, empty list                               */
#define EXITED 253
#define NW    3          /* works (nodes) on the task list                 */

/* node states (owner word) */
#define ALLOC 1
#define QUEUED 2
#define CANCELLING 3
#define DETACHED 4
#define RUNNING 5
#define DONE 6
#define GONE 7           /* cancelled, dead letter, or interrupted: settled */

/* life word: 0 held by the live task, 1 OWNER_DIED, 2 held by the reaper */
byte life = 0;
byte head = NIL;         /* task->task_works */
byte next[NW];
byte st[NW];
byte pi_lock = 0;        /* 0 free, 1 held, 2 held by a process that died   */
byte ran[NW], cancelled[NW], orphaned[NW], interrupted[NW];
bool added[NW], refused[NW];
byte adders_done = 0;
bool runner_gone = 0;

inline CAS(loc, expect, newval, ok) {
    atomic {
        if
        :: loc == expect -> loc = newval; ok = 1
        :: else -> expect = loc; ok = 0
        fi
    }
}

/* robust: a lock whose holder died is taken over (EOWNERDEAD) */
inline lock() { atomic { pi_lock != 1 -> pi_lock = 1 } }
inline unlock() { pi_lock = 0 }
#define closed(h) ((h) != NIL && (h) >= DEADB)

/* may the runner die here? (it takes pi_lock's fate with it) */
inline maybe_die() {
    if
    :: true ->
       atomic {
           life = 1;
           if
           :: (pi_lock == 1 && holding) -> pi_lock = 2
           :: else -> skip
           fi;
           runner_gone = 1
       };
       goto dead
    :: true -> skip
    fi
}

proctype adder(byte n) {
    byte h, o; bool ok;
    st[n] = ALLOC;
    if
    :: life == 1 -> refused[n] = 1; goto out      /* the one load: dead */
    :: else
    fi;
    h = head;
    do
    :: closed(h) -> refused[n] = 1; goto out       /* exited or dead: -ESRCH */
    :: !closed(h) ->
       next[n] = h;
       CAS(head, h, n, ok);                        /* on failure h holds the new head */
       if
       :: ok -> break
       :: else
       fi
    od;
    added[n] = 1;
    o = ALLOC;
    CAS(st[n], o, QUEUED, ok);                     /* mark_queued: may lose, fine */
out:
    adders_done++
}

proctype runner() {
    byte first, stop, cur, k, o, steps, i, h;
    byte batch[NW];
    bool ok, holding = 0;
    do
    :: head == NIL && adders_done == NW -> break
    :: head != NIL && !closed(head) ->
       lock(); holding = 1;
       maybe_die();
       k = 0; stop = NIL; first = head;
       do
       :: first == NIL -> break                    /* a canceller emptied it */
       :: first != NIL ->
          cur = first; steps = 0;
          do
          :: cur == stop -> break
          :: cur != stop ->
             assert(cur < NW);
             o = st[cur];
             assert(o == ALLOC || o == QUEUED);    /* no canceller inside: we hold the lock */
             CAS(st[cur], o, DETACHED, ok);        /* against mark_queued */
             if
             :: ok -> batch[k] = cur; k++; cur = next[cur]; steps++; assert(steps <= NW)
             :: else                               /* retry with the marked value */
             fi
          od;
          maybe_die();
          h = first;
          CAS(head, h, NIL, ok);                   /* on failure h holds the new head */
          if
          :: ok -> break
          :: else -> stop = first; first = h        /* a push: mark the new ones too */
          fi
       od;
       unlock(); holding = 0;
       /* The batch run path: the batch is copied out (no shared state
        * changes), then each work is started by one store (RUNNING), run,
        * and marked DONE by another store; DONE nodes are freed after the
        * batch (a reaper frees those of a dead runner, unreported). Or the
        * batch goes to one batch callback: every work started, one call. */
       i = 0;
       if
       :: true ->
          do
          :: i == k -> break
          :: i < k ->
             cur = batch[i];
             assert(st[cur] == DETACHED);          /* never cancelled after detach */
             st[cur] = RUNNING;
             maybe_die();
             ran[cur]++;
             maybe_die();
             st[cur] = DONE;
             i++
          od
       :: true ->
          do
          :: i == k -> break
          :: i < k -> assert(st[batch[i]] == DETACHED); st[batch[i]] = RUNNING; i++
          od;
          maybe_die();
          atomic {
             i = 0;
             do
             :: i == k -> break
             :: i < k -> ran[batch[i]]++; i++
             od
          };
          maybe_die();
          i = 0;
          do
          :: i == k -> break
          :: i < k -> st[batch[i]] = DONE; i++
          od
       fi
    od;
    runner_gone = 1;
dead:
    skip
}

proctype canceller(byte target) {
    byte cur, prev, nx, steps, o; bool ok;
    lock();
    if
    :: closed(head) -> goto out
    :: else
    fi;
    prev = NIL;
    cur = head;
    steps = 0;
    do
    :: cur == NIL || closed(cur) -> break
    :: cur != NIL && !closed(cur) && cur != target ->
       prev = cur; cur = next[cur]; steps++; assert(steps <= 2 * NW)
    :: cur == target && st[cur] == DETACHED ->
       /* taken by a runner that died before detaching it: not ours to
          cancel (the reaper files it), walk on */
       prev = cur; cur = next[cur]; steps++; assert(steps <= 2 * NW)
    :: cur == target && st[cur] != DETACHED ->
       o = st[cur];
       assert(o == ALLOC || o == QUEUED);
       CAS(st[cur], o, CANCELLING, ok);
       if
       :: !ok -> goto again
       :: else
       fi;
       nx = next[cur];
       if
       :: prev == NIL ->
          CAS(head, cur, nx, ok);                 /* raced with a push */
          if
          :: ok -> st[cur] = GONE; cancelled[target]++; break
          :: else -> st[target] = QUEUED; prev = NIL /* cur = what head holds now */
          fi
       :: prev != NIL ->
          CAS(next[prev], cur, nx, ok);
          if
          :: ok -> st[cur] = GONE; cancelled[target]++; break
          :: else -> st[target] = QUEUED; cur = target   /* cannot happen: we hold the lock */
          fi
       fi;
again: skip
    od;
out:
    unlock()
}

proctype reaper() {
    byte h, cur, n, o, steps; bool ok;
    do
    :: life == 1 -> break
    :: runner_gone && life == 0 -> goto out        /* it ended alive */
    od;
    /* close the head before taking the life lock */
    atomic {
        if
        :: head == NIL -> head = DEMPTY
        :: head < DEADB -> head = head + DEADB
        :: else
        fi
    };
    o = 1;
    CAS(life, o, 2, ok);
    assert(ok);
    lock();
    /* finish the marks of adders that pushed onto the closed list */
    h = head;
    cur = (h == DEMPTY || h == EXITED -> NIL : h - DEADB);
    steps = 0;
    do
    :: cur == NIL -> break
    :: cur != NIL ->
       assert(cur < NW);
       o = ALLOC;
       CAS(st[cur], o, QUEUED, ok);
       cur = next[cur]; steps++; assert(steps <= NW)
    od;
    /* every node the task held, by its owner word */
    n = 0;
    do
    :: n == NW -> break
    :: n < NW ->
       atomic {
           if
           :: st[n] == QUEUED || st[n] == DETACHED -> st[n] = GONE; orphaned[n]++
           :: st[n] == RUNNING -> st[n] = GONE; interrupted[n]++
           :: else
           fi
       };
       n++
    od;
    head = EXITED;
    unlock();
out:
    skip
}

/* ---- part 2: the tagged free list ---------------------------------------- */

#define NF 3
byte fidx = 0;            /* head index: 0 -> 1 -> 2 -> NIL at start */
byte ftag = 0;
byte fnext[NF];
byte owners[NF];

proctype user() {
    byte i, t, nx, round;
    bool ok;
    round = 0;
    do
    :: round == 2 -> break
    :: round < 2 ->
       /* pop */
       do
       :: atomic { i = fidx; t = ftag };
          if
          :: i == NIL -> goto done
          :: else
          fi;
          nx = fnext[i];                          /* may be stale: the tag decides */
          atomic {
#ifdef NOTAG
            if
            :: fidx == i -> fidx = nx; ok = 1
            :: else -> ok = 0
            fi
#else
            if
            :: fidx == i && ftag == t -> fidx = nx; ftag = (ftag + 1) % 8; ok = 1
            :: else -> ok = 0
            fi
#endif
          };
          if
          :: ok -> break
          :: else
          fi
       od;
       owners[i]++;
       assert(owners[i] == 1);                    /* never two owners */
       owners[i]--;
       /* push back */
       do
       :: atomic { t = ftag; nx = fidx };
          fnext[i] = nx;
          atomic {
            if
            :: fidx == nx && ftag == t -> fidx = i; ftag = (ftag + 1) % 8; ok = 1
            :: else -> ok = 0
            fi
          };
          if
          :: ok -> break
          :: else
          fi
       od;
       round++
    od;
done:
    skip
}

#ifdef FREELIST
init {
    atomic {
        fnext[0] = 1; fnext[1] = 2; fnext[2] = NIL;
        run user(); run user(); run user()
    }
}
#else
init {
    atomic {
        next[0] = NIL; next[1] = NIL; next[2] = NIL;
        run adder(0); run adder(1); run adder(2);
        run runner();
        run canceller(1);
        run reaper()
    };
    (_nr_pr == 1);                                /* every other process ended */
    byte k = 0;
    do
    :: k < NW ->
       assert(ran[k] <= 1 && interrupted[k] <= 1 && cancelled[k] <= 1 && orphaned[k] <= 1);
       if
       :: added[k] ->                             /* exactly once, one way */
          assert((ran[k] > 0 || interrupted[k] > 0) + cancelled[k] + orphaned[k] == 1)
       :: else ->
          assert(refused[k] && ran[k] + interrupted[k] + cancelled[k] + orphaned[k] == 0)
       fi;
       k++
    :: k == NW -> break
    od
}
#endif
