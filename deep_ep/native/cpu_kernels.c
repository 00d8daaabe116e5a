/*
 * deep_ep's native CPU helpers: the few loops of the portable engine that torch can only express as
 * many small operations. deep_ep/_native.py compiles this file on first use into a CPython extension
 * module (`_cpu_kernels`) and imports it; without a C compiler the engine does the same work with
 * torch operations, with the same bits.
 *
 * C11 and the CPython API only (no torch headers: tensors arrive as addresses and sizes). Compiled with
 * -ffp-contract=off: a multiply followed by an add stays two roundings (never a fused multiply-add),
 * exactly as torch's separate mul and add. Every function checks its indices before touching memory
 * and returns 0, or -1 (nothing written) when one is out of range. The GIL is released while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define DEEP_EP_HAVE_SSE2 1
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* One body, compiled for several instruction sets; the loader picks the best (glibc ifunc). The
 * results are the same on all of them: the arithmetic is IEEE single precision either way. */
#define DEEP_EP_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DEEP_EP_MULTIVERSION
#endif

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch converts float32 to bfloat16 on the CPU (every NaN -> 0xFFFF). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0xFFFFu : rounded;
}

/*
 * Copy n bytes; 1 KiB and more go with non-temporal stores (after a head copied normally up to a 16-byte
 * boundary of the destination): the destination, usually shared memory that another process reads
 * later, is not first read into this core's cache, which halves the memory traffic of a large copy.
 * (glibc's memcpy switches to such stores only above a threshold scaled to the last-level cache, which
 * virtual machines may report as hundreds of MiB.) The caller ends with a store fence.
 */
static inline void copy_nt(uint8_t *to, const uint8_t *from, int64_t n) {
#ifdef DEEP_EP_HAVE_SSE2
    if (n >= 1024) {
        int64_t head = (int64_t)((16 - ((uintptr_t)to & 15)) & 15);
        if (head) {
            memcpy(to, from, (size_t)head);
            to += head, from += head, n -= head;
        }
        int64_t i = 0;
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(from + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(from + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(from + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(from + i + 48));
            _mm_stream_si128((__m128i *)(to + i), a);
            _mm_stream_si128((__m128i *)(to + i + 16), b);
            _mm_stream_si128((__m128i *)(to + i + 32), c);
            _mm_stream_si128((__m128i *)(to + i + 48), d);
        }
        if (i < n)
            memcpy(to + i, from + i, (size_t)(n - i));
        return;
    }
#endif
    memcpy(to, from, (size_t)n);
}

static inline void store_fence(void) {
#ifdef DEEP_EP_HAVE_SSE2
    _mm_sfence(); /* the non-temporal stores are visible before anything this thread stores next */
#endif
}

/* Copy n bytes from src to dst (non-overlapping), as copy_nt. */
static int64_t copy_bytes(uint8_t *dst, const uint8_t *src, int64_t n) {
    if (n > 0)
        copy_nt(dst, src, n);
    store_fence();
    return 0;
}

/*
 * Copy n rows of row_bytes bytes: row i goes from src + src_index[i] * src_stride to
 * dst[dst_rank[i]] + dst_index[i] * dst_stride (dst_rank NULL: every row to dst[0]).
 * Bounds: src_index[i] < src_rows, dst_rank[i] < num_dst, dst_index[i] < dst_rows.
 */
static int64_t copy_rows(const uint8_t *src, int64_t src_stride, int64_t src_rows, const int64_t *src_index,
                          uint8_t *const *dst, int64_t num_dst, const int64_t *dst_rank, int64_t dst_stride,
                          int64_t dst_rows, const int64_t *dst_index, int64_t n, int64_t row_bytes) {
    for (int64_t i = 0; i < n; ++i) {
        int64_t r = dst_rank ? dst_rank[i] : 0;
        if (src_index[i] < 0 || src_index[i] >= src_rows || r < 0 || r >= num_dst || dst_index[i] < 0 ||
            dst_index[i] >= dst_rows)
            return -1;
    }
    for (int64_t i = 0; i < n; ++i) {
        uint8_t *to = dst[dst_rank ? dst_rank[i] : 0] + dst_index[i] * dst_stride;
        copy_nt(to, src + src_index[i] * src_stride, row_bytes);
    }
    store_fence();
    return 0;
}

/* counts[e] = entries of topk[0, n) equal to e (negative entries: none); -1 when one is E or more. */
static int64_t count_experts(const int64_t *topk, int64_t n, int64_t E, int64_t *counts) {
    for (int64_t e = 0; e < E; ++e)
        counts[e] = 0;
    for (int64_t i = 0; i < n; ++i) {
        int64_t e = topk[i];
        if (e >= E)
            return -1;
        if (e >= 0)
            counts[e] += 1;
    }
    return 0;
}

/*
 * The low-latency dispatch's writes on the shared-memory push path. For every valid (token t, k) of this
 * rank, row-major (so within an expert: tokens ascending, then k), expert e = topk[t, k] gets the next
 * row of its block on rank e / L: position p = begin[e] + (pairs of e so far), flat row
 * (e % L) * num_rows + p. The row of x (row_bytes bytes at x + t * x_stride) goes to rows[e / L] + flat
 * row * row_bytes, t to info[e / L][flat row] (int32), and with scales (scale_bytes at scales +
 * t * scale_stride) to stage[e / L] + flat row * scale_bytes. topk: [T, K] int64, -1 = none; begin: [E].
 * Checks first that every expert id is below E and every position below num_rows (-1, nothing written).
 * cursor: E int64 of scratch.
 */
static int64_t ll_dispatch_place(const int64_t *topk, int64_t T, int64_t K, int64_t E, int64_t L, int64_t num_rows,
                                 const int64_t *begin, const uint8_t *x, int64_t x_stride, int64_t row_bytes,
                                 const uint8_t *scales, int64_t scale_stride, int64_t scale_bytes,
                                 uint8_t *const *rows, int32_t *const *info, uint8_t *const *stage, int64_t *cursor) {
    if (count_experts(topk, T * K, E, cursor) != 0)
        return -1;
    for (int64_t e = 0; e < E; ++e) {
        if (begin[e] < 0 || begin[e] + cursor[e] > num_rows)
            return -1;
        cursor[e] = 0;
    }
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t k = 0; k < K; ++k) {
            int64_t e = topk[t * K + k];
            if (e < 0)
                continue;
            int64_t d = e / L;
            int64_t row = (e % L) * num_rows + begin[e] + cursor[e]++;
            copy_nt(rows[d] + row * row_bytes, x + t * x_stride, row_bytes);
            info[d][row] = (int32_t)t;
            if (scales)
                memcpy(stage[d] + row * scale_bytes, scales + t * scale_stride, (size_t)scale_bytes);
        }
    }
    store_fence();
    return 0;
}

