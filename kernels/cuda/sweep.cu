/* Fused kernels for the hot blocks of a Gibbs sweep (kernels/gibbs.py, kernels/arrival.py).
 *
 * One source, two compilers:
 *   - CUDA (NVRTC, through cupy.RawModule in kernels/fused.py): one thread per
 *     row, a grid-stride loop;
 *   - plain C (cc -O2 -shared -fPIC -x c, tests/unit/kernels/test_fused.py): a loop over
 *     the rows, so the device code's arithmetic is tested on any machine.
 * Each kernel's body is a function of the row index (ls_*_row); the random
 * numbers are inputs (drawn by kernels.rng.Rng before the launch, at the
 * same draw sites as the array code), so a kernel is a deterministic function
 * of its arrays and the fused path consumes exactly the array path's draws.
 *
 * The arithmetic follows the NumPy code operation for operation (same order
 * of additions, numpy's pairwise order for a sum over the last axis), so the
 * only differences are the last bits of log/exp/log1p/expm1 (numpy's SIMD
 * versions, libm and CUDA's each round differently). Compile with FMA
 * contraction off (--fmad=false; -ffp-contract=off) to keep that so.
 *
 * Portable subset: C99 and CUDA C++ alike -- no templates, no references, no
 * headers under NVRTC (its math builtins), double and long long only.
 */
#if defined(__CUDACC__)
#define LS_DEV static __device__ __forceinline__
#define LS_RESTRICT __restrict__
#else
#include <math.h>
#define LS_DEV static inline
#define LS_RESTRICT restrict
#endif

typedef long long ls_int;

#ifndef LS_OMEGA_G
#define LS_OMEGA_G 16 /* kernels.grids.OMEGA_GRID; kernels/fused.py passes -DLS_OMEGA_G */
#endif
#define LS_NO_DATA_V 1e300 /* kernels.gibbs._NO_DATA_V */
#define LS_LG_FLOOR (-1e4) /* the proposal's floor in kernels.gibbs._draw_omega2 */

/* ---------------------------------------------------------------- helpers */

/* kernels.arrival.loglinear_masses for one cell */
LS_DEV double ls_loglinear_mass(double l0, double l1)
{
    double gap = fabs(l1 - l0);
    double psi = gap > 0.0 ? -expm1(-gap) / gap : 1.0;
    return exp(l0 > l1 ? l0 : l1) * psi;
}

/* kernels.arrival.loglinear_position for one cell */
LS_DEV double ls_loglinear_position(double delta, double f)
{
    double a = fabs(delta);
    double s = a > 0.0 ? -log1p(f * expm1(-a)) / a : f;
    return delta > 0.0 ? 1.0 - s : s;
}

/* numpy's sum over a contiguous last axis of n <= 128 terms, fed one term at a
 * time: 0 + (the terms in order) for n < 8, else eight running sums combined
 * as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)) and the tail added in order
 * (numpy's pairwise_sum; above 128 terms numpy splits the range in halves,
 * which this does not follow: equal to rounding there). */
typedef struct {
    double r[8];
    double res;
    ls_int n, main, i;
} ls_npsum;

LS_DEV void ls_npsum_init(ls_npsum *a, ls_int n)
{
    a->n = n;
    a->main = n < 8 ? 0 : n - n % 8;
    a->i = 0;
    a->res = 0.0;
}

LS_DEV void ls_npsum_add(ls_npsum *a, double t)
{
    ls_int i = a->i++;
    if (a->n < 8) {
        a->res += t;
    } else if (i < 8) {
        a->r[i] = t;
    } else if (i < a->main) {
        a->r[i % 8] += t;
    } else {
        if (i == a->main)
            a->res = ((a->r[0] + a->r[1]) + (a->r[2] + a->r[3])) +
                     ((a->r[4] + a->r[5]) + (a->r[6] + a->r[7]));
        a->res += t;
    }
}

LS_DEV double ls_npsum_done(ls_npsum *a)
{
    if (a->n >= 8 && a->main == a->n)
        a->res = ((a->r[0] + a->r[1]) + (a->r[2] + a->r[3])) +
                 ((a->r[4] + a->r[5]) + (a->r[6] + a->r[7]));
    return 0.0 + a->res;
}

