// Native CPU implementations of dynbatch's ops (EDBA's selection, the per-sample scores, and at the end of this file
// the language model's head), with the same contracts and the same random subsets as the torch references
// (kernels/reference.py, kernels/lm_head.py) and the Triton kernels (kernels/*.py).
//
// Memory: subsets are processed kBlockRows at a time. A block's masks (kBlockRows x B floats) are drawn from
// (seed, subset, sample) into a reused buffer, multiplied with K (Gram route) or with a tile of G built from E and
// A (direct route) by the BLAS torch links (sgemm), and reduced to one number per subset. Nothing of size N x B or
// N x C(D+1) exists, and neither does the whole G. Up to B = 256 the Gram route skips the GEMM and the mask buffer:
// each subset, drawn as bits, sums its members' rows of K, which stays in cache (gram_quadratic).
//
// Fixed cost: a selection runs once per training step, often at small batches, and (registered as a torch op)
// inside the dispatcher, where every ATen call costs a microsecond or two. So the work between the inputs and the
// two outputs uses plain buffers and BLAS directly: no ATen operator runs inside select_subset.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

// The Fortran BLAS entry point that libtorch links (MKL or OpenBLAS). Weak: a torch built without one leaves it
// null, and the products fall back to at::mm.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kRateSalt = 0x5BD1E995u;
// Subsets per block: 1024 rows keep the BLAS calls efficient (256 measured ~10% slower at B=1000) while a block's
// buffers stay a few MB whatever N is.
constexpr int64_t kBlockRows = 1024;
constexpr int64_t kTileCols = 2048;  // G columns per direct-route tile, rounded to whole classes: (B x 2048)
                                     // keeps C=10, D=64 in one GEMM per block, as wide as BLAS likes
// Gram route up to this batch: subsets summed from K's rows (K <= 256 KB, cache-resident) instead of the GEMM.
constexpr int64_t kSparseMaxBatch = 256;
constexpr int kLanes = 8;            // independent accumulators, so reductions vectorise without -ffast-math

// sum_i x[i] * y[i] in kLanes float lanes, combined in double.
inline double dot_lanes(const float* x, const float* y, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l] * y[i + l];
  double s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += static_cast<double>(x[i]) * y[i];
  return s;
}

inline __attribute__((always_inline)) uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// One subset's membership: sample i is in iff the top 24 bits of mix32(key + i * golden) are below t. Written as
// bits (bit l of words[w] is sample 64 w + l) and as 0/1 floats o (batch of them); returns the subset's size.
// AVX2 draws eight samples per step and packs them with movemask (the 24-bit draws and the threshold <= 2^24
// compare as signed); draw_bits_scalar is the same test for machines without it.
__attribute__((target("avx2"))) int32_t draw_bits_avx2(uint32_t key, uint32_t t, int batch, uint64_t* words,
                                                       float* o) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), golden = _mm256_set1_epi32(static_cast<int>(kGolden));
  const __m256i c1 = _mm256_set1_epi32(0x7FEB352D), c2 = _mm256_set1_epi32(static_cast<int>(0x846CA68Bu));
  const __m256i tv = _mm256_set1_epi32(static_cast<int>(t));
  int32_t count = 0;
  for (int w = 0; w * 64 < batch; ++w) {
    uint64_t word = 0;
    for (int g = 0; g < 8 && w * 64 + g * 8 < batch; ++g) {
      const int i0 = w * 64 + g * 8;
      __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(key)),
                                   _mm256_mullo_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(i0)), golden));
      x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
      x = _mm256_mullo_epi32(x, c1);
      x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
      x = _mm256_mullo_epi32(x, c2);
      x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
      const __m256i in = _mm256_cmpgt_epi32(tv, _mm256_srli_epi32(x, 8));
      uint64_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(in)));
      const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(m)), lane),
                                           _mm256_set1_epi32(1));
      if (batch - i0 >= 8) {
        _mm256_storeu_ps(o + i0, _mm256_cvtepi32_ps(bit));
      } else {  // lanes past the batch are neither samples nor written (o may be a row of a larger buffer)
        m &= (uint64_t{1} << (batch - i0)) - 1;
        _mm256_maskstore_ps(o + i0, _mm256_cmpgt_epi32(_mm256_set1_epi32(batch - i0), lane),
                            _mm256_cvtepi32_ps(bit));
      }
      word |= m << (g * 8);
    }
    words[w] = word;
    count += __builtin_popcountll(word);
  }
  return count;
}

int32_t draw_bits_scalar(uint32_t key, uint32_t t, int batch, uint64_t* words, float* o) {
  int32_t count = 0;
  for (int w = 0; w * 64 < batch; ++w) words[w] = 0;
  for (int i = 0; i < batch; ++i) {
    const uint64_t in = (mix32(key + static_cast<uint32_t>(i) * kGolden) >> 8) < t;
    words[i / 64] |= in << (i % 64);
    o[i] = static_cast<float>(in);
    count += static_cast<int32_t>(in);
  }
  return count;
}

// A given 0/1 byte row as bits and floats (as draw_bits_*); returns its size. AVX2 packs 32 bytes per movemask.
__attribute__((target("avx2"))) int32_t bytes_to_bits_avx2(const uint8_t* m, int batch, uint64_t* words, float* o) {
  for (int i = 0; i < batch; ++i) o[i] = m[i] != 0;  // vectorises
  int32_t count = 0;
  for (int w = 0; w * 64 < batch; ++w) {
    uint64_t word = 0;
    for (int h = 0; h < 2 && w * 64 + h * 32 < batch; ++h) {
      const int i0 = w * 64 + h * 32, n = std::min(32, batch - i0);
      uint64_t bits;
      if (n == 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + i0));
        bits = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
      } else {
        bits = 0;
        for (int l = 0; l < n; ++l) bits |= static_cast<uint64_t>(m[i0 + l] != 0) << l;
      }
      word |= (bits & 0xFFFFFFFFu) << (h * 32);
    }
    words[w] = word;
    count += __builtin_popcountll(word);
  }
  return count;
}

int32_t bytes_to_bits_scalar(const uint8_t* m, int batch, uint64_t* words, float* o) {
  int32_t count = 0;
  for (int w = 0; w * 64 < batch; ++w) words[w] = 0;
  for (int i = 0; i < batch; ++i) {
    const uint64_t in = m[i] != 0;
    words[i / 64] |= in << (i % 64);
    o[i] = static_cast<float>(in);
    count += static_cast<int32_t>(in);
  }
  return count;
}

// AVX2 and FMA (every AVX2 CPU has both; the draws need only the first, the class pairs' dot4 both).
bool has_avx2_fma() {
  static const bool yes = [] {
    __builtin_cpu_init();  // may run before the CPU model is initialised by the runtime's own constructors
    // DYNBATCH_NATIVE_SCALAR: the portable loops, so that a test can check them on an AVX2 machine.
    return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0 &&
           std::getenv("DYNBATCH_NATIVE_SCALAR") == nullptr;
  }();
  return yes;
}

struct MaskSource {
  const uint8_t* masks;  // mode 0: (N, B) row-major
  uint32_t seed;         // already folded to 32 bits by the caller
  int64_t mode;          // 0 given, 1 bernoulli, 2 uniform_size
  uint32_t thr;          // bernoulli threshold on the 24-bit draw
  int64_t batch;