/*
 * The normal dispatch's channel counts: counts[d, c] = tokens t of channel c (t / per) with mask[t, d]
 * set. mask: [T, D] bytes (0 or 1); counts: [D, C] int32.
 */
static void dispatch_channel_counts(const uint8_t *mask, int64_t T, int64_t D, int64_t per, int64_t C,
                                    int32_t *counts) {
    for (int64_t i = 0; i < D * C; ++i)
        counts[i] = 0;
    for (int64_t t = 0; t < T; ++t) {
        int64_t c = t / per;
        for (int64_t d = 0; d < D; ++d)
            counts[d * C + c] += mask[t * D + d];
    }
}

/*
 * The runs of the normal dispatch's (destination, token) pairs, sorted by destination then token: a run
 * starts where the destination changes or the token does not follow the previous one. Writes each run's
 * first token and length (run_tok, run_len: up to n entries) and the runs of each destination
 * (runs_per_dst: D entries). Returns the number of runs, or -1 for a destination outside [0, D).
 */
static int64_t dispatch_row_runs(const int64_t *dst, const int64_t *tok, int64_t n, int64_t D, int64_t *run_tok,
                                 int64_t *run_len, int64_t *runs_per_dst) {
    for (int64_t d = 0; d < D; ++d)
        runs_per_dst[d] = 0;
    int64_t runs = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (dst[i] < 0 || dst[i] >= D)
            return -1;
        if (i > 0 && dst[i] == dst[i - 1] && tok[i] == tok[i - 1] + 1) {
            run_len[runs - 1] += 1;
            continue;
        }
        run_tok[runs] = tok[i];
        run_len[runs] = 1;
        runs_per_dst[dst[i]] += 1;
        ++runs;
    }
    return runs;
}

/*
 * The normal dispatch's per-row metadata: row i (token t = tok[i]) of out (width bytes) is
 * [scale_bytes of scales + t * scale_stride | K int32 ids from the int64 topk[t, :] | K float32 weights
 * w[t, :] (bits copied) | int32 t]; the parts with scale_bytes = 0 or K = 0 are absent. Returns -1 (nothing
 * written) for a token outside [0, T) or a width that does not match.
 */
static int64_t dispatch_pack_meta(const int64_t *tok, int64_t n, int64_t T, uint8_t *out, int64_t width,
                                  const uint8_t *scales, int64_t scale_stride, int64_t scale_bytes,
                                  const int64_t *topk, const uint32_t *w, int64_t K) {
    if (width != scale_bytes + 8 * K + 4)
        return -1;
    for (int64_t i = 0; i < n; ++i)
        if (tok[i] < 0 || tok[i] >= T)
            return -1;
    for (int64_t i = 0; i < n; ++i) {
        int64_t t = tok[i];
        uint8_t *row = out + i * width;
        if (scale_bytes)
            memcpy(row, scales + t * scale_stride, (size_t)scale_bytes);
        row += scale_bytes;
        for (int64_t k = 0; k < K; ++k) {
            int32_t id = (int32_t)topk[t * K + k];
            memcpy(row + 4 * k, &id, 4);
        }
        row += 4 * K;
        if (K)
            memcpy(row, w + t * K, (size_t)(4 * K));
        row += 4 * K;
        int32_t src = (int32_t)t;
        memcpy(row, &src, 4);
    }
    return 0;
}

/*
 * The normal dispatch's ring slots (the handle's send_head): out[t, d] = number of earlier tokens of
 * t's channel (channels of `per` tokens: t / per) with mask[., d] set, or -1 where mask[t, d] is 0.
 * mask: [T, D] bytes (0 or 1); out: [T, D] int32; cnt: D int64 of scratch.
 */
static void dispatch_slots(const uint8_t *mask, int64_t T, int64_t D, int64_t per, int32_t *out, int64_t *cnt) {
    for (int64_t t = 0; t < T; ++t) {
        if (t % per == 0)
            for (int64_t d = 0; d < D; ++d)
                cnt[d] = 0;
        for (int64_t d = 0; d < D; ++d)
            out[t * D + d] = mask[t * D + d] ? (int32_t)cnt[d]++ : -1;
    }
}

/*
 * The normal dispatch's received top-k, made local: for every received row i and k, the global expert
 * id g (int32 at meta + i * meta_stride + idx_off + 4k) becomes g - lo when lo <= g < lo + num_local
 * (and g >= 0), else -1 (out_idx: [N, K] int64); its weight (float32 at w_off + 4k, copied bit for bit)
 * is kept there, else +0.0 (out_w: [N, K] float32).
 */
