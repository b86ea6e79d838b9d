/*
 * nodecache.pml - the per-process node cache of native/pool.c, for spin.
 *
 * The free list is a Treiber stack with a tagged head (tag++ on every
 * change). Process B keeps a cache: it takes a run of up to two nodes from the
 * head with one CAS (pop_batch: walk the links, publish the intent "this
 * chain", CAS the head to the node after the run, make each owner word
 * CACHED), allocates one from its cache by CAS on the owner word (CACHED ->
 * ALLOC; it fails if another process stole the node), gives it back to its
 * cache (ALLOC -> CACHED, a store), and flushes the cache (cache_flush +
 * push_batch: each node CACHED -> HELD by CAS, link the chain, publish the
 * intent, owner words FREE, one CAS of the head onto the chain). B may die at
 * any step. Process U meanwhile pops single nodes (intent, CAS) and pushes
 * them back; finding the list empty it steals a node from B's cache (CAS
 * CACHED -> ALLOC on the owner word). After both end, if B died, its entry is
 * reclaimed as tw_proc_settle does, judging only by owner words: FREE nodes
 * on no list (its intents protect nothing now), CACHED or HELD in B, and
 * ALLOC by B go back to the list.
 *
 * Checked at every step (a monitor takes atomic snapshots):
 *  - the list is acyclic, in bounds, and holds only FREE nodes nobody holds;
 *  - a node nobody holds is on the list (none lost);
 *  - a FREE node on no list is covered by its live holder's intent (the
 *    chain it names, followed link by link as fsck does), so fsck never
 *    takes a node a live process is moving for a leak;
 *  - each take (pop, batch pop, cache allocation, steal) finds the node held
 *    as expected: never two owners.
 * And at the end: every node is back on the list exactly once.
 *
 * -DNOTAG: the CASes compare the index only: spin must find the ABA (a CAS
 * on a head read before a pop-pop-push installs a stale link: a node is
 * lost, or taken while U holds it). -DSHORTINTENT: the batch intent names only
 * its first node: spin must find a FREE node in flight that fsck would take
 * for a leak. make model-check runs all three.
 */

#define NF     4
#define NIL    255
#define PB     1            /* the caching process                          */
#define PU     2            /* the single-op process (and thief)            */

/* owner word state */
#define FREE   0
#define CACHED 1
#define HELD   2            /* CACHED with TW_CACHE_HELD: being flushed      */
#define ALLOC  3

byte fidx = 0;              /* head: 0 -> 1 -> 2 -> 3 -> NIL at start        */
byte ftag = 0;
byte fnext[NF];
byte ost[NF];               /* owner word: state ...                         */
byte who[NF];               /* ... and aux (process)                         */
byte holder[NF];            /* ghost: who holds the node (0: on the list)    */
bool bdead = 0, bdone = 0, udone = 0;
byte bi_first = NIL, bi_cnt = 0;   /* B's intent word: a chain               */
byte ui_first = NIL;               /* U's intent word: one node              */
byte onl[NF];               /* scratch of the snapshot check                */

#ifdef NOTAG
#define HEAD_SAME(h, t) (fidx == (h))
#else
#define HEAD_SAME(h, t) (fidx == (h) && ftag == (t))
#endif

/* B may die here: its process-local state is gone, its shared words stay. */
inline maybe_die() {
    if
    :: true -> bdead = 1; goto bend
    :: true
    fi
}

inline in_bchain(n, r) {
    r = (bi_cnt >= 1 && n == bi_first) ||
        (bi_cnt >= 2 && bi_first != NIL && n == fnext[bi_first])
}

inline check() {
    atomic {
        byte c, s, m;
        bool cov;
        m = 0;
        do
        :: m < NF -> onl[m] = 0; m++
        :: else -> break
        od;
        c = fidx; s = 0;
        do
        :: c != NIL ->
           assert(c < NF && s < NF && onl[c] == 0);
           onl[c] = 1;
           assert(ost[c] == FREE && holder[c] == 0);
           c = fnext[c]; s++
        :: else -> break
        od;
        m = 0;
        do
        :: m < NF ->
           if
           :: onl[m] == 0 ->
              assert(holder[m] != 0);                  /* not lost          */
              if
              :: ost[m] == FREE && holder[m] == PU -> assert(ui_first == m)
              :: ost[m] == FREE && holder[m] == PB && !bdead ->
                 in_bchain(m, cov); assert(cov)
              :: else
              fi
           :: else
           fi;
           m++
        :: else -> break
        od
    }
}

proctype monitor() {
    do
    :: check()
    :: bdone && udone -> break
    od
}