  // Rows [n0, n0 + rows) into out (rows x batch, float 0/1), their sizes into counts[r].
  void fill(int64_t n0, int64_t rows, float* out, float* counts) const {
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      std::vector<uint64_t> words((batch + 63) / 64);
      for (int64_t r = r0; r < r1; ++r) counts[r] = static_cast<float>(bits(n0 + r, words.data(), out + r * batch));
    });
  }

  // Subset n as bits (ceil(batch / 64) words) and 0/1 floats (o: batch floats); returns its size.
  int32_t bits(int64_t n, uint64_t* words, float* o) const {
    const int b = static_cast<int>(batch);
    if (mode == 0) {
      const uint8_t* m = masks + n * batch;
      return has_avx2_fma() ? bytes_to_bits_avx2(m, b, words, o) : bytes_to_bits_scalar(m, b, words, o);
    }
    const uint32_t key = mix32(mix32(seed) + static_cast<uint32_t>(n));
    const uint32_t t = mode == 1 ? thr : (mix32(key ^ kRateSalt) >> 8);
    return has_avx2_fma() ? draw_bits_avx2(key, t, b, words, o) : draw_bits_scalar(key, t, b, words, o);
  }
};

// The Gram route's quadratic form without a GEMM, for K small enough to stay in cache. With m a 0/1 membership,
// m^T K m = sum over member pairs (i, j) of K_ij. K is symmetric, so it suffices to sum, over member rows j, the
// columns from j's own 16-column group onwards, with the diagonal 16 x 16 blocks halved (Kh), and double: a pair in
// two groups is met once at full weight, a pair in one group twice at half weight. Members arrive in index order,
// so the groups (and the columns each member row adds) are fixed at compile time: the accumulators stay in
// registers while about |S| B / 2 floats of Kh stream, instead of the GEMM's B^2 multiply-adds.

// acc[s, W) += Kh[j, c0 + s : c0 + W) for the members j in group [c0 + s, c0 + s + 16), for every group s >= S.
template <int W, int S>
inline __attribute__((always_inline)) void add_member_rows(const float* Kh, int64_t ld, int64_t c0,
                                                           const uint64_t* words, float* acc) {
  if constexpr (S < W) {
    const int64_t g = c0 + S;
    for (uint32_t bits = static_cast<uint32_t>(words[g / 64] >> (g % 64)) & 0xFFFFu; bits != 0; bits &= bits - 1) {
      const float* row = Kh + (g + __builtin_ctz(bits)) * ld + c0;
      for (int l = S; l < W; ++l) acc[l] += row[l];
    }
    add_member_rows<W, S + 16>(Kh, ld, c0, words, acc);
  }
}

// Columns [c0, c0 + W) of the form: members before c0 add whole rows, members inside add their tails; the result
// dotted with the membership o.
template <int W>
inline __attribute__((always_inline)) double columns_dot(const float* Kh, int64_t ld, int64_t c0,
                                                         const uint64_t* words, const float* o) {
  float acc[W] = {0.f};
  for (int w = 0; w * 64 < c0; ++w)
    for (uint64_t bits = words[w]; bits != 0; bits &= bits - 1) {
      const float* row = Kh + (w * 64 + __builtin_ctzll(bits)) * ld + c0;
      for (int l = 0; l < W; ++l) acc[l] += row[l];
    }
  add_member_rows<W, 0>(Kh, ld, c0, words, acc);
  float lanes[8] = {0.f};
  for (int k = 0; k < W; k += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += acc[k + l] * o[c0 + k + l];
  double q = 0;
  for (int l = 0; l < 8; ++l) q += lanes[l];
  return q;
}

// m^T K m for one subset (bits and 0/1 floats o, zero past B), from Kh: rows of ld floats (a multiple of 16,
// zero-padded), up to 128 columns (16 AVX2 registers) per pass.
__attribute__((target_clones("avx2", "default"))) float gram_quadratic(const float* Kh, int64_t ld,
                                                                       const uint64_t* words, const float* o) {
  double q = 0;
  for (int64_t c0 = 0; c0 < ld; c0 += 128) {
    switch (std::min<int64_t>(128, ld - c0)) {
      case 16: q += columns_dot<16>(Kh, ld, c0, words, o); break;
      case 32: q += columns_dot<32>(Kh, ld, c0, words, o); break;
      case 48: q += columns_dot<48>(Kh, ld, c0, words, o); break;
      case 64: q += columns_dot<64>(Kh, ld, c0, words, o); break;
      case 80: q += columns_dot<80>(Kh, ld, c0, words, o); break;
      case 96: q += columns_dot<96>(Kh, ld, c0, words, o); break;
      case 112: q += columns_dot<112>(Kh, ld, c0, words, o); break;
      default: q += columns_dot<128>(Kh, ld, c0, words, o); break;
    }
  }
  return static_cast<float>(2 * q);
}

// Row-major C (M x N) = A (M x K, row stride lda) * B^T if b_transposed (B: N x K) else B (K x N), ldb, ldc.
void gemm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
               bool b_transposed, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (sgemm_ != nullptr && K > 0) {
    // Column-major BLAS sees the row-major C as C^T = op(B)^T A^T.
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int ia = static_cast<int>(ldb), ib = static_cast<int>(lda), ic = static_cast<int>(ldc);
    const float one = 1.f, zero = 0.f;
    const char ta = b_transposed ? 'T' : 'N', tb = 'N';
    sgemm_(&ta, &tb, &m, &n, &k, &one, B, &ia, A, &ib, &zero, C, &ic);
    return;
  }
  auto f32 = torch::dtype(torch::kFloat32);
  auto a = torch::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, f32);
  auto b = b_transposed ? torch::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, f32).t()
                        : torch::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, f32);
  auto c = torch::from_blob(C, {M, N}, {ldc, 1}, f32);
  at::mm_out(c, a, b);
}

