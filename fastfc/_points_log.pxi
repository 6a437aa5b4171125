# Included by _core.pyx before _points.pxi: the log of a durable chain of
# recovery points (storage units), a file mapped shared and grown in chunks,
# as the grain pool is. Appending a record is a few stores into the mapping:
# no system call per record.
#
# The file: a header record, then records of four int64s (32 bytes, so that
# none straddles a 4 KiB page): kind, two values, a check word (a hash of
# the three and of the record's index). The first record that is all zeros,
# or whose check does not match, ends the log (what follows it is never read
# and is zeroed when the log is opened for appending). Kinds:
# LOG_SAVE (grain, slot): the newest point took ``grain`` into ``slot``;
# LOG_TAKE (seq, 0): a point was taken; LOG_EXPIRE (seq, 0): it expired;
# LOG_NEXT_SEQ (seq, 0): the next point taken gets ``seq`` (a compacted log
# skips the seqs of expired points with it).
#
# Order. Process kill: the stores are in memory in program order (a grain's
# bytes in the pool, then its record, then the host write), and the page
# cache keeps every one. Power cut (durability "power": the chain is
# ``ordered``): the kernel may write any dirty page back at any time, so a
# save syncs the pool (its grains on the disk) before it writes the records,
# and syncs the log before the host write lands; a take or an expiry syncs
# the log before its lock is released (an expiry's freed slots are reused
# only after the log says they are free).

cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void* addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_PRIVATE, MAP_POPULATE
    void* MAP_FAILED

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, off_t length)
    off_t lseek(int fd, off_t offset, int whence)
    int SEEK_END

cdef enum:
    LOG_SAVE = 1
    LOG_TAKE = 2
    LOG_EXPIRE = 3
    LOG_NEXT_SEQ = 4
    LOG_WORDS = 4            # int64s per record
    LOG_FIRST_BYTES = 65536  # a new log's first chunk; it doubles, 16 MiB at most per step

# "FFCPLOG2" (little-endian), the header's first word
LOG_MAGIC = 0x32474f4c50434646
cdef int64_t LOG_MAGIC_C = LOG_MAGIC


