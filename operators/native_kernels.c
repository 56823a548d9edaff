/* Fused CPU kernels for the merge engine (see operators/native.py for why and how they load).
 *
 * Every floating-point step mirrors the eager torch code (and so mergekit 0.1.5) operation for
 * operation: single IEEE float ops, no reassociation, no FMA contraction (-ffp-contract=off), so
 * results are bit-identical to the eager path. Only the loop structure differs: one pass over
 * L1-sized blocks instead of one pass per torch op.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 512
#define MAX_MODELS 32
#define MAX_RANKS 4
#define HALF 65536

/* ---- inputs: float32 or bfloat16, read as float32 block by block ----
 *
 * The models and the base of one call share one format: `bf16` = 0 for float32, 1 for bfloat16.
 * A bfloat16 is the top half of a float32, so widening it is exact: the kernels compute on the
 * same float32 values as the eager code does after `.float()`, without a float32 copy of any
 * input (a 128K-vocabulary embedding is 1 GiB per input in float32). */

static inline float bf16_value(uint16_t half) {
    const uint32_t bits = (uint32_t)half << 16;
    float x;
    memcpy(&x, &bits, 4);
    return x;
}

/* entry j of an input */
static inline float input_at(const void *data, int bf16, int64_t j) {
    return bf16 ? bf16_value(((const uint16_t *)data)[j]) : ((const float *)data)[j];
}

/* entries [offset, offset + size) of an input, as float32 in `buffer` */
static inline void load_block(const void *data, int bf16, int64_t offset, int64_t size,
                              float *buffer) {
    if (!bf16) {
        memcpy(buffer, (const float *)data + offset, sizeof(float) * size);
        return;
    }
    const uint16_t *half = (const uint16_t *)data + offset;
    for (int64_t j = 0; j < size; ++j) buffer[j] = bf16_value(half[j]);
}

/* entries [offset, offset + size) as float32: the input itself when it is float32, else widened
 * into `buffer` (size <= BLOCK) */
static inline const float *input_block(const void *data, int bf16, int64_t offset, int64_t size,
                                       float *buffer) {
    if (!bf16) return (const float *)data + offset;
    load_block(data, bf16, offset, size, buffer);
    return buffer;
}

/* ---- order statistics: two-level radix select over sortable 32-bit keys ---- */

static inline uint32_t sortable_key(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float key_value(uint32_t k) {
    uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* k-th smallest of keys[0..n) (rearranges them): iterative quickselect, median-of-three. */
static uint32_t nth_key(uint32_t *keys, int64_t n, int64_t k) {
    int64_t left = 0, right = n - 1;
    while (right > left) {
        const int64_t middle = left + (right - left) / 2;
        const uint32_t a = keys[left], b = keys[middle], c = keys[right];
        const uint32_t pivot =
            a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t i = left, j = right;
        while (i <= j) {
            while (keys[i] < pivot) ++i;
            while (keys[j] > pivot) --j;
            if (i <= j) {
                const uint32_t t = keys[i];
                keys[i] = keys[j];
                keys[j] = t;
                ++i;
                --j;
            }
        }
        if (k <= j) right = j;
        else if (k >= i) left = i;
        else return keys[k];
    }
    return keys[k];
}

/* ---- collecting the keys inside (or outside) a bracket [from, from + span] ---- */

#ifdef __AVX2__
/* pack_lanes[mask]: the lane indices of mask's set bits, in order (AVX2 left-packing). */
static uint32_t pack_lanes[256][8];

__attribute__((constructor)) static void build_pack_lanes(void) {
    for (int mask = 0; mask < 256; ++mask)
        for (int lane = 0, put = 0; lane < 8; ++lane)
            if (mask >> lane & 1) pack_lanes[mask][put++] = (uint32_t)lane;
}
#endif

/* Appends to `into` the keys inside the bracket (outside it when `outside` is 1) and returns
 * how many. Callers collect a few percent of the keys: AVX2 packs eight keys per step with no
 * branch per key; elsewhere a branchless scalar loop. Writes up to 8 entries past the returned
 * count (callers leave COLLECT_SLACK spare). */
#define COLLECT_SLACK 8
static inline int64_t collect_keys(const uint32_t *keys, int64_t size, uint32_t from,
                                   uint32_t span, int outside, uint32_t *into) {
    int64_t put = 0, j = 0;
#ifdef __AVX2__
    /* unsigned key - from <= span, as a signed compare of both sides with the top bit flipped */
    const __m256i origin = _mm256_set1_epi32((int32_t)from);
    const __m256i flip = _mm256_set1_epi32((int32_t)0x80000000u);
    const __m256i limit = _mm256_set1_epi32((int32_t)(span ^ 0x80000000u));
    for (; j + 8 <= size; j += 8) {
        const __m256i key = _mm256_loadu_si256((const __m256i *)(keys + j));
        const __m256i offset = _mm256_xor_si256(_mm256_sub_epi32(key, origin), flip);
        const __m256i excluded = _mm256_cmpgt_epi32(offset, limit);
        const int beyond = _mm256_movemask_ps(_mm256_castsi256_ps(excluded));
        const int mask = (outside ? beyond : ~beyond) & 0xFF;
        /* no branch on an empty mask: which groups hold a key is unpredictable, and a
         * mispredicted branch costs more than the store of nothing */
        const __m256i lanes = _mm256_loadu_si256((const __m256i *)pack_lanes[mask]);
        _mm256_storeu_si256((__m256i *)(into + put), _mm256_permutevar8x32_epi32(key, lanes));
        put += __builtin_popcount((unsigned)mask);
    }
#endif
    for (; j < size; ++j) {
        into[put] = keys[j];
        put += (keys[j] - from <= span) ^ outside;
    }
    return put;
}

/* value j of the stream: |a[j] - b[j]| when b is given, else a[j] */
static inline float stream_value(const void *a, const void *b, int bf16, int64_t j) {
    return b ? fabsf(input_at(a, bf16, j) - input_at(b, bf16, j)) : input_at(a, bf16, j);
}

/* Per-thread histogram scratch, kept between calls: fresh 256 KiB blocks per call would pay
 * page faults on every selection. */
static _Thread_local uint32_t *scratch_histograms;

static uint32_t *thread_histograms(void) {
    if (!scratch_histograms) scratch_histograms = malloc(sizeof(uint32_t) * HALF * (MAX_RANKS > 4 ? MAX_RANKS : 4));
    return scratch_histograms;
}

/* The high 16 bits of every key, saved by pass 1 so that pass 2 tests 2 bytes per value instead
 * of recomputing it. One process-wide buffer, grown on demand (fresh allocations would pay page
 * faults on every call); a concurrent caller that finds it busy allocates its own. */
static uint16_t *shared_highs;
static int64_t shared_capacity;
static int highs_busy;

static uint16_t *acquire_highs(int64_t n, int *owned) {
    if (!__atomic_exchange_n(&highs_busy, 1, __ATOMIC_ACQUIRE)) {
        if (shared_capacity < n) {
            free(shared_highs);
            shared_highs = malloc(sizeof(uint16_t) * n);
            shared_capacity = shared_highs ? n : 0;
        }
        if (shared_highs) {
            *owned = 0;
            return shared_highs;
        }
        __atomic_store_n(&highs_busy, 0, __ATOMIC_RELEASE);
    }
    *owned = 1;
    return malloc(sizeof(uint16_t) * n);
}

static void release_highs(uint16_t *highs, int owned) {
    if (owned)
        free(highs);
    else
        __atomic_store_n(&highs_busy, 0, __ATOMIC_RELEASE);
}

static void histogram_high(const void *a, const void *b, int bf16, int64_t n, uint64_t *counts,
                           uint16_t *highs, int threads) {
    memset(counts, 0, sizeof(uint64_t) * HALF);
#pragma omp parallel num_threads(threads)
    {
        /* Four interleaved copies: neighbouring values often share a bucket, and increments of
         * one counter would otherwise wait on each other. */
        uint32_t *local = thread_histograms();
        memset(local, 0, sizeof(uint32_t) * HALF * 4);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; ++j) {
            const uint16_t high = (uint16_t)(sortable_key(stream_value(a, b, bf16, j)) >> 16);
            highs[j] = high;
            local[(size_t)(j & 3) * HALF + high]++;
        }
#pragma omp critical
        for (int h = 0; h < HALF; ++h)
            counts[h] += (uint64_t)local[h] + local[HALF + h] + local[2 * HALF + h] +
                         local[3 * HALF + h];
    }
}

/* Bucket of 0-based `rank` in `counts`; *below receives the count of smaller buckets. */
static int find_bucket(const uint64_t *counts, int64_t rank, int64_t *below) {
    int64_t seen = 0;
    for (int h = 0; h < HALF; ++h) {
        if (seen + (int64_t)counts[h] > rank) {
            *below = seen;
            return h;
        }
        seen += counts[h];
    }
    *below = seen;
    return HALF - 1;
}

/* Below this many values a quickselect over a copy of the keys beats the radix passes, whose
 * 65536-bucket histograms cost a fixed ~1 MB of memory traffic per call (norm and bias tensors). */
#define SMALL_SELECT 16384

/* Exact values of ascending `ranks` (n_ranks <= MAX_RANKS) among the stream's n values. */
int select_ranks(const void *a, const void *b, int bf16, int64_t n, const int64_t *ranks,
                 int n_ranks, float *values, int threads) {
    if (n_ranks > MAX_RANKS || n <= 0) return -1;
    if (n <= SMALL_SELECT) {
        uint32_t keys[SMALL_SELECT];
        for (int64_t j = 0; j < n; ++j) keys[j] = sortable_key(stream_value(a, b, bf16, j));
        for (int r = 0; r < n_ranks; ++r) values[r] = key_value(nth_key(keys, n, ranks[r]));
        return 0;
    }
    int owned;
    uint16_t *highs = acquire_highs(n, &owned);
    uint64_t *high = malloc(sizeof(uint64_t) * HALF);
    uint64_t *low = calloc((size_t)HALF * n_ranks, sizeof(uint64_t));
    if (!highs || !high || !low) {
        if (highs) release_highs(highs, owned);
        free(high);
        free(low);
        return -2;
    }
    int bucket[MAX_RANKS];
    int64_t below[MAX_RANKS];
    histogram_high(a, b, bf16, n, high, highs, threads);
    for (int r = 0; r < n_ranks; ++r) bucket[r] = find_bucket(high, ranks[r], &below[r]);
#pragma omp parallel num_threads(threads)
    {
        uint32_t *local = thread_histograms();
        memset(local, 0, sizeof(uint32_t) * HALF * n_ranks);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; ++j) {
            for (int r = 0; r < n_ranks; ++r)
                if (highs[j] == bucket[r])
                    local[(size_t)r * HALF + (sortable_key(stream_value(a, b, bf16, j)) & 0xFFFFu)]++;
        }
#pragma omp critical
        for (size_t h = 0; h < (size_t)HALF * n_ranks; ++h) low[h] += local[h];
    }
    for (int r = 0; r < n_ranks; ++r) {
        int64_t unused;
        int low_bucket = find_bucket(low + (size_t)r * HALF, ranks[r] - below[r], &unused);
        values[r] = key_value(((uint32_t)bucket[r] << 16) | (uint32_t)low_bucket);
    }
    release_highs(highs, owned);
    free(high);
    free(low);
    return 0;
}