static void dispatch_local_topk(const uint8_t *meta, int64_t meta_stride, int64_t idx_off, int64_t w_off, int64_t N,
                                int64_t K, int64_t lo, int64_t num_local, int64_t *out_idx, uint32_t *out_w) {
    for (int64_t i = 0; i < N; ++i) {
        const uint8_t *row = meta + i * meta_stride;
        for (int64_t k = 0; k < K; ++k) {
            int32_t g;
            uint32_t w;
            memcpy(&g, row + idx_off + 4 * k, sizeof g);
            memcpy(&w, row + w_off + 4 * k, sizeof w);
            int64_t local = (int64_t)g - lo;
            int is_local = g >= 0 && local >= 0 && local < num_local;
            out_idx[i * K + k] = is_local ? local : -1;
            out_w[i * K + k] = is_local ? w : 0u;
        }
    }
}

/*
 * The low-latency push dispatch's bookkeeping on the receiving rank `rank`, once the senders' writes are
 * visible. counts, begins: [R, E] int64 (pairs of each source rank per expert, and the row where they
 * start in the expert's block); info: this rank's [L * num_rows] int32 token indices (written by the
 * senders). Writes recv_count [L] int32 (rows of each local expert), layout_range [L, R] int64
 * ((begin << 32) | count, per source) and src_info [L, num_rows] int32: rows below recv_count from info,
 * the others left as they are. Checks every block first (-1, nothing written).
 */
static int64_t ll_dispatch_unpack(const int64_t *counts, const int64_t *begins, int64_t R, int64_t E, int64_t L,
                                  int64_t rank, int64_t num_rows, const int32_t *info, int32_t *recv_count,
                                  int64_t *layout_range, int32_t *src_info) {
    if (rank < 0 || (rank + 1) * L > E)
        return -1;
    for (int64_t j = 0; j < L; ++j) {
        int64_t total = 0;
        for (int64_t s = 0; s < R; ++s) {
            int64_t c = counts[s * E + rank * L + j], b = begins[s * E + rank * L + j];
            if (c < 0 || b < 0 || c > num_rows || b > num_rows - c)
                return -1;
            total += c;
        }
        if (total > num_rows)
            return -1;
    }
    for (int64_t j = 0; j < L; ++j) {
        int64_t total = 0;
        for (int64_t s = 0; s < R; ++s) {
            int64_t c = counts[s * E + rank * L + j], b = begins[s * E + rank * L + j];
            layout_range[j * R + s] = (b << 32) | c;
            total += c;
        }
        recv_count[j] = (int32_t)total;
        memcpy(src_info + j * num_rows, info + j * num_rows, (size_t)total * sizeof(int32_t));
    }
    return 0;
}

/*
 * The low-latency combine's arrival order, on the owner of the tokens: rows come grouped by expert
 * ascending and, within an expert, in (token, k) row-major order, so the row of pair (t, k) with expert
 * e is (pairs of the experts below e) + (pairs of e before (t, k)). Writes row_of [T, K] (-1 where
 * topk is -1) and per_owner [R] (pairs whose expert lives on each rank, L experts per rank).
 * -1 (nothing written) when an expert id is E or more. scratch: E int64.
 */
static int64_t ll_combine_row_of(const int64_t *topk, int64_t T, int64_t K, int64_t E, int64_t L, int64_t R,
                                 int64_t *row_of, int64_t *per_owner, int64_t *scratch) {
    if (count_experts(topk, T * K, E, scratch) != 0)
        return -1;
    int64_t running = 0;
    for (int64_t r = 0; r < R; ++r)
        per_owner[r] = 0;
    for (int64_t e = 0; e < E; ++e) {
        int64_t c = scratch[e];
        per_owner[e / L] += c;
        scratch[e] = running;
        running += c;
    }
    for (int64_t i = 0; i < T * K; ++i) {
        int64_t e = topk[i];
        row_of[i] = e < 0 ? -1 : scratch[e]++;
    }
    return 0;
}

/*
 * The low-latency combine's sends on the shared-memory push path, on an expert rank: for each owner s
 * (ascending) and local expert j (ascending), the block of rows (begin, count) = (ranges[j, s] >> 32,
 * ranges[j, s] & 0xffffffff) of expert j, rows j * num_rows + begin + i of src, goes to owner s's receive
 * slot from row offsets[s] on, consecutively. ranges: [L, R] int64; slots: R pointers to slot_rows rows.
 * Checks every block and destination first (-1, nothing written).
 */
static int64_t ll_combine_push(const int64_t *ranges, int64_t L, int64_t R, int64_t num_rows, const int64_t *offsets,
                               const uint8_t *src, int64_t src_stride, int64_t row_bytes, uint8_t *const *slots,
                               int64_t slot_rows) {
    for (int64_t s = 0; s < R; ++s) {
        int64_t total = 0;
        for (int64_t j = 0; j < L; ++j) {
            int64_t begin = ranges[j * R + s] >> 32, count = ranges[j * R + s] & 0xffffffff;
            if (begin < 0 || begin + count > num_rows)
                return -1;
            total += count;
        }
        if (offsets[s] < 0 || offsets[s] + total > slot_rows)
            return -1;
    }
    for (int64_t s = 0; s < R; ++s) {
        int64_t at = offsets[s];
        for (int64_t j = 0; j < L; ++j) {
            int64_t begin = ranges[j * R + s] >> 32, count = ranges[j * R + s] & 0xffffffff;
            for (int64_t i = 0; i < count; ++i)
                copy_nt(slots[s] + (at++) * row_bytes, src + (j * num_rows + begin + i) * src_stride, row_bytes);
        }
    }
    store_fence();
    return 0;
}

/*
 * The low-latency combine's reduce: out[t] = bf16(sum over k ascending with row_of[t, k] >= 0 of
 * float(w[t, k]) * float(recv[row_of[t, k]])), the sum starting from +0.0f, one float32 multiply and
 * then one float32 add per term. recv: [recv_rows, H] bf16 (rows contiguous, row stride H); row_of:
 * [T, K] int64 (-1: no row); w: [T, K] float32; out: [T, H] bf16 with row stride out_stride;
 * acc: H floats of scratch.
 */
