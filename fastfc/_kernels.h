/* fastfc's word-array and copy kernels, chosen at run time.

   The extension is built for a baseline ISA (setup.py: x86-64-v2 unless
   FASTFC_NATIVE=1 or FASTFC_PORTABLE=1), so a wheel runs on any CPU of that
   level. The kernels that gain from wide vectors come in up to three variants
   compiled with GCC/Clang target attributes, and fastfc_select_kernels() (called
   once at module init) points a table at the best variant this CPU runs:

       scalar   plain C at the build's baseline (POPCNT, SSE2 on x86-64)
       avx2     256-bit vectors (Haswell, Zen and later)
       avx512   512-bit vectors (AVX-512F; popcount also needs VPOPCNTDQ)

   Only the *_avx2 and *_avx512 functions hold instructions past the baseline;
   scripts/isa_count.py checks that in the built .so. Elsewhere (not x86, or a
   compiler without target attributes) only the scalar kernels exist.

   Which kernel copies a large run (memcpy, or streaming stores in four streams
   or one) is no vector level: it is timed on this machine at the first large
   copy (the end of this file, "Which kernel copies a large run").

   Bit i of a bitmap lives in word i >> 6 at position i & 63. */
#ifndef FASTFC_KERNELS_H
#define FASTFC_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define FASTFC_X86 1
#include <immintrin.h>
#define FASTFC_TARGET_AVX2 __attribute__((target("avx2,popcnt")))
#define FASTFC_TARGET_AVX512 __attribute__((target("avx512f,avx512vpopcntdq,avx2,popcnt")))
#endif

enum { FASTFC_SCALAR = 0, FASTFC_AVX2 = 1, FASTFC_AVX512 = 2 };
static const char *const fastfc_level_names[] = {"scalar", "avx2", "avx512"};

enum { FASTFC_OP_OR = 0, FASTFC_OP_AND = 1, FASTFC_OP_ANDNOT = 2, FASTFC_OP_COPY = 3 };


/* ---------------------------------------------------------------------------
   Word loops the compiler vectorises by itself: d op= s, r = a | b | c, a == b.
   One body, compiled once per target. */
#define FASTFC_WORD_LOOPS(SUFFIX, ATTR)                                               \
    static ATTR void fastfc_words_op_##SUFFIX(int op, uint64_t *d,                    \
                                              const uint64_t *s, Py_ssize_t n) \
    {                                                                                 \
        Py_ssize_t k;                                                                 \
        if (op == FASTFC_OP_OR)                                                       \
            for (k = 0; k < n; k++) d[k] |= s[k];                                     \
        else if (op == FASTFC_OP_AND)                                                 \
            for (k = 0; k < n; k++) d[k] &= s[k];                                     \
        else if (op == FASTFC_OP_ANDNOT)                                              \
            for (k = 0; k < n; k++) d[k] &= ~s[k];                                    \
        else                                                                          \
            memcpy(d, s, (size_t)n * 8);                                              \
    }                                                                                 \
    static ATTR void fastfc_or3_words_##SUFFIX(uint64_t *r,                           \
                                               const uint64_t *a, const uint64_t *b,  \
                                               const uint64_t *c, Py_ssize_t n)       \
    {                                                                                 \
        Py_ssize_t k;                                                                 \
        for (k = 0; k < n; k++) r[k] = a[k] | b[k] | c[k];                            \
    }

FASTFC_WORD_LOOPS(scalar, )
#ifdef FASTFC_X86
FASTFC_WORD_LOOPS(avx2, FASTFC_TARGET_AVX2)
FASTFC_WORD_LOOPS(avx512, FASTFC_TARGET_AVX512)
#endif


/* ---------------------------------------------------------------------------
   Set bits in w[0, n). */