// exp(x) for x <= 0, float, no libm call, so that a loop of it vectorises (libm's expf kept the softmax pass at
// ~5 ns an element, 0.6 x the head's product at B = 1024, C = 100): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two
// parts, exact n ln2_hi), exp(r) by Cephes expf's degree-7 polynomial (~1 ulp), 2^n written into the exponent bits.
// Below kExpFloor it returns 0 where expf would return a subnormal: a softmax term that small is 0 at fp32 anyway.
constexpr float kExpFloor = -87.0f;
inline float exp_nonpositive(float x) {
  const float xc = x < kExpFloor ? kExpFloor : x;  // NaN passes through
  const float n = (xc * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest by the 1.5 * 2^23 shift
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale * (x < kExpFloor ? 0.f : 1.f);  // a blend (see native.py's flags)
}

// One row's softmax residual er = softmax(zr) - off - on [c == y] (C), in float lanes; returns its max logit, the
// sum of exp(z - max) and the sum of z (for the loss) and ||er||^2. er may be zr (the LM head's chunk turns its
// logits into residuals in place): zr is read only before er is written.
struct RowSums {
  float mx;
  double s, zsum, e2;
};
RowSums softmax_residual(const float* zr, int64_t y, int64_t C, float off, float on, float* er) {
  float lane[kLanes], zs[kLanes] = {0.f}, tail[kLanes];
  std::fill(lane, lane + kLanes, -INFINITY);
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] = std::max(lane[l], zr[c + l]), zs[l] += zr[c + l];
  const int64_t body = c;
  float mx = *std::max_element(lane, lane + kLanes);
  for (; c < C; ++c) mx = std::max(mx, zr[c]), tail[c - body] = zr[c];
  RowSums out{mx, 0.0, 0.0, 0.0};
  for (int l = 0; l < kLanes; ++l) out.zsum += zs[l];
  for (c = body; c < C; ++c) out.zsum += tail[c - body];
  for (c = 0; c < C; ++c) er[c] = exp_nonpositive(zr[c] - mx);
  float es[kLanes] = {0.f};
  for (c = 0; c + kLanes <= C; c += kLanes)
    for (int l = 0; l < kLanes; ++l) es[l] += er[c + l];
  for (int l = 0; l < kLanes; ++l) out.s += es[l];
  for (; c < C; ++c) out.s += er[c];
  const float inv = static_cast<float>(1.0 / out.s);
  for (c = 0; c < C; ++c) er[c] = er[c] * inv - off;
  er[y] -= on;  // y in [0, C): checked once per op (Batch)
  out.e2 = dot_lanes(er, er, C);
  return out;
}

// Softmax residual rows E = softmax(z) - smoothed one-hot (B x C) and per-sample norms ||e_i|| ||a_i|| (B), from
// fp32 row-major logits z (B x C), int64 targets y (B) and fp32 features h (B x D); where given, also each
// sample's cross-entropy (lossp) and ||e_i|| (enp), from the same pass.
void residual_rows(const float* zp, const int64_t* yp, const float* hp, int64_t B, int64_t C, int64_t D, bool bias,
                   double smoothing, float* ep, float* np, float* lossp = nullptr, float* enp = nullptr) {
  const float off = static_cast<float>(smoothing / C), on = static_cast<float>(1.0 - smoothing);
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* zr = zp + b * C;
      const RowSums row = softmax_residual(zr, yp[b], C, off, on, ep + b * C);
      // In float lanes (a serial double sum here cost more than the head's product at D = 512).
      const double a2 = (bias ? 1.0 : 0.0) + dot_lanes(hp + b * D, hp + b * D, D);
      if (np != nullptr) np[b] = static_cast<float>(std::sqrt(row.e2) * std::sqrt(a2));
      if (lossp != nullptr)  // -sum_k t_k log p_k, t = (1 - smoothing) one-hot + smoothing / C; the smoothing
                             // term only when smoothing > 0, as 0 * (-inf) for a -inf logit is NaN
        lossp[b] = static_cast<float>(row.mx + std::log(row.s) - (1 - smoothing) * zr[yp[b]] -
                                      (smoothing > 0 ? smoothing / C * row.zsum : 0.0));
      if (enp != nullptr) enp[b] = static_cast<float>(std::sqrt(row.e2));
    }
  });
}

// The inputs as fp32/int64 contiguous tensors; converted only when they are not already (no ATen call otherwise).
struct Batch {
  torch::Tensor z, y, h;
  int64_t B, C, D;

  Batch(const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& features) {
    TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu() && features.device().is_cpu(),
                "the native selection ops need CPU tensors");
    z = logits.scalar_type() == torch::kFloat32 && logits.is_contiguous() ? logits
                                                                          : logits.to(torch::kFloat32).contiguous();
    h = features.scalar_type() == torch::kFloat32 && features.is_contiguous()
            ? features
            : features.to(torch::kFloat32).contiguous();
    y = targets.scalar_type() == torch::kInt64 && targets.is_contiguous() ? targets
                                                                          : targets.to(torch::kInt64).contiguous();
    B = z.size(0);
    C = z.size(1);
    D = h.size(1);
    // Once for every op: the kernels index rows by the targets (the loss, the residual, the class order).
    const int64_t* yp = y.data_ptr<int64_t>();
    TORCH_CHECK(std::all_of(yp, yp + B, [this](int64_t t) { return t >= 0 && t < C; }),
                "targets must be class indices in [0, C)");
  }
};

// Subsets scored a block of kBlockRows at a time, each finished block handed to a visitor: callers that only
// reduce over subsets (select_subset) never hold anything N-sized. All buffers are plain vectors.
class BlockScorer {
 public:
  BlockScorer(const Batch& in, bool bias, double smoothing, int64_t num_subsets, MaskSource src, bool gram)
      : B_(in.B), C_(in.C), DA_(in.D + (bias ? 1 : 0)), N_(num_subsets), src_(src), gram_(gram) {
    e_.resize(B_ * C_);
    residual_rows(in.z.data_ptr<float>(), in.y.data_ptr<int64_t>(), in.h.data_ptr<float>(), B_, C_, in.D, bias,
                  smoothing, e_.data(), nullptr);
    a_.resize(B_ * DA_);
    const float* hp = in.h.data_ptr<float>();
    for (int64_t b = 0; b < B_; ++b) {
      std::copy(hp + b * in.D, hp + (b + 1) * in.D, a_.data() + b * DA_);
      if (bias) a_[b * DA_ + in.D] = 1.f;
    }
    rows_max_ = std::max<int64_t>(1, std::min(N_, kBlockRows));
    if (gram_) {
      // K = (E E^T) o (A A^T), (B, B): K_ij = <g_i, g_j>.
      K_.resize(B_ * B_);
      std::vector<float> ak(B_ * B_);
      gemm_rows(B_, B_, C_, e_.data(), C_, e_.data(), C_, true, K_.data(), B_);
      gemm_rows(B_, B_, DA_, a_.data(), DA_, a_.data(), DA_, true, ak.data(), B_);
      for (int64_t i = 0; i < B_ * B_; ++i) K_[i] *= ak[i];
      cols_ = B_;
      if (B_ <= kSparseMaxBatch) {
        // Kh for gram_quadratic: rows padded to whole 16-column groups with zeros, diagonal 16 x 16 blocks halved.
        ld_ = (B_ + 15) / 16 * 16;
        std::vector<float> kh(B_ * ld_, 0.f);
        for (int64_t i = 0; i < B_; ++i)
          for (int64_t j = 0; j < B_; ++j) kh[i * ld_ + j] = K_[i * B_ + j] * (i / 16 == j / 16 ? 0.5f : 1.f);
        K_.swap(kh);
        q_.resize(rows_max_);
        c_.resize(rows_max_);
        return;  // no mask or product buffers
      }
    } else {
      // Tiles hold whole classes, so G[b, (c - c0) * DA + d] = E[b, c] * A[b, d] fills with a contiguous loop.
      const int64_t classes_per_tile = std::max<int64_t>(1, kTileCols / std::max<int64_t>(DA_, 1));
      cols_ = std::min(C_, classes_per_tile) * DA_;
      g_.resize(B_ * cols_);
    }
    m_.resize(rows_max_ * B_);
    q_.resize(rows_max_);
    c_.resize(rows_max_);
    p_.resize(rows_max_ * cols_);
  }

