// The per-step loops of the Mogrifier LSTM fast path (fast.py), in C++: CPU, float32, x86-64 with
// AVX2 and PyTorch's MKL (cpu.py checks all that before building this).
//
// The Python autograd.Function (fast._MogrifierLSTMFunction) allocates every buffer, computes the
// weight gradients as big matmuls after the backward loop, and chooses between these loops and its own
// Python loops: the buffers and their meaning are exactly those of the Python loops, which stay the readable
// version of what happens here. What is different here, and why it is faster:
//
// * No Python and no tensor objects per step: the loops work on raw row pointers (a step's [B, k] rows of a
//   [steps, B, k] buffer), so a step costs its arithmetic, not ~40 dispatcher calls and views.
// * The weights are packed once per call into MKL's internal GEMM format (cblas_sgemm_pack, with the
//   transpose and the round's 1/2 folded in) and every per-step product is cblas_sgemm_compute against
//   them. An ordinary sgemm re-packs its weights at every call: for the [32, 512] x [512, 1024] gate
//   product that made it ~1.5x slower in a micro-benchmark while developing. On CPUs other than Intel's, where
//   MKL takes a generic path, and that have AVX-512, the weights are packed into panels for a plain AVX-512
//   kernel instead (see panel_kernel).
// * The elementwise work of a step is fused into a few passes (bias + activation + update), with a fast
//   vectorised tanh (see tanh8); sigmoid(z) = (1 + tanh(z/2)) / 2.
// * The batch rows are independent recurrences: with several threads each thread runs the whole time loop
//   on its own chunk of rows (see over_batch_chunks).
//
// All [B, k] rows passed in have a contiguous last dimension; their rows may be strided (e.g. the x and h
// halves of the gate-matmul input xh [B, m + n]).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

// MKL's packed GEMM, exported by libtorch_cpu (x86-64 builds link MKL statically; LP64, so MKL_INT is int).
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest);
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

bool given(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// A [steps, B, k] (or [B, k]) float buffer as rows: row b of step t at p + t * step + b * row.
struct Rows {
  float* p = nullptr;
  int64_t step = 0, row = 0;
  Rows() = default;
  Rows(const at::Tensor& t, int64_t b0) {
    if (!given(t)) return;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.stride(-1) == 1, "mogrifier_cpu: expected float rows");
    row = t.stride(-2);
    step = t.dim() == 3 ? t.stride(0) : 0;
    p = t.data_ptr<float>() + b0 * row;
  }
  float* at(int64_t t) const { return p + t * step; }
  float* at(int64_t t, int64_t b) const { return p + t * step + b * row; }
};

// ---- the per-step products: C[m rows, n] = A[m rows, k] @ op(B) (+ C), op(B) packed once per call ----------
//
// MKL runs its fastest GEMM kernels only on Intel CPUs: it checks the CPU's vendor and elsewhere takes a
// generic path. On an AMD EPYC (Zen 4, AVX-512) its packed GEMM reached ~85 GFLOP/s on one core for these
// [16-32, 256-1024] x [256-1024, 256-1024] products, the plain AVX-512 kernel below ~115 (about the core's
// peak). So the products use that kernel on other CPUs with AVX-512, and MKL's packed GEMM on Intel's (and on
// CPUs without AVX-512), as before.

bool mkl_by_default() {
  __builtin_cpu_init();  // (this runs while the library loads, before GCC's own CPU detection may have)
  return __builtin_cpu_is("intel") || !__builtin_cpu_supports("avx512f");
}
bool products_use_mkl = mkl_by_default();  // the tests may switch it (set_products)

// Columns per panel of the packed op(B), and rows of A per kernel call (16 accumulator registers).
constexpr int64_t kPanel = 32, kKernelRows = 8;

