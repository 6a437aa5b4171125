# Included by _core.pyx: the hold a Global Mirror session's CG attempt puts
# on the NBD connection threads of ``fastfc serve`` (fastfc/tools/nbd.py,
# Turn.hold), and those threads' socket calls, which wait at the hold
# without the GIL before they go back into Python.
#
# Why: a CG attempt in the server takes the turn (nbd.Turn) so that the
# request threads do not run batches meanwhile; but every request thread
# that comes back from a recv or a send still takes the GIL to get as far as
# the turn, and the loop, each time it gives the GIL up (its rest, the wait
# for the turn, a drain without the GIL), waited behind them to get it back:
# the GIL is not handed over in the order asked, and under load the loop
# lost it again and again (tens of ms in one attempt). Held, the threads
# coming out of a socket call wait here instead, GIL-free; only those
# already in Python when the hold began stand between the loop and the GIL.

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_condattr_init(pthread_condattr_t*)
    int pthread_condattr_setclock(pthread_condattr_t*, int)
    int pthread_condattr_destroy(pthread_condattr_t*)
    int pthread_cond_init(pthread_cond_t*, pthread_condattr_t*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_broadcast(pthread_cond_t*)
    int pthread_cond_timedwait(pthread_cond_t*, pthread_mutex_t*, const timespec*)

from posix.types cimport time_t

cdef extern from "<time.h>" nogil:
    int nanosleep(const timespec*, timespec*)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_recv "recv" (int, void*, size_t, int)
    ssize_t c_send "send" (int, const void*, size_t, int)
    int MSG_NOSIGNAL


cdef class TurnHold:
    """A hold on the NBD connection threads while a session's CG attempt
    asks for or holds the server's turn: a thread's socket call
    (:func:`nbd_recv_into`, :func:`nbd_send_all`) waits here, without the
    GIL, after the call and before it goes back into Python, while the
    hold is on (at most its ``wait`` seconds, then it goes on).

    :meth:`hold` puts it on (after a rest, slept without the GIL: the loop
    then comes back to the GIL with the hold already on), :meth:`release`
    takes it off and lets every waiting thread go; holds count (two
    sessions may hold at once). A thread waiting here holds no turn place
    and no lock: the hold orders only who runs Python next."""

    cdef pthread_mutex_t mutex
    cdef pthread_cond_t cond
    cdef bint ready
    cdef int count                     # holds on now
    cdef unsigned long long generation  # releases so far (a waiter goes after one)
    cdef unsigned long long n_waits     # threads that waited here, in all
    cdef unsigned long long waits_then  # n_waits when the hold went on

    def __cinit__(self):
        cdef pthread_condattr_t attr
        if pthread_mutex_init(&self.mutex, NULL) != 0:
            raise MemoryError("could not make a turn hold's mutex")
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        if pthread_cond_init(&self.cond, &attr) != 0:
            pthread_condattr_destroy(&attr)
            pthread_mutex_destroy(&self.mutex)
            raise MemoryError("could not make a turn hold's condition")
        pthread_condattr_destroy(&attr)
        self.ready = True

    def __dealloc__(self):
        if self.ready:
            pthread_cond_destroy(&self.cond)
            pthread_mutex_destroy(&self.mutex)

    @property
    def held(self):
        """How many holds are on now."""
        return self.count

    @property
    def waits(self):
        """How many times a thread waited at the hold (tests, figures)."""
        return self.n_waits

    @property
    def waited(self):
        """Whether a thread waited at the hold since it went on."""
        return self.count > 0 and self.n_waits > self.waits_then

    def hold(self, double rest=0.0):
        """Sleep ``rest`` seconds without the GIL, then put the hold on."""
        if rest != rest or rest < 0:
            rest = 0.0
        with nogil:
            _sleep(rest)
            self._on()

    def rest(self, double rest=0.0):
        """Take one hold off (as :meth:`release`), sleep ``rest`` seconds and
        put it on again, all without the GIL: a loop that kept the hold on
        from the end of one attempt to the start of its rest lets the
        threads go only once it is out of their way."""
        if rest != rest or rest < 0:
            rest = 0.0
        with nogil:
            self._off()
            _sleep(rest)
            self._on()

    cdef void _on(self) noexcept nogil:
        pthread_mutex_lock(&self.mutex)
        if self.count == 0:
            self.waits_then = self.n_waits
        self.count += 1
        pthread_mutex_unlock(&self.mutex)

    cdef bint _off(self) noexcept nogil:
        cdef bint waited
        pthread_mutex_lock(&self.mutex)
        waited = self.n_waits > self.waits_then
        if self.count > 0:
            self.count -= 1
        if self.count == 0:
            self.generation += 1
            pthread_cond_broadcast(&self.cond)
        pthread_mutex_unlock(&self.mutex)
        return waited

    def release(self):
        """Take one hold off; the last lets every waiting thread go. Returns
        whether a thread waited at the hold since it went on (the connections
        wanted to work meanwhile: a session rests before it holds again). The GIL
        is kept throughout (the mutex is held only for moments, never by a
        thread waiting for the GIL): giving it up here, the loop would wait
        to get it back behind the very threads it just let go."""
        return self._off()

    def wait(self, double timeout):
        """Wait while the hold is on, at most ``timeout`` seconds (what a
        socket call does after it returns); True if it waited."""
        cdef bint waited
        with nogil:
            waited = self._wait(timeout)
        return waited

    cdef bint _wait(self, double timeout) noexcept nogil:
        cdef timespec ts
        cdef double end
        cdef unsigned long long gen
        if self.count == 0:            # (unlocked: a hold just put on is missed, as
            return False               # by a thread a moment ahead of it)
        pthread_mutex_lock(&self.mutex)
        if self.count == 0:
            pthread_mutex_unlock(&self.mutex)
            return False
        self.n_waits += 1
        gen = self.generation
        end = monotonic() + timeout
        ts.tv_sec = <time_t>end
        ts.tv_nsec = <long>((end - ts.tv_sec) * 1e9)
        while self.count > 0 and self.generation == gen:
            if pthread_cond_timedwait(&self.cond, &self.mutex, &ts) != 0 and \
                    monotonic() >= end:
                break
        pthread_mutex_unlock(&self.mutex)
        return True

    def __repr__(self):
        return f"<TurnHold {'on' if self.count else 'off'} ({self.count}), {self.n_waits} waits>"


cdef void _sleep(double seconds) noexcept nogil:
    cdef timespec ts
    if seconds <= 0:
        return
    ts.tv_sec = <time_t>seconds
    ts.tv_nsec = <long>((seconds - ts.tv_sec) * 1e9)
    while nanosleep(&ts, &ts) != 0 and errno == EINTR:
        pass


cdef inline char* _bytearray_at(bytearray buf, Py_ssize_t at, Py_ssize_t n) except NULL:
    if at < 0 or n < 0 or at + n > PyByteArray_GET_SIZE(buf):
        raise ValueError(f"{n} bytes at {at} are outside a buffer of "
                         f"{PyByteArray_GET_SIZE(buf)}")
    return PyByteArray_AS_STRING(buf) + at


def nbd_recv_into(int fd, bytearray buf, Py_ssize_t at, Py_ssize_t n,
                  TurnHold hold not None, double wait):
    """``recv`` on the blocking socket ``fd`` into ``buf[at:at + n]``
    without the GIL; then, while ``hold`` is on, wait at it (at most
    ``wait`` s) before taking the GIL back. Returns the bytes received (0:
    the client closed); raises OSError as ``socket.recv_into`` does. The
    caller resizes ``buf`` in no other thread."""
    cdef char* p = _bytearray_at(buf, at, n)
    cdef ssize_t got
    cdef int err = 0
    with nogil:
        while True:
            got = c_recv(fd, p, n, 0)
            if got >= 0 or errno != EINTR:
                break
        if got < 0:
            err = errno
        else:
            hold._wait(wait)
    if got < 0:
        raise OSError(err, os.strerror(err))
    return got


def nbd_send_all(int fd, bytearray out, TurnHold hold not None, double wait):
    """Send all of ``out`` on the blocking socket ``fd`` without the GIL (as
    ``socket.sendall``); then, while ``hold`` is on, wait at it (at most
    ``wait`` s) before taking the GIL back. Raises OSError (a send that
    failed: what went before it stays sent)."""
    cdef Py_ssize_t n = PyByteArray_GET_SIZE(out)
    cdef char* p = _bytearray_at(out, 0, n)
    cdef ssize_t sent
    cdef Py_ssize_t done = 0
    cdef int err = 0
    with nogil:
        while done < n:
            sent = c_send(fd, p + done, n - done, MSG_NOSIGNAL)
            if sent < 0:
                if errno == EINTR:
                    continue
                err = errno
                break
            done += sent
        if not err:
            hold._wait(wait)
    if err:
        raise OSError(err, os.strerror(err))
