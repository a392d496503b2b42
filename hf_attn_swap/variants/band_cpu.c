/* Sliding-window (band) attention forward for x86-64 CPUs with AVX2 and FMA, fp32; and, further down, the decode
 * kernel (decode_attention_f32: one new token per sequence against a K/V cache, AVX-512 or AVX2).
 *
 * Why a kernel of our own: torch's CPU SDPA cannot be told about a band. A mask only hides work (the full n^2 is
 * still computed) and the blocked SDPA path (blocked.py) must compute every query block against window + block - 1
 * keys, in 32-query tiles, with an online-softmax rescale between its 512-key tiles. Here each block of 64 queries
 * computes exactly the 16-query x 6-key tiles that touch its band, one plain softmax over an L2-resident score
 * tile, and no mask tensor at all.
 *
 * Layout of the work for one (batch, head, block of 64 queries):
 *   QT  (D x 64)  the block's queries, transposed and scaled by scale * log2(e) (so exp2 gives the softmax);
 *   ST  (L x 64)  scores, one row per key of the block's span (L <= window + 63), queries along the row, so the
 *                 softmax over keys runs as vector max/exp/sum down the rows, 8 queries per instruction;
 *   out (64 x D)  P @ V for the block's real rows, divided by the row sums.
 * Semantics (matching reference.reference_sliding_window with no sinks): query i sits at key position
 * p = q_off + i and sees keys j with p - window < j <= p and 0 <= j < N.
 *
 * Built at run time by band_cpu.py (cc -O3 -mavx2 -mfma -fopenmp) and called through ctypes; compared with the
 * reference in tests/test_band_kernel.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QB 64 /* queries per block: 4 tiles of 16 */
#define KT 6  /* keys (gemm 1) or queries (gemm 2) per register tile: 6 x 16 floats = 12 accumulators */

/* 2^x for x <= 0, exactly 0 below -125 (masked scores are -inf). Degree-7 Taylor of 2^f on f in [-0.5, 0.5]:
 * relative error ~1e-7, the precision of fp32. */
static inline __m256 exp2_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-125.0f);
    __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 xi = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, xi);
    __m256 p = _mm256_set1_ps(1.5252733804059840e-5f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-4f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(xi), 23);
    __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
    return _mm256_and_ps(r, keep);
}

static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The register tile of both products: res[i][0..15] = sum_t a_i[t * as] * b[t * bs + 0..15] for 6 rows i.
 * Twelve named accumulators: with an array, gcc spills them to the stack on every step. */
static inline __attribute__((always_inline)) void tile6x16(const float *a0, const float *a1, const float *a2,
                                                           const float *a3, const float *a4, const float *a5,
                                                           int64_t as, const float *b, int64_t bs, int64_t n,
                                                           __m256 res[12]) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t t = 0; t < n; t++) {
        const __m256 b0 = _mm256_loadu_ps(b + t * bs), b1 = _mm256_loadu_ps(b + t * bs + 8);
        __m256 a;
        a = _mm256_broadcast_ss(a0 + t * as); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(a1 + t * as); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(a2 + t * as); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(a3 + t * as); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(a4 + t * as); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(a5 + t * as); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    }
    res[0] = c00; res[1] = c01; res[2] = c10; res[3] = c11; res[4] = c20; res[5] = c21;
    res[6] = c30; res[7] = c31; res[8] = c40; res[9] = c41; res[10] = c50; res[11] = c51;
}

/* One block: queries rows [0, R) of the block at positions p0.., keys [c_lo, c_lo + L) of (b, head). */
typedef struct {
    const float *k, *v; /* this (batch, KV head)'s sink keys/values, at positions 0 .. n - 1 */
    int64_t k_sn, v_sn, n;
    int64_t r_first; /* sink s is seen by the block's queries r >= s + r_first (those whose window it has left) */
} sinks_t;