  // visit(n0, rows, q, counts): q[r] = ||sum_{i in S} g_i||^2 and counts[r] = |S| of subsets n0 + r.
  template <typename Visit>
  void run(Visit visit) {
    for (int64_t n0 = 0; n0 < N_; n0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, N_ - n0);
      if (B_ == 0) {
        std::fill(q_.begin(), q_.begin() + rows, 0.f);
        std::fill(c_.begin(), c_.begin() + rows, 0.f);
      } else if (ld_ > 0) {
        sparse_gram_block(n0, rows);
      } else {
        src_.fill(n0, rows, m_.data(), c_.data());
        gram_ ? gram_block(rows) : direct_block(rows);
      }
      visit(n0, rows, q_.data(), c_.data());
    }
  }

 private:
  void sparse_gram_block(int64_t n0, int64_t rows) {
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      uint64_t words[kSparseMaxBatch / 64] = {0};
      float o[kSparseMaxBatch] = {0.f};  // never written past B: gram_quadratic's padding stays zero
      for (int64_t r = r0; r < r1; ++r) {
        c_[r] = static_cast<float>(src_.bits(n0 + r, words, o));
        q_[r] = gram_quadratic(K_.data(), ld_, words, o);
      }
    });
  }

  void gram_block(int64_t rows) {
    const int64_t B = B_;
    gemm_rows(rows, B, B, m_.data(), B, K_.data(), B, false, p_.data(), B);
    const float* pp = p_.data();
    const float* mp = m_.data();
    float* qp = q_.data();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) qp[r] = static_cast<float>(dot_lanes(pp + r * B, mp + r * B, B));
    });
  }

  void direct_block(int64_t rows) {
    const int64_t B = B_, C = C_, DA = DA_, J = C * DA, tile = cols_;
    const float* ep = e_.data();
    const float* ap = a_.data();
    float* qp = q_.data();
    std::fill(qp, qp + rows, 0.f);
    for (int64_t j0 = 0; j0 < J; j0 += tile) {
      const int64_t w = std::min(tile, J - j0), c0 = j0 / DA, nc = w / DA;
      float* gp = g_.data();
      at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t c = 0; c < nc; ++c) {
            const float ev = ep[b * C + c0 + c];
            float* row = gp + b * tile + c * DA;
            const float* ar = ap + b * DA;
            for (int64_t d = 0; d < DA; ++d) row[d] = ev * ar[d];
          }
      });
      gemm_rows(rows, w, B, m_.data(), B, gp, tile, false, p_.data(), tile);
      const float* pp = p_.data();
      at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) qp[r] += static_cast<float>(dot_lanes(pp + r * tile, pp + r * tile, w));
      });
    }
  }

  int64_t B_, C_, DA_, N_, rows_max_ = 1, cols_ = 0, ld_ = 0;  // ld_ > 0: the sparse Gram path
  MaskSource src_;
  bool gram_;
  std::vector<float> e_, a_, K_, g_, m_, p_, q_, c_;
};

// [loss, loss_ema, grad_ema] from the trend tensor (3,), float64 or float32; the EMAs are NaN before the first step.
std::array<double, 3> trend_of(const torch::Tensor& trend) {
  TORCH_CHECK(trend.numel() == 3 && trend.device().is_cpu(), "trend must be a CPU tensor (3,) = [loss, loss_ema, grad_ema]");
  const auto t = trend.to(torch::kFloat64).contiguous();
  const double* p = t.data_ptr<double>();
  return {p[0], p[1], p[2]};
}

}  // namespace

// The ops' signatures follow their schemas in dynbatch/ops/library.py (the one place they are written): the head
// (logits, targets, features, bias, label_smoothing) first, then each op's own arguments.

// ||g_i|| = ||e_i|| * ||[h_i, 1]|| (fp32, B), e_i = softmax(z_i) - smoothed one-hot.
torch::Tensor per_sample_grad_norms(const torch::Tensor& logits, const torch::Tensor& targets,
                                    const torch::Tensor& features, bool bias, double smoothing) {
  Batch in(logits, targets, features);
  std::vector<float> e(static_cast<size_t>(in.B * in.C));
  auto norms = torch::empty({in.B}, torch::dtype(torch::kFloat32));
  residual_rows(in.z.data_ptr<float>(), in.y.data_ptr<int64_t>(), in.h.data_ptr<float>(), in.B, in.C, in.D, bias,
                smoothing, e.data(), norms.data_ptr<float>());
  return norms;
}

// (||sum_{i in S} g_i||^2, |S|) for N subsets, fp32 (N,) each: the given masks (mode 0, (N, B) bool or uint8) or
// subsets drawn from `seed` (modes 1, 2).
std::tuple<torch::Tensor, torch::Tensor> subset_sq_sums(const torch::Tensor& logits, const torch::Tensor& targets,
                                                        const torch::Tensor& features, bool bias, double smoothing,
                                                        const c10::optional<torch::Tensor>& masks, int64_t num_subsets,
                                                        int64_t seed, int64_t mode, int64_t thr, bool gram) {
  Batch in(logits, targets, features);
  const int64_t N = num_subsets;
  torch::Tensor bytes;
  if (mode == 0) {
    TORCH_CHECK(masks.has_value(), "mode 0 needs a mask tensor");
    // bool and uint8 share a 0/1 byte layout: read bool masks in place instead of converting them.
    bytes = masks->scalar_type() == torch::kBool ? masks->contiguous() : masks->to(torch::kUInt8).contiguous();
    TORCH_CHECK(bytes.size(0) == N && bytes.size(1) == in.B, "masks must be (num_subsets, B)");
  }
  MaskSource src{mode == 0 ? static_cast<const uint8_t*>(bytes.data_ptr()) : nullptr, static_cast<uint32_t>(seed),
                 mode, static_cast<uint32_t>(thr), in.B};
  auto sq = torch::empty({N}, torch::dtype(torch::kFloat32));
  auto counts = torch::empty({N}, torch::dtype(torch::kFloat32));
  float* sqp = sq.data_ptr<float>();
  float* cp = counts.data_ptr<float>();
  BlockScorer(in, bias, smoothing, N, src, gram).run([&](int64_t n0, int64_t rows, const float* q,
                                                                   const float* c) {
    std::copy(q, q + rows, sqp + n0);
    std::copy(c, c + rows, cp + n0);
  });
  return {sq, counts};
}