static long long fastfc_popcount_words_scalar(const uint64_t *w, Py_ssize_t n)
{
    /* four independent accumulators, so the adds do not wait on each other */
    Py_ssize_t k = 0;
    long long c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    for (; k + 4 <= n; k += 4) {
        c0 += __builtin_popcountll(w[k]);
        c1 += __builtin_popcountll(w[k + 1]);
        c2 += __builtin_popcountll(w[k + 2]);
        c3 += __builtin_popcountll(w[k + 3]);
    }
    for (; k < n; k++)
        c0 += __builtin_popcountll(w[k]);
    return c0 + c1 + c2 + c3;
}

#ifdef FASTFC_X86
/* Nibble lookups with VPSHUFB (Mula): byte counts add up in 8-bit lanes for
   up to 31 steps (at most 8 per step, 248 < 256), then VPSADBW folds them. */
static FASTFC_TARGET_AVX2 long long fastfc_popcount_words_avx2(const uint64_t *w, Py_ssize_t n)
{
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256i acc = zero;
    Py_ssize_t k = 0;
    long long c = 0;
    while (k + 8 <= n) {
        __m256i b0 = zero, b1 = zero;
        Py_ssize_t stop = k + 8 * 31 < n ? k + 8 * 31 : n;
        for (; k + 8 <= stop; k += 8) {
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + k));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + k + 4));
            b0 = _mm256_add_epi8(b0, _mm256_add_epi8(
                _mm256_shuffle_epi8(lut, _mm256_and_si256(v0, low)),
                _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v0, 4), low))));
            b1 = _mm256_add_epi8(b1, _mm256_add_epi8(
                _mm256_shuffle_epi8(lut, _mm256_and_si256(v1, low)),
                _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v1, 4), low))));
        }
        acc = _mm256_add_epi64(acc, _mm256_add_epi64(_mm256_sad_epu8(b0, zero),
                                                     _mm256_sad_epu8(b1, zero)));
    }
    c = _mm256_extract_epi64(acc, 0) + _mm256_extract_epi64(acc, 1)
        + _mm256_extract_epi64(acc, 2) + _mm256_extract_epi64(acc, 3);
    for (; k < n; k++)
        c += __builtin_popcountll(w[k]);
    return c;
}

/* VPOPCNTQ: 32 words per step in four accumulators. */
static FASTFC_TARGET_AVX512 long long fastfc_popcount_words_avx512(const uint64_t *w, Py_ssize_t n)
{
    Py_ssize_t k = 0;
    long long c = 0;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    /* NumPy arrays are often 16-byte aligned: a 64-byte load would then
       straddle two cache lines every time (measured: 1.6x slower in L2) */
    for (; k < n && ((uintptr_t)(w + k) & 63); k++)
        c += __builtin_popcountll(w[k]);
    for (; k + 32 <= n; k += 32) {
        a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_loadu_si512(w + k)));
        a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_loadu_si512(w + k + 8)));
        a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(_mm512_loadu_si512(w + k + 16)));
        a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(_mm512_loadu_si512(w + k + 24)));
    }
    c += _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1),
                                                  _mm512_add_epi64(a2, a3)));
    for (; k < n; k++)
        c += __builtin_popcountll(w[k]);
    return c;
}
#endif


/* ---------------------------------------------------------------------------
   Index of the first non-zero word in w[k, n), or n. */
static Py_ssize_t fastfc_first_nonzero_word_scalar(const uint64_t *w, Py_ssize_t k, Py_ssize_t n)
{
    for (; k + 8 <= n; k += 8)
        if (w[k] | w[k + 1] | w[k + 2] | w[k + 3] | w[k + 4] | w[k + 5] | w[k + 6] | w[k + 7])
            break;
    for (; k < n; k++)
        if (w[k])
            return k;
    return n;
}

