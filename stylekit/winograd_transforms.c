/* Winograd F(4x4, 3x3) input and output transforms over channels-last fp32 tensors, for
 * stylekit/winograd.py (built by stylekit/native_transforms.py). One pass over the pixels each,
 * zero padding read in place, every inner loop running over contiguous channels so the compiler
 * vectorises it: torch's elementwise form of the same transforms made a dozen passes per layer.
 * Built with -fopenmp, the tiles are shared among `threads` threads of the OpenMP runtime torch has
 * already loaded (the same libgomp, so the same worker threads: no second pool competes with
 * torch's); built without it, the pragmas are ignored and one thread does all.
 */
#include <stdint.h>
#include <stdlib.h>

#define CHANNELS _Pragma("GCC ivdep") for (int64_t i = 0; i < c; i++)

/* Bᵀ along one axis: six rows d[0..5] of c channels into o[0..5], o[k] = o + k * step. */
static inline void input_rows(const float *d[6], float *o, int64_t step, int64_t c) {
    const float *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3], *d4 = d[4], *d5 = d[5];
    CHANNELS {
        float a = d4[i] - 4 * d2[i], b = d3[i] - 4 * d1[i], e = d4[i] - d2[i], f = 2 * (d3[i] - d1[i]);
        o[i] = 4 * d0[i] - 5 * d2[i] + d4[i];
        o[step + i] = a + b;
        o[2 * step + i] = a - b;
        o[3 * step + i] = e + f;
        o[4 * step + i] = e - f;
        o[5 * step + i] = 4 * d1[i] - 5 * d3[i] + d5[i];
    }
}

/* A tile's work: tile t of a job, with the running thread's own scratch memory. */
typedef void (*tile_work)(const void *job, int64_t t, float *scratch);

/* work(job, t, scratch) for every tile t < count, shared among `threads` threads (one without
 * OpenMP), each with `floats` floats of scratch; 1 where a thread had no memory for it. */
static int each_tile(tile_work work, const void *job, int64_t count, int64_t floats, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = malloc((size_t)floats * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < count; t++) /* every thread meets the loop, even one without scratch */
            if (scratch) work(job, t, scratch);
        free(scratch);
    }
    return failed;
}

/* Where a transform reads and writes: tile t is tile (t / tw % rows + row0, t % tw) of image
 * t / (rows · tw); plane is the stride between the 36 transformed values of a tile. */
struct job {
    const float *from, *bias, *zero;
    float *to;
    int64_t h, w, c, tw, rows, row0, plane;
};

/* One tile of the input transform: its 6×6 pixels (zero outside the image), Bᵀ d B. */
static void input_tile(const void *job, int64_t t, float *m) {
    const struct job *j = job;
    int64_t c = j->c, b = t / (j->rows * j->tw), ti = j->row0 + t / j->tw % j->rows, tj = t % j->tw;
    for (int l = 0; l < 6; l++) { /* column l of the 6×6 input tile, rows transformed */
        const float *d[6];
        int64_t q = 4 * tj - 1 + l;
        for (int k = 0; k < 6; k++) {
            int64_t r = 4 * ti - 1 + k;
            d[k] = r >= 0 && r < j->h && q >= 0 && q < j->w ? j->from + ((b * j->h + r) * j->w + q) * c
                                                           : j->zero;
        }
        input_rows(d, m + l * c, 6 * c, c);
    }
    for (int k = 0; k < 6; k++) { /* row k of m, columns transformed: tiles (k, 0..5) */
        const float *d[6];
        for (int l = 0; l < 6; l++) d[l] = m + (k * 6 + l) * c;
        input_rows(d, j->to + t * c + 6 * k * j->plane, j->plane, c);
    }
}

/* Tiles of tile rows [row0, row1) of x (n×h×w×c) into tiles (36×n×(row1-row0)×tw×c), Bᵀ d B. */
int winograd_input(const float *x, float *tiles, int64_t n, int64_t h, int64_t w, int64_t c,
                   int64_t tw, int64_t row0, int64_t row1, int threads) {
    int64_t rows = row1 - row0;
    float *zero = calloc((size_t)c, sizeof(float));
    if (!zero) return 1;
    struct job job = {x, NULL, zero, tiles, h, w, c, tw, rows, row0, n * rows * tw * c};
    int failed = each_tile(input_tile, &job, n * rows * tw, 36 * c, threads);
    free(zero);
    return failed;
}

/* Aᵀ along one axis: six rows y[0..5] into four, each plus bias where given; only the first
 * `count` of them are written (the image's edge cuts the last tile). */
static inline void output_rows(const float *y[6], float *o, int64_t step, int count,
                               const float *bias, int64_t c) {
    const float *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3], *y4 = y[4], *y5 = y[5];
    if (count == 4 && !bias) {
        CHANNELS {
            float s = y1[i] + y2[i], d = y1[i] - y2[i], t = y3[i] + y4[i], e = y3[i] - y4[i];
            o[i] = y0[i] + s + t;
            o[step + i] = d + 2 * e;
            o[2 * step + i] = s + 4 * t;
            o[3 * step + i] = d + 8 * e + y5[i];
        }
        return;
    }
    CHANNELS {
        float s = y1[i] + y2[i], d = y1[i] - y2[i], t = y3[i] + y4[i], e = y3[i] - y4[i];
        float v[4] = {y0[i] + s + t, d + 2 * e, s + 4 * t, d + 8 * e + y5[i]}, add = bias ? bias[i] : 0;
        for (int a = 0; a < count; a++) o[a * step + i] = v[a] + add;
    }
}

/* One tile of the output transform: its 6×6 products into up to 4×4 pixels, Aᵀ m A + bias. */
static void output_tile(const void *job, int64_t t, float *m) {
    const struct job *j = job;
    int64_t c = j->c, h = j->h, w = j->w;
    int64_t b = t / (j->rows * j->tw), ti = j->row0 + t / j->tw % j->rows, tj = t % j->tw;
    const float *in = j->from + t * c;
    for (int l = 0; l < 6; l++) { /* column l: rows 0..5 into m (0..3, l) */
        const float *d[6];
        for (int k = 0; k < 6; k++) d[k] = in + (6 * k + l) * j->plane;
        output_rows(d, m + l * c, 6 * c, 4, NULL, c);
    }
    int64_t height = h - 4 * ti < 4 ? h - 4 * ti : 4, width = w - 4 * tj < 4 ? w - 4 * tj : 4;
    for (int a = 0; a < height; a++) { /* output row a: columns transformed */
        const float *d[6];
        for (int l = 0; l < 6; l++) d[l] = m + (a * 6 + l) * c;
        output_rows(d, j->to + ((b * h + 4 * ti + a) * w + 4 * tj) * c, c, (int)width, j->bias, c);
    }
}

/* Products of tile rows [row0, row1) (36×n×(row1-row0)×tw×c) into out (n×h×w×c), Aᵀ m A + bias. */
int winograd_output(const float *y, float *out, const float *bias, int64_t n, int64_t h, int64_t w,
                    int64_t c, int64_t tw, int64_t row0, int64_t row1, int threads) {
    int64_t rows = row1 - row0;
    struct job job = {y, bias, NULL, out, h, w, c, tw, rows, row0, n * rows * tw * c};
    return each_tile(output_tile, &job, n * rows * tw, 24 * c, threads);
}