static void band_block(const float *q, int64_t q_sm, const float *k, int64_t k_sn, const float *v, int64_t v_sn,
                       float *o, int64_t o_sm, float *lse, int64_t R, int64_t D, int64_t p0, int64_t c_lo,
                       int64_t L, int64_t window, float qscale, const sinks_t *sk, float *QT, float *ST, float *SS) {
    const float ninf = -INFINITY;
    /* QT: transposed, scaled queries; rows past R are zero (their scores are finite and never stored). */
    for (int64_t r = 0; r < QB; r++)
        for (int64_t d = 0; d < D; d++) QT[d * QB + r] = r < R ? q[r * q_sm + d] * qscale : 0.0f;

    /* Query r sees local key c when rmin(c) <= r <= rmax(c): j = c_lo + c, p0 + r - window < j <= p0 + r. */
    const int64_t base = c_lo - p0;
    /* Gemm 1: ST[c][r] = K[c] . QT[:, r], skipping 6x16 tiles wholly outside the band. */
    for (int64_t c0 = 0; c0 < L; c0 += KT) {
        const int64_t nc = min64(KT, L - c0);
        const float *kr[KT];
        for (int i = 0; i < KT; i++) kr[i] = k + (c_lo + c0 + (i < nc ? i : 0)) * k_sn;
        const int64_t r_first = base + c0;                    /* smallest rmin in the tile */
        const int64_t r_last = base + c0 + nc - 1 + window - 1; /* largest rmax */
        for (int64_t rt = 0; rt < QB; rt += 16) {
            if (rt + 15 < r_first || rt > r_last) {
                for (int64_t i = 0; i < nc; i++)
                    for (int64_t r = 0; r < 16; r++) ST[(c0 + i) * QB + rt + r] = ninf;
                continue;
            }
            __m256 acc[12];
            tile6x16(kr[0], kr[1], kr[2], kr[3], kr[4], kr[5], 1, QT + rt, QB, D, acc);
            for (int64_t i = 0; i < nc; i++) {
                _mm256_storeu_ps(ST + (c0 + i) * QB + rt, acc[2 * i]);
                _mm256_storeu_ps(ST + (c0 + i) * QB + rt + 8, acc[2 * i + 1]);
            }
        }
    }
    /* Mask the band's edges exactly (only the rows of ST where the band does not cover all 64 queries). */
    for (int64_t c = 0; c < L; c++) {
        const int64_t rmin = base + c, rmax = base + c + window - 1;
        for (int64_t r = 0; r < min64(rmin, QB); r++) ST[c * QB + r] = ninf;
        for (int64_t r = max64(rmax + 1, 0); r < QB; r++) ST[c * QB + r] = ninf;
    }
    /* Sinks: their own score rows SS (n x 64), -inf for the queries whose window still holds them. */
    for (int64_t s0 = 0; s0 < sk->n; s0 += KT) {
        const int64_t ns = min64(KT, sk->n - s0);
        const float *kr[KT];
        for (int i = 0; i < KT; i++) kr[i] = sk->k + (s0 + (i < ns ? i : 0)) * sk->k_sn;
        for (int64_t rt = 0; rt < QB; rt += 16) {
            __m256 acc[12];
            tile6x16(kr[0], kr[1], kr[2], kr[3], kr[4], kr[5], 1, QT + rt, QB, D, acc);
            for (int64_t i = 0; i < ns; i++) {
                _mm256_storeu_ps(SS + (s0 + i) * QB + rt, acc[2 * i]);
                _mm256_storeu_ps(SS + (s0 + i) * QB + rt + 8, acc[2 * i + 1]);
            }
        }
    }
    for (int64_t s0 = 0; s0 < sk->n; s0++)
        for (int64_t r = 0; r < min64(s0 + sk->r_first, QB); r++) SS[s0 * QB + r] = ninf;
    const float *rows[2] = {SS, ST};
    const int64_t nrows[2] = {sk->n, L};

    /* Softmax down the rows: max, then exp2 and sum, 8 queries per vector. */
    __m256 mx[QB / 8], sm[QB / 8];
    for (int j = 0; j < QB / 8; j++) {
        mx[j] = _mm256_set1_ps(ninf);
        sm[j] = _mm256_setzero_ps();
    }
    for (int part = 0; part < 2; part++)
        for (int64_t c = 0; c < nrows[part]; c++)
            for (int j = 0; j < QB / 8; j++)
                mx[j] = _mm256_max_ps(mx[j], _mm256_loadu_ps(rows[part] + c * QB + 8 * j));
    for (int part = 0; part < 2; part++)
        for (int64_t c = 0; c < nrows[part]; c++)
            for (int j = 0; j < QB / 8; j++) {
                float *x = (float *)rows[part] + c * QB + 8 * j;
                __m256 e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(x), mx[j]));
                _mm256_storeu_ps(x, e);
                sm[j] = _mm256_add_ps(sm[j], e);
            }
    float mxs[QB], sms[QB];
    for (int j = 0; j < QB / 8; j++) {
        _mm256_storeu_ps(mxs + 8 * j, mx[j]);
        _mm256_storeu_ps(sms + 8 * j, sm[j]);
    }
    if (lse)
        for (int64_t r = 0; r < R; r++) lse[r] = (mxs[r] + log2f(sms[r])) * 0.69314718055994531f;

    /* Gemm 2: out[r] = sum_c P[c][r] V[c] / sum[r], over the keys some row of the 6-row tile sees. */
    for (int64_t r0 = 0; r0 < R; r0 += KT) {
        const int64_t nr = min64(KT, R - r0);
        const int64_t cl = max64(0, p0 + r0 - window + 1 - c_lo);
        const int64_t ch = min64(L - 1, p0 + r0 + nr - 1 - c_lo);
        for (int64_t jt = 0; jt < D; jt += 16) {
            /* rows past 64 read the next key's (or the padding's) values: computed, never stored */
            const float *pr = ST + cl * QB + r0;
            __m256 acc[12];
            tile6x16(pr, pr + 1, pr + 2, pr + 3, pr + 4, pr + 5, QB, v + (c_lo + cl) * v_sn + jt, v_sn, ch - cl + 1,
                     acc);
            if (sk->n && r0 + nr - 1 >= sk->r_first) { /* some row of the tile sees a sink */
                const float *ps = SS + r0;
                __m256 acc_s[12];
                tile6x16(ps, ps + 1, ps + 2, ps + 3, ps + 4, ps + 5, QB, sk->v + jt, sk->v_sn, sk->n, acc_s);
                for (int i = 0; i < 12; i++) acc[i] = _mm256_add_ps(acc[i], acc_s[i]);
            }
            for (int64_t i = 0; i < nr; i++) {
                __m256 inv = _mm256_set1_ps(1.0f / sms[r0 + i]);
                _mm256_storeu_ps(o + (r0 + i) * o_sm + jt, _mm256_mul_ps(acc[2 * i], inv));
                _mm256_storeu_ps(o + (r0 + i) * o_sm + jt + 8, _mm256_mul_ps(acc[2 * i + 1], inv));
            }
        }
    }
}