#ifdef FASTFC_X86
/* 128 bytes per step. */
static FASTFC_TARGET_AVX2 Py_ssize_t fastfc_first_nonzero_word_avx2(const uint64_t *w, Py_ssize_t k,
                                                                    Py_ssize_t n)
{
    for (; k < n && ((uintptr_t)(w + k) & 63); k++)   /* align the loads */
        if (w[k])
            return k;
    for (; k + 16 <= n; k += 16) {
        __m256i a = _mm256_or_si256(
            _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(w + k)),
                            _mm256_loadu_si256((const __m256i *)(w + k + 4))),
            _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(w + k + 8)),
                            _mm256_loadu_si256((const __m256i *)(w + k + 12))));
        if (!_mm256_testz_si256(a, a))
            break;
    }
    for (; k < n; k++)
        if (w[k])
            return k;
    return n;
}

/* 256 bytes per step. */
static FASTFC_TARGET_AVX512 Py_ssize_t fastfc_first_nonzero_word_avx512(const uint64_t *w, Py_ssize_t k,
                                                                        Py_ssize_t n)
{
    for (; k < n && ((uintptr_t)(w + k) & 63); k++)   /* align the loads */
        if (w[k])
            return k;
    for (; k + 32 <= n; k += 32) {
        __m512i a = _mm512_or_si512(
            _mm512_or_si512(_mm512_loadu_si512(w + k), _mm512_loadu_si512(w + k + 8)),
            _mm512_or_si512(_mm512_loadu_si512(w + k + 16), _mm512_loadu_si512(w + k + 24)));
        if (_mm512_test_epi64_mask(a, a))
            break;
    }
    for (; k < n; k++)
        if (w[k])
            return k;
    return n;
}
#endif


/* ---------------------------------------------------------------------------
   Copy n bytes with non-temporal (streaming) stores. A track copied to a
   FlashCopy target is not read back soon, so skipping the read-for-ownership
   of each destination line (and leaving the caches alone) saves a third of the
   memory traffic. glibc's memcpy streams only above its non-temporal threshold
   (about 3/4 of the L3 share, often 100+ MiB), which a copy done in bounded
   chunks or track by track never reaches.

   Four 4 KiB streams at once, two lines of each per step, with the next
   step's lines prefetched (as glibc's large memcpy does): more DRAM pages and
   prefetch streams in flight than one linear pass, which measured 10% slower.
   Without x86 vectors this is memcpy. */
#define FASTFC_PAGE 4096
#define FASTFC_STEP 128   /* bytes per page stream per step: two cache lines */

/* The start of a streaming copy: a copy too short to stream (under four
   pages past the destination's alignment) is a memcpy and returns; else the
   destination's unaligned head is copied and dst, src and n move past it. */
#define FASTFC_STREAM_HEAD(VEC)                                                       \
        size_t head = (size_t)(-(uintptr_t)dst) & (VEC - 1);                          \
        if (n < head + 4 * FASTFC_PAGE) {                                             \
            memcpy(dst, src, n);                                                      \
            return;                                                                   \
        }                                                                             \
        if (head) {                     /* align the destination */                   \
            memcpy(dst, src, head);                                                   \
            dst += head; src += head; n -= head;                                      \
        }

#define FASTFC_COPY_STREAM(SUFFIX, ATTR, VEC, VEC_T, LOADU, STREAM)                   \
    static inline ATTR void fastfc_stream_step_##SUFFIX(uint8_t *dst, const uint8_t *src) \
    {                                                                                 \
        VEC_T v[FASTFC_STEP / VEC];                                                   \
        int u;                                                                        \
        for (u = 0; u < FASTFC_STEP / VEC; u++)                                       \
            v[u] = LOADU(src + u * VEC);                                              \
        for (u = 0; u < FASTFC_STEP / VEC; u++)                                       \
            STREAM(dst + u * VEC, v[u]);                                              \
    }                                                                                 \
    static ATTR void fastfc_copy_stream_##SUFFIX(uint8_t *dst, const uint8_t *src, size_t n) \
    {                                                                                 \
        size_t off, i;                                                                \
        int p;                                                                        \
        FASTFC_STREAM_HEAD(VEC)                                                       \
        while (n >= 4 * FASTFC_PAGE) {                                                \
            for (off = 0; off < FASTFC_PAGE; off += FASTFC_STEP) {                    \
                for (p = 0; p < 4; p++) {                                             \
                    const uint8_t *s = src + p * FASTFC_PAGE + off;                   \
                    __builtin_prefetch(s + FASTFC_STEP, 0, 3);                        \
                    __builtin_prefetch(s + FASTFC_STEP + 64, 0, 3);                   \
                    fastfc_stream_step_##SUFFIX(dst + p * FASTFC_PAGE + off, s);      \
                }                                                                     \
            }                                                                         \
            dst += 4 * FASTFC_PAGE; src += 4 * FASTFC_PAGE; n -= 4 * FASTFC_PAGE;     \
        }                                                                             \
        for (i = 0; i + FASTFC_STEP <= n; i += FASTFC_STEP)                           \
            fastfc_stream_step_##SUFFIX(dst + i, src + i);                            \
        _mm_sfence();   /* streamed stores are weakly ordered: publish them */        \
        if (n > i)                                                                    \
            memcpy(dst + i, src + i, n - i);                                          \
    }