// c[R rows, 32] = a[R rows, k] @ panel[k, 32] (+ c where accumulate); only the columns set in `columns` (a mask
// of 32 bits) are stored, so that the last panel may be partly padding.
template <int R>
__attribute__((target("avx512f"))) void panel_kernel(int64_t k, const float* a, int64_t lda, const float* panel,
                                                     bool accumulate, float* c, int64_t ldc, uint32_t columns) {
  __m512 lo[R], hi[R];
  for (int i = 0; i < R; ++i) lo[i] = _mm512_setzero_ps(), hi[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; ++j, panel += kPanel) {
    const __m512 b_lo = _mm512_load_ps(panel), b_hi = _mm512_load_ps(panel + 16);
    for (int i = 0; i < R; ++i) {
      const __m512 a_ij = _mm512_set1_ps(a[i * lda + j]);
      lo[i] = _mm512_fmadd_ps(a_ij, b_lo, lo[i]);
      hi[i] = _mm512_fmadd_ps(a_ij, b_hi, hi[i]);
    }
  }
  const __mmask16 lo_columns = columns & 0xffff, hi_columns = columns >> 16;
  for (int i = 0; i < R; ++i) {
    float* row = c + i * ldc;
    if (accumulate) {
      lo[i] = _mm512_add_ps(lo[i], _mm512_maskz_loadu_ps(lo_columns, row));
      hi[i] = _mm512_add_ps(hi[i], _mm512_maskz_loadu_ps(hi_columns, row + 16));
    }
    _mm512_mask_storeu_ps(row, lo_columns, lo[i]);
    _mm512_mask_storeu_ps(row + 16, hi_columns, hi[i]);
  }
}

using PanelKernel = void (*)(int64_t, const float*, int64_t, const float*, bool, float*, int64_t, uint32_t);
constexpr PanelKernel kPanelKernels[kKernelRows] = {panel_kernel<1>, panel_kernel<2>, panel_kernel<3>,
                                                    panel_kernel<4>, panel_kernel<5>, panel_kernel<6>,
                                                    panel_kernel<7>, panel_kernel<8>};

// op(B) of the products, packed once: B is [n, k] (trans) or [k, n] rows, scaled by alpha.
struct Packed {
  at::Tensor storage;  // MKL's packed format, or panels [ceil(n / 32), k, 32] of op(B), zero beyond column n
  int n = 0, k = 0;
  bool mkl = true;
  Packed() = default;
  Packed(const at::Tensor& b, bool trans, int m, float alpha) : mkl(products_use_mkl) {
    TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kFloat && b.stride(1) == 1, "mogrifier_cpu: bad weight");
    n = trans ? b.size(0) : b.size(1);
    k = trans ? b.size(1) : b.size(0);
    if (!mkl) {
      const at::Tensor op_b = (trans ? b.t() : b) * alpha;
      storage = at::zeros({(n + kPanel - 1) / kPanel, k, kPanel}, b.options());
      for (int64_t p = 0; p * kPanel < n; ++p)
        storage[p].narrow(1, 0, width(p)).copy_(op_b.narrow(1, p * kPanel, width(p)));
      return;
    }
    const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, m, n, k);
    storage = at::empty({static_cast<int64_t>(bytes / sizeof(float) + 16)}, b.options());
    cblas_sgemm_pack(kRowMajor, kBMatrix, trans ? kTrans : kNoTrans, m, n, k, alpha, b.data_ptr<float>(),
                     b.stride(0), storage.data_ptr<float>());
  }
  int64_t width(int64_t p) const { return std::min(kPanel, n - p * kPanel); }  // columns of panel p
  // c[m rows, n] = a[m rows, k] @ op(B) + beta * c   (lda, ldc: row strides; beta is 0 or 1)
  void product(int64_t m, const float* a, int64_t lda, float beta, float* c, int64_t ldc) const {
    if (mkl) {
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, a, lda, storage.data_ptr<float>(), n, beta, c,
                          ldc);
      return;
    }
    // Panel by panel (a panel stays in L2 while all rows pass); the panels are split between the threads only
    // where this runs outside over_batch_chunks (one chunk: fewer than 16 rows), as MKL's products are.
    const float* panels = storage.data_ptr<float>();
    at::parallel_for(0, (n + kPanel - 1) / kPanel, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const uint32_t columns = width(p) == kPanel ? ~0u : (1u << width(p)) - 1;
        for (int64_t i = 0; i < m; i += kKernelRows)
          kPanelKernels[std::min(kKernelRows, m - i) - 1](k, a + i * lda, lda, panels + p * k * kPanel,
                                                          beta != 0.0f, c + i * ldc + p * kPanel, ldc, columns);
      }
    });
  }
};