/* q (B, H, M, D), k/v (B, Hkv, N, D), out (B, H, M, D): element strides for batch, head and sequence, the last
 * dimension contiguous. lse (B, H, M) contiguous or NULL. Sinks: sk/sv (B, Hkv, S, D) at positions 0 .. S-1, the
 * tail's key 0 at position pos0 (so query i at position pos0 + q_off + i sees sink s when s <= that - window); S = 0
 * for none. Returns 0, -1 when the shapes are not supported, -2 when out of memory. */
int band_attention_f32(const float *q, const float *k, const float *v, float *out, float *lse, int64_t B, int64_t H,
                       int64_t Hkv, int64_t M, int64_t N, int64_t D, int64_t q_sb, int64_t q_sh, int64_t q_sm,
                       int64_t k_sb, int64_t k_sh, int64_t k_sn, int64_t v_sb, int64_t v_sh, int64_t v_sn,
                       int64_t o_sb, int64_t o_sh, int64_t o_sm, int64_t q_off, int64_t window, float scale,
                       const float *sk, const float *sv, int64_t S, int64_t sk_sb, int64_t sk_sh, int64_t sk_sn,
                       int64_t sv_sb, int64_t sv_sh, int64_t sv_sn, int64_t pos0, int nthreads) {
    if (D % 16 || H % Hkv || window < 1 || q_off < 0 || q_off + M > N || S < 0) return -1;
    const int64_t nblk = (M + QB - 1) / QB;
    const int64_t items = B * H * nblk;
    const int64_t span = min64(window + QB - 1, N) + KT; /* rows of ST, with room for the tile's overhang */
    const float qscale = scale * 1.4426950408889634f;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *QT = (float *)aligned_alloc(64, (size_t)(D * QB) * sizeof(float));
        float *ST = (float *)aligned_alloc(64, (size_t)(span * QB + QB) * sizeof(float));
        float *SS = (float *)aligned_alloc(64, (size_t)((S + KT) * QB + QB) * sizeof(float));
        if (!QT || !ST || !SS) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!QT || !ST || !SS) continue;
            const int64_t b = it / (H * nblk), h = (it / nblk) % H, blk = it % nblk;
            const int64_t hk = h / (H / Hkv);
            const int64_t r0 = blk * QB, R = min64(QB, M - r0);
            const int64_t p0 = q_off + r0;
            const int64_t c_lo = max64(0, p0 - window + 1), c_hi = p0 + R - 1;
            const sinks_t sinks = {sk + b * sk_sb + hk * sk_sh, sv + b * sv_sb + hk * sv_sh, sk_sn, sv_sn, S,
                                   window - pos0 - p0};
            band_block(q + b * q_sb + h * q_sh + r0 * q_sm, q_sm, k + b * k_sb + hk * k_sh, k_sn,
                       v + b * v_sb + hk * v_sh, v_sn, out + b * o_sb + h * o_sh + r0 * o_sm, o_sm,
                       lse ? lse + (b * H + h) * M + r0 : NULL, R, D, p0, c_lo, c_hi - c_lo + 1, window, qscale,
                       &sinks, QT, ST, SS);
        }
        free(QT);
        free(ST);
        free(SS);
    }
    return failed ? -2 : 0;
}