// EDBA's whole selection in one call, with the reference's fp32 arithmetic in the reference's order
// (kernels/reference.py: subset_norms, margins, choose) so that both choose the same subset: residuals, subsets
// drawn from `seed`, their gradient norms (of the mean, or of the sum with sum_metric), margins
// |(L - L_ema) / (G_S - G_ema) - 1|, the first minimal margin (before any EMA: the first largest subset), and the
// winner's mask. Returns (stats float64 (5,) = [loss, grad_norm, margin, size, index], mask bool (B,)).
std::tuple<torch::Tensor, torch::Tensor> select_subset(const torch::Tensor& logits, const torch::Tensor& targets,
                                                       const torch::Tensor& features, bool bias, double smoothing,
                                                       const torch::Tensor& trend, int64_t num_subsets, int64_t seed,
                                                       int64_t mode, int64_t thr, bool gram, bool sum_metric,
                                                       double eps) {
  TORCH_CHECK(mode == 1 || mode == 2, "select_subset draws its subsets: mode must be 1 or 2");
  TORCH_CHECK(num_subsets >= 1, "num_subsets must be at least 1");
  Batch in(logits, targets, features);
  const int64_t B = in.B;
  MaskSource src{nullptr, static_cast<uint32_t>(seed), mode, static_cast<uint32_t>(thr), B};
  const auto [loss_value, loss_ema, grad_ema] = trend_of(trend);
  const bool has_ema = !std::isnan(loss_ema) && !std::isnan(grad_ema);
  const float num = static_cast<float>(loss_value) - static_cast<float>(loss_ema);
  const float gema = static_cast<float>(grad_ema), feps = static_cast<float>(eps);
  const float fmax = std::numeric_limits<float>::max(), inf = std::numeric_limits<float>::infinity();
  // Best so far: the smallest key, the first index on ties (blocks arrive in order, rows scanned in order).
  float best_key = inf, best_norm = 0.f, max_count = 0.f;
  int64_t best = -1;
  std::vector<float> key(std::min(num_subsets, kBlockRows)), nrm(key.size());
  BlockScorer(in, bias, smoothing, num_subsets, src, gram)
      .run([&](int64_t n0, int64_t rows, const float* q, const float* c) {
        at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const float root = std::sqrt(std::max(q[r], 0.f));
            const float g = c[r] > 0 ? (sum_metric ? root : root / std::max(c[r], 1.f)) : 0.f;
            nrm[r] = g;
            if (!has_ema) {
              key[r] = -c[r];  // the first largest subset, as a minimum
              continue;
            }
            float den = g - gema;
            const float sign = den < 0 ? -1.f : 1.f;
            if (std::fabs(den) < feps) den = sign * feps;
            float m = std::fabs(num / den - 1.f);
            if (std::isnan(m) || std::isinf(m)) m = fmax;
            key[r] = c[r] > 0 ? m : inf;
          }
        });
        for (int64_t r = 0; r < rows; ++r) {
          max_count = std::max(max_count, c[r]);
          if (best < 0 || key[r] < best_key) {
            best_key = key[r];
            best = n0 + r;
            best_norm = nrm[r];
          }
        }
      });
  auto mask = torch::empty({B}, torch::dtype(torch::kBool));
  bool* mp = mask.data_ptr<bool>();
  int64_t size = B;
  if (max_count > 0) {
    std::vector<float> row(std::max<int64_t>(B, 1));
    float count = 0.f;
    src.fill(best, 1, row.data(), &count);
    for (int64_t i = 0; i < B; ++i) mp[i] = row[i] != 0.f;
    size = static_cast<int64_t>(count);
  } else {
    std::fill(mp, mp + B, true);  // every subset empty (tiny B): train on the whole batch
  }
  auto stats = torch::empty({5}, torch::dtype(torch::kFloat64));
  double* sp = stats.data_ptr<double>();
  sp[0] = loss_value;
  sp[1] = best_norm;
  sp[2] = has_ema ? static_cast<double>(best_key) : std::nan("");
  sp[3] = static_cast<double>(size);
  sp[4] = static_cast<double>(best);
  return {stats, mask};
}

// ---- per-sample scores against the batch (kernels/reference.py: sample_scores) ----------------------------------
namespace {

// Must match reference.ALONE: ||G - g_i||^2 below this share of ||G||^2 + ||g_i||^2 is rounding (a lone sample).
constexpr double kAlone = 1e-5;

// cos(g_i, G - g_i) from r_i = <g_i, G>, ||g_i|| and ||G||^2; 0 for a zero gradient or a lone sample.
float consensus_of(double r, double gn, double total_sq) {
  const double g2 = gn * gn, rest = total_sq - 2 * r + g2;
  const double den = gn * std::sqrt(std::max(rest, 0.0));
  if (rest <= kAlone * (total_sq + g2) || !(den > 0)) return 0.f;
  return static_cast<float>(std::min(1.0, std::max(-1.0, (r - g2) / den)));
}

// r_i = <e_i (x) a_i, G> = e_i^T G a_i for the rows of E (n x C) and H (n x D) (a_i = [h_i, 1] with bias), with G
// = their own sum E^T A, never n x C x (D+1). As r_i = e_i . (A G^T)_i, the second product is H G_h^T (n x C),
// the head's own shape (cheaper than E G, n x D), then a pass over n x C. The products run in ATen (its threads);
// returns ||G||^2.
double agreements_product(const torch::Tensor& e, const torch::Tensor& h, bool bias, float* r) {
  const auto gt = at::mm(h.t(), e);                                     // G_h^T (D, C)
  const auto q = at::mm(h, gt);                                         // (n, C)
  double total = gt.square().sum().item<double>();
  torch::Tensor gb;
  if (bias) {
    gb = e.sum(0);                                                      // (C,): G's bias column
    total += gb.square().sum().item<double>();
  }
  const int64_t n = e.size(0), C = e.size(1);
  const float *qp = q.data_ptr<float>(), *ep = e.data_ptr<float>(), *gbp = bias ? gb.data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      r[i] = static_cast<float>(dot_lanes(qp + i * C, ep + i * C, C) + (bias ? dot_lanes(gbp, ep + i * C, C) : 0.0));
  });
  return total;
}

// The same for a group small enough that its Gram is cheaper than G: r_i = sum_j (e_i . e_j)(a_i . a_j), with
// ||G||^2 = sum_i r_i (cost n^2 (C + D) against 2 n C (D + 1)).
double agreements_gram(const torch::Tensor& e, const torch::Tensor& h, bool bias, float* r) {
  auto k = at::mm(e, e.t()) * (bias ? at::mm(h, h.t()) + 1 : at::mm(h, h.t()));
  const auto rows = k.sum(1);
  std::copy(rows.data_ptr<float>(), rows.data_ptr<float>() + rows.numel(), r);
  return rows.sum().item<double>();
}

// x . y_t for four rows y_0..y_3 of length n (out: 4). AVX2/FMA: x loaded once for the four, two 8-float
// accumulators per row, eight independent chains that hide the FMA latency (one row at a time through dot_lanes
// waits on its adds: 1.6x slower at C = 100, D = 512); the tail in double.
__attribute__((target("avx2,fma"))) void dot4_avx2(const float* x, const float* const* y, int64_t n, double* out) {
  __m256 acc[4][2];
  for (int t = 0; t < 4; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    for (int t = 0; t < 4; ++t) {
      acc[t][0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(y[t] + i), acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(y[t] + i + 8), acc[t][1]);
    }
  }
  for (int t = 0; t < 4; ++t) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(acc[t][0], acc[t][1]));
    double s = 0;
    for (int l = 0; l < 8; ++l) s += lanes[l];
    for (int64_t k = i; k < n; ++k) s += static_cast<double>(x[k]) * y[t][k];
    out[t] = s;
  }
}

void dot4_portable(const float* x, const float* const* y, int64_t n, double* out) {
  for (int t = 0; t < 4; ++t) out[t] = dot_lanes(x, y[t], n);
}