/* One linear stream, the next lines prefetched 1 KiB ahead for one use
   (prefetchnta): on an AMD EPYC (Zen 3, under KVM) the four-stream loop above
   ran at 0.3-0.5x np.copyto while this one matched it. */
#define FASTFC_PREFETCH_AHEAD 1024
#define FASTFC_COPY_STREAM1(SUFFIX, ATTR, VEC)                                        \
    static ATTR void fastfc_copy_stream1_##SUFFIX(uint8_t *dst, const uint8_t *src, size_t n) \
    {                                                                                 \
        size_t i;                                                                     \
        FASTFC_STREAM_HEAD(VEC)                                                       \
        for (i = 0; i + FASTFC_STEP <= n; i += FASTFC_STEP) {                         \
            __builtin_prefetch(src + i + FASTFC_PREFETCH_AHEAD, 0, 0);                \
            __builtin_prefetch(src + i + FASTFC_PREFETCH_AHEAD + 64, 0, 0);           \
            fastfc_stream_step_##SUFFIX(dst + i, src + i);                            \
        }                                                                             \
        _mm_sfence();   /* streamed stores are weakly ordered: publish them */        \
        if (n > i)                                                                    \
            memcpy(dst + i, src + i, n - i);                                          \
    }

#ifdef FASTFC_X86
#define FASTFC_LOADU_128(p) _mm_loadu_si128((const __m128i *)(p))
#define FASTFC_STREAM_128(p, v) _mm_stream_si128((__m128i *)(p), (v))
#define FASTFC_LOADU_256(p) _mm256_loadu_si256((const __m256i *)(p))
#define FASTFC_STREAM_256(p, v) _mm256_stream_si256((__m256i *)(p), (v))
#define FASTFC_LOADU_512(p) _mm512_loadu_si512((const void *)(p))
#define FASTFC_STREAM_512(p, v) _mm512_stream_si512((void *)(p), (v))
FASTFC_COPY_STREAM(scalar, , 16, __m128i, FASTFC_LOADU_128, FASTFC_STREAM_128)   /* SSE2 */
FASTFC_COPY_STREAM(avx2, FASTFC_TARGET_AVX2, 32, __m256i, FASTFC_LOADU_256, FASTFC_STREAM_256)
FASTFC_COPY_STREAM(avx512, FASTFC_TARGET_AVX512, 64, __m512i, FASTFC_LOADU_512, FASTFC_STREAM_512)
FASTFC_COPY_STREAM1(scalar, , 16)
FASTFC_COPY_STREAM1(avx2, FASTFC_TARGET_AVX2, 32)
FASTFC_COPY_STREAM1(avx512, FASTFC_TARGET_AVX512, 64)
#else
static void fastfc_copy_stream_scalar(uint8_t *dst, const uint8_t *src, size_t n)
{
    memcpy(dst, src, n);
}
static void fastfc_copy_stream1_scalar(uint8_t *dst, const uint8_t *src, size_t n)
{
    memcpy(dst, src, n);
}
#endif