/* Decode attention: one new token per sequence, so each query sees every key its mask allows and the G = H / Hkv
 * query heads of a KV head share those keys. Why a kernel: torch's CPU SDPA reads a decode step's K/V at about half
 * the rate a plain sum reads memory, and at long contexts that read is the whole cost of attention (issue 13's
 * roofline). Here the keys stream through once, in blocks of DB with an online softmax across blocks, so K and V are
 * each read once, in order, and the scores never leave L1.
 *
 * Dims run along the lanes (16 with AVX-512, 8 with AVX2): fp32 decode attention does 2 G D FLOPs per key for 4 D
 * bytes of K and V, so at G = 9 (SmolLM2's MQA) the arithmetic takes about as long as the memory read, and a first
 * version with the queries along the lanes (as in the band kernel) measured slower than SDPA. A score is D / 16 (or
 * D / 8) FMAs plus a share of a transposing sum over 16 (8) keys; P @ V is G D / 16 (8) FMAs per key, in tiles of
 * exactly the heads there are; neither wastes lanes when G is small (GQA: 1-4).
 *   QS (G x D)     the group's queries, scaled by scale * log2(e) (so exp2 gives the softmax);
 *   S  (GMAX x DB) one block's scores, then probabilities: one row per query head, keys along the row;
 *   O  (G x D)     the running, unnormalised outputs, rescaled when a block raises a head's running max.
 * valid (B, N) bytes, row stride valid_sb (0: one row for every sequence), or NULL: which keys each sequence sees.
 * A query that sees no key gets zeros (as from torch's SDPA). */
#define DB 128
#define GMAX 16

/* Ask for memory ahead of use, spread over the scores' arithmetic: while a chunk's scores are computed, the next
 * block's K rows at the chunk's offset (read by the next block's scores) and this block's V rows (read by its P @ V),
 * one query head's share of the chunk's lines at a time (head g of G takes lines [L g / G, L (g + 1) / G) of L).
 * Without prefetches the reads and the arithmetic took turns instead of overlapping (the time per key out of cache
 * was about the in-cache time plus the read's). Spreading them matters at many heads per KV head: asking for all of
 * a chunk's lines at once, as a first version did, left MQA (G = 9, where the arithmetic is longest) at 1.36x a plain
 * read's time; spread, 1.15x. Measured side by side, 8k x 8, every layer, one thread, idle (ms: all at once /
 * spread): MQA 121-126 / 103-105, GQA-3 278-280 / 274-280, Llama-3-8B's shape 196-202 / 204-207; asking for the next
 * block's V instead of this one's made GQA-3 and Llama-3-8B slower (282, 213), and asking for V during P @ V, a few
 * lines a key, made MQA slower (116). A macro, not a function: gcc 12's pure-const analysis finds no side effect in
 * a function made only of prefetches and deletes its calls. row0: the chunk's first row in the next block. */
#define PREFETCH_SHARE(k, k_sn, v, v_sn, row0, nc, N, D, g, G)                                                       \
    {                                                                                                                 \
        const int64_t per_row_ = (D) / 16, lines_ = (nc) * per_row_ * 2; /* 16 floats a line; K and V */           \
        for (int64_t li_ = lines_ * (g) / (G); li_ < lines_ * ((g) + 1) / (G); li_++) {                              \
            const int64_t rr_ = (li_ >> 1) / per_row_, off_ = ((li_ >> 1) % per_row_) * 16;                         \
            const int64_t r_ = (li_ & 1) ? (row0) - DB + rr_ : (row0) + rr_;                                           \
            if (r_ < (N)) _mm_prefetch((const char *)((li_ & 1) ? (v) + r_ * (v_sn) : (k) + r_ * (k_sn)) + off_ * 4, \
                                       _MM_HINT_T0);                                                                  \
        }                                                                                                             \
    }

#define T512 __attribute__((target("avx512f")))

T512 static inline __m512 exp2_ps512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-125.0f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ); /* false for -inf and NaN */
    x = _mm512_max_ps(x, lo);
    __m512 xi = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, xi);
    __m512 p = _mm512_set1_ps(1.5252733804059840e-5f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-4f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(xi), 23);
    return _mm512_maskz_mov_ps(keep, _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e)));
}