// Class-conditional agreements by one fused pass over each class's pairs, for classes small enough that ATen's
// per-call cost would exceed their work: r_i = sum_{j in i's class} (e_i . e_j)(a_i . a_j), the pair terms summed
// once for both rows (row i against four j >= i at a time), nothing stored but r; classes run in parallel and write
// only their own rows. ``order`` lists the rows class by class (class k at order[start[k] .. start[k+1])). Sets
// rc[i] (by row) and class_sq[k] = ||G_k||^2 = sum of class k's r_i.
void class_agreements_fused(const float* ep, const float* hp, int64_t C, int64_t D, bool bias,
                            const std::vector<int64_t>& start, const std::vector<int64_t>& order, float* rc,
                            double* class_sq) {
  const auto dot4 = has_avx2_fma() ? dot4_avx2 : dot4_portable;
  at::parallel_for(0, C, 1, [&](int64_t k0, int64_t k1) {
    std::vector<double> acc;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t lo = start[k], n = start[k + 1] - lo;
      acc.assign(n, 0.0);
      for (int64_t a = 0; a < n; ++a) {
        const int64_t i = order[lo + a];
        for (int64_t b = a; b < n; b += 4) {
          const float *ej[4], *hj[4];
          for (int t = 0; t < 4; ++t) {
            const int64_t j = order[lo + std::min(b + t, n - 1)];  // past the class's end: a repeat, unused
            ej[t] = ep + j * C, hj[t] = hp + j * D;
          }
          double ke[4], kh[4];
          dot4(ep + i * C, ej, C, ke);
          dot4(hp + i * D, hj, D, kh);
          for (int t = 0; t < 4 && b + t < n; ++t) {
            const double kij = ke[t] * (kh[t] + bias);
            acc[a] += kij;
            if (b + t != a) acc[b + t] += kij;
          }
        }
      }
      double total = 0;
      for (int64_t a = 0; a < n; ++a) rc[order[lo + a]] = static_cast<float>(acc[a]), total += acc[a];
      class_sq[k] = total;
    }
  });
}

// Whether the fused pass is the cheaper way to the class agreements: its multiply-adds (each pair once, n(n+1)/2
// per class of n, C + D + 1 each) against the per-class products' (2 C (D+1) per row) at half its efficiency per
// multiply-add (no GEMM blocking), or small enough outright that the products' ~10 ATen calls would cost more.
bool fused_classes_cheaper(const std::vector<int64_t>& start, int64_t C, int64_t DA, int64_t B) {
  constexpr double kFusedOutright = 1e6;  // multiply-adds: ~10 ATen calls' fixed cost on one core
  double fused = 0;
  for (int64_t k = 0; k < C; ++k) {
    const double n = static_cast<double>(start[k + 1] - start[k]);
    fused += 0.5 * n * (n + 1) * static_cast<double>(C + DA);
  }
  return fused <= kFusedOutright || 2 * fused <= 2.0 * C * DA * B;
}

// Each class's G, the classes padded to the largest (m rows) and batched: a few ATen calls whatever C.
void class_agreements_padded(const torch::Tensor& e, const torch::Tensor& h, bool bias,
                             const std::vector<int64_t>& start, const std::vector<int64_t>& order, int64_t m,
                             float* rc, double* class_sq) {
  const int64_t B = e.size(0), C = e.size(1), D = h.size(1);
  std::vector<int64_t> slot(B);  // sample i's row in the padded (C x m) layout
  for (int64_t k = 0; k < C; ++k)
    for (int64_t j = start[k]; j < start[k + 1]; ++j) slot[order[j]] = k * m + (j - start[k]);
  const auto at_slot = torch::from_blob(slot.data(), {B}, torch::dtype(torch::kInt64));
  const auto f32 = torch::dtype(torch::kFloat32);
  const auto e3 = torch::zeros({C * m, C}, f32).index_copy_(0, at_slot, e).view({C, m, C});
  const auto h3 = torch::zeros({C * m, D}, f32).index_copy_(0, at_slot, h).view({C, m, D});
  const auto gt = at::bmm(h3.transpose(1, 2), e3);                     // (C, D, C): each class's G_h^T
  auto q = at::bmm(h3, gt);                                            // (C, m, C)
  if (bias) q = q + e3.sum(1, /*keepdim=*/true);                       // + each class's bias column
  const auto rows = (q * e3).sum(-1);
  const auto flat = rows.reshape({C * m}).index_select(0, at_slot).contiguous();
  const auto sums = rows.sum(-1).contiguous();
  std::copy(flat.data_ptr<float>(), flat.data_ptr<float>() + B, rc);
  std::copy(sums.data_ptr<float>(), sums.data_ptr<float>() + C, class_sq);
}

// Class-conditional agreement and consensus (rc, cc: B each) of the rows of e (B, C) and h (B, D) with labels yp
// and gradient norms gn. The rows are gathered class by class (a counting sort). Small classes: one fused pass over
// their pairs; else each class's G, padded and batched while the padding stays within 4 x B rows, else class by
// class (by Gram or by G, as each class's size makes cheaper).
void class_scores(const torch::Tensor& e, const torch::Tensor& h, const int64_t* yp, const float* gn, bool bias,
                  float* rc, float* cc) {
  const int64_t B = e.size(0), C = e.size(1), D = h.size(1), DA = D + (bias ? 1 : 0);
  std::vector<int64_t> start(C + 1, 0), order(B);
  for (int64_t i = 0; i < B; ++i) ++start[yp[i] + 1];  // yp in [0, C) (Batch)
  int64_t m = 0;
  for (int64_t k = 0; k < C; ++k) m = std::max(m, start[k + 1]), start[k + 1] += start[k];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < B; ++i) order[next[yp[i]]++] = i;
  std::vector<double> class_sq(C, 0.0);
  if (fused_classes_cheaper(start, C, DA, B)) {
    class_agreements_fused(e.data_ptr<float>(), h.data_ptr<float>(), C, D, bias, start, order, rc, class_sq.data());
  } else if (C * m <= 4 * B) {
    class_agreements_padded(e, h, bias, start, order, m, rc, class_sq.data());
  } else {
    const auto idx = torch::from_blob(order.data(), {B}, torch::dtype(torch::kInt64));
    const auto es = e.index_select(0, idx), hs = h.index_select(0, idx);
    std::vector<float> rk(B);
    for (int64_t k = 0; k < C; ++k) {
      const int64_t lo = start[k], n = start[k + 1] - lo;
      if (n == 0) continue;
      const auto ek = es.narrow(0, lo, n), hk = hs.narrow(0, lo, n);
      class_sq[k] = n * (C + DA) < 2 * C * DA ? agreements_gram(ek, hk, bias, rk.data() + lo)
                                              : agreements_product(ek, hk, bias, rk.data() + lo);
      for (int64_t j = lo; j < lo + n; ++j) rc[order[j]] = rk[j];
    }
  }
  for (int64_t i = 0; i < B; ++i) cc[i] = consensus_of(rc[i], gn[i], class_sq[yp[i]]);
}

}  // namespace