/* ---------------------------------------------------------------------------
   The table the rest of the extension calls through, and its selection. */
typedef struct {
    long long (*popcount_words)(const uint64_t *, Py_ssize_t);
    Py_ssize_t (*first_nonzero_word)(const uint64_t *, Py_ssize_t, Py_ssize_t);
    void (*words_op)(int, uint64_t *, const uint64_t *, Py_ssize_t);
    void (*or3_words)(uint64_t *, const uint64_t *, const uint64_t *, const uint64_t *,
                      Py_ssize_t);
    void (*copy_stream)(uint8_t *, const uint8_t *, size_t);
    void (*copy_stream1)(uint8_t *, const uint8_t *, size_t);
    /* the level of each kernel above, in the same order */
    int level[6];
} fastfc_kernel_table;

#define FASTFC_N_KERNELS 6
static const char *const fastfc_kernel_names[FASTFC_N_KERNELS] = {
    "popcount_words", "first_nonzero_word", "words_op", "or3_words", "copy_stream",
    "copy_stream1"};

static fastfc_kernel_table fastfc_k = {
    fastfc_popcount_words_scalar, fastfc_first_nonzero_word_scalar, fastfc_words_op_scalar,
    fastfc_or3_words_scalar, fastfc_copy_stream_scalar, fastfc_copy_stream1_scalar,
    {0, 0, 0, 0, 0, 0}};

#define fastfc_popcount_words(w, n) (fastfc_k.popcount_words((w), (n)))
#define fastfc_first_nonzero_word(w, k, n) (fastfc_k.first_nonzero_word((w), (k), (n)))
#define fastfc_words_op(op, d, s, n) (fastfc_k.words_op((op), (d), (s), (n)))
#define fastfc_or3_words(r, a, b, c, n) (fastfc_k.or3_words((r), (a), (b), (c), (n)))
#define fastfc_copy_stream(d, s, n) (fastfc_k.copy_stream((d), (s), (n)))
#define fastfc_copy_stream1(d, s, n) (fastfc_k.copy_stream1((d), (s), (n)))

/* CPU features the variants need: bit 0 AVX2, bit 1 AVX-512F, bit 2
   AVX-512 VPOPCNTDQ (each only when the OS saves the vector state too). */
enum { FASTFC_HAS_AVX2 = 1, FASTFC_HAS_AVX512F = 2, FASTFC_HAS_VPOPCNTDQ = 4 };

static int fastfc_cpu_features(void)
{
    int f = 0;
#ifdef FASTFC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        f |= FASTFC_HAS_AVX2;
    if (__builtin_cpu_supports("avx512f"))
        f |= FASTFC_HAS_AVX512F;
    if (__builtin_cpu_supports("avx512vpopcntdq"))
        f |= FASTFC_HAS_VPOPCNTDQ;
#endif
    return f;
}

/* Whether this CPU lacks an instruction set the build's baseline assumes
   (setup.py's -march): then nothing may run, and import must fail cleanly. */
static const char *fastfc_missing_baseline(void)
{
#if defined(FASTFC_X86) && defined(__SSE4_2__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("sse4.2") || !__builtin_cpu_supports("popcnt"))
        return "SSE4.2 and POPCNT (x86-64-v2)";
#endif
#if defined(FASTFC_X86) && defined(__AVX2__)
    if (!__builtin_cpu_supports("avx2"))
        return "AVX2";
#endif
#if defined(FASTFC_X86) && defined(__AVX512F__)
    if (!__builtin_cpu_supports("avx512f"))
        return "AVX-512";
#endif
    return NULL;
}

/* The instruction sets the compiler may use everywhere (setup.py's -march). */
static const char *const fastfc_baseline_names[8] = {
#ifdef __SSE4_2__
    "sse4.2",
#endif
#ifdef __POPCNT__
    "popcnt",
#endif
#ifdef __AVX2__
    "avx2",
#endif
#ifdef __AVX512F__
    "avx512f",
#endif
#ifdef __AVX512VPOPCNTDQ__
    "avx512vpopcntdq",
#endif
    NULL};