/* ---- counter-based keep masks (operators/rng.py, bit for bit) ---- */

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* DARE's keep draw of entry `index` of stream `key`: 1 when the hash's top 24 bits, shifted
 * arithmetically as torch's int32 shift, lie below threshold - 2^23 (rng.keep_threshold). */
static inline float kept_draw(uint32_t key, int64_t index, int32_t threshold) {
    const uint32_t x = lowbias32((uint32_t)index * 0x9E3779B1u + key);
    return ((int32_t)x) >> 8 < threshold - (1 << 23) ? 1.0f : 0.0f;
}

/* The L1 norms of model - base before and after DARE's keep draw (sums[0], sums[1]), in float64
 * (mergekit's l1 rescale), with the draw made on the fly: no mask is stored. Sixteen partial sums
 * per thread, so the additions do not wait on each other; the order differs from torch's sum,
 * which moves the float64 ratio by an ulp or so, far below the float32 scale it becomes. */
#define L1_LANES 16
void dare_l1_sums(const void *base, const void *model, int bf16, int64_t numel, int32_t key,
                  int32_t threshold, double *sums, int threads) {
    double before = 0.0, after = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : before, after)
    {
        double whole[L1_LANES] = {0}, kept[L1_LANES] = {0};
#pragma omp for schedule(static)
        for (int64_t block = 0; block < numel; block += BLOCK) {
            const int64_t size = numel - block < BLOCK ? numel - block : BLOCK;
            float magnitude[BLOCK], survivor[BLOCK], base_buffer[BLOCK], model_buffer[BLOCK];
            const float *b = input_block(base, bf16, block, size, base_buffer);
            const float *m = input_block(model, bf16, block, size, model_buffer);
            for (int64_t j = 0; j < size; ++j) {
                magnitude[j] = fabsf(m[j] - b[j]);
                survivor[j] = magnitude[j] * kept_draw((uint32_t)key, block + j, threshold);
            }
            for (int64_t j = 0; j < size; ++j) {
                whole[j % L1_LANES] += magnitude[j];
                kept[j % L1_LANES] += survivor[j];
            }
        }
        for (int lane = 0; lane < L1_LANES; ++lane) {
            before += whole[lane];
            after += kept[lane];
        }
    }
    sums[0] = before;
    sums[1] = after;
}

/* ---- the generalized task-arithmetic merge of one tensor ---- */

typedef struct {
    int n_models;
    int consensus; /* 0 none, 1 sum, 2 count */
    int weight_before_election;
    int normalize;
    float lambda;
    float weight_total; /* divisor without consensus (mergekit: 1 if |sum w| < 1e-8) */
} merge_options;

/* ---- the tie rule: a trim by rank keeps exactly its count, ties in flat index order ----
 *
 * Entries whose score equals a boundary value of a trim (TIES' threshold, breadcrumbs' band
 * edges, PCB's drop threshold) hold consecutive ranks; among them the trim keeps a window
 * [skip, skip + take) in flat index order, as a stable sort would order them. `prefix[b]` counts
 * the entries equal to the value before block b, so each block knows where its ties stand. A NULL
 * prefix means no window: every entry equal to the value is kept. */