DEEP_EP_MULTIVERSION
static int64_t ll_reduce_bf16(const uint16_t *recv, int64_t recv_rows, const int64_t *row_of, const float *w,
                               int64_t T, int64_t K, int64_t H, uint16_t *out, int64_t out_stride, float *acc) {
    for (int64_t i = 0; i < T * K; ++i)
        if (row_of[i] >= recv_rows)
            return -1;
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < H; ++h)
            acc[h] = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
            int64_t r = row_of[t * K + k];
            if (r < 0)
                continue;
            const float wk = w[t * K + k];
            const uint16_t *y = recv + r * H;
            for (int64_t h = 0; h < H; ++h) {
                float product = wk * bf16_to_f32(y[h]);
                acc[h] = acc[h] + product;
            }
        }
        uint16_t *o = out + t * out_stride;
        for (int64_t h = 0; h < H; ++h)
            o[h] = f32_to_bf16(acc[h]);
    }
    return 0;
}

/*
 * The normal-mode combine's reduce: out[t] = bf16(bias_0[t] + bias_1[t] + ... + the rows of token t,
 * segment by segment in ascending order), the sum starting from +0.0f, one float32 add per term.
 * Segment d: seg_rows[d] rows at seg[d] (row stride seg_stride[d] elements) for the tokens tok[d]
 * (int64, strictly ascending). bias[b]: [T, H] bf16 with row stride bias_stride[b]. out: [T, H] bf16
 * with row stride out_stride. acc: H floats and cursor: num_seg int64 of scratch.
 */
DEEP_EP_MULTIVERSION
static int64_t reduce_segments_bf16(const uint16_t *const *seg, const int64_t *seg_stride, const int64_t *const *tok,
                                    const int64_t *seg_rows, int64_t num_seg, const uint16_t *const *bias,
                                    const int64_t *bias_stride, int64_t num_bias, int64_t T, int64_t H, uint16_t *out,
                                    int64_t out_stride, float *acc, int64_t *cursor) {
    for (int64_t d = 0; d < num_seg; ++d) {
        for (int64_t i = 0; i < seg_rows[d]; ++i) {
            int64_t t = tok[d][i];
            if (t < 0 || t >= T || (i > 0 && t <= tok[d][i - 1]))
                return -1;
        }
        cursor[d] = 0;
    }
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < H; ++h)
            acc[h] = 0.0f;
        for (int64_t b = 0; b < num_bias; ++b) {
            const uint16_t *y = bias[b] + t * bias_stride[b];
            for (int64_t h = 0; h < H; ++h)
                acc[h] = acc[h] + bf16_to_f32(y[h]);
        }
        for (int64_t d = 0; d < num_seg; ++d) {
            int64_t c = cursor[d];
            if (c >= seg_rows[d] || tok[d][c] != t)
                continue;
            const uint16_t *y = seg[d] + c * seg_stride[d];
            for (int64_t h = 0; h < H; ++h)
                acc[h] = acc[h] + bf16_to_f32(y[h]);
            cursor[d] = c + 1;
        }
        uint16_t *o = out + t * out_stride;
        for (int64_t h = 0; h < H; ++h)
            o[h] = f32_to_bf16(acc[h]);
    }
    return 0;
}

/* ---- the Python module: every argument is an integer (addresses as integers) ---- */

static PyObject *py_copy_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t src, src_stride, src_rows, src_index, dst, num_dst, dst_rank, dst_stride, dst_rows, dst_index, n,
        row_bytes;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnn", &src, &src_stride, &src_rows, &src_index, &dst, &num_dst, &dst_rank,
                          &dst_stride, &dst_rows, &dst_index, &n, &row_bytes))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = copy_rows((const uint8_t *)src, src_stride, src_rows, (const int64_t *)src_index, (uint8_t *const *)dst,
                   num_dst, (const int64_t *)dst_rank, dst_stride, dst_rows, (const int64_t *)dst_index, n, row_bytes);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

static PyObject *py_ll_reduce_bf16(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t recv, recv_rows, row_of, w, T, K, H, out, out_stride, acc;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnn", &recv, &recv_rows, &row_of, &w, &T, &K, &H, &out, &out_stride, &acc))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ll_reduce_bf16((const uint16_t *)recv, recv_rows, (const int64_t *)row_of, (const float *)w, T, K, H,
                        (uint16_t *)out, out_stride, (float *)acc);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

static PyObject *py_reduce_segments_bf16(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t seg, seg_stride, tok, seg_rows, num_seg, bias, bias_stride, num_bias, T, H, out, out_stride, acc, cursor;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnnnn", &seg, &seg_stride, &tok, &seg_rows, &num_seg, &bias, &bias_stride,
                          &num_bias, &T, &H, &out, &out_stride, &acc, &cursor))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = reduce_segments_bf16((const uint16_t *const *)seg, (const int64_t *)seg_stride, (const int64_t *const *)tok,
                              (const int64_t *)seg_rows, num_seg, (const uint16_t *const *)bias,
                              (const int64_t *)bias_stride, num_bias, T, H, (uint16_t *)out, out_stride, (float *)acc,
                              (int64_t *)cursor);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

static PyObject *py_copy_bytes(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t dst, src, n;
    if (!PyArg_ParseTuple(args, "nnn", &dst, &src, &n))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = copy_bytes((uint8_t *)dst, (const uint8_t *)src, n);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

static PyObject *py_ll_dispatch_place(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t topk, T, K, E, L, num_rows, begin, x, x_stride, row_bytes, scales, scale_stride, scale_bytes, rows, info,
        stage, cursor;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnnnnnnn", &topk, &T, &K, &E, &L, &num_rows, &begin, &x, &x_stride,
                          &row_bytes, &scales, &scale_stride, &scale_bytes, &rows, &info, &stage, &cursor))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ll_dispatch_place((const int64_t *)topk, T, K, E, L, num_rows, (const int64_t *)begin, (const uint8_t *)x,
                           x_stride, row_bytes, (const uint8_t *)scales, scale_stride, scale_bytes,
                           (uint8_t *const *)rows, (int32_t *const *)info, (uint8_t *const *)stage, (int64_t *)cursor);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