static int fastfc_baseline_count(void)
{
    int i = 0;
    while (fastfc_baseline_names[i])
        i++;
    return i;
}

/* Point the table at the best variant of each kernel that this CPU runs and
   that is at most ``max_level``. Returns the highest level picked. */
static int fastfc_select_kernels(int max_level)
{
    fastfc_kernel_table t = {
        fastfc_popcount_words_scalar, fastfc_first_nonzero_word_scalar, fastfc_words_op_scalar,
        fastfc_or3_words_scalar, fastfc_copy_stream_scalar, fastfc_copy_stream1_scalar,
    {0, 0, 0, 0, 0, 0}};
    int top = FASTFC_SCALAR;
#ifdef FASTFC_X86
    int f = fastfc_cpu_features(), i;
    if (max_level >= FASTFC_AVX2 && (f & FASTFC_HAS_AVX2)) {
        t.popcount_words = fastfc_popcount_words_avx2;
        t.first_nonzero_word = fastfc_first_nonzero_word_avx2;
        t.words_op = fastfc_words_op_avx2;
        t.or3_words = fastfc_or3_words_avx2;
        t.copy_stream = fastfc_copy_stream_avx2;
        t.copy_stream1 = fastfc_copy_stream1_avx2;
        for (i = 0; i < FASTFC_N_KERNELS; i++)
            t.level[i] = FASTFC_AVX2;
        top = FASTFC_AVX2;
    }
    /* the AVX-512 variants are compiled with AVX2 enabled as well */
    if (max_level >= FASTFC_AVX512 && (f & FASTFC_HAS_AVX512F) && (f & FASTFC_HAS_AVX2)) {
        if (f & FASTFC_HAS_VPOPCNTDQ) {
            t.popcount_words = fastfc_popcount_words_avx512;
            t.level[0] = FASTFC_AVX512;
        }
        t.first_nonzero_word = fastfc_first_nonzero_word_avx512;
        t.words_op = fastfc_words_op_avx512;
        t.or3_words = fastfc_or3_words_avx512;
        t.copy_stream = fastfc_copy_stream_avx512;
        t.copy_stream1 = fastfc_copy_stream1_avx512;
        for (i = 1; i < FASTFC_N_KERNELS; i++)
            t.level[i] = FASTFC_AVX512;
        top = FASTFC_AVX512;
    }
#else
    (void)max_level;
#endif
    fastfc_k = t;
    return top;
}


/* ---------------------------------------------------------------------------
   Which kernel copies a large run, measured on this CPU.

   Streaming stores win or lose by machine: on an Intel Xeon (avx512) the
   four-stream kernel ran 1.86x np.copyto, on an AMD EPYC (avx2, under KVM)
   0.26x. So the first large copy of the process (or copy_kernel()) times the
   candidates on a buffer past the L3 cache, in the pieces a copy thread is
   handed, and keeps the fastest. The measurement must survive a shared,
   noisy machine: the candidates take turns, each round in another order, the
   best of FASTFC_CAL_ROUNDS counts, and one beats the default (memcpy,
   which the C library tunes for the CPU itself) only by FASTFC_COPY_MARGIN.
   FASTFC_COPY names one and skips the measurement (_copy.pxi). */
#include <stdlib.h>
#include <time.h>
#include <pthread.h>
#include <sys/mman.h>

enum { FASTFC_COPY_MEMCPY = 0, FASTFC_COPY_STREAM = 1, FASTFC_COPY_STREAM1 = 2, FASTFC_N_COPY = 3 };
static const char *const fastfc_copy_names[FASTFC_N_COPY] = {"memcpy", "stream", "stream1"};