proctype B() {
    byte h, t, n0, n1, nx, k, e, ent[2], nent, got[2], ng, j;
    bool ok;
    /* ---- pop_batch: up to two nodes, one CAS ---- */
    do
    :: atomic { h = fidx; t = ftag };
       if
       :: h == NIL -> goto alloc
       :: else
       fi;
       n0 = h; k = 1;
       nx = fnext[n0];                             /* may be stale          */
       if
       :: nx != NIL -> n1 = nx; k = 2; nx = fnext[n1]
       :: else
       fi;
       bi_first = n0;
#ifdef SHORTINTENT
       bi_cnt = 1;
#else
       bi_cnt = k;
#endif
       maybe_die();
       atomic {
           if
           :: HEAD_SAME(h, t) ->
              fidx = nx; ftag++; ok = 1;
              assert(holder[n0] == 0); holder[n0] = PB;
              if
              :: k == 2 -> assert(holder[n1] == 0); holder[n1] = PB
              :: else
              fi
           :: else -> ok = 0
           fi
       };
       if
       :: ok -> break
       :: else
       fi
    od;
    maybe_die();                                   /* TW_KP_MID_BATCH_POP   */
    ost[n0] = CACHED; who[n0] = PB;
    maybe_die();
    if
    :: k == 2 -> ost[n1] = CACHED; who[n1] = PB
    :: else
    fi;
    maybe_die();
    bi_cnt = 0; bi_first = NIL;                    /* intent done           */
    ent[0] = n0; nent = 1;
    if
    :: k == 2 -> ent[1] = n1; nent = 2
    :: else
    fi;
alloc:
    /* ---- allocate from the cache, give it back ---- */
    if
    :: nent > 0 ->
       e = ent[nent - 1];
       atomic {
           if
           :: ost[e] == CACHED && who[e] == PB ->
              assert(holder[e] == PB); ost[e] = ALLOC; ok = 1
           :: else -> ok = 0                       /* stolen: entry stale   */
           fi
       };
       maybe_die();
       if
       :: ok -> ost[e] = CACHED; who[e] = PB       /* freed into the cache  */
       :: else -> nent--
       fi
    :: else
    fi;
    maybe_die();
    /* ---- cache_flush: HELD by CAS, then push_batch ---- */
    ng = 0; j = 0;
    do
    :: j < nent ->
       atomic {
           if
           :: ost[ent[j]] == CACHED && who[ent[j]] == PB ->
              ost[ent[j]] = HELD; got[ng] = ent[j]; ng++
           :: else
           fi
       };
       maybe_die();
       j++
    :: else -> break
    od;
    if
    :: ng == 0 -> goto bend
    :: else
    fi;
    if
    :: ng == 2 -> fnext[got[0]] = got[1]
    :: else
    fi;
    maybe_die();
    bi_first = got[0]; bi_cnt = ng;                /* intent: the chain     */
    maybe_die();
    ost[got[0]] = FREE; who[got[0]] = 0;
    maybe_die();
    if
    :: ng == 2 -> ost[got[1]] = FREE; who[got[1]] = 0
    :: else
    fi;
    maybe_die();                                   /* TW_KP_MID_BATCH_PUSH  */
    do
    :: atomic { h = fidx; t = ftag };
       fnext[got[ng - 1]] = h;                     /* only the tail's link  */
       atomic {
           if
           :: HEAD_SAME(h, t) ->
              fidx = got[0]; ftag++; ok = 1;
              holder[got[0]] = 0;
              if
              :: ng == 2 -> holder[got[1]] = 0
              :: else
              fi
           :: else -> ok = 0
           fi
       };
       if
       :: ok -> break
       :: else
       fi
    od;
    bi_cnt = 0; bi_first = NIL;
bend:
    bdone = 1
}

/* U: a single pop (stealing from B's cache when the list is empty) */
inline upop(x) {
    do
    :: atomic { h = fidx; t = ftag };
       if
       :: h == NIL ->
          atomic {                                 /* steal()               */
              if
              :: ost[0] == CACHED -> x = 0
              :: ost[1] == CACHED -> x = 1
              :: ost[2] == CACHED -> x = 2
              :: ost[3] == CACHED -> x = 3
              :: else -> x = NIL
              fi;
              if
              :: x != NIL -> assert(holder[x] == PB && who[x] == PB);
                 ost[x] = ALLOC; who[x] = PU; holder[x] = PU
              :: else
              fi
          };
          break
       :: else
       fi;
       ui_first = h;
       nx = fnext[h];
       atomic {
           if
           :: HEAD_SAME(h, t) ->
              fidx = nx; ftag++; ok = 1;
              assert(holder[h] == 0); holder[h] = PU
           :: else -> ok = 0
           fi
       };
       if
       :: ok -> x = h; ost[x] = ALLOC; who[x] = PU; ui_first = NIL; break
       :: else
       fi
    od
}

inline upush(x) {
    if
    :: x != NIL ->
       ui_first = x;
       ost[x] = FREE; who[x] = 0;
       do
       :: atomic { h = fidx; t = ftag };
          fnext[x] = h;
          atomic {
              if
              :: HEAD_SAME(h, t) -> fidx = x; ftag++; ok = 1; holder[x] = 0
              :: else -> ok = 0
              fi
          };
          if
          :: ok -> break
          :: else
          fi
       od;
       ui_first = NIL
    :: else
    fi
}

proctype U() {
    byte h, t, nx, a, b, round;
    bool ok;
    round = 0;
    do
    :: round == 2 -> break
    :: round < 2 ->
       upop(a);
       upop(b);
       upush(a);
       upush(b);
       round++
    od;
    udone = 1
}

/* tw_proc_settle for B's entry (B dead, U done: no intent in flight). */
inline reclaim() {
    byte n;
    n = 0;
    do
    :: n < NF ->
       if
       :: onl[n] == 0 && (ost[n] == FREE || who[n] == PB) ->
          assert(holder[n] == PB);                 /* B's, and only B's    */
          ost[n] = FREE; who[n] = 0;
          fnext[n] = fidx; fidx = n; ftag++; holder[n] = 0
       :: else
       fi;
       n++
    :: else -> break
    od
}

init {
    atomic {
        fnext[0] = 1; fnext[1] = 2; fnext[2] = 3; fnext[3] = NIL;
        run B(); run U(); run monitor()
    };
    (_nr_pr == 1);
    check();                                       /* fills onl[]           */
    if
    :: bdead -> atomic { reclaim() }; check()
    :: else
    fi;
    byte k = 0;
    do
    :: k < NF -> assert(onl[k] == 1 && holder[k] == 0 && ost[k] == FREE); k++
    :: else -> break
    od
}