cdef inline int64_t log_check(int64_t kind, int64_t a, int64_t b, int64_t index) noexcept nogil:
    """The check word of a record (never 0 for a record of a known kind)."""
    cdef uint64_t h = <uint64_t>index * <uint64_t>0x9E3779B97F4A7C15ULL
    h ^= <uint64_t>kind * <uint64_t>0xBF58476D1CE4E5B9ULL
    h = (h ^ (h >> 31)) * <uint64_t>0x94D049BB133111EBULL
    h ^= <uint64_t>a
    h = (h ^ (h >> 29)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    h ^= <uint64_t>b
    h = (h ^ (h >> 32)) * <uint64_t>0x94D049BB133111EBULL
    h ^= h >> 31
    return <int64_t>(h | 1)


cdef struct PointLog:
    int fd                   # -1: not logging
    int64_t* map             # the file's mapping (LOG_WORDS int64s a record)
    Py_ssize_t cap           # records the mapping holds (the header included)
    Py_ssize_t n             # records written (the header included)
    bint ordered             # durability "power": the syncs above


cdef int log_sync_fd(int fd) except -1:
    """fdatasync through ``os`` (the power-cut tests watch it): the data and
    what reading it needs (the size, the blocks), not the times."""
    os.fdatasync(fd)
    return 0


cdef void log_unmap(PointLog* lg) noexcept:
    if lg.map != NULL:
        munmap(lg.map, <size_t>lg.cap * LOG_WORDS * sizeof(int64_t))
    lg.map = NULL
    lg.cap = lg.n = 0
    lg.fd = -1


cdef int log_map_file(PointLog* lg, int fd, Py_ssize_t records) except -1:
    """Map the file ``fd`` (grown to room for ``records`` at least, its
    blocks allocated) in place of the current mapping."""
    cdef size_t size = <size_t>records * LOG_WORDS * sizeof(int64_t)
    cdef off_t have = lseek(fd, 0, SEEK_END)
    cdef int err
    cdef void* p
    if have < 0:
        raise OSError(errno, "cannot size the recovery points' log")
    if <size_t>have > size:
        size = <size_t>have
    size = (size + 4095) & ~(<size_t>4095)
    err = posix_fallocate(fd, 0, <off_t>size)
    if err != 0:
        raise OSError(err, f"cannot grow the recovery points' log: {os.strerror(err)}")
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if p == MAP_FAILED:
        raise OSError(errno, "cannot map the recovery points' log")
    if lg.map != NULL:
        munmap(lg.map, <size_t>lg.cap * LOG_WORDS * sizeof(int64_t))
    lg.map = <int64_t*>p
    lg.cap = <Py_ssize_t>(size // (LOG_WORDS * sizeof(int64_t)))
    lg.fd = fd
    return 0


cdef int log_open(PointLog* lg, int fd, Py_ssize_t valid) except -1:
    """Append to the log file ``fd`` after its first ``valid`` records (0: a
    new log: the header is written). What follows them is zeroed."""
    cdef Py_ssize_t keep = valid + 1, i, last = -1
    log_map_file(lg, fd, max(keep + 1, LOG_FIRST_BYTES // (LOG_WORDS * 8)))
    if valid == 0:
        memset(lg.map, 0, LOG_WORDS * sizeof(int64_t))
        lg.map[0] = LOG_MAGIC_C
        lg.map[1] = LOG_WORDS
    for i in range(keep * LOG_WORDS, lg.cap * LOG_WORDS):
        if lg.map[i] != 0:
            last = i
    if last >= 0:
        memset(lg.map + keep * LOG_WORDS, 0, (last + 1 - keep * LOG_WORDS) * sizeof(int64_t))
    lg.n = keep
    return 0


cdef int log_append(PointLog* lg, int64_t kind, int64_t a, int64_t b) except -1:
    """Append one record (room grown first). Raises OSError if the file
    cannot grow."""
    cdef int64_t* r
    cdef Py_ssize_t grow
    if lg.n == lg.cap:
        grow = lg.cap if lg.cap < (16 << 20) // (LOG_WORDS * 8) else (16 << 20) // (LOG_WORDS * 8)
        log_map_file(lg, lg.fd, lg.cap + grow)
    r = lg.map + lg.n * LOG_WORDS
    r[0] = kind
    r[1] = a
    r[2] = b
    r[3] = log_check(kind, a, b, lg.n)
    lg.n += 1
    return 0


def point_log_records(const int64_t[::1] words):
    """The records of a log file's words (header first): an (n, 3) int64
    array of (kind, a, b), up to the first record that is all zeros or
    fails its check. ValueError if the header is not a log's."""
    cdef Py_ssize_t n = words.shape[0] // LOG_WORDS, i
    cdef const int64_t* w
    if n == 0 or words[0] == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if words[0] != LOG_MAGIC_C or words[1] != LOG_WORDS:
        raise ValueError("not a recovery points' log (its header)")
    for i in range(1, n):
        w = &words[i * LOG_WORDS]
        if w[0] == 0 or w[3] != log_check(w[0], w[1], w[2], i):
            break
    else:
        i = n
    out = np.asarray(words[LOG_WORDS:i * LOG_WORDS]).reshape(-1, LOG_WORDS)[:, :3]
    return np.ascontiguousarray(out)


def point_log_bytes(const int64_t[:, ::1] records):
    """A whole log file (header, then ``records``: an (n, 3) int64 array)."""
    cdef Py_ssize_t n = records.shape[0], i
    if records.shape[1] != 3:
        raise ValueError("records must be an (n, 3) array")
    out = np.zeros((n + 1) * LOG_WORDS, dtype=np.int64)
    cdef int64_t[::1] o = out
    o[0] = LOG_MAGIC_C
    o[1] = LOG_WORDS
    for i in range(n):
        o[(i + 1) * LOG_WORDS] = records[i, 0]
        o[(i + 1) * LOG_WORDS + 1] = records[i, 1]
        o[(i + 1) * LOG_WORDS + 2] = records[i, 2]
        o[(i + 1) * LOG_WORDS + 3] = log_check(records[i, 0], records[i, 1], records[i, 2],
                                               i + 1)
    return out.tobytes()
