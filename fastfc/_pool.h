/* fastfc's copy threads: a small pool of POSIX threads that split one large
   copy (a background-copy chunk, a reverse restore run, a drain run) into
   pieces, the calling thread taking one of them.

   Why C threads and not Python threads over a GIL-releasing kernel: a
   piece is handed over and its end waited for without the GIL, by a
   condition variable, in a few microseconds; a Python worker would first
   have to take the GIL to learn of the piece, and the thread that holds it
   (a host writer, the calling thread's own caller) may keep it for a whole
   switch interval (5 ms), longer than the copy. No OpenMP (house style).

   fastfc_pool_copy() copies n bytes with up to fastfc_pool.threads threads
   (the caller included) when n is at least two pieces of min_piece bytes
   and no other caller is using the pool at that moment (then it copies on
   its own thread: a copy never waits for another copy's threads). Workers
   are started on first use and live as long as the process; a child made
   by fork() starts its own (pthread_atfork). */
#ifndef FASTFC_POOL_H
#define FASTFC_POOL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FASTFC_POOL_MAX 16

typedef void (*fastfc_copy_fn)(uint8_t *dst, const uint8_t *src, size_t n);

typedef struct {
    uint8_t *dst;
    const uint8_t *src;
    size_t n;
} fastfc_piece;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work;        /* pieces to take */
    pthread_cond_t done;        /* the last piece of a copy is done */
    int threads;                /* copy threads wanted, the caller included */
    int started;                /* workers running */
    int busy;                   /* a caller is using the pool */
    int n_pieces, next, left;
    fastfc_copy_fn fn;
    fastfc_piece pieces[FASTFC_POOL_MAX];
    unsigned long copies;       /* copies split across threads (a counter for tests) */
    int atfork;
} fastfc_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
                 PTHREAD_COND_INITIALIZER, 1, 0, 0, 0, 0, 0, NULL, {{0, 0, 0}}, 0, 0};

static void *fastfc_pool_worker(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&fastfc_pool.mu);
    for (;;) {
        while (fastfc_pool.next >= fastfc_pool.n_pieces)
            pthread_cond_wait(&fastfc_pool.work, &fastfc_pool.mu);
        fastfc_piece p = fastfc_pool.pieces[fastfc_pool.next++];
        fastfc_copy_fn fn = fastfc_pool.fn;
        pthread_mutex_unlock(&fastfc_pool.mu);
        fn(p.dst, p.src, p.n);
        pthread_mutex_lock(&fastfc_pool.mu);
        if (--fastfc_pool.left == 0)
            pthread_cond_signal(&fastfc_pool.done);
    }
    return NULL;
}

static void fastfc_pool_after_fork(void)
{
    /* the child has none of the parent's workers */
    pthread_mutex_init(&fastfc_pool.mu, NULL);
    pthread_cond_init(&fastfc_pool.work, NULL);
    pthread_cond_init(&fastfc_pool.done, NULL);
    fastfc_pool.started = 0;
    fastfc_pool.busy = 0;
    fastfc_pool.n_pieces = fastfc_pool.next = fastfc_pool.left = 0;
}

/* Set the number of copy threads (the caller included), 1..FASTFC_POOL_MAX;
   returns it. Workers already started stay; only as many as wanted work. */
static int fastfc_pool_set_threads(int n)
{
    if (n < 1)
        n = 1;
    if (n > FASTFC_POOL_MAX)
        n = FASTFC_POOL_MAX;
    pthread_mutex_lock(&fastfc_pool.mu);
    fastfc_pool.threads = n;
    if (!fastfc_pool.atfork) {
        pthread_atfork(NULL, NULL, fastfc_pool_after_fork);
        fastfc_pool.atfork = 1;
    }
    pthread_mutex_unlock(&fastfc_pool.mu);
    return n;
}

/* Copy n bytes src -> dst with fn, split across the pool when it is worth it
   and free. Returns the number of threads that took part. */
static int fastfc_pool_copy(uint8_t *dst, const uint8_t *src, size_t n, size_t min_piece,
                            fastfc_copy_fn fn)
{
    int k = fastfc_pool.threads, i;
    size_t piece, off;
    if (k <= 1 || n < 2 * min_piece || pthread_mutex_trylock(&fastfc_pool.mu) != 0) {
        fn(dst, src, n);
        return 1;
    }
    if (fastfc_pool.busy) {
        pthread_mutex_unlock(&fastfc_pool.mu);
        fn(dst, src, n);
        return 1;
    }
    k = fastfc_pool.threads;
    while (fastfc_pool.started < k - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&t, &attr, fastfc_pool_worker, NULL);
        pthread_attr_destroy(&attr);
        if (err)
            break;
        fastfc_pool.started++;
    }
    if (k > fastfc_pool.started + 1)
        k = fastfc_pool.started + 1;
    if ((size_t)k > n / min_piece)
        k = (int)(n / min_piece);
    if (k <= 1) {
        pthread_mutex_unlock(&fastfc_pool.mu);
        fn(dst, src, n);
        return 1;
    }
    /* k pieces of whole pages; the caller takes the last (the remainder) */
    piece = ((n / k) + 4095) & ~(size_t)4095;
    off = 0;
    for (i = 0; i < k - 1; i++) {
        fastfc_pool.pieces[i].dst = dst + off;
        fastfc_pool.pieces[i].src = src + off;
        fastfc_pool.pieces[i].n = piece;
        off += piece;
    }
    fastfc_pool.fn = fn;
    fastfc_pool.n_pieces = k - 1;
    fastfc_pool.next = 0;
    fastfc_pool.left = k - 1;
    fastfc_pool.busy = 1;
    fastfc_pool.copies++;
    pthread_cond_broadcast(&fastfc_pool.work);
    pthread_mutex_unlock(&fastfc_pool.mu);
    fn(dst + off, src + off, n - off);
    pthread_mutex_lock(&fastfc_pool.mu);
    /* pieces no worker has taken yet: take them here */
    while (fastfc_pool.next < fastfc_pool.n_pieces) {
        fastfc_piece p = fastfc_pool.pieces[fastfc_pool.next++];
        pthread_mutex_unlock(&fastfc_pool.mu);
        fn(p.dst, p.src, p.n);
        pthread_mutex_lock(&fastfc_pool.mu);
        fastfc_pool.left--;
    }
    while (fastfc_pool.left > 0)
        pthread_cond_wait(&fastfc_pool.done, &fastfc_pool.mu);
    fastfc_pool.n_pieces = fastfc_pool.next = 0;
    fastfc_pool.busy = 0;
    pthread_mutex_unlock(&fastfc_pool.mu);
    return k;
}

#endif