/* Transposing sum, level by level: in every 128-bit lane, pair(x, y) holds two partial sums of x (floats 0, 2) and
 * two of y (1, 3); quad(pair(a, b), pair(c, d)) one each of a, b, c, d; octet(u, w) sums pairs of 128-bit lanes of
 * u (the result's lanes 0-1) and w (2-3); and octet(octet(u0, u1), octet(u2, u3)) puts the whole sum of input i
 * (in the order a0..a15 of the quads) at float i. */
T512 static inline __m512 pair_sum(__m512 x, __m512 y) {
    return _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
}
T512 static inline __m512 quad_sum(__m512 x, __m512 y) {
    const __m512d xd = _mm512_castps_pd(x), yd = _mm512_castps_pd(y);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(xd, yd)), _mm512_castpd_ps(_mm512_unpackhi_pd(xd, yd)));
}
T512 static inline __m512 octet_sum(__m512 u, __m512 w) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u, w, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Scores of one query head against 16 keys (rows kr + i * k_sn): float i of the result. Sixteen named
 * accumulators, D / 16 FMAs each. */
#define KEY16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
T512 static inline __m512 scores16(const float *qg, const float *const kr[16], int64_t D) {
#define DECL(i) __m512 a##i = _mm512_setzero_ps();
    KEY16(DECL)
#undef DECL
    for (int64_t c = 0; c < D; c += 16) {
        const __m512 qc = _mm512_loadu_ps(qg + c);
#define FMA(i) a##i = _mm512_fmadd_ps(qc, _mm512_loadu_ps(kr[i] + c), a##i);
        KEY16(FMA)
#undef FMA
    }
    const __m512 u0 = quad_sum(pair_sum(a0, a1), pair_sum(a2, a3)), u1 = quad_sum(pair_sum(a4, a5), pair_sum(a6, a7));
    const __m512 u2 = quad_sum(pair_sum(a8, a9), pair_sum(a10, a11));
    const __m512 u3 = quad_sum(pair_sum(a12, a13), pair_sum(a14, a15));
    return octet_sum(octet_sum(u0, u1), octet_sum(u2, u3));
}
#undef KEY16

/* P @ V for n heads (rows p, p + DB, ...) and 4 vectors of dims of V (rows vr, vr + v_sn, ...) over nb keys, added
 * to the outputs og, og + D, ... after scaling them by alpha[i]: one function per n, each with 4n named accumulators
 * (an array would be spilled to the stack on every key). Written once over the vector ops VEC / VZERO / VSET1 / VFMA
 * / VLD / VST of width W, and instantiated for AVX-512 here and AVX2 below. */
#define PV_DECL(i) VEC c##i##0 = VZERO(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
#define PV_FMA(i)                                                                                                     \
    {                                                                                                                 \
        const VEC pc = VSET1(p[(i) * DB + c]);                                                                        \
        c##i##0 = VFMA(pc, v0, c##i##0);                                                                              \
        c##i##1 = VFMA(pc, v1, c##i##1);                                                                              \
        c##i##2 = VFMA(pc, v2, c##i##2);                                                                              \
        c##i##3 = VFMA(pc, v3, c##i##3);                                                                              \
    }