// ---- elementwise passes over one row of k values ([0, k8) with AVX2, the rest scalar) -------------------

// tanh as a rational function of z (the minimax approximation Eigen uses for float, a few ulp): ~4x faster
// than SLEEF's 1-ulp tanh, which made half of a step's time at n=256.
inline __m256 tanh8(__m256 z) {
  const __m256 bound = _mm256_set1_ps(7.90531110763549805f);  // tanh is 1 to float precision beyond
  const __m256 x = _mm256_max_ps(_mm256_min_ps(z, bound), _mm256_sub_ps(_mm256_setzero_ps(), bound));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-2.76076847742355e-16f);
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(2.00018790482477e-13f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-8.60467152213735e-11f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(5.12229709037114e-08f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(1.48572235717979e-05f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(6.37261928875436e-04f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(4.89352455891786e-03f));
  p = _mm256_mul_ps(x, p);
  __m256 q = _mm256_set1_ps(1.19825839466702e-06f);
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(1.18534705686654e-04f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(2.26843463243900e-03f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(4.89352518554385e-03f));
  const __m256 r = _mm256_div_ps(p, q);
  // below |z| = 0.0004, tanh(z) = z to float precision; and NaN stays NaN (a diverged run must show)
  const __m256 tiny = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), z), _mm256_set1_ps(0.0004f), _CMP_LT_OQ);
  const __m256 nan = _mm256_cmp_ps(z, z, _CMP_UNORD_Q);
  return _mm256_blendv_ps(r, z, _mm256_or_ps(tiny, nan));
}
inline __m256 sigmoid8(__m256 z) {  // (1 + tanh(z / 2)) / 2
  const __m256 half = _mm256_set1_ps(0.5f);
  return _mm256_fmadd_ps(half, tanh8(_mm256_mul_ps(half, z)), half);
}
inline float sigmoid1(float z) { return 0.5f + 0.5f * std::tanh(0.5f * z); }
inline __m256 ld(const float* p) { return _mm256_loadu_ps(p); }
inline void st(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// A round: u = tanh((z + b) / 2) (z holds s @ M^T, becomes u); after = before + before * u.
void round_forward(float* z, const float* b, const float* before, float* after, int64_t k) {
  const __m256 half = _mm256_set1_ps(0.5f);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 u = tanh8(_mm256_mul_ps(half, _mm256_add_ps(ld(z + j), ld(b + j))));
    st(z + j, u);
    st(after + j, _mm256_fmadd_ps(ld(before + j), u, ld(before + j)));
  }
  for (; j < k; ++j) {
    const float u = std::tanh(0.5f * (z[j] + b[j]));
    z[j] = u;
    after[j] = before[j] + before[j] * u;
  }
}