static PyObject *py_dispatch_channel_counts(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t mask, T, D, per, C, counts;
    if (!PyArg_ParseTuple(args, "nnnnnn", &mask, &T, &D, &per, &C, &counts))
        return NULL;
    if (per <= 0 || (T > 0 && (T - 1) / per >= C))
        return PyLong_FromLongLong(-1LL);
    Py_BEGIN_ALLOW_THREADS
    dispatch_channel_counts((const uint8_t *)mask, T, D, per, C, (int32_t *)counts);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(0LL);
}

static PyObject *py_dispatch_row_runs(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t dst, tok, n, D, run_tok, run_len, runs_per_dst;
    if (!PyArg_ParseTuple(args, "nnnnnnn", &dst, &tok, &n, &D, &run_tok, &run_len, &runs_per_dst))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dispatch_row_runs((const int64_t *)dst, (const int64_t *)tok, n, D, (int64_t *)run_tok, (int64_t *)run_len,
                           (int64_t *)runs_per_dst);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

static PyObject *py_dispatch_pack_meta(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t tok, n, T, out, width, scales, scale_stride, scale_bytes, topk, w, K;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnn", &tok, &n, &T, &out, &width, &scales, &scale_stride, &scale_bytes, &topk,
                          &w, &K))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dispatch_pack_meta((const int64_t *)tok, n, T, (uint8_t *)out, width, (const uint8_t *)scales, scale_stride,
                            scale_bytes, (const int64_t *)topk, (const uint32_t *)w, K);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

static PyObject *py_dispatch_slots(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t mask, T, D, per, out, cnt;
    if (!PyArg_ParseTuple(args, "nnnnnn", &mask, &T, &D, &per, &out, &cnt))
        return NULL;
    if (per <= 0)
        return PyLong_FromLongLong(-1LL);
    Py_BEGIN_ALLOW_THREADS
    dispatch_slots((const uint8_t *)mask, T, D, per, (int32_t *)out, (int64_t *)cnt);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(0LL);
}

static PyObject *py_dispatch_local_topk(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t meta, meta_stride, idx_off, w_off, N, K, lo, num_local, out_idx, out_w;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnn", &meta, &meta_stride, &idx_off, &w_off, &N, &K, &lo, &num_local, &out_idx,
                          &out_w))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    dispatch_local_topk((const uint8_t *)meta, meta_stride, idx_off, w_off, N, K, lo, num_local, (int64_t *)out_idx,
                        (uint32_t *)out_w);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(0LL);
}

static PyObject *py_ll_dispatch_unpack(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t counts, begins, R, E, L, rank, num_rows, info, recv_count, layout_range, src_info;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnn", &counts, &begins, &R, &E, &L, &rank, &num_rows, &info, &recv_count,
                          &layout_range, &src_info))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ll_dispatch_unpack((const int64_t *)counts, (const int64_t *)begins, R, E, L, rank, num_rows,
                            (const int32_t *)info, (int32_t *)recv_count, (int64_t *)layout_range, (int32_t *)src_info);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

static PyObject *py_ll_combine_row_of(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t topk, T, K, E, L, R, row_of, per_owner, scratch;
    if (!PyArg_ParseTuple(args, "nnnnnnnnn", &topk, &T, &K, &E, &L, &R, &row_of, &per_owner, &scratch))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ll_combine_row_of((const int64_t *)topk, T, K, E, L, R, (int64_t *)row_of, (int64_t *)per_owner,
                           (int64_t *)scratch);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

static PyObject *py_ll_combine_push(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t ranges, L, R, num_rows, offsets, src, src_stride, row_bytes, slots, slot_rows;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnn", &ranges, &L, &R, &num_rows, &offsets, &src, &src_stride, &row_bytes,
                          &slots, &slot_rows))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ll_combine_push((const int64_t *)ranges, L, R, num_rows, (const int64_t *)offsets, (const uint8_t *)src,
                         src_stride, row_bytes, (uint8_t *const *)slots, slot_rows);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)rc);
}

/*
 * The shared-memory transport's doorbells (deep_ep/_shm.py): a 32-bit word in memory the ranks' processes
 * share. futex_wait sleeps while *addr == val, at most timeout_ns, and returns 0 (woken, or the word had
 * changed: EAGAIN) or the errno (ETIMEDOUT, EINTR, ...); futex_wake wakes every waiter on addr. Shared
 * futexes (no FUTEX_PRIVATE_FLAG): the waiters are other processes. -1 where there is no futex (not Linux).
 */
static PyObject *py_futex_wait(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t addr;
    int val;
    long long timeout_ns;
    if (!PyArg_ParseTuple(args, "niL", &addr, &val, &timeout_ns))
        return NULL;
#ifdef __linux__
    struct timespec ts;
    if (timeout_ns < 0)
        timeout_ns = 0;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000LL);
    ts.tv_nsec = (long)(timeout_ns % 1000000000LL);
    long rc;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, val, &ts, NULL, 0);
    if (rc != 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc == 0 || err == EAGAIN ? 0 : err);
#else
    (void)addr, (void)val, (void)timeout_ns;
    return PyLong_FromLong(-1);
#endif
}

static PyObject *py_futex_wake(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t addr;
    if (!PyArg_ParseTuple(args, "n", &addr))
        return NULL;
#ifdef __linux__
    long rc = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    return PyLong_FromLong(rc < 0 ? -1 : 0);
#else
    (void)addr;
    return PyLong_FromLong(-1);
#endif
}