#define PV_STORE(i)                                                                                                   \
    {                                                                                                                 \
        float *o = og + (i) * D;                                                                                      \
        const VEC a = VSET1(alpha[i]);                                                                                \
        VST(o, VFMA(VLD(o), a, c##i##0));                                                                             \
        VST(o + W, VFMA(VLD(o + W), a, c##i##1));                                                                     \
        VST(o + 2 * W, VFMA(VLD(o + 2 * W), a, c##i##2));                                                             \
        VST(o + 3 * W, VFMA(VLD(o + 3 * W), a, c##i##3));                                                             \
    }
#define PV_TILE(name, ATTR, ROWS)                                                                                     \
    ATTR static void name(const float *p, const float *vr, int64_t v_sn, int64_t nb, float *og, int64_t D,            \
                          const float *alpha) {                                                                       \
        ROWS(PV_DECL)                                                                                                 \
        for (int64_t c = 0; c < nb; c++, vr += v_sn) {                                                                \
            const VEC v0 = VLD(vr), v1 = VLD(vr + W), v2 = VLD(vr + 2 * W), v3 = VLD(vr + 3 * W);                     \
            ROWS(PV_FMA)                                                                                              \
        }                                                                                                             \
        ROWS(PV_STORE)                                                                                                \
    }
#define ROWS1(X) X(0)
#define ROWS2(X) ROWS1(X) X(1)
#define ROWS3(X) ROWS2(X) X(2)
#define ROWS4(X) ROWS3(X) X(3)
#define ROWS5(X) ROWS4(X) X(4)
#define ROWS6(X) ROWS5(X) X(5)
#define VEC __m512
#define VZERO _mm512_setzero_ps
#define VSET1 _mm512_set1_ps
#define VFMA _mm512_fmadd_ps
#define VLD _mm512_loadu_ps
#define VST _mm512_storeu_ps
#define W 16
PV_TILE(pv_tile1, T512, ROWS1)
PV_TILE(pv_tile2, T512, ROWS2)
PV_TILE(pv_tile3, T512, ROWS3)
PV_TILE(pv_tile4, T512, ROWS4)
PV_TILE(pv_tile5, T512, ROWS5)
PV_TILE(pv_tile6, T512, ROWS6)
#undef VEC
#undef VZERO
#undef VSET1
#undef VFMA
#undef VLD
#undef VST
#undef W
typedef void (*pv_tile_fn)(const float *, const float *, int64_t, int64_t, float *, int64_t, const float *);

/* The scalar parts both versions share. decode_start: scaled queries, zero outputs, no key seen yet. */
static void decode_start(const float *q, int64_t q_sh, int64_t G, int64_t D, float qscale, float *QS, float *O,
                         float *m, float *l) {
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++) QS[g * D + d] = q[g * q_sh + d] * qscale;
    for (int64_t i = 0; i < G * D; i++) O[i] = 0.0f;
    for (int64_t g = 0; g < GMAX; g++) m[g] = -INFINITY, l[g] = 0.0f;
}

/* Online softmax, after head g's block was exponentiated against its new running max mn (block sum bs): the factor
 * alpha[g] its earlier outputs are rescaled by, and the running sum and max. */
static inline void decode_rescale(int64_t g, float mn, float bs, float *m, float *l, float *alpha) {
    alpha[g] = m[g] == -INFINITY ? 0.0f : exp2f(m[g] - mn);
    l[g] = l[g] * alpha[g] + bs;
    m[g] = mn;
}

/* O[g] = alpha[g] O[g] + sum_c P[g][c] V[c] over one block, in tiles of at most hmax heads x dims dims (tile[n] for
 * n heads), the heads split as evenly as the tiles allow (AVX-512, G = 9: 5 + 4), so no tile computes a head that
 * is not there. */
static void decode_pv(const pv_tile_fn *tile, int64_t hmax, int64_t dims, const float *S, const float *vb,
                      int64_t v_sn, int64_t nb, float *O, int64_t G, int64_t D, const float *alpha) {
    const int64_t tiles = (G + hmax - 1) / hmax;
    for (int64_t dc = 0; dc < D; dc += dims)
        for (int64_t t = 0, g0 = 0; t < tiles; t++) {
            const int64_t ng = (G - g0) / (tiles - t) + ((G - g0) % (tiles - t) != 0);
            tile[ng](S + g0 * DB, vb + dc, v_sn, nb, O + g0 * D + dc, D, alpha + g0);
            g0 += ng;
        }
}

/* The outputs, divided by each head's softmax sum (zeros for a head that saw no key). */
static void decode_finish(float *o, int64_t o_sh, const float *O, const float *l, int64_t G, int64_t D) {
    for (int64_t g = 0; g < G; g++) {
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int64_t d = 0; d < D; d++) o[g * o_sh + d] = O[g * D + d] * inv;
    }
}
static const pv_tile_fn pv_tiles[7] = {NULL, pv_tile1, pv_tile2, pv_tile3, pv_tile4, pv_tile5, pv_tile6};

T512 static void decode_group512(const float *q, int64_t q_sh, const float *k, int64_t k_sn, const float *v,
                                 int64_t v_sn, float *o, int64_t o_sh, const uint8_t *valid, int64_t G, int64_t N,
                                 int64_t D, float qscale, float *QS, float *S, float *O) {
    const float ninf = -INFINITY;
    float m[GMAX], l[GMAX], alpha[GMAX];
    decode_start(q, q_sh, G, D, qscale, QS, O, m, l);
    for (int64_t j0 = 0; j0 < N; j0 += DB) {
        const int64_t nb = min64(DB, N - j0);
        for (int64_t c0 = 0; c0 < nb; c0 += 16) {
            const int64_t nc = min64(16, nb - c0);
            const float *kr[16];
            for (int i = 0; i < 16; i++) kr[i] = k + (j0 + c0 + (i < nc ? i : 0)) * k_sn;
            __mmask16 live = (__mmask16)((1u << nc) - 1u);
            if (valid)
                for (int i = 0; i < nc; i++)
                    if (!valid[j0 + c0 + i]) live &= (__mmask16)~(1u << i);
            for (int64_t g = 0; g < G; g++) {
                PREFETCH_SHARE(k, k_sn, v, v_sn, j0 + DB + c0, nc, N, D, g, G)
                _mm512_storeu_ps(S + g * DB + c0, _mm512_mask_mov_ps(_mm512_set1_ps(ninf), live,
                                                                      scores16(QS + g * D, kr, D)));
            }
        }
        const int64_t nv = (nb + 15) / 16; /* a partial last vector's tail lanes hold -inf */
        for (int64_t g = 0; g < G; g++) {
            float *sg = S + g * DB;
            __m512 mx = _mm512_set1_ps(ninf);
            for (int64_t t = 0; t < nv; t++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sg + 16 * t));
            const float mn = fmaxf(m[g], _mm512_reduce_max_ps(mx));
            /* -inf (no key seen yet) shifts by 0, so exp2 still maps the -inf scores to 0 */
            const __m512 shift = _mm512_set1_ps(mn == ninf ? 0.0f : mn);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t t = 0; t < nv; t++) {
                const __m512 e = exp2_ps512(_mm512_sub_ps(_mm512_loadu_ps(sg + 16 * t), shift));
                _mm512_storeu_ps(sg + 16 * t, e);
                sum = _mm512_add_ps(sum, e);
            }
            decode_rescale(g, mn, _mm512_reduce_add_ps(sum), m, l, alpha);
        }
        decode_pv(pv_tiles, 6, 64, S, v + j0 * v_sn, v_sn, nb, O, G, D, alpha); /* 4n named accumulators a tile */
    }
    decode_finish(o, o_sh, O, l, G, D);
}

/* The same step on AVX2 (CPUs without AVX-512, or D a multiple of 32 but not of 64): dims along 8 lanes, scores
 * for 8 keys at a time summed across lanes by a transposing hadd tree, P @ V in tiles of up to 3 heads x 32 dims
 * (12 named accumulators of 16 registers). */
static inline __m256 transpose_sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                                    __m256 a7) {
    /* hadd pairs within each 128-bit half; after two levels each half holds 4 inputs' partial sums, in order */
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline __m256 scores8(const float *qg, const float *const kr[8], int64_t D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t c = 0; c < D; c += 8) {
        const __m256 qc = _mm256_loadu_ps(qg + c);
        a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[0] + c), a0);
        a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[1] + c), a1);
        a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[2] + c), a2);
        a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[3] + c), a3);
        a4 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[4] + c), a4);
        a5 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[5] + c), a5);
        a6 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[6] + c), a6);
        a7 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[7] + c), a7);
    }
    return transpose_sum8(a0, a1, a2, a3, a4, a5, a6, a7);
}