/* ------------------------------------------------ block 2: ω_k | μ0, σ², θ, β
 *
 * kernels.gibbs._draw_omega2 for one row (p, c, k), row = (p*C + c)*K + k:
 * the proposal table over LS_OMEGA_G log-ω points (S strata summed in order),
 * its log-linear cell masses and their cumulative sums, the exact inverse-CDF
 * draw (cell, then the point inside it), the target at the proposed and the
 * current value, and the independence-MH accept.
 *
 *   resid, v   [P, C, K, S]   ȳ_ks − μ_0s − θ_k − β_k z_s;  σ²_ks/n_ks (1 if no data)
 *   has        [P, K, S]      stratum observed (bytes 0/1)
 *   omega2     [P, C, K]      current ω²
 *   u_x, u_acc [P, C, K]      the two uniforms (proposal, accept)
 *   grid_om2, grid_prior [G, P]  ω² and log prior (with Jacobian) at the grid points
 *   u0, log_A  [P]            first grid point of log ω; log of the half-t scale
 *   out        [P, C, K]      new ω²
 */
LS_DEV void ls_omega_row(ls_int row, const double *LS_RESTRICT resid, const double *LS_RESTRICT v,
                         const unsigned char *LS_RESTRICT has, const double *LS_RESTRICT omega2,
                         const double *LS_RESTRICT u_x, const double *LS_RESTRICT u_acc,
                         const double *LS_RESTRICT grid_om2, const double *LS_RESTRICT grid_prior,
                         const double *LS_RESTRICT u0_p, const double *LS_RESTRICT log_A_p,
                         double nu, double step, ls_int P, ls_int C, ls_int K, ls_int S,
                         double *LS_RESTRICT out)
{
    const int G = LS_OMEGA_G;
    ls_int k = row % K;
    ls_int p = row / (C * K);
    const double *r = resid + row * S;
    const double *vv = v + row * S;
    const unsigned char *h = has + (p * K + k) * S;
    double lg[LS_OMEGA_G];
    double cum[LS_OMEGA_G - 1];
    double u0 = u0_p[p], log_A = log_A_p[p];
    int g, j;
    ls_int s;

    /* the table: lg[g] = prior[g] − ½ Σ_s (log(v+ω²) + r²/(v+ω²)), strata in order */
    double mx = 0.0;
    for (g = 0; g < G; g++) {
        double om2 = grid_om2[(ls_int)g * P + p];
        double acc = 0.0;
        for (s = 0; s < S; s++) {
            double vt = h[s] ? vv[s] : LS_NO_DATA_V;
            double tot = vt + om2;
            double t = log(tot) + (r[s] * r[s]) / tot;
            acc = s == 0 ? t : acc + t;
        }
        lg[g] = grid_prior[(ls_int)g * P + p] - 0.5 * acc;
        if (g == 0 || lg[g] > mx)
            mx = lg[g];
    }
    for (g = 0; g < G; g++) {
        double l = lg[g] - mx;
        lg[g] = l > LS_LG_FLOOR ? l : LS_LG_FLOOR;
    }
    for (g = 0; g < G - 1; g++) {
        double m = ls_loglinear_mass(lg[g], lg[g + 1]);
        cum[g] = g == 0 ? m : cum[g - 1] + m;
    }

    /* the proposal: cell j with cum[j-1] <= x < cum[j], then the point inside it */
    double x = u_x[row] * cum[G - 2];
    j = 0;
    for (g = 0; g < G - 2; g++)
        j += cum[g] <= x;
    double c1 = cum[j];
    double c0 = j > 0 ? cum[j - 1] : 0.0;
    double frac = c1 > c0 ? (x - c0) / (c1 - c0) : 0.5;
    double t = ls_loglinear_position(lg[j + 1] - lg[j], frac);
    double u_new = u0 + step * ((double)j + t);
    double u_cur = 0.5 * log(omega2[row]);

    /* log q: the table interpolated at u (valid inside the grid only) */
    double lq[2];
    int valid[2];
    double uu[2];
    uu[0] = u_new;
    uu[1] = u_cur;
    for (g = 0; g < 2; g++) {
        double pos = (uu[g] - u0) / step;
        double kf = floor(pos);
        kf = kf < 0.0 ? 0.0 : (kf > (double)(G - 2) ? (double)(G - 2) : kf);
        int kk = (int)kf;
        double l0 = lg[kk];
        lq[g] = l0 + (lg[kk + 1] - l0) * (pos - kf);
        valid[g] = pos >= 0.0 && pos <= (double)(G - 1);
    }

    /* the target (τ integrated out) at u_new and u_cur */
    double lp[2];
    for (g = 0; g < 2; g++) {
        double om2 = exp(2.0 * uu[g]);
        ls_npsum a;
        ls_npsum_init(&a, S);
        for (s = 0; s < S; s++) {
            double tot = om2 + vv[s];
            ls_npsum_add(&a, h[s] ? log(tot) + (r[s] * r[s]) / tot : 0.0);
        }
        double prior = -0.5 * (nu + 1.0) * log1p(exp(2.0 * (uu[g] - log_A)) / nu) + uu[g];
        lp[g] = -0.5 * ls_npsum_done(&a) + prior;
    }
    /* a current value outside the grid (only from a foreign start) is left
       (log q_cur = −inf); a proposal that rounds past the grid's end has
       log q_new = −inf, so log_ratio = +inf: accepted */
    int accept;
    if (!valid[1])
        accept = 1;
    else if (!valid[0])
        accept = 1;
    else
        accept = log(u_acc[row]) < ((lp[0] - lp[1]) + lq[1]) - lq[0];
    out[row] = accept ? exp(2.0 * u_new) : omega2[row];
}