static inline float in_window(int64_t skip, int64_t take, int64_t *at) {
    const int64_t position = (*at)++;
    return position >= skip && position - skip < take ? 1.0f : 0.0f;
}

/* A window is a run of tie positions, so almost every block holds only kept ties or only dropped
 * ones: TIES_ALL or TIES_NONE let the block's loop stay vectorized; TIES_SOME (a block holding a
 * window's end, at most two per window) takes the loop that counts positions. */
enum { TIES_ALL = 0, TIES_NONE = 1, TIES_SOME = 2 };

static inline int ties_in_block(const int64_t *prefix, int64_t skip, int64_t take, int64_t b) {
    if (!prefix) return TIES_ALL;
    const int64_t first = prefix[b], end = prefix[b + 1];
    if (first >= skip && end - skip <= take) return TIES_ALL;
    if (end <= skip || first - skip >= take) return TIES_NONE;
    return TIES_SOME;
}

/* draw_key/draw_threshold: model i's DARE keep draw, made on the fly (threshold < 0: none).
 * tie_skip/tie_take/tie_prefix: the windows of model i's band edges, low at 2i, high at 2i + 1
 * (tie_prefix NULL: no windows at all). */
void merge_task_vectors(const void *base, const void *const *models, int bf16, const float *low,
                        const float *high, const int64_t *tie_skip, const int64_t *tie_take,
                        const int64_t *const *tie_prefix, const float *const *masks,
                        const int32_t *draw_key, const int32_t *draw_threshold,
                        const float *scale, const float *weight, const merge_options *opt,
                        int64_t numel, float *out, int threads) {
    const int n = opt->n_models;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < numel; block += BLOCK) {
        float d[MAX_MODELS][BLOCK];
        float votes[BLOCK], mixed[BLOCK], divisor[BLOCK], base_buffer[BLOCK], model_buffer[BLOCK];
        const int64_t size = numel - block < BLOCK ? numel - block : BLOCK;
        const float *b = input_block(base, bf16, block, size, base_buffer);
        for (int i = 0; i < n; ++i) {
            const float *m = input_block(models[i], bf16, block, size, model_buffer);
            float *di = d[i];
            for (int64_t j = 0; j < size; ++j) di[j] = m[j] - b[j];
            const int64_t *low_ties = tie_prefix ? tie_prefix[2 * i] : NULL;
            const int64_t *high_ties = tie_prefix ? tie_prefix[2 * i + 1] : NULL;
            const int at_low_edge = ties_in_block(low_ties, tie_skip ? tie_skip[2 * i] : 0,
                                                  tie_take ? tie_take[2 * i] : 0, block / BLOCK);
            const int at_high_edge = ties_in_block(high_ties,
                                                   tie_skip ? tie_skip[2 * i + 1] : 0,
                                                   tie_take ? tie_take[2 * i + 1] : 0,
                                                   block / BLOCK);
            if (high[i] >= 0 && at_low_edge != TIES_SOME && at_high_edge != TIES_SOME) {
                /* band: low <= |delta| <= high, an edge's ties all kept or all dropped */
                const float lo = low[i], hi = high[i];
                if (at_low_edge == TIES_ALL && at_high_edge == TIES_ALL) {
                    for (int64_t j = 0; j < size; ++j) {
                        float magnitude = fabsf(di[j]);
                        di[j] = di[j] * ((magnitude >= lo && magnitude <= hi) ? 1.0f : 0.0f);
                    }
                } else if (at_low_edge == TIES_ALL) {
                    for (int64_t j = 0; j < size; ++j) {
                        float magnitude = fabsf(di[j]);
                        di[j] = di[j] * ((magnitude >= lo && magnitude < hi) ? 1.0f : 0.0f);
                    }
                } else if (at_high_edge == TIES_ALL) {
                    for (int64_t j = 0; j < size; ++j) {
                        float magnitude = fabsf(di[j]);
                        di[j] = di[j] * ((magnitude > lo && magnitude <= hi) ? 1.0f : 0.0f);
                    }
                } else {
                    for (int64_t j = 0; j < size; ++j) {
                        float magnitude = fabsf(di[j]);
                        di[j] = di[j] * ((magnitude > lo && magnitude < hi) ? 1.0f : 0.0f);
                    }
                }
            } else if (high[i] >= 0) { /* a block holding a window's end: count positions */
                const float lo = low[i], hi = high[i];
                int64_t at_low = low_ties ? low_ties[block / BLOCK] : 0;
                int64_t at_high = high_ties ? high_ties[block / BLOCK] : 0;
                for (int64_t j = 0; j < size; ++j) {
                    float magnitude = fabsf(di[j]), keep;
                    if (magnitude == lo)
                        keep = low_ties ? in_window(tie_skip[2 * i], tie_take[2 * i], &at_low)
                                        : 1.0f;
                    else if (magnitude == hi)
                        keep = high_ties ? in_window(tie_skip[2 * i + 1], tie_take[2 * i + 1],
                                                     &at_high)
                                         : 1.0f;
                    else
                        keep = (magnitude > lo && magnitude < hi) ? 1.0f : 0.0f;
                    di[j] = di[j] * keep;
                }
            }
            if (masks[i]) {
                const float *mask = masks[i] + block;
                for (int64_t j = 0; j < size; ++j) di[j] = di[j] * mask[j];
            }
            if (draw_threshold[i] >= 0) {
                const uint32_t key = (uint32_t)draw_key[i];
                const int32_t threshold = draw_threshold[i];
                for (int64_t j = 0; j < size; ++j)
                    di[j] = di[j] * kept_draw(key, block + j, threshold);
            }
            if (scale[i] != 1.0f) {
                const float s = scale[i];
                for (int64_t j = 0; j < size; ++j) di[j] = di[j] * s;
            }
            if (opt->weight_before_election) {
                const float w = weight[i];
                for (int64_t j = 0; j < size; ++j) di[j] = di[j] * w;
            }
        }
        if (opt->consensus == 0) {
            for (int64_t j = 0; j < size; ++j) mixed[j] = 0.0f;
            for (int i = 0; i < n; ++i) {
                const float w = weight[i];
                if (!opt->weight_before_election)
                    for (int64_t j = 0; j < size; ++j) d[i][j] = d[i][j] * w;
                for (int64_t j = 0; j < size; ++j) mixed[j] = mixed[j] + d[i][j];
            }
            for (int64_t j = 0; j < size; ++j) divisor[j] = opt->weight_total;
        } else {
            for (int64_t j = 0; j < size; ++j) votes[j] = 0.0f;
            for (int i = 0; i < n; ++i) {
                const float *di = d[i];
                if (opt->consensus == 1)
                    for (int64_t j = 0; j < size; ++j) votes[j] = votes[j] + di[j];
                else
                    for (int64_t j = 0; j < size; ++j)
                        votes[j] = votes[j] + (float)((di[j] > 0.0f) - (di[j] < 0.0f));
            }
            for (int64_t j = 0; j < size; ++j) {
                votes[j] = votes[j] >= 0.0f ? 1.0f : -1.0f;
                mixed[j] = 0.0f;
                divisor[j] = 0.0f;
            }
            for (int i = 0; i < n; ++i) {
                float *di = d[i];
                const float w = weight[i];
                for (int64_t j = 0; j < size; ++j) {
                    float agree = (di[j] * votes[j] > 0.0f) ? 1.0f : 0.0f;
                    float value = opt->weight_before_election ? di[j] : di[j] * w;
                    mixed[j] = mixed[j] + value * agree;
                    divisor[j] = divisor[j] + agree * w;
                }
            }
            for (int64_t j = 0; j < size; ++j)
                if (divisor[j] == 0.0f) divisor[j] = 1.0f;
        }
        float *o = out + block;
        for (int64_t j = 0; j < size; ++j) {
            float value = mixed[j];
            if (opt->normalize) value = value / divisor[j];
            if (opt->lambda != 1.0f) value = value * opt->lambda;
            o[j] = b[j] + value;
        }
    }
}

