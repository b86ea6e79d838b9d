/*
 * taskwork.pml - the list algorithms of native/taskwork.c, for spin.
 *
 * Part 1 (task list): adders push with compare-and-swap on the head (no
 * lock); the runner detaches with one exchange, takes and releases pi_lock,
 * then walks and runs the batch; a canceller walks from the head under
 * pi_lock and unlinks its target with compare-and-swap, restarting from the
 * value it lost to. Checked: every added work is run exactly once or
 * cancelled exactly once, never both, never neither; a batch never holds a
 * cancelled node; walks stay in bounds.
 *
 * Part 2 (free list): a Treiber stack whose head carries a tag bumped on every
 * change. Poppers read head and ->next, then CAS; pushers link and CAS.
 * Checked: a node is never owned by two processes at once (the ABA case a
 * stale ->next would cause). Build with -DNOTAG to see spin find the ABA.
 *
 * make model-check runs both parts (-DFREELIST selects part 2) with safety and
 * end-state checks.
 */

#define NIL 255
#define NW  3            /* works (nodes) on the task list */

byte head = NIL;         /* task->task_works */
byte next[NW];
bool pi_lock = 0;
byte ran[NW];
byte cancelled[NW];
byte queued[NW];
byte adders_done = 0;

inline CAS(loc, expect, newval, ok) {
    atomic {
        if
        :: loc == expect -> loc = newval; ok = 1
        :: else -> expect = loc; ok = 0
        fi
    }
}

inline lock() { atomic { pi_lock == 0 -> pi_lock = 1 } }
inline unlock() { pi_lock = 0 }

proctype adder(byte n) {
    byte h; bool ok;
    h = head;
    do
    :: next[n] = h;
       CAS(head, h, n, ok);        /* on failure h holds the new head */
       if
       :: ok -> break
       :: else
       fi
    od;
    queued[n] = 1;
    adders_done++
}

proctype runner() {
    byte b, cur, steps;
    do
    :: atomic { b = head; head = NIL };          /* xchg: detach */
       lock(); unlock();                          /* synchronize with cancel */
       cur = b; steps = 0;
       do
       :: cur == NIL -> break
       :: cur != NIL ->
          assert(cur < NW);
          assert(cancelled[cur] == 0);            /* a cancelled node is never run */
          ran[cur]++;
          cur = next[cur];
          steps++;
          assert(steps <= NW)                     /* bounded walk */
       od
    :: adders_done == NW && head == NIL -> break
    od
}

proctype canceller(byte target) {
    byte cur, prev, nx, steps; bool ok;
    lock();
    prev = NIL;
    cur = head;
    steps = 0;
    do
    :: cur == NIL -> break
    :: cur != NIL && cur != target ->
       prev = cur; cur = next[cur]; steps++; assert(steps <= 2 * NW)
    :: cur == target ->
       nx = next[cur];
       if
       :: prev == NIL ->
          CAS(head, cur, nx, ok);                 /* raced with a push or the detach */
          if
          :: ok -> cancelled[target]++; break
          :: else -> prev = NIL                  /* cur = what head holds now */
          fi
       :: prev != NIL ->
          CAS(next[prev], cur, nx, ok);
          if
          :: ok -> cancelled[target]++; break
          :: else
          fi
       fi
    od;
    unlock()
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
        run canceller(1)
    };
    (_nr_pr == 1);                                /* every other process ended */
    byte k = 0;
    do
    :: k < NW ->
       assert(ran[k] + cancelled[k] == 1);        /* exactly once, one way */
       k++
    :: k == NW -> break
    od
}
#endif
