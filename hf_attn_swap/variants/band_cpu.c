/* Sliding-window (band) attention forward for x86-64 CPUs with AVX2 and FMA, fp32.
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