/* ---- exp and tanh from IEEE basic operations (operators/ieee_math.py, step for step) ---- */

/* exp for x in [-87, 88] (no clamp: for callers whose argument provably lies there). */
static inline float exp_ieee_in_range(float x) {
    const float k = nearbyintf(x * 0x1.715476p+0f);
    const float r = (x - k * 0x1.62e4p-1f) - k * 0x1.7f7d1cp-20f;
    const float r2 = r * r, r4 = r2 * r2;
    const float a23 = 0x1p-1f + r * 0x1.555556p-3f, a45 = 0x1.555556p-5f + r * 0x1.111112p-7f;
    const float a67 = 0x1.6c16c2p-10f + r * 0x1.a01a02p-13f;
    const float p = 0x1p+0f + ((r + r2 * a23) + r4 * (a45 + r2 * a67));
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline float exp_ieee(float x) {
    return exp_ieee_in_range(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x));
}

/* tanh below |x| = 0.4: the odd Taylor series. */
static inline float tanh_small_ieee(float x) {
    const float square = x * x;
    float p = 0x1.d6d3d0p-9f;
    p = p * square + -0x1.226e36p-7f;
    p = p * square + 0x1.664f48p-6f;
    p = p * square + -0x1.ba1ba2p-5f;
    p = p * square + 0x1.111112p-3f;
    p = p * square + -0x1.555556p-2f;
    return x + (x * square) * p;
}

static inline float tanh_ieee(float x) {
    const float small = tanh_small_ieee(x);
    const float absolute = x < 0.0f ? -x : x;
    const float magnitude = absolute > 9.0f ? 9.0f : absolute;
    float large = 1.0f - 2.0f / (exp_ieee(magnitude * 2.0f) + 1.0f);
    large = x < 0.0f ? -large : large;
    return absolute < 0.4f ? small : large;
}

/* PCB's clipped task vectors of one block and their sum over models (operators/pcb.py); `b` is
 * the base's block, already read. */
static inline void pcb_clipped_block(const float *b, const void *const *models, int bf16, int n,
                                     int64_t block, int64_t size, const float *low,
                                     const float *high, float tau[][BLOCK], float *total) {
    float model_buffer[BLOCK];
    for (int64_t j = 0; j < size; ++j) total[j] = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float *m = input_block(models[i], bf16, block, size, model_buffer);
        const float lo = low[i], hi = high[i];
        for (int64_t j = 0; j < size; ++j) {
            const float delta = m[j] - b[j];
            const float absolute = fabsf(delta);
            const float raised = absolute < lo ? lo : absolute;
            const float magnitude = raised > hi ? hi : raised;
            tau[i][j] = delta > 0.0f ? magnitude : (delta < 0.0f ? -magnitude : 0.0f);
            total[j] = total[j] + tau[i][j];
        }
    }
}

/* One model's scores in one block: exp(factor (tau^2 - low2)) * tanh(tau * sum_k tau_k).
 * Task vectors are small, so whole blocks take cheaper forms of tanh with the same bits:
 * - |x| < 0.4 everywhere: the series alone (no exp, no division);
 * - |x| < 2^-12 everywhere: the series' correction x^3 p (|p| < 0.34) is below half an ulp of x,
 *   so the series rounds to x + 0 (the + 0 keeps its result for x = -0: +0). */
#define TANH_IS_IDENTITY 0x1p-12f
/* The intra-balancing exponent (tau^2 - low2) * factor lies in [0, N], N <= MAX_MODELS: tau is
 * clipped to [low, high] in magnitude, rounding is monotone, and factor = N / max(high^2 - low2,
 * tiny). So exp's clamp to [-87, 88] never acts and is skipped. */
/* `bound` is at least every |tau_j * total_j| of the row: the tiers are picked from it, and only
 * where it allows the full tanh, from the entries themselves. */
static inline void pcb_score_row(const float *tau, const float *total, int64_t size, float bound,
                                 float l2, float f, float *out) {
    int32_t large = bound >= 0.4f, curved = bound >= TANH_IS_IDENTITY;
    if (curved) { /* integer counts: float max reductions would not vectorize */
        large = curved = 0;
        for (int64_t j = 0; j < size; ++j) {
            const float x = fabsf(tau[j] * total[j]);
            large += x >= 0.4f;
            curved += x >= TANH_IS_IDENTITY;
        }
    }
    if (!curved) {
        for (int64_t j = 0; j < size; ++j)
            out[j] = exp_ieee_in_range((tau[j] * tau[j] - l2) * f) * (tau[j] * total[j] + 0.0f);
    } else if (!large) {
        for (int64_t j = 0; j < size; ++j)
            out[j] = exp_ieee_in_range((tau[j] * tau[j] - l2) * f) *
                     tanh_small_ieee(tau[j] * total[j]);
    } else {
        for (int64_t j = 0; j < size; ++j)
            out[j] = exp_ieee_in_range((tau[j] * tau[j] - l2) * f) * tanh_ieee(tau[j] * total[j]);
    }
}

/* The largest |v_j| of a block, compared as integer bits (a float max would not vectorize). */
static inline float block_abs_max(const float *v, int64_t size) {
    uint32_t most = 0;
    for (int64_t j = 0; j < size; ++j) {
        uint32_t bits;
        memcpy(&bits, v + j, 4);
        bits &= 0x7FFFFFFFu;
        most = bits > most ? bits : most;
    }
    float x;
    memcpy(&x, &most, 4);
    return x;
}

/* Every model's scores of one block into rows[i] (the clipped task vectors stay in tau): PCB's
 * tanh-mode scores, the same steps as operators/pcb.py. |tau_i| <= high_i after the clip, and
 * rounding is monotone, so high_i * max|total| bounds every |tau_i * total| of the row. */
static inline void pcb_score_block(const float *b, const void *const *models, int bf16, int n,
                                   int64_t block, int64_t size, const float *low,
                                   const float *high, const float *low2, const float *factor,
                                   float tau[][BLOCK], float *const *rows) {
    float total[BLOCK];
    pcb_clipped_block(b, models, bf16, n, block, size, low, high, tau, total);
    const float total_max = block_abs_max(total, size);
    for (int i = 0; i < n; ++i)
        pcb_score_row(tau[i], total, size, high[i] * total_max, low2[i], factor[i], rows[i]);
}