#ifdef __linux__
/*
 * The row streams' exchange (deep_ep/_rowsock.py): one message to and from each of n peers over connected
 * non-blocking stream sockets fds[p], all at once in one poll loop. A message is a 16-byte header
 * (little-endian u32 magic, u32 sequence number, u64 body bytes) and its body.
 * - Byte ranges are rows [base, offset, bytes] of the int64 tables stab (sent) and rtab (received): the bytes
 *   at bases[base] + offset. Peer p's are rows sbeg[p] .. sbeg[p+1] of stab and rbeg[p] .. rbeg[p+1] of rtab.
 * - seq[p] = [the sequence number of the message to p, the one expected from p].
 * - Peer p is sent its header, then its ranges in order, in as few sendmsg calls as the socket takes. From p,
 *   16 header bytes land in hdr_in[16p ..] and must be (magic, seq[p][1], the bytes of p's receive ranges):
 *   else the call stops before any body byte is read. Then the body fills p's receive ranges in order.
 * - st[p][0..5] is p's progress (header bytes sent, send range, offset in it, header bytes received,
 *   receive range, offset in it; ranges counted from p's first), all 0 before the first call and kept
 *   across calls: a call that returns early resumes where it stopped.
 * Returns 0 when every message is sent and received, 1 when nothing moved for timeout_ms, 2 when a signal
 * interrupted the wait, -1 on an error: err = [peer, kind, errno, bytes expected from the peer] with kind
 * 1 send failed, 2 receive failed, 3 connection closed by the peer, 4 header mismatch, 5 poll failed
 * (peer -1), 6 a range outside the bases (nothing moved).
 */
enum { SX_HOUT, SX_SEG, SX_OFF, SX_HIN, SX_RSEG, SX_ROFF, SX_COLS };
enum { SX_ERR_SEND = 1, SX_ERR_RECV, SX_ERR_CLOSED, SX_ERR_HEADER, SX_ERR_POLL, SX_ERR_TABLE };
#define SX_IOV 1024
#define SX_HEADER 16

typedef struct {
    const int64_t *bases, *tab, *beg;  /* the ranges: rows [base, offset, bytes] of tab, peer p's from beg[p] */
} sx_ranges;

static int64_t sx_fail(int64_t *err, int64_t peer, int64_t kind, int64_t code) {
    err[0] = peer, err[1] = kind, err[2] = code;
    return -1;
}

static void sx_put_header(uint8_t *h, uint32_t magic, uint32_t seq, uint64_t nbytes) {
    for (int i = 0; i < 4; ++i)
        h[i] = (uint8_t)(magic >> (8 * i)), h[4 + i] = (uint8_t)(seq >> (8 * i));
    for (int i = 0; i < 8; ++i)
        h[8 + i] = (uint8_t)(nbytes >> (8 * i));
}

static int64_t sx_total(const sx_ranges *r, int64_t p) {
    int64_t total = 0;
    for (int64_t i = r->beg[p]; i < r->beg[p + 1]; ++i)
        total += r->tab[3 * i + 2];
    return total;
}

/* Fills iov with what is left of the header (header bytes hdr_done of 16 at head) and of peer p's ranges
 * from range seg (relative), offset off; at most SX_IOV entries. Returns how many. */
static int sx_iov(const sx_ranges *r, int64_t p, uint8_t *head, int64_t hdr_done, int64_t seg, int64_t off,
                  struct iovec *iov) {
    int k = 0;
    if (head != NULL && hdr_done < SX_HEADER) {
        iov[k].iov_base = head + hdr_done;
        iov[k++].iov_len = (size_t)(SX_HEADER - hdr_done);
    }
    for (int64_t i = r->beg[p] + seg; i < r->beg[p + 1] && k < SX_IOV; ++i, off = 0) {
        const int64_t *row = r->tab + 3 * i;
        if (row[2] - off <= 0)
            continue;
        iov[k].iov_base = (void *)(intptr_t)(r->bases[row[0]] + row[1] + off);
        iov[k++].iov_len = (size_t)(row[2] - off);
    }
    return k;
}

/* Moves peer p's (range, offset) forward by n bytes, past empty ranges; true when every range is done. */
static int sx_advance(const sx_ranges *r, int64_t p, int64_t *seg, int64_t *off, int64_t n) {
    int64_t count = r->beg[p + 1] - r->beg[p];
    while (*seg < count) {
        int64_t left = r->tab[3 * (r->beg[p] + *seg) + 2] - *off;
        if (n < left) {
            *off += n;
            return 0;
        }
        n -= left;
        ++*seg, *off = 0;
    }
    return 1;
}