// The LSTM cell: with z = [x | h] @ W^T (4n, in g) and the bias, i, f, o = sigmoid, u = tanh of their
// quarters; c = f c_prev + i u; h = o tanh(c). g and tc then hold what the backward needs (fast.py
// computes the same after its Python loop): g = [u i(1-i), c_prev f(1-f), i(1-u^2), tanh(c) o(1-o)],
// tc = o (1 - tanh(c)^2) = d c / d h, and forget = f. Without a backward (forget null) they are left as is.
void cell_forward(float* g, const float* bias, const float* c_prev, float* c, float* tc, float* forget, float* h,
                  int64_t n) {
  float *gi = g, *gf = g + n, *gg = g + 2 * n, *go = g + 3 * n;
  const float *bi = bias, *bf = bias + n, *bg = bias + 2 * n, *bo = bias + 3 * n;
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 i = sigmoid8(_mm256_add_ps(ld(gi + j), ld(bi + j)));
    const __m256 f = sigmoid8(_mm256_add_ps(ld(gf + j), ld(bf + j)));
    const __m256 u = tanh8(_mm256_add_ps(ld(gg + j), ld(bg + j)));
    const __m256 o = sigmoid8(_mm256_add_ps(ld(go + j), ld(bo + j)));
    const __m256 cp = ld(c_prev + j);
    const __m256 cc = _mm256_fmadd_ps(f, cp, _mm256_mul_ps(i, u));
    const __m256 t = tanh8(cc);
    st(c + j, cc), st(h + j, _mm256_mul_ps(o, t));
    if (!forget) continue;
    st(gi + j, _mm256_mul_ps(_mm256_mul_ps(u, i), _mm256_sub_ps(one, i)));
    st(gf + j, _mm256_mul_ps(_mm256_mul_ps(cp, f), _mm256_sub_ps(one, f)));
    st(gg + j, _mm256_mul_ps(i, _mm256_fnmadd_ps(u, u, one)));
    st(go + j, _mm256_mul_ps(_mm256_mul_ps(t, o), _mm256_sub_ps(one, o)));
    st(tc + j, _mm256_mul_ps(o, _mm256_fnmadd_ps(t, t, one)));
    st(forget + j, f);
  }
  for (; j < n; ++j) {
    const float i = sigmoid1(gi[j] + bi[j]), f = sigmoid1(gf[j] + bf[j]);
    const float u = std::tanh(gg[j] + bg[j]), o = sigmoid1(go[j] + bo[j]);
    c[j] = f * c_prev[j] + i * u;
    const float t = std::tanh(c[j]);
    h[j] = o * t;
    if (!forget) continue;
    gi[j] = u * i * (1 - i), gf[j] = c_prev[j] * f * (1 - f), gg[j] = i * (1 - u * u), go[j] = t * o * (1 - o);
    tc[j] = o * (1 - t * t);
    forget[j] = f;
  }
}

// The gate backward of one step. factors holds [g i(1-i), c_prev f(1-f), i(1-g^2), tanh(c) o(1-o)]
// (see fast.py): d_go = dh F_o; dc += dh dc_dh; d_g{i,f,g} = dc F_{i,f,g}; then dc *= forget.
void gate_backward(float* dg, float* dc, const float* dh, const float* dc_dh, const float* f, const float* fg,
                   int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float h = dh[j], c = dc[j] + h * dc_dh[j];
    dg[3 * n + j] = h * f[3 * n + j];
    dg[j] = c * f[j];
    dg[n + j] = c * f[n + j];
    dg[2 * n + j] = c * f[2 * n + j];
    dc[j] = c * fg[j];
  }
}

// A round's backward: e = d_after * after * (1 - u)  (d z' of z' = z/2); d_before = d_after (1 + u).
// d holds d_after on entry and d_before on exit.
void round_backward(float* e, float* d, const float* after, const float* u, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    const float s = d[j] * after[j];
    e[j] = s - s * u[j];
    d[j] = d[j] + d[j] * u[j];
  }
}

// ---- the loops over time, on rows [b0, b0 + nb) of the batch -------------------------------------------

struct Round {  // one round's weights, packed, and its per-step buffers
  bool odd = false;        // odd rounds update x from h, even rounds h from x
  Packed matrix, right;    // forward: M^T (or L^T and R^T); backward: M / 2 (or L / 2 and R)
  const float* bias = nullptr;
  at::Tensor tanh, after, low, e, d_low;  // [steps, B, k] buffers (low, d_low: low rank only)
};