/* ------------------------------------------------ block 5: logit p_s | arrivals
 *
 * kernels.arrival.draw_logit_p for one element (p, c, s), i = (p*C + c)*S + s:
 * the cell by binary search in row r = p*S + s of the CDF shifted by 2r (the
 * same comparisons as numpy's searchsorted over ArrivalGrid.flat, whose
 * entries are cdf + 2r rounded), then the inverse CDF of the log-linear
 * density inside the cell.
 *
 *   u               [P, C, S]   uniforms
 *   cdf, x, logw    [P, S, G]   the grid (ArrivalGrid)
 *   out             [P, C, S]   logit p
 */
LS_DEV void ls_arrival_elem(ls_int i, const double *LS_RESTRICT u, const double *LS_RESTRICT cdf,
                            const double *LS_RESTRICT xg, const double *LS_RESTRICT logw,
                            ls_int C, ls_int S, ls_int G, double *LS_RESTRICT out)
{
    ls_int s = i % S;
    ls_int p = i / (C * S);
    ls_int r = p * S + s;
    const double *cr = cdf + r * G;
    double off = 2.0 * (double)r;
    double ui = u[i];
    double key = ui + off;
    ls_int lo = 0, hi = G; /* first index with cdf + off > key (side="right") */
    while (lo < hi) {
        ls_int mid = (lo + hi) / 2;
        if (cr[mid] + off > key)
            hi = mid;
        else
            lo = mid + 1;
    }
    ls_int j = lo < 1 ? 1 : (lo > G - 1 ? G - 1 : lo);
    double c0 = cr[j - 1], c1 = cr[j];
    double x0 = xg[r * G + j - 1], x1 = xg[r * G + j];
    double frac = c1 > c0 ? (ui - c0) / (c1 - c0) : 0.5;
    double t = ls_loglinear_position(logw[r * G + j] - logw[r * G + j - 1], frac);
    out[i] = x0 + t * (x1 - x0);
}

/* ---------------------------------------------------------------- entry points */
#if defined(__CUDACC__)
#define LS_GRID_STRIDE(i, n) \
    for (ls_int i = (ls_int)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (ls_int)blockDim.x * gridDim.x)

extern "C" __global__ void ls_omega_step(
    const double *resid, const double *v, const unsigned char *has, const double *omega2,
    const double *u_x, const double *u_acc, const double *grid_om2, const double *grid_prior,
    const double *u0, const double *log_A, double nu, double step, ls_int P, ls_int C, ls_int K,
    ls_int S, double *out)
{
    LS_GRID_STRIDE(row, P * C * K)
    ls_omega_row(row, resid, v, has, omega2, u_x, u_acc, grid_om2, grid_prior, u0, log_A, nu,
                 step, P, C, K, S, out);
}

extern "C" __global__ void ls_arrival_draw(const double *u, const double *cdf, const double *x,
                                           const double *logw, ls_int P, ls_int C, ls_int S,
                                           ls_int G, double *out)
{
    LS_GRID_STRIDE(i, P * C * S)
    ls_arrival_elem(i, u, cdf, x, logw, C, S, G, out);
}
#else
void ls_omega_step(const double *resid, const double *v, const unsigned char *has,
                   const double *omega2, const double *u_x, const double *u_acc,
                   const double *grid_om2, const double *grid_prior, const double *u0,
                   const double *log_A, double nu, double step, ls_int P, ls_int C, ls_int K,
                   ls_int S, double *out)
{
    for (ls_int row = 0; row < P * C * K; row++)
        ls_omega_row(row, resid, v, has, omega2, u_x, u_acc, grid_om2, grid_prior, u0, log_A,
                     nu, step, P, C, K, S, out);
}

void ls_arrival_draw(const double *u, const double *cdf, const double *x, const double *logw,
                     ls_int P, ls_int C, ls_int S, ls_int G, double *out)
{
    for (ls_int i = 0; i < P * C * S; i++)
        ls_arrival_elem(i, u, cdf, x, logw, C, S, G, out);
}
#endif
