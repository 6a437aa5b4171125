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
        size_t head = (size_t)(-(uintptr_t)dst) & (VEC - 1);                          \
        size_t off, i;                                                                \
        int p;                                                                        \
        if (n < head + 4 * FASTFC_PAGE) {                                             \
            memcpy(dst, src, n);                                                      \
            return;                                                                   \
        }                                                                             \
        if (head) {                     /* align the destination */                   \
            memcpy(dst, src, head);                                                   \
            dst += head; src += head; n -= head;                                      \
        }                                                                             \
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
#else
static void fastfc_copy_stream_scalar(uint8_t *dst, const uint8_t *src, size_t n)
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
    /* the level of each kernel above, in the same order */
    int level[5];
} fastfc_kernel_table;

#define FASTFC_N_KERNELS 5
static const char *const fastfc_kernel_names[FASTFC_N_KERNELS] = {
    "popcount_words", "first_nonzero_word", "words_op", "or3_words", "copy_stream"};

static fastfc_kernel_table fastfc_k = {
    fastfc_popcount_words_scalar, fastfc_first_nonzero_word_scalar, fastfc_words_op_scalar,
    fastfc_or3_words_scalar, fastfc_copy_stream_scalar, {0, 0, 0, 0, 0}};

#define fastfc_popcount_words(w, n) (fastfc_k.popcount_words((w), (n)))
#define fastfc_first_nonzero_word(w, k, n) (fastfc_k.first_nonzero_word((w), (k), (n)))
#define fastfc_words_op(op, d, s, n) (fastfc_k.words_op((op), (d), (s), (n)))
#define fastfc_or3_words(r, a, b, c, n) (fastfc_k.or3_words((r), (a), (b), (c), (n)))
#define fastfc_copy_stream(d, s, n) (fastfc_k.copy_stream((d), (s), (n)))

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
        fastfc_or3_words_scalar, fastfc_copy_stream_scalar, {0, 0, 0, 0, 0}};
    int top = FASTFC_SCALAR;
#ifdef FASTFC_X86
    int f = fastfc_cpu_features(), i;
    if (max_level >= FASTFC_AVX2 && (f & FASTFC_HAS_AVX2)) {
        t.popcount_words = fastfc_popcount_words_avx2;
        t.first_nonzero_word = fastfc_first_nonzero_word_avx2;
        t.words_op = fastfc_words_op_avx2;
        t.or3_words = fastfc_or3_words_avx2;
        t.copy_stream = fastfc_copy_stream_avx2;
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

#endif /* FASTFC_KERNELS_H */