std::vector<Round> make_rounds(const std::vector<bool>& odd, const std::vector<at::Tensor>& mats,
                               const std::vector<at::Tensor>& rights, const std::vector<at::Tensor>& biases,
                               bool forward, int m) {
  std::vector<Round> rounds(odd.size());
  for (size_t i = 0; i < odd.size(); ++i) {
    Round& rd = rounds[i];
    rd.odd = odd[i];
    // forward: z = s @ M^T (full) or (s @ R^T) @ L^T; backward: d s += e @ (M / 2) or (e @ (L / 2)) @ R
    rd.matrix = Packed(mats[i].contiguous(), forward, m, forward ? 1.0f : 0.5f);
    if (given(rights[i])) rd.right = Packed(rights[i].contiguous(), forward, m, 1.0f);
    if (forward) {
      TORCH_CHECK(biases[i].is_contiguous() && biases[i].scalar_type() == at::kFloat, "mogrifier_cpu: bad bias");
      rd.bias = biases[i].data_ptr<float>();
    }
  }
  return rounds;
}

// The rows of the batch are independent recurrences. With several threads the batch is split into one chunk
// of rows per thread and each thread runs the whole time loop on its chunk, its products single-threaded:
// a step is a chain of small products and elementwise passes that stall on memory and on each other, and
// two such chains side by side (B=16 each) run almost twice as fast as one chain (B=32) whose every product
// MKL splits over both threads. With one chunk (one thread, or fewer than 2 * kMinRowsPerChunk rows) the
// loop runs on the calling thread and MKL may use all threads in each product.
constexpr int64_t kMinRowsPerChunk = 8;

int64_t chunk_count(int64_t B) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kMinRowsPerChunk));
}

template <typename F>
void over_batch_chunks(int64_t B, int64_t chunks, const F& f) {
  if (chunks == 1) {
    f(0, B);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(B * c / chunks, B * (c + 1) / chunks - B * c / chunks);
  });
}

void forward_loop(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c_all, const at::Tensor& out,
                  const at::Tensor& xh, const at::Tensor& gates, const at::Tensor& tanh_c, const at::Tensor& forget,
                  const at::Tensor& w, const at::Tensor& bias, const at::Tensor& mask, const at::Tensor& h_masked,
                  const std::vector<bool>& odd, const std::vector<at::Tensor>& mats,
                  const std::vector<at::Tensor>& rights, const std::vector<at::Tensor>& biases,
                  const std::vector<at::Tensor>& tanhs, const std::vector<at::Tensor>& afters,
                  const std::vector<at::Tensor>& lows, bool keep, bool copy_x, bool copy_h) {
  const int64_t T = x.size(0), B = x.size(1), m = x.size(2), n = out.size(2);
  const int64_t chunks = chunk_count(B), rows_max = (B + chunks - 1) / chunks;
  const Packed gate(w.contiguous(), true, rows_max, 1.0f);  // z = [x | h] @ W^T
  std::vector<Round> rounds = make_rounds(odd, mats, rights, biases, true, rows_max);
  for (size_t i = 0; i < rounds.size(); ++i)
    rounds[i].tanh = tanhs[i], rounds[i].after = afters[i], rounds[i].low = lows[i];
  const at::Tensor h0c = h0.contiguous(), maskc = given(mask) ? mask.contiguous() : mask;
  const at::Tensor biasc = bias.contiguous();

  over_batch_chunks(B, chunks, [&](int64_t b0, int64_t nb) {
    const Rows X(x, b0), H0(h0c, b0), C(c_all, b0), OUT(out, b0), XH(xh, b0), G(gates, b0), TC(tanh_c, b0);
    const Rows MASK(maskc, b0), HM(h_masked, b0), FORGET(forget, b0);
    std::vector<Rows> U, AFTER, LOW;
    for (const Round& rd : rounds)
      U.emplace_back(rd.tanh, b0), AFTER.emplace_back(rd.after, b0), LOW.emplace_back(rd.low, b0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = keep ? t : 0;
      // the current x and h versions: [nb rows] with their row strides
      const float* x_cur = X.at(t);
      int64_t x_row = X.row;
      const float* h_cur = t == 0 ? H0.at(0) : OUT.at(t - 1);
      int64_t h_row = t == 0 ? H0.row : OUT.row;
      float* xh_s = XH.at(s);
      if (MASK.p) {
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t j = 0; j < n; ++j) HM.at(s, b)[j] = h_cur[b * h_row + j] * MASK.at(0, b)[j];
        h_cur = HM.at(s), h_row = HM.row;
      } else if (copy_h) {
        for (int64_t b = 0; b < nb; ++b) std::copy_n(h_cur + b * h_row, n, xh_s + b * XH.row + m);
      }
      if (copy_x)
        for (int64_t b = 0; b < nb; ++b) std::copy_n(x_cur + b * x_row, m, xh_s + b * XH.row);
      for (size_t i = 0; i < rounds.size(); ++i) {
        const Round& rd = rounds[i];
        const float* src = rd.odd ? h_cur : x_cur;
        const int64_t src_row = rd.odd ? h_row : x_row;
        const float* tgt = rd.odd ? x_cur : h_cur;
        const int64_t tgt_row = rd.odd ? x_row : h_row;
        float* u = U[i].at(s);
        if (rd.right.n) {  // low rank: z = (s @ R^T) @ L^T
          rd.right.product(nb, src, src_row, 0.0f, LOW[i].at(s), LOW[i].row);
          rd.matrix.product(nb, LOW[i].at(s), LOW[i].row, 0.0f, u, U[i].row);
        } else {
          rd.matrix.product(nb, src, src_row, 0.0f, u, U[i].row);
        }
        float* after = AFTER[i].at(s);
        for (int64_t b = 0; b < nb; ++b)
          round_forward(u + b * U[i].row, rd.bias, tgt + b * tgt_row, after + b * AFTER[i].row, rd.matrix.n);
        (rd.odd ? x_cur : h_cur) = after;
        (rd.odd ? x_row : h_row) = AFTER[i].row;
      }
      float* g = G.at(s);
      gate.product(nb, xh_s, XH.row, 0.0f, g, G.row);
      for (int64_t b = 0; b < nb; ++b)
        cell_forward(g + b * G.row, biasc.data_ptr<float>(), C.at(t, b), C.at(t + 1, b), TC.at(s, b),
                     FORGET.p ? FORGET.at(t, b) : nullptr, OUT.at(t, b), n);
    }
  });
}