/* P @ V tiles of up to 3 heads x 32 dims (12 accumulators of 16 registers): PV_TILE above on AVX2's vector ops. */
#define VEC __m256
#define VZERO _mm256_setzero_ps
#define VSET1 _mm256_set1_ps
#define VFMA _mm256_fmadd_ps
#define VLD _mm256_loadu_ps
#define VST _mm256_storeu_ps
#define W 8
PV_TILE(pv8_tile1, , ROWS1)
PV_TILE(pv8_tile2, , ROWS2)
PV_TILE(pv8_tile3, , ROWS3)
#undef VEC
#undef VZERO
#undef VSET1
#undef VFMA
#undef VLD
#undef VST
#undef W
static const pv_tile_fn pv8_tiles[4] = {NULL, pv8_tile1, pv8_tile2, pv8_tile3};

static void decode_group256(const float *q, int64_t q_sh, const float *k, int64_t k_sn, const float *v, int64_t v_sn,
                            float *o, int64_t o_sh, const uint8_t *valid, int64_t G, int64_t N, int64_t D,
                            float qscale, float *QS, float *S, float *O) {
    const float ninf = -INFINITY;
    float m[GMAX], l[GMAX], alpha[GMAX];
    decode_start(q, q_sh, G, D, qscale, QS, O, m, l);
    for (int64_t j0 = 0; j0 < N; j0 += DB) {
        const int64_t nb = min64(DB, N - j0);
        for (int64_t c0 = 0; c0 < nb; c0 += 8) {
            const int64_t nc = min64(8, nb - c0);
            const float *kr[8];
            for (int i = 0; i < 8; i++) kr[i] = k + (j0 + c0 + (i < nc ? i : 0)) * k_sn;
            for (int64_t g = 0; g < G; g++) {
                PREFETCH_SHARE(k, k_sn, v, v_sn, j0 + DB + c0, nc, N, D, g, G)
                float *sg = S + g * DB + c0;
                _mm256_storeu_ps(sg, scores8(QS + g * D, kr, D));
                for (int64_t i = 0; i < 8; i++)
                    if (i >= nc || (valid && !valid[j0 + c0 + i])) sg[i] = ninf;
            }
        }
        const int64_t nv = (nb + 7) / 8;
        for (int64_t g = 0; g < G; g++) {
            float *sg = S + g * DB;
            __m256 mx = _mm256_set1_ps(ninf);
            for (int64_t t = 0; t < nv; t++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sg + 8 * t));
            float lanes[8], bm = ninf;
            _mm256_storeu_ps(lanes, mx);
            for (int i = 0; i < 8; i++) bm = fmaxf(bm, lanes[i]);
            const float mn = fmaxf(m[g], bm);
            const __m256 shift = _mm256_set1_ps(mn == ninf ? 0.0f : mn);
            __m256 sum = _mm256_setzero_ps();
            for (int64_t t = 0; t < nv; t++) {
                const __m256 e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(sg + 8 * t), shift));
                _mm256_storeu_ps(sg + 8 * t, e);
                sum = _mm256_add_ps(sum, e);
            }
            _mm256_storeu_ps(lanes, sum);
            float bs = 0.0f;
            for (int i = 0; i < 8; i++) bs += lanes[i];
            decode_rescale(g, mn, bs, m, l, alpha);
        }
        decode_pv(pv8_tiles, 3, 32, S, v + j0 * v_sn, v_sn, nb, O, G, D, alpha);
    }
    decode_finish(o, o_sh, O, l, G, D);
}