void pcb_scores(const void *base, const void *const *models, int bf16, int n, int64_t numel,
                const float *low, const float *high, const float *low2, const float *factor,
                float *const *scores, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < numel; block += BLOCK) {
        float tau[MAX_MODELS][BLOCK], *rows[MAX_MODELS], base_buffer[BLOCK];
        const int64_t size = numel - block < BLOCK ? numel - block : BLOCK;
        const float *b = input_block(base, bf16, block, size, base_buffer);
        for (int i = 0; i < n; ++i) rows[i] = scores[i] + block;
        pcb_score_block(b, models, bf16, n, block, size, low, high, low2, factor, tau, rows);
    }
}

/* ---- exact per-model order statistics of scores computed on the fly, bracketed by a sample ----
 *
 * Two kinds of scores: |model_i - base| (TIES' trim threshold) and PCB's balance scores. Both are
 * computed block by block and never stored: a sample brackets each model's wanted rank, one pass
 * counts the scores below each bracket and collects those inside it, and a quickselect among the
 * collected gives the exact value. */

enum { SCORE_MAGNITUDE = 0, SCORE_PCB = 1 };

struct scoring {
    int kind, n;
    const float *low, *high, *low2, *factor; /* PCB: clip bounds and score constants per model */
};

/* scores[i][0..size) of every model for the entries [block, block + size) */
static inline void score_block(const struct scoring *sc, const void *base,
                               const void *const *models, int bf16, int64_t block, int64_t size,
                               float scores[][BLOCK]) {
    float base_buffer[BLOCK], model_buffer[BLOCK];
    const float *b = input_block(base, bf16, block, size, base_buffer);
    if (sc->kind == SCORE_PCB) {
        float tau[MAX_MODELS][BLOCK], *rows[MAX_MODELS];
        for (int i = 0; i < sc->n; ++i) rows[i] = scores[i];
        pcb_score_block(b, models, bf16, sc->n, block, size, sc->low, sc->high, sc->low2,
                        sc->factor, tau, rows);
        return;
    }
    for (int i = 0; i < sc->n; ++i) {
        const float *m = input_block(models[i], bf16, block, size, model_buffer);
        for (int64_t j = 0; j < size; ++j) scores[i][j] = fabsf(m[j] - b[j]);
    }
}

/* The sample: m entries, taken as m / SAMPLE_RUN evenly spaced runs of SAMPLE_RUN consecutive
 * entries (whole cache lines, where single strided entries would each cost a miss). Per model,
 * lo[i] and hi[i] are the sample scores at ranks low_rank[i] and high_rank[i] (-1 and m: no
 * bound, -inf and +inf). Returns the largest number of sample scores inside a bracket, or -1 for
 * bad arguments or no memory. */
#define SAMPLE_RUN 16
static int64_t sample_brackets(const struct scoring *sc, const void *base,
                               const void *const *models, int bf16, int64_t numel, int64_t m,
                               const int64_t *low_rank, const int64_t *high_rank, float *lo,
                               float *hi, int threads) {
    const int n = sc->n;
    if (n > MAX_MODELS || m <= 0 || m % SAMPLE_RUN || numel < m) return -1;
    float *gathered = malloc(sizeof(float) * m * (n + 1));
    uint32_t *keys = malloc(sizeof(uint32_t) * m * n);
    int64_t widest = -1;
    if (gathered && keys) {
        const int64_t runs = m / SAMPLE_RUN, spacing = numel / runs;
        const void *sampled[MAX_MODELS];
        for (int i = 0; i < n; ++i) sampled[i] = gathered + (i + 1) * m;
        /* in parallel: the gather is a cache miss per run and input; gathered as float32 */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < runs; ++r) {
            load_block(base, bf16, r * spacing, SAMPLE_RUN, gathered + r * SAMPLE_RUN);
            for (int i = 0; i < n; ++i)
                load_block(models[i], bf16, r * spacing, SAMPLE_RUN,
                           gathered + (i + 1) * m + r * SAMPLE_RUN);
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t block = 0; block < m; block += BLOCK) {
            float scores[MAX_MODELS][BLOCK];
            const int64_t size = m - block < BLOCK ? m - block : BLOCK;
            score_block(sc, gathered, sampled, 0, block, size, scores);
            for (int i = 0; i < n; ++i)
                for (int64_t j = 0; j < size; ++j)
                    keys[i * m + block + j] = sortable_key(scores[i][j]);
        }
        widest = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic) reduction(max : widest)
        for (int i = 0; i < n; ++i) {
            uint32_t *row = keys + i * m;
            lo[i] = low_rank[i] < 0 ? -INFINITY : key_value(nth_key(row, m, low_rank[i]));
            /* quickselect leaves the keys after rank low_rank no smaller: search only those */
            const int64_t after = high_rank[i] > low_rank[i] ? low_rank[i] + 1 : 0;
            hi[i] = high_rank[i] >= m ? INFINITY
                                      : key_value(nth_key(row + after, m - after,
                                                          high_rank[i] - after));
            const uint32_t from = sortable_key(lo[i]), span = sortable_key(hi[i]) - from;
            int64_t inside = 0;
            for (int64_t j = 0; j < m; ++j) inside += row[j] - from <= span;
            widest = inside > widest ? inside : widest;
        }
    }
    free(gathered);
    free(keys);
    return widest;
}

/* Every model's score at ascending rank `ranks[i]`, and its largest score, in one pass: scores
 * below each bracket [lo_i, hi_i] are counted, those inside collected (at most `capacity` per
 * thread and model) and counted in FINE_BUCKETS equal slices of the bracket's key range. The
 * counts name the slice that holds the rank; only its keys go to the final quickselect, so
 * the threads do the selection's bulk in parallel with nothing copied. Returns 1 if a bracket
 * missed its rank or a buffer filled: the caller then selects another way. */