static int64_t sock_exchange(const int64_t *fds, int64_t n, const sx_ranges *out, const sx_ranges *in,
                             int64_t *st, uint8_t *hdr_out, uint8_t *hdr_in, const uint8_t *expect,
                             int64_t timeout_ms, int64_t *err, struct pollfd *pfd, int64_t *who,
                             struct iovec *iov) {
    for (;;) {
        nfds_t m = 0;
        for (int64_t p = 0; p < n; ++p) {
            int64_t *s = st + SX_COLS * p;
            int sending = s[SX_HOUT] < SX_HEADER || !sx_advance(out, p, &s[SX_SEG], &s[SX_OFF], 0);
            int receiving = s[SX_HIN] < SX_HEADER || !sx_advance(in, p, &s[SX_RSEG], &s[SX_ROFF], 0);
            if (sending || receiving) {
                pfd[m].fd = (int)fds[p], pfd[m].revents = 0;
                pfd[m].events = (short)((sending ? POLLOUT : 0) | (receiving ? POLLIN : 0));
                who[m++] = p;
            }
        }
        if (m == 0)
            return 0;
        int ready = poll(pfd, m, (int)timeout_ms);
        if (ready < 0)
            return errno == EINTR ? 2 : sx_fail(err, -1, SX_ERR_POLL, errno);
        if (ready == 0)
            return 1;
        for (nfds_t i = 0; i < m; ++i) {
            short rev = pfd[i].revents;
            int64_t p = who[i], *s = st + SX_COLS * p;
            int fd = pfd[i].fd;
            if ((pfd[i].events & POLLOUT) && (rev & (POLLOUT | POLLERR | POLLHUP))) {
                for (;;) {
                    struct msghdr msg;
                    memset(&msg, 0, sizeof msg);
                    msg.msg_iov = iov;
                    msg.msg_iovlen = (size_t)sx_iov(out, p, hdr_out + SX_HEADER * p, s[SX_HOUT], s[SX_SEG],
                                                    s[SX_OFF], iov);
                    if (msg.msg_iovlen == 0)
                        break;
                    ssize_t sent = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
                    if (sent < 0) {
                        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                            break;
                        return sx_fail(err, p, SX_ERR_SEND, errno);
                    }
                    int64_t head = SX_HEADER - s[SX_HOUT] < sent ? SX_HEADER - s[SX_HOUT] : (int64_t)sent;
                    s[SX_HOUT] += head;
                    if (sx_advance(out, p, &s[SX_SEG], &s[SX_OFF], (int64_t)sent - head))
                        break;
                }
            }
            if ((pfd[i].events & POLLIN) && (rev & (POLLIN | POLLERR | POLLHUP))) {
                for (;;) {
                    ssize_t got;
                    if (s[SX_HIN] < SX_HEADER) {
                        got = recv(fd, hdr_in + SX_HEADER * p + s[SX_HIN], (size_t)(SX_HEADER - s[SX_HIN]),
                                   MSG_DONTWAIT);
                    } else {
                        struct msghdr msg;
                        memset(&msg, 0, sizeof msg);
                        msg.msg_iov = iov;
                        msg.msg_iovlen = (size_t)sx_iov(in, p, NULL, SX_HEADER, s[SX_RSEG], s[SX_ROFF], iov);
                        if (msg.msg_iovlen == 0)
                            break;
                        got = recvmsg(fd, &msg, MSG_DONTWAIT);
                    }
                    if (got < 0) {
                        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                            break;
                        return sx_fail(err, p, SX_ERR_RECV, errno);
                    }
                    if (got == 0)
                        return sx_fail(err, p, SX_ERR_CLOSED, 0);
                    if (s[SX_HIN] < SX_HEADER) {
                        s[SX_HIN] += got;
                        if (s[SX_HIN] == SX_HEADER &&
                            memcmp(hdr_in + SX_HEADER * p, expect + SX_HEADER * p, SX_HEADER) != 0)
                            return sx_fail(err, p, SX_ERR_HEADER, 0);
                    } else if (sx_advance(in, p, &s[SX_RSEG], &s[SX_ROFF], (int64_t)got)) {
                        break;
                    }
                }
            }
        }
    }
}

/* Every range inside its base: 0, or -1 (err filled). */
static int64_t sx_check(const sx_ranges *r, int64_t n, int64_t num_bases, const int64_t *base_bytes, int64_t *err) {
    for (int64_t p = 0; p < n; ++p) {
        if (r->beg[p] < 0 || r->beg[p + 1] < r->beg[p])
            return sx_fail(err, p, SX_ERR_TABLE, 0);
        for (int64_t i = r->beg[p]; i < r->beg[p + 1]; ++i) {
            const int64_t *row = r->tab + 3 * i;
            if (row[0] < 0 || row[0] >= num_bases || row[1] < 0 || row[2] < 0 || row[1] > base_bytes[row[0]] ||
                row[2] > base_bytes[row[0]] - row[1])
                return sx_fail(err, p, SX_ERR_TABLE, 0);
        }
    }
    return 0;
}
#endif

/*
 * sock_exchange(fds, n, bases, base_bytes, num_bases, stab, sbeg, rtab, rbeg, seq, st, hdr_in, magic, timeout_ms,
 * err): see above; -3 where there is no implementation (not Linux). A KeyboardInterrupt (or any signal
 * handler's exception) raises.
 */
static PyObject *py_sock_exchange(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t fds, bases, base_bytes, stab, sbeg, rtab, rbeg, seq, st, hdr_in, err;
    long long n, num_bases, magic, timeout_ms;
    if (!PyArg_ParseTuple(args, "nLnnLnnnnnnnLLn", &fds, &n, &bases, &base_bytes, &num_bases, &stab, &sbeg, &rtab,
                          &rbeg, &seq, &st, &hdr_in, &magic, &timeout_ms, &err))
        return NULL;
#ifdef __linux__
    if (n < 0 || timeout_ms < 0 || timeout_ms > INT_MAX)
        return PyLong_FromLong(-3);
    sx_ranges out = {(const int64_t *)bases, (const int64_t *)stab, (const int64_t *)sbeg};
    sx_ranges in = {(const int64_t *)bases, (const int64_t *)rtab, (const int64_t *)rbeg};
    if (sx_check(&out, n, num_bases, (const int64_t *)base_bytes, (int64_t *)err) != 0 ||
        sx_check(&in, n, num_bases, (const int64_t *)base_bytes, (int64_t *)err) != 0)
        return PyLong_FromLong(-1);
    size_t m = (size_t)n + 1;
    struct pollfd *pfd = PyMem_RawMalloc(sizeof(struct pollfd) * m);
    int64_t *who = PyMem_RawMalloc(sizeof(int64_t) * m);
    struct iovec *iov = PyMem_RawMalloc(sizeof(struct iovec) * SX_IOV);
    uint8_t *heads = PyMem_RawMalloc(2 * SX_HEADER * m);  /* the headers sent, then those expected */
    if (pfd == NULL || who == NULL || iov == NULL || heads == NULL) {
        PyMem_RawFree(pfd), PyMem_RawFree(who), PyMem_RawFree(iov), PyMem_RawFree(heads);
        return PyErr_NoMemory();
    }
    const int64_t *sq = (const int64_t *)seq;
    for (int64_t p = 0; p < n; ++p) {
        sx_put_header(heads + SX_HEADER * p, (uint32_t)magic, (uint32_t)sq[2 * p], (uint64_t)sx_total(&out, p));
        sx_put_header(heads + SX_HEADER * (n + p), (uint32_t)magic, (uint32_t)sq[2 * p + 1],
                      (uint64_t)sx_total(&in, p));
    }
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sock_exchange((const int64_t *)fds, n, &out, &in, (int64_t *)st, heads, (uint8_t *)hdr_in,
                       heads + SX_HEADER * n, timeout_ms, (int64_t *)err, pfd, who, iov);
    Py_END_ALLOW_THREADS
    if (rc == -1 && ((int64_t *)err)[0] >= 0)
        ((int64_t *)err)[3] = sx_total(&in, ((int64_t *)err)[0]);
    PyMem_RawFree(pfd), PyMem_RawFree(who), PyMem_RawFree(iov), PyMem_RawFree(heads);
    if (rc == 2 && PyErr_CheckSignals() < 0)
        return NULL;
    return PyLong_FromLongLong((long long)rc);
#else
    (void)fds, (void)n, (void)bases, (void)base_bytes, (void)num_bases, (void)stab, (void)sbeg, (void)rtab;
    (void)rbeg, (void)seq, (void)st, (void)hdr_in, (void)magic, (void)timeout_ms, (void)err;
    return PyLong_FromLong(-3);
#endif
}