/* Whether this CPU (and its OS) runs AVX-512F and the step's D suits the 64-dim tiles. */
static int decode_avx512_ok(int64_t D) { return D % 64 == 0 && __builtin_cpu_supports("avx512f"); }

/* Which version decode_attention_f32 runs here for head dim D: 2 AVX-512 (the CPU and its OS have AVX-512F, D a
 * multiple of 64), 1 AVX2 (D a multiple of 32; the library is only loaded where AVX2 and FMA run), 0 none. */
int decode_attention_supported(int64_t D) { return decode_avx512_ok(D) ? 2 : D % 32 == 0 ? 1 : 0; }

/* q (B, H, D) and out (B, H, D): element strides for batch and head; k/v (B, Hkv, N, D): strides for batch, head and
 * key; the last dimension of each contiguous. isa: 0 the best this CPU runs, 1 AVX2, 2 AVX-512 (tests hold both to
 * the reference). Returns 0, -1 when the shapes or this CPU are not supported, -2 when out of memory. */
int decode_attention_f32(const float *q, const float *k, const float *v, float *out, int64_t B, int64_t H,
                         int64_t Hkv, int64_t N, int64_t D, int64_t q_sb, int64_t q_sh, int64_t k_sb, int64_t k_sh,
                         int64_t k_sn, int64_t v_sb, int64_t v_sh, int64_t v_sn, int64_t o_sb, int64_t o_sh,
                         const uint8_t *valid, int64_t valid_sb, float scale, int isa, int nthreads) {
    const int best = decode_attention_supported(D);
    if (isa == 0) isa = best;
    if (isa < 1 || isa > best || Hkv < 1 || H % Hkv || H / Hkv > GMAX || N < 1) return -1;
    const int64_t G = H / Hkv, items = B * Hkv;
    const float qscale = scale * 1.4426950408889634f;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *QS = (float *)aligned_alloc(64, (size_t)(GMAX * D) * sizeof(float));
        float *S = (float *)aligned_alloc(64, (size_t)(GMAX * DB) * sizeof(float));
        float *O = (float *)aligned_alloc(64, (size_t)(GMAX * D) * sizeof(float));
        if (!QS || !S || !O) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!QS || !S || !O) continue;
            const int64_t b = it / Hkv, hk = it % Hkv;
            (isa == 2 ? decode_group512 : decode_group256)(
                q + b * q_sb + hk * G * q_sh, q_sh, k + b * k_sb + hk * k_sh, k_sn, v + b * v_sb + hk * v_sh, v_sn,
                out + b * o_sb + hk * G * o_sh, o_sh, valid ? valid + b * valid_sb : NULL, G, N, D, qscale, QS, S, O);
        }
        free(QS);
        free(S);
        free(O);
    }
    return failed ? -2 : 0;
}