// Each sample's scores, fp32 (K, B): loss, ||e_i||, ||g_i||, agreement r_i and consensus c_i against the batch,
// and with by_class the same two against the sample's own class.
torch::Tensor sample_scores(const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& features,
                            bool bias, double smoothing, bool by_class) {
  Batch in(logits, targets, features);
  const int64_t B = in.B, C = in.C, D = in.D;
  auto out = torch::empty({by_class ? 7 : 5, B}, torch::dtype(torch::kFloat32));
  float* o = out.data_ptr<float>();
  float *loss = o, *en = o + B, *gn = o + 2 * B, *r = o + 3 * B, *c = o + 4 * B;
  const float* zp = in.z.data_ptr<float>();
  const int64_t* yp = in.y.data_ptr<int64_t>();
  auto e = torch::empty({B, C}, torch::dtype(torch::kFloat32));
  float* ep = e.data_ptr<float>();
  residual_rows(zp, yp, in.h.data_ptr<float>(), B, C, D, bias, smoothing, ep, gn, loss, en);
  const double total_sq = agreements_product(e, in.h, bias, r);
  for (int64_t i = 0; i < B; ++i) c[i] = consensus_of(r[i], gn[i], total_sq);
  if (!by_class) return out;
  class_scores(e, in.h, yp, gn, bias, o + 5 * B, o + 6 * B);
  return out;
}

// ---- lm_head: a language model's head, a chunk of whole sequences x V at a time (math and the chunk plan:
// kernels/lm_head.py, whose lm_head this matches). Each chunk's logits come from one product (ATen's threaded
// BLAS) and become residuals in place in one threaded, vectorised pass over rows (softmax_residual); the
// gradients and sequence norms are products of that chunk. Never N x V.
namespace {

constexpr int64_t kChunkElements = int64_t{1} << 22;  // = kernels/lm_head.py CHUNK_ELEMENTS
enum LMHeadWhat : int64_t { kGrads = 1, kNorms = 2, kAgreement = 4 };

struct Chunk {
  int64_t lo, hi, s0, s1;  // tokens [lo, hi), sequences [s0, s1)
};

std::vector<Chunk> lm_chunks(const int64_t* off, int64_t B, int64_t V, bool whole_sequences) {
  const int64_t rows = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(V, 1)), n = off[B];
  std::vector<Chunk> out;
  if (!whole_sequences) {
    for (int64_t lo = 0; lo < n; lo += rows) out.push_back({lo, std::min(lo + rows, n), 0, 0});
    return out;
  }
  for (int64_t start = 0; start < B;) {
    int64_t end = start + 1;
    while (end < B && off[end + 1] - off[start] <= rows) ++end;
    out.push_back({off[start], off[end], start, end});
    start = end;
  }
  return out;
}

// The chunk's logits h W^T (n x V) into the reused buffer z (its first n rows), without the bias: each row's pass
// adds it, so no broadcast copy of it is written first.
torch::Tensor chunk_logits(torch::Tensor& z, const torch::Tensor& h, const torch::Tensor& w) {
  auto out = z.slice(0, 0, h.size(0));
  at::mm_out(out, h, w.t());
  return out;
}

// The chunk's logits z (n x V, bias not yet added) into E = (softmax(z) - q) [valid] in place, each row times
// row_scale[t] where given (the gradient's scale, when nothing needs E unscaled); loss, LSE, ||e||, ||g|| into the
// token rows at column lo (rows of N floats).
void lm_residual_rows(float* z, const float* bias, const int64_t* y, const float* h, int64_t lo, int64_t n,
                      int64_t V, int64_t D, int64_t ignore, double smoothing, const float* row_scale, float* tokens,
                      int64_t N) {
  const float off = static_cast<float>(smoothing / V), on = static_cast<float>(1.0 - smoothing);
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = lo + r, target = y[t];
      const bool valid = target != ignore;
      float* zr = z + r * V;
      if (bias != nullptr)
        for (int64_t v = 0; v < V; ++v) zr[v] += bias[v];
      const float z_y = valid ? zr[target] : 0.f;
      const RowSums row = softmax_residual(zr, valid ? target : 0, V, off, on, zr);
      const double lse = row.mx + std::log(row.s);
      if (!valid || (row_scale != nullptr && row_scale[t] == 0.f)) {
        std::fill(zr, zr + V, 0.f);
      } else if (row_scale != nullptr) {
        const float k = row_scale[t];
        for (int64_t v = 0; v < V; ++v) zr[v] *= k;
      }
      const double e_norm = valid ? std::sqrt(row.e2) : 0.0;
      const double a2 = (bias != nullptr ? 1.0 : 0.0) + dot_lanes(h + t * D, h + t * D, D);
      tokens[t] = valid ? static_cast<float>(lse - on * z_y - (smoothing > 0 ? off * row.zsum : 0.0)) : 0.f;
      tokens[N + t] = static_cast<float>(lse);
      tokens[2 * N + t] = static_cast<float>(e_norm);
      tokens[3 * N + t] = static_cast<float>(e_norm * std::sqrt(a2));
    }
  });
}

// ||G_b|| of each sequence of a chunk from its weighted residual rows ew (w_t e_t), by the Gram or the direct route.
void lm_sequence_norms(const torch::Tensor& e_weighted, const torch::Tensor& h, const Chunk& ch, const int64_t* off,
                       bool bias, bool gram, float* out) {
  for (int64_t s = ch.s0; s < ch.s1; ++s) {
    const int64_t lo = off[s] - ch.lo, hi = off[s + 1] - ch.lo;
    if (hi == lo) continue;
    const auto ew = e_weighted.slice(0, lo, hi);
    const auto a = h.slice(0, off[s], off[s + 1]);
    double sq;
    if (gram) {
      const auto aa = at::mm(a, a.t());
      sq = (at::mm(ew, ew.t()) * (bias ? aa + 1 : aa)).sum().item<double>();
    } else {
      sq = at::mm(ew.t(), a).square().sum().item<double>() + (bias ? ew.sum(0).square().sum().item<double>() : 0.0);
    }
    out[s] = static_cast<float>(std::sqrt(std::max(sq, 0.0)));
  }
}