void backward_loop(const at::Tensor& d_h, const at::Tensor& d_c, const at::Tensor& dc_dh, const at::Tensor& forget,
                   const at::Tensor& factors, const at::Tensor& d_gates, const at::Tensor& d_xh, const at::Tensor& w,
                   const at::Tensor& mask, const at::Tensor& d_h0, const std::vector<bool>& odd,
                   const std::vector<at::Tensor>& mats, const std::vector<at::Tensor>& rights,
                   const std::vector<at::Tensor>& tanhs, const std::vector<at::Tensor>& es,
                   const std::vector<at::Tensor>& afters, const std::vector<at::Tensor>& d_lows) {
  // The rounds arrive in backward order (last round first).
  TORCH_CHECK(d_c.is_contiguous(), "mogrifier_cpu: d_c must be contiguous");
  const int64_t T = d_h.size(0), B = d_h.size(1), n = d_h.size(2), m = d_xh.size(2) - n;
  const int64_t chunks = chunk_count(B), rows_max = (B + chunks - 1) / chunks;
  const Packed gate(w.contiguous(), false, rows_max, 1.0f);  // d [x | h] = d z @ W
  std::vector<Round> rounds = make_rounds(odd, mats, rights, {}, false, rows_max);
  for (size_t i = 0; i < rounds.size(); ++i)
    rounds[i].tanh = tanhs[i], rounds[i].e = es[i], rounds[i].after = afters[i], rounds[i].d_low = d_lows[i];
  const at::Tensor maskc = given(mask) ? mask.contiguous() : mask;

  over_batch_chunks(B, chunks, [&](int64_t b0, int64_t nb) {
    const Rows DH(d_h, b0), DC(d_c, b0), DCDH(dc_dh, b0), FG(forget, b0), F(factors, b0), DG(d_gates, b0);
    const Rows DXH(d_xh, b0), MASK(maskc, b0), DH0(d_h0, b0);
    std::vector<Rows> U, E, AFTER, DLOW;
    for (const Round& rd : rounds) {
      U.emplace_back(rd.tanh, b0), E.emplace_back(rd.e, b0);
      AFTER.emplace_back(rd.after, b0), DLOW.emplace_back(rd.d_low, b0);
    }
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t b = 0; b < nb; ++b)
        gate_backward(DG.at(t, b), DC.at(0, b), DH.at(t, b), DCDH.at(t, b), F.at(t, b), FG.at(t, b), n);
      float* dxh = DXH.at(t);
      gate.product(nb, DG.at(t), DG.row, 0.0f, dxh, DXH.row);
      float *dx = dxh, *dhh = dxh + m;
      for (size_t i = 0; i < rounds.size(); ++i) {
        const Round& rd = rounds[i];
        float* d_tgt = rd.odd ? dx : dhh;
        float* d_src = rd.odd ? dhh : dx;
        const int64_t k_tgt = rd.odd ? m : n;
        for (int64_t b = 0; b < nb; ++b)
          round_backward(E[i].at(t, b), d_tgt + b * DXH.row, AFTER[i].at(t, b), U[i].at(t, b), k_tgt);
        if (rd.right.n) {  // d s += (e @ (L / 2)) @ R
          rd.matrix.product(nb, E[i].at(t), E[i].row, 0.0f, DLOW[i].at(t), DLOW[i].row);
          rd.right.product(nb, DLOW[i].at(t), DLOW[i].row, 1.0f, d_src, DXH.row);
        } else {  // d s += e @ (M / 2)
          rd.matrix.product(nb, E[i].at(t), E[i].row, 1.0f, d_src, DXH.row);
        }
      }
      for (int64_t b = 0; b < nb; ++b) {  // d h_{t-1} += d h (masked), or d h0
        const float* src = dhh + b * DXH.row;
        const float* mk = MASK.p ? MASK.at(0, b) : nullptr;
        float* dst = t > 0 ? DH.at(t - 1, b) : DH0.at(0, b);
        for (int64_t j = 0; j < n; ++j) {
          const float v = mk ? src[j] * mk[j] : src[j];
          dst[j] = t > 0 ? dst[j] + v : v;
        }
      }
    }
  });
}

}  // namespace