#define FINE_BUCKETS 2048
static int bracket_select(const struct scoring *sc, const void *base, const void *const *models,
                          int bf16, int64_t numel, const int64_t *ranks, const float *lo,
                          const float *hi,
                          int64_t capacity, float *thresholds, float *maxima, int threads) {
    const int n = sc->n;
    if (n > MAX_MODELS || numel <= 0 || capacity <= 0 || capacity > UINT32_MAX) return -1;
    uint32_t lo_key[MAX_MODELS], width[MAX_MODELS], top_key[MAX_MODELS];
    int shift[MAX_MODELS];
    int64_t below[MAX_MODELS] = {0}, slice[MAX_MODELS], slice_rank[MAX_MODELS];
    int64_t found_n[MAX_MODELS] = {0};
    uint32_t *found[MAX_MODELS] = {0};
    int64_t *slices = calloc((size_t)n * FINE_BUCKETS, sizeof(int64_t));
    int failed = slices == NULL;
    for (int i = 0; i < n; ++i) {
        lo_key[i] = sortable_key(lo[i]);
        width[i] = sortable_key(hi[i]) - lo_key[i];
        top_key[i] = 0; /* the smallest key: largest scores compare as keys */
        for (shift[i] = 0; width[i] >> shift[i] >= FINE_BUCKETS; ++shift[i]) {}
    }
    if (!failed) {
#pragma omp parallel num_threads(threads)
        {
            uint32_t *local[MAX_MODELS] = {0}, top[MAX_MODELS];
            int64_t count[MAX_MODELS] = {0}, under[MAX_MODELS] = {0};
            uint32_t *counts = calloc((size_t)n * FINE_BUCKETS, sizeof(uint32_t));
            int full = counts == NULL;
            for (int i = 0; i < n; ++i) {
                top[i] = 0;
                local[i] = malloc(sizeof(uint32_t) * capacity);
                if (!local[i]) full = 1;
            }
#pragma omp for schedule(static)
            for (int64_t block = 0; block < numel; block += BLOCK) {
                if (full) continue;
                float scores[MAX_MODELS][BLOCK];
                const int64_t size = numel - block < BLOCK ? numel - block : BLOCK;
                score_block(sc, base, models, bf16, block, size, scores);
                for (int i = 0; i < n; ++i) {
                    /* the first loop vectorizes (max, count below, how many inside); the
                     * collection only runs when the block has entries inside the bracket */
                    uint32_t keys[BLOCK], best = top[i];
                    int32_t less = 0, inside = 0;
                    const uint32_t from = lo_key[i], span = width[i];
                    for (int64_t j = 0; j < size; ++j) { /* integer ops only: vectorizes */
                        keys[j] = sortable_key(scores[i][j]);
                        best = keys[j] > best ? keys[j] : best;
                        less += keys[j] < from;
                        inside += keys[j] - from <= span; /* lo <= key <= hi, unsigned */
                    }
                    top[i] = best;
                    under[i] += less;
                    if (!inside) continue;
                    if (count[i] + inside + COLLECT_SLACK > capacity) {
                        full = 1;
                        continue;
                    }
                    uint32_t *added = local[i] + count[i], *tally = counts + i * FINE_BUCKETS;
                    const int64_t m = collect_keys(keys, size, from, span, 0, added);
                    for (int64_t c = 0; c < m; ++c) ++tally[(added[c] - from) >> shift[i]];
                    count[i] += m;
                }
            }
#pragma omp critical
            {
                failed |= full;
                for (int i = 0; i < n && !full; ++i) {
                    below[i] += under[i];
                    top_key[i] = top[i] > top_key[i] ? top[i] : top_key[i];
                    for (int c = 0; c < FINE_BUCKETS; ++c)
                        slices[i * FINE_BUCKETS + c] += counts[i * FINE_BUCKETS + c];
                }
            }
#pragma omp barrier
#pragma omp single
            for (int i = 0; i < n && !failed; ++i) { /* the slice holding each wanted rank */
                int64_t target = ranks[i] - below[i], c = 0;
                const int64_t *tally = slices + i * FINE_BUCKETS;
                while (c < FINE_BUCKETS && target >= tally[c]) target -= tally[c++];
                if (ranks[i] < below[i] || c == FINE_BUCKETS) {
                    failed = 1;
                    break;
                }
                slice[i] = c;
                slice_rank[i] = target;
                found[i] = malloc(sizeof(uint32_t) * tally[c]);
                if (!found[i]) failed = 1;
            }
            /* (the single's barrier) each thread keeps its keys of the slice, in place */
            for (int i = 0; i < n && !failed; ++i) {
                const uint32_t from = lo_key[i] + ((uint32_t)slice[i] << shift[i]);
                const uint32_t span = ((uint32_t)1 << shift[i]) - 1;
                const int64_t kept = collect_keys(local[i], count[i], from, span, 0, local[i]);
#pragma omp critical
                {
                    memcpy(found[i] + found_n[i], local[i], sizeof(uint32_t) * kept);
                    found_n[i] += kept;
                }
            }
            for (int i = 0; i < n; ++i) free(local[i]);
            free(counts);
        }
    }
    for (int i = 0; i < n; ++i) {
        if (!failed) {
            thresholds[i] = key_value(nth_key(found[i], found_n[i], slice_rank[i]));
            maxima[i] = key_value(top_key[i]);
        }
        free(found[i]);
    }
    free(slices);
    return failed ? 1 : 0;
}

/* The two passes for both kinds: `kind` is SCORE_MAGNITUDE or SCORE_PCB (then low, high, low2 and
 * factor are PCB's per-model clip bounds and score constants; NULL for magnitudes). */
int64_t scores_sample_brackets(int kind, const void *base, const void *const *models, int bf16,
                               int n, int64_t numel, const float *low, const float *high,
                               const float *low2, const float *factor, int64_t m,
                               const int64_t *low_rank, const int64_t *high_rank, float *lo,
                               float *hi, int threads) {
    const struct scoring sc = {kind, n, low, high, low2, factor};
    return sample_brackets(&sc, base, models, bf16, numel, m, low_rank, high_rank, lo, hi,
                           threads);
}

int scores_select(int kind, const void *base, const void *const *models, int bf16, int n,
                  int64_t numel,
                  const float *low, const float *high, const float *low2, const float *factor,
                  const int64_t *ranks, const float *lo, const float *hi, int64_t capacity,
                  float *thresholds, float *maxima, int threads) {
    const struct scoring sc = {kind, n, low, high, low2, factor};
    return bracket_select(&sc, base, models, bf16, numel, ranks, lo, hi, capacity, thresholds,
                          maxima, threads);
}

/* Every model's score at ascending rank `ranks[i]`, and its largest score, exactly and with no
 * sample: a radix select over the scores' keys in two passes (scores computed on the fly in
 * both). Pass 1 counts the high 16 bits of every key, which names each rank's bucket; pass 2
 * counts the low 16 bits of the keys in that bucket. Memory: 2 x 65536 counters per model and
 * thread, whatever the tensor. One pass more than `scores_select`, but no bracket to miss: it is
 * the fallback for scores whose ties defeat the sample (bf16 task vectors take few values). */
int scores_radix_select(int kind, const void *base, const void *const *models, int bf16, int n,
                        int64_t numel, const float *low, const float *high, const float *low2,
                        const float *factor, const int64_t *ranks, float *thresholds,
                        float *maxima, int threads) {
    if (n > MAX_MODELS || numel <= 0) return -1;
    const struct scoring sc = {kind, n, low, high, low2, factor};
    uint64_t *counts = calloc((size_t)n * HALF, sizeof(uint64_t));
    int bucket[MAX_MODELS];
    int64_t below[MAX_MODELS];
    uint32_t top[MAX_MODELS] = {0};
    int failed = counts == NULL;
    for (int pass = 0; pass < 2 && !failed; ++pass) {
#pragma omp parallel num_threads(threads)
        {
            uint32_t *local = calloc((size_t)n * HALF, sizeof(uint32_t));
            uint32_t best[MAX_MODELS] = {0};
            if (local) {
#pragma omp for schedule(static)
                for (int64_t block = 0; block < numel; block += BLOCK) {
                    float scores[MAX_MODELS][BLOCK];
                    const int64_t size = numel - block < BLOCK ? numel - block : BLOCK;
                    score_block(&sc, base, models, bf16, block, size, scores);
                    for (int i = 0; i < n; ++i) {
                        uint32_t *tally = local + (size_t)i * HALF;
                        for (int64_t j = 0; j < size; ++j) {
                            const uint32_t key = sortable_key(scores[i][j]);
                            if (pass == 0) {
                                ++tally[key >> 16];
                                best[i] = key > best[i] ? key : best[i];
                            } else if ((int)(key >> 16) == bucket[i]) {
                                ++tally[key & 0xFFFFu];
                            }
                        }
                    }
                }
            }
#pragma omp critical
            {
                failed |= local == NULL;
                for (size_t h = 0; local && h < (size_t)n * HALF; ++h) counts[h] += local[h];
                for (int i = 0; i < n; ++i) top[i] = best[i] > top[i] ? best[i] : top[i];
            }
            free(local);
        }
        for (int i = 0; i < n && !failed; ++i) {
            uint64_t *tally = counts + (size_t)i * HALF;
            if (pass == 0) {
                bucket[i] = find_bucket(tally, ranks[i], &below[i]);
            } else {
                int64_t unused;
                const int low_bucket = find_bucket(tally, ranks[i] - below[i], &unused);
                thresholds[i] = key_value(((uint32_t)bucket[i] << 16) | (uint32_t)low_bucket);
                maxima[i] = key_value(top[i]);
            }
        }
        memset(counts, 0, sizeof(uint64_t) * (size_t)n * HALF);
    }
    free(counts);
    return failed ? -2 : 0;
}