/* how the copy was chosen */
enum { FASTFC_COPY_UNCHOSEN = 0, FASTFC_COPY_MEASURED = 1, FASTFC_COPY_FORCED = 2,
       FASTFC_COPY_NO_BUFFER = 3, FASTFC_COPY_NO_STREAMS = 4 };

#define FASTFC_CAL_BYTES ((size_t)16 << 20)   /* source and destination: 32 MiB */
#define FASTFC_CAL_PIECE ((size_t)2 << 20)    /* a copy thread's piece of a 4 MiB chunk */
#define FASTFC_CAL_ROUNDS 5
#define FASTFC_COPY_MARGIN 0.15               /* at least 15% faster than memcpy */

typedef struct {
    int kind;                     /* FASTFC_COPY_*, valid once state == 2 */
    int state;                    /* 0 unchosen, 1 being measured, 2 chosen */
    int how;                      /* FASTFC_COPY_MEASURED, ... */
    double seconds[FASTFC_N_COPY];  /* best time of each for FASTFC_CAL_BYTES; 0 unmeasured */
    double cost;                  /* seconds the measurement took, buffers included */
    unsigned long runs[FASTFC_N_COPY];  /* large runs each copied (a counter for tests) */
} fastfc_copy_state;
static fastfc_copy_state fastfc_copy = {FASTFC_COPY_MEMCPY, 0, FASTFC_COPY_UNCHOSEN, {0, 0, 0}, 0,
                                        {0, 0, 0}};

static inline void fastfc_copy_with(int kind, uint8_t *dst, const uint8_t *src, size_t n)
{
    if (kind == FASTFC_COPY_STREAM)
        fastfc_copy_stream(dst, src, n);
    else if (kind == FASTFC_COPY_STREAM1)
        fastfc_copy_stream1(dst, src, n);
    else
        memcpy(dst, src, n);
}

/* The candidate to use, given each one's best time (<= 0: not measured):
   the fastest, if it beats the default's time by more than ``margin`` (a
   fraction); else the default. A pure function, tested with made-up times. */
static int fastfc_copy_decide(const double *seconds, int n, int dflt, double margin)
{
    int best = dflt, i;
    if (dflt < 0 || dflt >= n || !(seconds[dflt] > 0))
        return dflt;
    for (i = 0; i < n; i++)
        if (seconds[i] > 0 && seconds[i] < seconds[best])
            best = i;
    if (best != dflt && !(seconds[best] < seconds[dflt] * (1.0 - margin)))
        best = dflt;
    return best;
}

static double fastfc_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Time every candidate (seconds[k]: best of the rounds for FASTFC_CAL_BYTES).
   The buffers are fresh anonymous memory with huge pages allowed and start
   16 bytes into a page, as a NumPy array's data does. A candidate more than
   twice as slow as the best after the first round sits the others out (never
   the default: a blip can then only keep the default, not pick a slow one).
   Returns 0, or -1 when the buffers could not be had. */
static int fastfc_copy_measure(double *seconds, int dflt)
{
    size_t span = 2 * FASTFC_CAL_BYTES + 4096, off;
    uint8_t *base, *src, *dst;
    int r, j, k;
    double fastest = 0;
    base = (uint8_t *)mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == (uint8_t *)MAP_FAILED)
        return -1;
#ifdef MADV_HUGEPAGE
    madvise(base, span, MADV_HUGEPAGE);
#endif
    src = base + 16;
    dst = base + FASTFC_CAL_BYTES + 4096 + 16;
    memset(base, 0x5a, span);   /* real pages, not the shared zero page */
    for (k = 0; k < FASTFC_N_COPY; k++)
        seconds[k] = 0;
    for (r = 0; r < FASTFC_CAL_ROUNDS; r++) {
        for (j = 0; j < FASTFC_N_COPY; j++) {
            double t;
            k = (r + j) % FASTFC_N_COPY;   /* each round in another order */
            if (r > 0 && k != dflt && seconds[k] > 2 * fastest)
                continue;
            t = fastfc_now();
            for (off = 0; off + FASTFC_CAL_PIECE <= FASTFC_CAL_BYTES; off += FASTFC_CAL_PIECE)
                fastfc_copy_with(k, dst + off, src + off, FASTFC_CAL_PIECE - 16);
            t = fastfc_now() - t;
            if (seconds[k] == 0 || t < seconds[k])
                seconds[k] = t;
        }
        for (k = 0; k < FASTFC_N_COPY; k++)
            if (fastest == 0 || seconds[k] < fastest)
                fastest = seconds[k];
    }
    munmap(base, span);
    return 0;
}

