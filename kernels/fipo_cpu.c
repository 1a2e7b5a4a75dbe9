/* Fused FIPO loss for CPU: what the Triton row kernel (fipo_triton.py) does, as one pass per row in C.
 *
 * Built on first use by fipo_cpu.py with the system C compiler (the one Triton itself needs) and called through
 * ctypes: plain C, no torch headers, so it compiles in about a second and does not depend on the torch ABI.
 *
 * One read of the inputs, one write of f, A * f, F and (optionally) the per-token gradient, nothing else per token. Each
 * row is walked from its end in chunks, so the discounted reverse scan is the recursion F_t = x_t + gamma * F_{t+1}
 * with a double carry, between two vectorised elementwise loops. Per-token values are float (as the fp32 torch and
 * Triton paths); chunk sums are float and row sums double. The row partial sums are reduced here too, so the caller
 * gets the loss, the metrics' stats and the sequence filter in one call.
 *
 * Semantics: SPEC §1.1, the same operation order as fipo_triton._fipo_row_kernel (the tests check both against
 * the torch path and the float64 reference).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LOG_RATIO_CLAMP 20.0f
#define MASKED_MEAN_EPS 1e-8
#define CHUNK 256  /* tokens per chunk: a chunk's temporaries stay in L1 */

/* Per-row partial sums; the order of the final stats is fipo_cpu.STATS_KEYS. */
enum {
    R_TOKENS, R_DUAL, R_LOSS, R_NEG_LOG_RATIO, R_FUTURE_KL, R_ACTIVE, R_FILTERED, R_PG_CLIPPED, R_SAFETY,
    R_WEIGHT, R_MIN_WEIGHT, R_MAX_WEIGHT, R_RAW, R_MIN_RAW, R_MAX_RAW, R_UPPER, R_LOWER, R_NEG_2_3, R_NEG_3_4,
    R_NEG_4_C, R_POS_MINI, R_MAX_NEG_RATIO, R_MAX_POS_RATIO, R_MIN_POS_RATIO, R_BAD_RATIO, R_BAD_ADV, N_ROW
};

enum {
    S_TOKENS, S_FINAL_TOKENS, S_NEG_LOG_RATIO, S_FUTURE_KL, S_ACTIVE, S_FILTERED, S_PG_CLIPPED, S_DUAL, S_SAFETY,
    S_WEIGHT, S_MIN_WEIGHT, S_MAX_WEIGHT, S_RAW, S_MIN_RAW, S_MAX_RAW, S_UPPER, S_LOWER, S_NEG_2_3, S_NEG_3_4,
    S_NEG_4_C, S_POS_MINI, S_MAX_NEG_RATIO, S_MAX_POS_RATIO, S_MIN_POS_RATIO, S_ROWS, S_DROPPED_ROWS,
    S_LOSS, S_BAD_RATIO, S_BAD_ADV, N_OUT
};

int fipo_cpu_n_out(void) { return N_OUT; }
int fipo_cpu_chunk(void) { return CHUNK; }

typedef struct {
    float lower, upper, upper_clip_at, lower_clip_at, safety, dual_clip, ratio_low, ratio_high;
    double gamma;
} params_t;

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* exp in float, within ~1 ulp of libm's expf and branch-free, so that the chunk loops vectorize: exp(x) = 2^k e^r
 * with k = round(x / ln2) (the 1.5 * 2^23 rounding trick), |r| <= ln2 / 2, and a degree-6 polynomial for e^r (the
 * classic Cephes expf coefficients). 2^k is applied as two factors so that subnormal results, and inf above
 * ln(FLT_MAX), come out as expf's. */
static inline float exp_f32(float x)
{
    const float round_magic = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer, kept in the low bits */
    x = MIN(MAX(x, -104.0f), 89.0f);  /* exp(-104) rounds to 0 and exp(89) to inf in float */
    union { float f; int32_t i; } t = { .f = x * 1.44269504088896341f + round_magic };
    const float n = t.f - round_magic;
    const int32_t k = t.i - 0x4B400000;  /* the bits of round_magic */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t half = k >> 1;
    union { int32_t i; float f; } s1 = { .i = (half + 127) << 23 }, s2 = { .i = (k - half + 127) << 23 };
    return p * s1.f * s2.f;
}

/* AVX2 doubles the vector width where the CPU has it; the default clone is SSE2. One build serves both (the loader
 * picks at run time), so a cache on a shared home directory stays valid on any x86-64 node. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* One row, from its end, CHUNK tokens at a time: (a) elementwise log-ratio, ratio and scan input, (b) the scan
 * F_t = x_t + gamma * F_{t+1} (the only serial part), (c) elementwise weights, loss, gradient and metric sums. */