/* The [count_low - 1]-th smallest and the [count_high]-th largest |model_i - base| of every
 * model, in one pass over all of them: bounded heaps per thread keep the count_low smallest
 * and count_high largest keys (PCB's clip quantiles are extreme: the heaps stay small).
 * Returns 2 if some |model_i - base| is NaN or Inf, which every NaN/Inf input entry makes it:
 * the pass doubles as the input check, and the caller names the culprit. */
#define NONFINITE_KEY 0xFF800000u /* sortable_key(+Inf); +NaN keys lie above it */
static void heap_sift_down(uint32_t *heap, int64_t size, int64_t at, int max_heap) {
    for (;;) {
        int64_t child = 2 * at + 1;
        if (child >= size) return;
        if (child + 1 < size && (max_heap ? heap[child + 1] > heap[child]
                                          : heap[child + 1] < heap[child])) ++child;
        if (max_heap ? heap[child] <= heap[at] : heap[child] >= heap[at]) return;
        const uint32_t t = heap[at];
        heap[at] = heap[child];
        heap[child] = t;
        at = child;
    }
}

static void heap_offer(uint32_t *heap, int64_t *size, int64_t cap, uint32_t key, int max_heap) {
    if (*size < cap) { /* sift up */
        int64_t at = (*size)++;
        heap[at] = key;
        while (at > 0) {
            const int64_t parent = (at - 1) / 2;
            if (max_heap ? heap[parent] >= heap[at] : heap[parent] <= heap[at]) break;
            const uint32_t t = heap[at];
            heap[at] = heap[parent];
            heap[parent] = t;
            at = parent;
        }
    } else if (max_heap ? key < heap[0] : key > heap[0]) {
        heap[0] = key;
        heap_sift_down(heap, *size, 0, max_heap);
    }
}

int magnitude_extremes(const void *base, const void *const *models, int bf16, int n, int64_t numel,
                       int64_t count_low, int64_t count_high, float *low, float *high,
                       int threads) {
    if (n > MAX_MODELS || numel <= 0 || count_low < 1 || count_high < 1 ||
        count_low > numel || count_high > numel)
        return -1;
    uint32_t *small_all = malloc(sizeof(uint32_t) * count_low * threads * n);
    uint32_t *large_all = malloc(sizeof(uint32_t) * count_high * threads * n);
    int64_t *small_n = calloc((size_t)threads * n, sizeof(int64_t));
    int64_t *large_n = calloc((size_t)threads * n, sizeof(int64_t));
    int status = 0, nonfinite = 0;
    if (!small_all || !large_all || !small_n || !large_n) status = -2;
    if (!status) {
#pragma omp parallel num_threads(threads) reduction(| : nonfinite)
        {
            const int t = omp_get_thread_num();
            uint32_t worst = 0; /* the largest key this thread saw */
#pragma omp for schedule(static)
            for (int64_t block = 0; block < numel; block += BLOCK) {
                const int64_t size = numel - block < BLOCK ? numel - block : BLOCK;
                float base_buffer[BLOCK], model_buffer[BLOCK];
                const float *b = input_block(base, bf16, block, size, base_buffer);
                uint32_t keys[BLOCK], candidates[BLOCK + COLLECT_SLACK];
                for (int i = 0; i < n; ++i) {
                    const int64_t slot = (int64_t)t * n + i;
                    uint32_t *smalls = small_all + slot * count_low;
                    uint32_t *larges = large_all + slot * count_high;
                    int64_t *ns = small_n + slot, *nl = large_n + slot;
                    const float *m = input_block(models[i], bf16, block, size, model_buffer);
                    uint32_t least = UINT32_MAX, most = 0;
                    for (int64_t j = 0; j < size; ++j) { /* integer min/max: vectorizes */
                        keys[j] = sortable_key(fabsf(m[j] - b[j]));
                        least = keys[j] < least ? keys[j] : least;
                        most = keys[j] > most ? keys[j] : most;
                    }
                    worst = most > worst ? most : worst;
                    const uint32_t *offered = keys;
                    int64_t offers = size;
                    if (*ns == count_low && *nl == count_high && smalls[0] <= larges[0]) {
                        /* full, disjoint heaps: most blocks hold no candidate, others a few */
                        if (least >= smalls[0] && most <= larges[0]) continue;
                        offers = collect_keys(keys, size, smalls[0], larges[0] - smalls[0], 1,
                                              candidates);
                        offered = candidates;
                    }
                    for (int64_t j = 0; j < offers; ++j) {
                        const uint32_t key = offered[j];
                        if (*ns < count_low || key < smalls[0])
                            heap_offer(smalls, ns, count_low, key, 1);
                        if (*nl < count_high || key > larges[0])
                            heap_offer(larges, nl, count_high, key, 0);
                    }
                }
            }
            nonfinite |= worst >= NONFINITE_KEY;
        }
        if (nonfinite) status = 2;
        for (int i = 0; i < n && !status; ++i) { /* pool the threads' heaps, select exactly */
            int64_t pooled_small = 0, pooled_large = 0;
            uint32_t *smalls = malloc(sizeof(uint32_t) * count_low * threads);
            uint32_t *larges = malloc(sizeof(uint32_t) * count_high * threads);
            if (!smalls || !larges) status = -2;
            for (int t = 0; t < threads && !status; ++t) {
                const int64_t slot = (int64_t)t * n + i;
                memcpy(smalls + pooled_small, small_all + slot * count_low,
                       sizeof(uint32_t) * small_n[slot]);
                pooled_small += small_n[slot];
                memcpy(larges + pooled_large, large_all + slot * count_high,
                       sizeof(uint32_t) * large_n[slot]);
                pooled_large += large_n[slot];
            }
            if (!status) {
                low[i] = key_value(nth_key(smalls, pooled_small, count_low - 1));
                high[i] = key_value(nth_key(larges, pooled_large, pooled_large - count_high));
            }
            free(smalls);
            free(larges);
        }
    }
    free(small_all);
    free(large_all);
    free(small_n);
    free(large_n);
    return status;
}

/* ---- PCB's final mix (operators/pcb.py) ---- */

/* The balanced weighted mean of the clipped task vectors, then base + lambda * merged. Blocks with
 * element-innermost loops, so the compiler vectorizes them. The kept mean for entries whose
 * balance is 0 in every task only runs in the rare blocks that have such entries. */