// <G_b, G> per sequence: the second pass, w_t e_t . u_t with u = G a_t, from the logits and the first pass's LSE
// (e . u = p . u - (1 - eps) u_y - eps / V sum(u): no E).
void lm_agreement(torch::Tensor& zbuf, torch::Tensor& ubuf, const torch::Tensor& h, const torch::Tensor& wt,
                  const float* bias, const torch::Tensor& gw, const float* g_bias, const int64_t* y,
                  const float* tok_w, const float* lse, const std::vector<Chunk>& chunks, const int64_t* off,
                  int64_t ignore, double smoothing, float* out) {
  const int64_t V = wt.size(0);
  const float off_t = static_cast<float>(smoothing / V), on = static_cast<float>(1.0 - smoothing);
  for (const Chunk& ch : chunks) {
    const auto hc = h.slice(0, ch.lo, ch.hi);
    const auto z = chunk_logits(zbuf, hc, wt), u = chunk_logits(ubuf, hc, gw);  // biases added row by row
    float *zp = z.data_ptr<float>(), *up = u.data_ptr<float>();
    std::vector<double> r(ch.hi - ch.lo, 0.0);
    at::parallel_for(0, ch.hi - ch.lo, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t t = ch.lo + i;
        if (y[t] == ignore) continue;
        float *zr = zp + i * V, *ur = up + i * V;
        const float l = lse[t];
        for (int64_t v = 0; v < V; ++v) zr[v] -= l;  // z - lse, then + b: the exponent of p
        if (bias != nullptr)
          for (int64_t v = 0; v < V; ++v) zr[v] += bias[v], ur[v] += g_bias[v];
        float acc[kLanes] = {0.f}, us[kLanes] = {0.f};
        int64_t v = 0;
        for (; v + kLanes <= V; v += kLanes)
          for (int k = 0; k < kLanes; ++k) acc[k] += exp_nonpositive(zr[v + k]) * ur[v + k], us[k] += ur[v + k];
        double dot = 0, usum = 0;
        for (int k = 0; k < kLanes; ++k) dot += acc[k], usum += us[k];
        for (; v < V; ++v) dot += exp_nonpositive(zr[v]) * ur[v], usum += ur[v];
        r[i] = tok_w[t] * (dot - on * ur[y[t]] - off_t * usum);
      }
    });
    for (int64_t s = ch.s0; s < ch.s1; ++s) {
      double acc = 0;
      for (int64_t t = off[s]; t < off[s + 1]; ++t) acc += r[t - ch.lo];
      out[s] = static_cast<float>(acc);
    }
  }
}

torch::Tensor fp32(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 && t.is_contiguous() ? t : t.to(torch::kFloat32).contiguous();
}

}  // namespace

// The lm_head op: (tokens fp32 (4, N), sequences fp32 (2, B), d_features (N, D), d_weight (V, D), d_bias (V,)),
// the gradients empty unless what has kGrads (contract: dynbatch/ops/lm_head.py).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> lm_head(
    const torch::Tensor& features, const torch::Tensor& weight, const std::optional<torch::Tensor>& bias,
    const torch::Tensor& targets, const std::optional<torch::Tensor>& token_weights,
    const std::optional<torch::Tensor>& grad_scale, const torch::Tensor& offsets, int64_t ignore_index,
    double smoothing, int64_t what, bool gram) {
  TORCH_CHECK(features.device().is_cpu() && weight.device().is_cpu(), "the native lm_head needs CPU tensors");
  const auto h = fp32(features), wt = fp32(weight);
  const auto b = bias.has_value() ? fp32(*bias) : torch::Tensor();
  const auto y = targets.to(torch::kInt64).contiguous();
  const auto off_t = offsets.to(torch::kInt64).contiguous();
  const int64_t N = h.size(0), D = h.size(1), V = wt.size(0), B = off_t.numel() - 1;
  const int64_t *yp = y.data_ptr<int64_t>(), *off = off_t.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(yp, yp + N, [&](int64_t t) { return t == ignore_index || (t >= 0 && t < V); }),
              "targets must be token ids in [0, V) or ignore_index");
  const auto valid = (y != ignore_index).to(torch::kFloat32);
  const auto tok_w = token_weights.has_value() ? fp32(*token_weights) * valid : valid;
  const auto scale = grad_scale.has_value() ? fp32(*grad_scale) * valid : tok_w;
  const bool grads = what & kGrads, norms = what & kNorms, agree = what & kAgreement, has_b = b.defined();
  const auto f32 = torch::dtype(torch::kFloat32);
  auto tokens = torch::zeros({4, N}, f32), sequences = torch::zeros({2, B}, f32), none = torch::empty({0}, f32);
  auto d_h = grads ? torch::zeros({N, D}, f32) : none;
  auto d_w = grads ? torch::zeros({V, D}, f32) : none;
  auto d_b = grads && has_b ? torch::zeros({V}, f32) : none;
  // G for the agreement is sum_t w_t e_t a_t^T: the gradient itself when the scale is w, else its own sum
  const bool own_total = agree && (!grads || grad_scale.has_value());
  auto total_w = own_total ? torch::zeros({V, D}, f32) : d_w;
  auto total_b = has_b ? (own_total ? torch::zeros({V}, f32) : d_b) : torch::Tensor();
  const auto chunks = lm_chunks(off, B, V, norms || agree);
  int64_t rows = 0;
  for (const Chunk& ch : chunks) rows = std::max(rows, ch.hi - ch.lo);
  auto z = torch::empty({rows, V}, f32);  // one chunk's logits, then its residuals, reused by every chunk
  // The residual pass weights E's rows: by the token weights w when the gradient's scale is w (what the norms and
  // the agreement's G weight by too), by the gradient's own scale when nothing else reads E, else not at all.
  const bool by_w = !grad_scale.has_value(), by_scale = grads && !norms && !own_total;
  const float* row_scale = by_w ? tok_w.data_ptr<float>() : by_scale ? scale.data_ptr<float>() : nullptr;
  const auto rows_of = [](const torch::Tensor& t, const Chunk& ch) { return t.slice(0, ch.lo, ch.hi).unsqueeze(1); };
  for (const Chunk& ch : chunks) {
    const auto hc = h.slice(0, ch.lo, ch.hi);
    auto e = chunk_logits(z, hc, wt);
    lm_residual_rows(e.data_ptr<float>(), has_b ? b.data_ptr<float>() : nullptr, yp, h.data_ptr<float>(), ch.lo,
                     ch.hi - ch.lo, V, D, ignore_index, smoothing, row_scale, tokens.data_ptr<float>(), N);
    const auto ew = by_w ? e : norms || own_total ? e * rows_of(tok_w, ch) : torch::Tensor();
    if (norms) lm_sequence_norms(ew, h, ch, off, has_b, gram, sequences.data_ptr<float>());
    if (grads) {
      const auto es = by_w || by_scale ? e : e * rows_of(scale, ch);
      auto d_h_rows = d_h.slice(0, ch.lo, ch.hi);
      at::mm_out(d_h_rows, es, wt);
      d_w.addmm_(es.t(), hc);
      if (has_b) d_b += es.sum(0);
    }
    if (own_total) {
      total_w.addmm_(ew.t(), hc);
      if (has_b) total_b += ew.sum(0);
    }
  }
  if (agree) {
    auto u = torch::empty_like(z);  // G a_t for a chunk's tokens
    lm_agreement(z, u, h, wt, has_b ? b.data_ptr<float>() : nullptr, total_w,
                 has_b ? total_b.data_ptr<float>() : nullptr, yp, tok_w.data_ptr<float>(),
                 tokens.data_ptr<float>() + N, chunks, off, ignore_index, smoothing, sequences.data_ptr<float>() + B);
  }
  return {tokens, sequences, d_h, d_w, d_b};
}

// The CPU kernels of the ops dynbatch/ops/library.py defines; registered when the library is loaded.
TORCH_LIBRARY_IMPL(dynbatch, CPU, m) {
  m.impl("per_sample_grad_norms", &per_sample_grad_norms);
  m.impl("subset_sq_sums", &subset_sq_sums);
  m.impl("select_subset", &select_subset);
  m.impl("sample_scores", &sample_scores);
  m.impl("lm_head", &lm_head);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dynbatch native CPU kernels (registered on the CPU key of torch.ops.dynbatch) and their block size";
  m.attr("block_rows") = kBlockRows;
}