VECTOR_CLONES static void fipo_row(const float *logps, const float *old, const float *adv, int adv_per_token,
                     const uint8_t *mask, int64_t T, const params_t *p,
                     float *weights, float *future_kl, float *weighted_adv, float *grad, double *s)
{
    /* Chunk temporaries. Everything in the two elementwise loops is float (0/1 floats for the conditions): a mixed
     * uint8/int/float loop body does not vectorize with GCC. */
    float ON[CHUNK], D[CHUNK], R[CHUNK], X[CHUNK], A[CHUNK], F[CHUNK], LIVE[CHUNK], G[CHUNK];
    const float lower = p->lower, upper = p->upper, c = p->dual_clip, thr = p->safety;
    const float rl = p->ratio_low, rh = p->ratio_high, uca = p->upper_clip_at, lca = p->lower_clip_at;
    double carry = 0.0;
    for (int k = 0; k < N_ROW; ++k) s[k] = 0.0;
    s[R_MIN_WEIGHT] = s[R_MIN_RAW] = s[R_MIN_POS_RATIO] = INFINITY;
    s[R_MAX_WEIGHT] = s[R_MAX_RAW] = s[R_MAX_NEG_RATIO] = s[R_MAX_POS_RATIO] = -INFINITY;

    for (int64_t hi = T; hi > 0; hi -= CHUNK) {
        const int64_t lo = hi > CHUNK ? hi - CHUNK : 0;
        const int n = (int)(hi - lo);
        for (int i = 0; i < n; ++i) ON[i] = mask[lo + i] ? 1.0f : 0.0f;
        if (adv_per_token) {
            for (int i = 0; i < n; ++i) A[i] = adv[lo + i];
        } else {
            for (int i = 0; i < n; ++i) A[i] = adv[0];
        }

        /* (a) log-ratio (clamped to +-20), ratio, scan input x (the ratio filter); bad inputs are counted */
        float bad_ratio = 0, bad_adv = 0;
#pragma omp simd reduction(+ : bad_ratio, bad_adv)
        for (int i = 0; i < n; ++i) {
            const float on = ON[i], a = A[i];
            const float raw_delta = logps[lo + i] - old[lo + i];
            bad_ratio += raw_delta != raw_delta ? on : 0.0f;
            bad_adv += fabsf(a) <= 3.40282347e38f ? 0.0f : on;
            const float d = on > 0.0f ? MIN(MAX(raw_delta, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP) : 0.0f;
            const float ratio = exp_f32(d);
            D[i] = d;
            R[i] = ratio;
            X[i] = ratio <= c ? d : 0.0f;  /* d = 0 off the response */
            A[i] = on > 0.0f ? a : 0.0f;  /* where, not *: NaN advantages at padding stay out */
            LIVE[i] = fabsf(raw_delta) <= LOG_RATIO_CLAMP ? on : 0.0f;  /* the clamp passes gradient */
        }
        /* (b) the reverse scan, in double */
        for (int i = n - 1; i >= 0; --i) {
            carry = X[i] + p->gamma * carry;
            F[i] = (float)carry;
        }
        /* (c) weights, loss, gradient and the metrics' partial sums (response tokens, before the sequence filter) */
        float n_tokens = 0, n_dual = 0, loss_sum = 0, neg_log_ratio = 0, sum_fkl = 0, n_active = 0, n_filtered = 0;
        float n_pg = 0, n_safety = 0, sum_w = 0, sum_raw = 0, n_upper = 0, n_lower = 0, n23 = 0, n34 = 0, n4c = 0;
        float n_mini = 0;
        float min_w = INFINITY, max_w = -INFINITY, min_raw = INFINITY, max_raw = -INFINITY;
        float max_neg = -INFINITY, max_pos = -INFINITY, min_pos = INFINITY;
#pragma omp simd reduction(+ : n_tokens, n_dual, loss_sum, neg_log_ratio, sum_fkl, n_active, n_filtered, n_pg, \
                           n_safety, sum_w, sum_raw, n_upper, n_lower, n23, n34, n4c, n_mini) \
                 reduction(min : min_w, min_raw, min_pos) reduction(max : max_w, max_raw, max_neg, max_pos)
        for (int i = 0; i < n; ++i) {
            const float on = ON[i], d = D[i], ratio = R[i], a = A[i], fkl = F[i];
            const float raw = exp_f32(fkl);
            const float clipped = MIN(MAX(raw, lower), upper);  /* clip_ratio = 0: lower = 0, exp F >= 0 */
            const float negative_adv = a < 0.0f ? 1.0f : 0.0f, positive_adv = a > 0.0f ? 1.0f : 0.0f;
            const float safety = ratio > thr ? negative_adv : 0.0f;  /* a = 0 off the response */
            const float w = safety > 0.0f ? MIN(MAX(clipped, 0.8f), 1.0f) : clipped;
            future_kl[lo + i] = fkl;
            weights[lo + i] = w;

            /* dual-clip PPO surrogate on the weighted advantage */
            const float wa = a * w;
            weighted_adv[lo + i] = wa;
            const float loss1 = -wa * ratio;
            const float loss2 = -wa * MIN(MAX(ratio, rl), rh);
            const float clip_loss = MAX(loss1, loss2);
            const float loss3 = -wa * c;
            const int negative = wa < 0.0f;
            loss_sum += negative ? MIN(loss3, clip_loss) : clip_loss;  /* 0 off the response (a = 0) */
            n_dual += negative & (clip_loss > loss3) ? 1.0f : 0.0f;
            /* d loss / d logp before the keep / (kept tokens) scale: only the ratio carries gradient */
            const float live_if_negative = (ratio > rl) & (ratio < c) ? 1.0f : 0.0f;
            const float ratio_live = negative ? live_if_negative : (ratio < rh ? 1.0f : 0.0f);
            G[i] = -wa * ratio * (ratio_live * LIVE[i]);

            n_tokens += on;
            neg_log_ratio -= d;
            sum_fkl += on * fkl;
            n_active += d != 0.0f ? 1.0f : 0.0f;
            n_filtered += ratio <= c ? 0.0f : on;
            n_pg += loss2 > loss1 ? on : 0.0f;
            n_safety += safety;
            sum_w += on * w;
            min_w = MIN(min_w, on > 0.0f ? w : INFINITY);
            max_w = MAX(max_w, on > 0.0f ? w : -INFINITY);
            sum_raw += on > 0.0f ? raw : 0.0f;  /* raw may be inf at padding */
            min_raw = MIN(min_raw, on > 0.0f ? raw : INFINITY);
            max_raw = MAX(max_raw, on > 0.0f ? raw : -INFINITY);
            n_upper += w >= uca ? on : 0.0f;
            n_lower += w <= lca ? on : 0.0f;
            n23 += (ratio >= 2.0f) & (ratio < 3.0f) ? negative_adv : 0.0f;
            n34 += (ratio >= 3.0f) & (ratio < 4.0f) ? negative_adv : 0.0f;
            n4c += (ratio >= 4.0f) & (ratio < c) ? negative_adv : 0.0f;
            max_neg = MAX(max_neg, negative_adv > 0.0f ? ratio : -INFINITY);
            n_mini += ratio < 1e-3f ? positive_adv : 0.0f;
            max_pos = MAX(max_pos, positive_adv > 0.0f ? ratio : -INFINITY);
            min_pos = MIN(min_pos, positive_adv > 0.0f ? ratio : INFINITY);
        }
        if (grad) memcpy(grad + lo, G, sizeof(float) * n);
        s[R_TOKENS] += n_tokens; s[R_DUAL] += n_dual; s[R_LOSS] += loss_sum; s[R_NEG_LOG_RATIO] += neg_log_ratio;
        s[R_FUTURE_KL] += sum_fkl; s[R_ACTIVE] += n_active; s[R_FILTERED] += n_filtered; s[R_PG_CLIPPED] += n_pg;
        s[R_SAFETY] += n_safety; s[R_WEIGHT] += sum_w; s[R_RAW] += sum_raw; s[R_UPPER] += n_upper;
        s[R_LOWER] += n_lower; s[R_NEG_2_3] += n23; s[R_NEG_3_4] += n34; s[R_NEG_4_C] += n4c;
        s[R_POS_MINI] += n_mini; s[R_BAD_RATIO] += bad_ratio; s[R_BAD_ADV] += bad_adv;
        s[R_MIN_WEIGHT] = MIN(s[R_MIN_WEIGHT], min_w); s[R_MAX_WEIGHT] = MAX(s[R_MAX_WEIGHT], max_w);
        s[R_MIN_RAW] = MIN(s[R_MIN_RAW], min_raw); s[R_MAX_RAW] = MAX(s[R_MAX_RAW], max_raw);
        s[R_MAX_NEG_RATIO] = MAX(s[R_MAX_NEG_RATIO], max_neg); s[R_MAX_POS_RATIO] = MAX(s[R_MAX_POS_RATIO], max_pos);
        s[R_MIN_POS_RATIO] = MIN(s[R_MIN_POS_RATIO], min_pos);
    }
}