static inline void pcb_mix_block(const float *b, float tau[][BLOCK], int n, int64_t size,
                                 const float *const *scores, const float *threshold,
                                 const float *inverse_span, const float *weight, float lambda,
                                 const int64_t *tie_skip, const int64_t *tie_take,
                                 const int64_t *const *tie_prefix, int64_t block_index,
                                 float *o) {
    float numerator[BLOCK], denominator[BLOCK];
    for (int64_t j = 0; j < size; ++j) numerator[j] = denominator[j] = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float *score = scores[i], *t_i = tau[i];
        const float t = threshold[i], s = inverse_span[i], w = weight[i];
        for (int64_t j = 0; j < size; ++j) {
            /* ternaries, not fminf/fmaxf: they vectorize (inputs are never NaN) */
            const float balanced = ((score[j] > t ? score[j] : t) - t) * s;
            denominator[j] = denominator[j] + balanced;
            numerator[j] = numerator[j] + (balanced * t_i[j]) * w;
        }
    }
    int32_t unbalanced = 0;
    for (int64_t j = 0; j < size; ++j) unbalanced += denominator[j] <= 0.0f;
    if (!unbalanced) {
        for (int64_t j = 0; j < size; ++j) {
            const float weight_sum = denominator[j] > 1e-12f ? denominator[j] : 1e-12f;
            o[j] = b[j] + (numerator[j] / weight_sum) * lambda;
        }
        return;
    }
    float kept_sum[BLOCK], kept_count[BLOCK];
    for (int64_t j = 0; j < size; ++j) kept_sum[j] = kept_count[j] = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float *score = scores[i], *t_i = tau[i];
        const float t = threshold[i], w = weight[i];
        const int64_t *ties = tie_prefix ? tie_prefix[i] : NULL;
        const int state = ties_in_block(ties, ties ? tie_skip[i] : 0, ties ? tie_take[i] : 0,
                                        block_index);
        if (state == TIES_SOME) {
            int64_t at = ties[block_index];
            for (int64_t j = 0; j < size; ++j) {
                float kept = score[j] > t ? 1.0f : 0.0f;
                if (score[j] == t) kept = in_window(tie_skip[i], tie_take[i], &at);
                kept_count[j] = kept_count[j] + kept;
                kept_sum[j] = kept_sum[j] + (kept * t_i[j]) * w;
            }
            continue;
        }
        for (int64_t j = 0; j < size; ++j) {
            const float kept = (state == TIES_ALL ? score[j] >= t : score[j] > t) ? 1.0f : 0.0f;
            kept_count[j] = kept_count[j] + kept;
            kept_sum[j] = kept_sum[j] + (kept * t_i[j]) * w;
        }
    }
    for (int64_t j = 0; j < size; ++j) {
        const float weight_sum = denominator[j] > 1e-12f ? denominator[j] : 1e-12f;
        const float count = kept_count[j] > 1.0f ? kept_count[j] : 1.0f;
        const float merged = denominator[j] > 0.0f ? numerator[j] / weight_sum
                                                   : kept_sum[j] / count;
        o[j] = b[j] + merged * lambda;
    }
}

/* Scores stored by the caller (the fallback path). */
void pcb_mix(const void *base, const void *const *models, int bf16, int n, int64_t numel,
             const float *low, const float *high, const float *const *scores,
             const float *threshold, const float *inverse_span, const float *weight, float lambda,
             const int64_t *tie_skip, const int64_t *tie_take, const int64_t *const *tie_prefix,
             float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < numel; block += BLOCK) {
        float tau[MAX_MODELS][BLOCK], total[BLOCK], base_buffer[BLOCK];
        const float *rows[MAX_MODELS];
        for (int i = 0; i < n; ++i) rows[i] = scores[i] + block;
        const int64_t size = numel - block < BLOCK ? numel - block : BLOCK;
        const float *b = input_block(base, bf16, block, size, base_buffer);
        pcb_clipped_block(b, models, bf16, n, block, size, low, high, tau, total);
        pcb_mix_block(b, tau, n, size, rows, threshold, inverse_span, weight, lambda, tie_skip,
                      tie_take, tie_prefix, block / BLOCK, out + block);
    }
}

/* Scores recomputed block by block (the same function as `pcb_scores`, so the same bits):
 * nothing tensor-sized is stored between the passes. */
void pcb_mix_recomputed(const void *base, const void *const *models, int bf16, int n,
                        int64_t numel,
                        const float *low, const float *high, const float *low2,
                        const float *factor, const float *threshold, const float *inverse_span,
                        const float *weight, float lambda, const int64_t *tie_skip,
                        const int64_t *tie_take, const int64_t *const *tie_prefix, float *out,
                        int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < numel; block += BLOCK) {
        float tau[MAX_MODELS][BLOCK], score[MAX_MODELS][BLOCK], *rows[MAX_MODELS];
        float base_buffer[BLOCK];
        const int64_t size = numel - block < BLOCK ? numel - block : BLOCK;
        const float *b = input_block(base, bf16, block, size, base_buffer);
        for (int i = 0; i < n; ++i) rows[i] = score[i];
        pcb_score_block(b, models, bf16, n, block, size, low, high, low2, factor, tau, rows);
        pcb_mix_block(b, tau, n, size, (const float *const *)rows, threshold, inverse_span,
                      weight, lambda, tie_skip, tie_take, tie_prefix, block / BLOCK,
                      out + block);
    }
}

/* ---- counting the ties of a trim's boundary values ----
 *
 * For each model, the scores below value[i] (below[i]) and equal to it (equal[i]); with
 * prefix[i] non-NULL, prefix[i][b] = the entries equal to value[i] before block b (nblocks + 1
 * entries): what the windows of the tie rule need. Scores as `score_block` computes them, so the
 * same bits as the selection and the mix. */
int count_ties(int kind, const void *base, const void *const *models, int bf16, int n,
               int64_t numel, const float *low, const float *high, const float *low2,
               const float *factor, const float *value, int64_t *const *prefix, int64_t *below,
               int64_t *equal, int threads) {
    if (n > MAX_MODELS || numel <= 0) return -1;
    const struct scoring sc = {kind, n, low, high, low2, factor};
    const int64_t blocks = (numel + BLOCK - 1) / BLOCK;
    int64_t under[MAX_MODELS] = {0}, same[MAX_MODELS] = {0};
#pragma omp parallel for num_threads(threads) schedule(static) \
    reduction(+ : under[:MAX_MODELS], same[:MAX_MODELS])
    for (int64_t b = 0; b < blocks; ++b) {
        float scores[MAX_MODELS][BLOCK];
        const int64_t block = b * BLOCK, size = numel - block < BLOCK ? numel - block : BLOCK;
        score_block(&sc, base, models, bf16, block, size, scores);
        for (int i = 0; i < n; ++i) {
            const float v = value[i];
            int64_t lt = 0, eq = 0;
            for (int64_t j = 0; j < size; ++j) {
                lt += scores[i][j] < v;
                eq += scores[i][j] == v;
            }
            under[i] += lt;
            same[i] += eq;
            if (prefix[i]) prefix[i][b + 1] = eq;
        }
    }
    for (int i = 0; i < n; ++i) {
        below[i] = under[i];
        equal[i] = same[i];
        if (!prefix[i]) continue;
        prefix[i][0] = 0;
        for (int64_t b = 1; b <= blocks; ++b) prefix[i][b] += prefix[i][b - 1];
    }
    return 0;
}