static PyMethodDef methods[] = {
    {"futex_wait", py_futex_wait, METH_VARARGS, "futex_wait(addr, val, timeout_ns) -> 0 or errno (-1: no futex)"},
    {"futex_wake", py_futex_wake, METH_VARARGS, "futex_wake(addr) -> 0 (-1: no futex)"},
    {"sock_exchange", py_sock_exchange, METH_VARARGS,
     "sock_exchange(fds, n, bases, base_bytes, num_bases, stab, sbeg, rtab, rbeg, seq, st, hdr_in, magic, "
     "timeout_ms, err) -> 0 done, 1 idle, 2 interrupted, -1 error (err), -3 not here"},
    {"copy_rows", py_copy_rows, METH_VARARGS,
     "copy_rows(src, src_stride, src_rows, src_index, dst_bases, num_dst, dst_rank, dst_stride, dst_rows, "
     "dst_index, n, row_bytes) -> 0 or -1 (an index out of range; nothing copied)"},
    {"copy_bytes", py_copy_bytes, METH_VARARGS, "copy_bytes(dst, src, n) -> 0 (non-overlapping)"},
    {"ll_combine_row_of", py_ll_combine_row_of, METH_VARARGS,
     "ll_combine_row_of(topk, T, K, E, L, R, row_of, per_owner, scratch) -> 0 or -1"},
    {"ll_combine_push", py_ll_combine_push, METH_VARARGS,
     "ll_combine_push(ranges, L, R, num_rows, offsets, src, src_stride, row_bytes, slots, slot_rows) -> 0 or -1"},
    {"ll_dispatch_place", py_ll_dispatch_place, METH_VARARGS,
     "ll_dispatch_place(topk, T, K, E, L, num_rows, begin, x, x_stride, row_bytes, scales, scale_stride, "
     "scale_bytes, rows, info, stage, cursor) -> 0 or -1"},
    {"dispatch_channel_counts", py_dispatch_channel_counts, METH_VARARGS,
     "dispatch_channel_counts(mask, T, D, per, C, counts) -> 0 or -1"},
    {"dispatch_row_runs", py_dispatch_row_runs, METH_VARARGS,
     "dispatch_row_runs(dst, tok, n, D, run_tok, run_len, runs_per_dst) -> runs or -1"},
    {"dispatch_pack_meta", py_dispatch_pack_meta, METH_VARARGS,
     "dispatch_pack_meta(tok, n, T, out, width, scales, scale_stride, scale_bytes, topk, w, K) -> 0 or -1"},
    {"dispatch_slots", py_dispatch_slots, METH_VARARGS, "dispatch_slots(mask, T, D, per, out, cnt) -> 0 or -1"},
    {"dispatch_local_topk", py_dispatch_local_topk, METH_VARARGS,
     "dispatch_local_topk(meta, meta_stride, idx_off, w_off, N, K, lo, num_local, out_idx, out_w) -> 0"},
    {"ll_dispatch_unpack", py_ll_dispatch_unpack, METH_VARARGS,
     "ll_dispatch_unpack(counts, begins, R, E, L, rank, num_rows, info, recv_count, layout_range, src_info) -> 0 or -1"},
    {"ll_reduce_bf16", py_ll_reduce_bf16, METH_VARARGS,
     "ll_reduce_bf16(recv, recv_rows, row_of, w, T, K, H, out, out_stride, acc) -> 0 or -1"},
    {"reduce_segments_bf16", py_reduce_segments_bf16, METH_VARARGS,
     "reduce_segments_bf16(seg_ptrs, seg_strides, tok_ptrs, seg_rows, num_seg, bias_ptrs, bias_strides, num_bias, "
     "T, H, out, out_stride, acc, cursor) -> 0 or -1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                                    "deep_ep's native CPU helpers (deep_ep/_native.py)", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu_kernels(void) {
    PyObject *m = PyModule_Create(&module);
#ifdef __linux__
    const int here = 1;
#else
    const int here = 0;
#endif
    if (m != NULL && (PyModule_AddIntConstant(m, "HAVE_FUTEX", here) != 0 ||
                      PyModule_AddIntConstant(m, "HAVE_SOCK_EXCHANGE", here) != 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