/* Returns 0, or -1 when the row scratch could not be allocated. adv_per_token: advantages are (B, T), else (B,).
 * weights, future_kl, weighted_adv (A * f, 0 off the response): (B, T) outputs, written everywhere. out: N_OUT doubles (the stats, the loss, the NaN log-ratio and non-finite advantage counts); keep: (B,) 0/1;
 * row_scale: (B,) keep_b / (kept tokens + 1e-8), the backward's factor; loss: the loss as float; grad may be NULL
 * (no gradient wanted). */
int fipo_cpu_forward(const float *logps, const float *old, const float *adv, int adv_per_token, const uint8_t *mask,
                     int64_t B, int64_t T, double gamma, double lower, double upper,
                     double safety_threshold, double dual_clip, double ratio_low, double ratio_high,
                     float *weights, float *future_kl, float *weighted_adv, float *grad, uint8_t *keep,
                     float *row_scale, float *loss, double *out)
{
    params_t p = {
        .lower = (float)lower, .upper = (float)upper,
        .upper_clip_at = (float)(upper - 1e-7), .lower_clip_at = (float)(lower + 1e-7),
        .safety = (float)safety_threshold, .dual_clip = (float)dual_clip,
        .ratio_low = (float)ratio_low, .ratio_high = (float)ratio_high, .gamma = gamma,
    };
    double *rows = malloc(sizeof(double) * N_ROW * (B > 0 ? B : 1));
    if (!rows) return -1;
    for (int64_t b = 0; b < B; ++b) {
        fipo_row(logps + b * T, old + b * T, adv + (adv_per_token ? b * T : b), adv_per_token, mask + b * T,
                 T, &p, weights + b * T, future_kl + b * T, weighted_adv + b * T, grad ? grad + b * T : NULL,
                 rows + b * N_ROW);
    }

    for (int i = 0; i < N_OUT; ++i) out[i] = 0.0;
    out[S_MIN_WEIGHT] = out[S_MIN_RAW] = out[S_MIN_POS_RATIO] = INFINITY;
    out[S_MAX_WEIGHT] = out[S_MAX_RAW] = out[S_MAX_NEG_RATIO] = out[S_MAX_POS_RATIO] = -INFINITY;
    double loss_sum = 0.0;
    for (int64_t b = 0; b < B; ++b) {
        const double *s = rows + b * N_ROW;
        int kept = s[R_DUAL] <= 1;
        keep[b] = (uint8_t)kept;
        out[S_TOKENS] += s[R_TOKENS];
        out[S_FINAL_TOKENS] += kept ? s[R_TOKENS] : 0.0;
        loss_sum += kept ? s[R_LOSS] : 0.0;
        out[S_NEG_LOG_RATIO] += s[R_NEG_LOG_RATIO];
        out[S_FUTURE_KL] += s[R_FUTURE_KL];
        out[S_ACTIVE] += s[R_ACTIVE];
        out[S_FILTERED] += s[R_FILTERED];
        out[S_PG_CLIPPED] += s[R_PG_CLIPPED];
        out[S_DUAL] += s[R_DUAL];
        out[S_SAFETY] += s[R_SAFETY];
        out[S_WEIGHT] += s[R_WEIGHT];
        out[S_MIN_WEIGHT] = fmin(out[S_MIN_WEIGHT], s[R_MIN_WEIGHT]);
        out[S_MAX_WEIGHT] = fmax(out[S_MAX_WEIGHT], s[R_MAX_WEIGHT]);
        out[S_RAW] += s[R_RAW];
        out[S_MIN_RAW] = fmin(out[S_MIN_RAW], s[R_MIN_RAW]);
        out[S_MAX_RAW] = fmax(out[S_MAX_RAW], s[R_MAX_RAW]);
        out[S_UPPER] += s[R_UPPER];
        out[S_LOWER] += s[R_LOWER];
        out[S_NEG_2_3] += s[R_NEG_2_3];
        out[S_NEG_3_4] += s[R_NEG_3_4];
        out[S_NEG_4_C] += s[R_NEG_4_C];
        out[S_POS_MINI] += s[R_POS_MINI];
        out[S_MAX_NEG_RATIO] = fmax(out[S_MAX_NEG_RATIO], s[R_MAX_NEG_RATIO]);
        out[S_MAX_POS_RATIO] = fmax(out[S_MAX_POS_RATIO], s[R_MAX_POS_RATIO]);
        out[S_MIN_POS_RATIO] = fmin(out[S_MIN_POS_RATIO], s[R_MIN_POS_RATIO]);
        out[S_ROWS] += s[R_TOKENS] > 0;
        out[S_DROPPED_ROWS] += s[R_TOKENS] > 0 && !kept;
        out[S_BAD_RATIO] += s[R_BAD_RATIO];
        out[S_BAD_ADV] += s[R_BAD_ADV];
    }
    double denominator = out[S_FINAL_TOKENS] + MASKED_MEAN_EPS;
    out[S_LOSS] = loss_sum / denominator;
    *loss = (float)out[S_LOSS];
    for (int64_t b = 0; b < B; ++b) row_scale[b] = keep[b] ? (float)(1.0 / denominator) : 0.0f;
    free(rows);
    return 0;
}