/* Choose the copy now (measuring it unless there are no streaming kernels)
   if nobody has; returns the kind. A thread that finds another measuring
   copies with memcpy meanwhile rather than wait. */
static int fastfc_copy_choose(void)
{
    int expected = 0;
    if (__atomic_load_n(&fastfc_copy.state, __ATOMIC_ACQUIRE) == 2)
        return fastfc_copy.kind;
    if (!__atomic_compare_exchange_n(&fastfc_copy.state, &expected, 1, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        return expected == 2 ? fastfc_copy.kind : FASTFC_COPY_MEMCPY;
    {
        double t0 = fastfc_now();
#ifdef FASTFC_X86
        if (fastfc_copy_measure(fastfc_copy.seconds, FASTFC_COPY_MEMCPY) == 0) {
            fastfc_copy.kind = fastfc_copy_decide(fastfc_copy.seconds, FASTFC_N_COPY,
                                                  FASTFC_COPY_MEMCPY, FASTFC_COPY_MARGIN);
            fastfc_copy.how = FASTFC_COPY_MEASURED;
        } else {
            fastfc_copy.kind = FASTFC_COPY_MEMCPY;
            fastfc_copy.how = FASTFC_COPY_NO_BUFFER;
        }
#else
        fastfc_copy.kind = FASTFC_COPY_MEMCPY;
        fastfc_copy.how = FASTFC_COPY_NO_STREAMS;
#endif
        fastfc_copy.cost = fastfc_now() - t0;
    }
    __atomic_store_n(&fastfc_copy.state, 2, __ATOMIC_RELEASE);
    return fastfc_copy.kind;
}

/* Use ``kind`` from now on (FASTFC_COPY, tests); -1: measure again at the
   next large copy. No copy may be running in another thread meanwhile. */
static void fastfc_copy_force(int kind)
{
    int k;
    for (k = 0; k < FASTFC_N_COPY; k++)
        fastfc_copy.seconds[k] = 0;
    fastfc_copy.cost = 0;
    if (kind < 0) {
        fastfc_copy.how = FASTFC_COPY_UNCHOSEN;
        fastfc_copy.kind = FASTFC_COPY_MEMCPY;
        __atomic_store_n(&fastfc_copy.state, 0, __ATOMIC_RELEASE);
        return;
    }
    fastfc_copy.kind = kind;
    fastfc_copy.how = FASTFC_COPY_FORCED;
    __atomic_store_n(&fastfc_copy.state, 2, __ATOMIC_RELEASE);
}

/* A child forked while its parent measured has no measuring thread. */
static void fastfc_copy_after_fork(void)
{
    if (fastfc_copy.state == 1)
        fastfc_copy.state = 0;
}

static void fastfc_copy_init(void)
{
    pthread_atfork(NULL, NULL, fastfc_copy_after_fork);
}

/* Copy a large run (>= STREAM_BYTES) with the chosen kernel. */
static inline void fastfc_copy_large(uint8_t *dst, const uint8_t *src, size_t n)
{
    int kind = __atomic_load_n(&fastfc_copy.state, __ATOMIC_ACQUIRE) == 2
                   ? fastfc_copy.kind : fastfc_copy_choose();
    __atomic_fetch_add(&fastfc_copy.runs[kind], 1, __ATOMIC_RELAXED);
    fastfc_copy_with(kind, dst, src, n);
}

#endif /* FASTFC_KERNELS_H */