// For the tests: tanh8 (and its scalar tail) over a float tensor, in place; and how many chunks a batch gets.
void tanh_(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "tanh_: contiguous float32");
  float* p = x.data_ptr<float>();
  const int64_t k = x.numel();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) st(p + j, tanh8(ld(p + j)));
  for (; j < k; ++j) p[j] = std::tanh(p[j]);
}

// For the tests and the benchmark: what the products run on ("mkl" or "avx512"), and a way to choose.
std::string products() { return products_use_mkl ? "mkl" : "avx512"; }
void set_products(const std::string& kind) {
  TORCH_CHECK(kind == "mkl" || (kind == "avx512" && __builtin_cpu_supports("avx512f")),
              "set_products: 'mkl', or 'avx512' on a CPU with AVX-512 (got '", kind, "')");
  products_use_mkl = kind == "mkl";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("tanh_", &tanh_, "the loops' tanh, in place (for tests)");
  mod.def("products", &products, "what the per-step products run on: 'mkl' or 'avx512'");
  mod.def("set_products", &set_products, "the per-step products on 'mkl' or 'avx512' (for tests)");
  mod.def("chunk_count", &chunk_count, "how many row chunks (threads) a batch of B rows is split into");
  mod.def("forward_loop", &forward_loop, "Mogrifier LSTM forward loop over time (see fast.py)",
          py::call_guard<py::gil_scoped_release>());
  mod.def("backward_loop", &backward_loop, "Mogrifier LSTM backward loop over time (see fast.py)",
          py::call_guard<py::gil_scoped_release>());
}
