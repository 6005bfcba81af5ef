// Native CPU implementations of EDBA's selection ops, with the same contracts and the same random subsets as the
// torch reference (kernels/reference.py) and the Triton kernels (kernels/*.py).
//
// Memory: subsets are processed kBlockRows at a time. A block's masks (kBlockRows x B floats) are drawn from
// (seed, subset, sample) into a reused buffer, multiplied with K (Gram route) or with a tile of G built from E and
// A (direct route) by the BLAS behind at::mm, and reduced to one number per subset. Nothing of size N x B or
// N x C(D+1) exists, and neither does the whole G.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

namespace {

constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kRateSalt = 0x5BD1E995u;
// Subsets per block: 1024 rows keep the BLAS calls efficient (256 measured ~10% slower at B=1000) while a block's
// buffers stay a few MB whatever N is.
constexpr int64_t kBlockRows = 1024;
constexpr int64_t kTileCols = 2048;  // G columns per direct-route tile, rounded to whole classes: (B x 2048)
                                     // keeps C=10, D=64 in one GEMM per block, as wide as BLAS likes
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

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct MaskSource {
  const uint8_t* masks;  // mode 0: (N, B) row-major
  uint32_t seed;         // already folded to 32 bits by the caller
  int64_t mode;          // 0 given, 1 bernoulli, 2 uniform_size
  uint32_t thr;          // bernoulli threshold on the 24-bit draw
  int64_t batch;

  // Rows [n0, n0 + rows) into out (rows x batch, float 0/1); returns nothing, writes counts[r].
  void fill(int64_t n0, int64_t rows, float* out, float* counts) const {
    const uint32_t seed_key = mix32(seed);
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = n0 + r;
        float* o = out + r * batch;
        int64_t c = 0;  // an integer count: a float sum here would serialise on add latency
        if (mode == 0) {
          const uint8_t* m = masks + n * batch;
          for (int64_t i = 0; i < batch; ++i) {
            o[i] = m[i] != 0;
            c += m[i] != 0;
          }
        } else {
          const uint32_t key = mix32(seed_key + static_cast<uint32_t>(n));
          const uint32_t t = mode == 1 ? thr : (mix32(key ^ kRateSalt) >> 8);
          for (int64_t i = 0; i < batch; ++i) {
            const bool in = (mix32(key + static_cast<uint32_t>(i) * kGolden) >> 8) < t;
            o[i] = in;
            c += in;
          }
        }
        counts[r] = static_cast<float>(c);
      }
    });
  }
};

void check_cpu_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor");
}

}  // namespace

// E = softmax(logits) - smoothed one-hot (fp32, B x C) and ||g_i|| = ||e_i|| * ||[h_i, 1]|| (fp32, B).
std::tuple<torch::Tensor, torch::Tensor> residuals(torch::Tensor logits, torch::Tensor targets, torch::Tensor features,
                                                   bool bias, double smoothing) {
  auto z = logits.to(torch::kFloat32).contiguous();
  auto h = features.to(torch::kFloat32).contiguous();
  auto y = targets.to(torch::kInt64).contiguous();
  TORCH_CHECK(z.device().is_cpu() && h.device().is_cpu() && y.device().is_cpu(), "native residuals need CPU tensors");
  const int64_t B = z.size(0), C = z.size(1), D = h.size(1);
  auto e = torch::empty({B, C}, z.options());
  auto norms = torch::empty({B}, z.options());
  const float* zp = z.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  float* ep = e.data_ptr<float>();
  float* np = norms.data_ptr<float>();
  const float off = static_cast<float>(smoothing / C), on = static_cast<float>(1.0 - smoothing);
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* zr = zp + b * C;
      float* er = ep + b * C;
      float mx = -INFINITY;
      for (int64_t c = 0; c < C; ++c) mx = std::max(mx, zr[c]);
      double s = 0;
      for (int64_t c = 0; c < C; ++c) {
        er[c] = std::exp(zr[c] - mx);
        s += er[c];
      }
      const float inv = static_cast<float>(1.0 / s);
      double e2 = 0;
      for (int64_t c = 0; c < C; ++c) {
        er[c] = er[c] * inv - off - (c == yp[b] ? on : 0.f);
        e2 += static_cast<double>(er[c]) * er[c];
      }
      double a2 = bias ? 1.0 : 0.0;
      for (int64_t d = 0; d < D; ++d) a2 += static_cast<double>(hp[b * D + d]) * hp[b * D + d];
      np[b] = static_cast<float>(std::sqrt(e2) * std::sqrt(a2));
    }
  });
  return {e, norms};
}

// (||sum_{i in S} g_i||^2, |S|) for N subsets, fp32 (N,) each. e: (B, C), a: (B, D') augmented features, fp32.
std::tuple<torch::Tensor, torch::Tensor> subset_sq_sums(torch::Tensor e, torch::Tensor a, int64_t num_subsets,
                                                        c10::optional<torch::Tensor> masks, int64_t seed,
                                                        int64_t mode, int64_t thr, const std::string& route) {
  check_cpu_f32(e, "e");
  check_cpu_f32(a, "a");
  TORCH_CHECK(route == "gram" || route == "direct", "route must be gram or direct");
  const int64_t B = e.size(0), C = e.size(1), DA = a.size(1), N = num_subsets;
  torch::Tensor mask_bytes;
  if (mode == 0) {
    TORCH_CHECK(masks.has_value(), "mode 0 needs a mask tensor");
    // bool and uint8 share a 0/1 byte layout: read bool masks in place instead of converting them.
    mask_bytes = masks->scalar_type() == torch::kBool ? masks->contiguous() : masks->to(torch::kUInt8).contiguous();
    TORCH_CHECK(mask_bytes.size(0) == N && mask_bytes.size(1) == B, "masks must be (num_subsets, B)");
  }
  MaskSource src{mode == 0 ? static_cast<const uint8_t*>(mask_bytes.data_ptr()) : nullptr, static_cast<uint32_t>(seed), mode,
                 static_cast<uint32_t>(thr), B};
  auto opts = e.options();
  auto sq = torch::zeros({N}, opts);
  auto counts = torch::empty({N}, opts);
  if (N == 0 || B == 0) {
    counts.zero_();
    return {sq, counts};
  }
  const int64_t rows_max = std::min(N, kBlockRows);
  auto m = torch::empty({rows_max, B}, opts);
  float* sqp = sq.data_ptr<float>();
  float* cp = counts.data_ptr<float>();

  if (route == "gram") {
    auto K = e.mm(e.t()).mul_(a.mm(a.t()));  // (B, B): K_ij = <g_i, g_j>
    auto p = torch::empty({rows_max, B}, opts);
    for (int64_t n0 = 0; n0 < N; n0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, N - n0);
      auto mb = m.narrow(0, 0, rows);
      auto pb = p.narrow(0, 0, rows);
      src.fill(n0, rows, mb.data_ptr<float>(), cp + n0);
      at::mm_out(pb, mb, K);
      const float* pp = pb.data_ptr<float>();
      const float* mp = mb.data_ptr<float>();
      at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) sqp[n0 + r] = static_cast<float>(dot_lanes(pp + r * B, mp + r * B, B));
      });
    }
  } else {
    // Tiles hold whole classes, so G[b, (c - c0) * DA + d] = E[b, c] * A[b, d] fills with a contiguous inner loop.
    const int64_t classes_per_tile = std::max<int64_t>(1, kTileCols / DA);
    const int64_t J = C * DA, tile = std::min(C, classes_per_tile) * DA;
    auto g = torch::empty({B, tile}, opts);
    auto p = torch::empty({rows_max, tile}, opts);
    const float* ep = e.data_ptr<float>();
    const float* ap = a.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, N - n0);
      auto mb = m.narrow(0, 0, rows);
      src.fill(n0, rows, mb.data_ptr<float>(), cp + n0);
      for (int64_t j0 = 0; j0 < J; j0 += tile) {
        const int64_t w = std::min(tile, J - j0), c0 = j0 / DA, nc = w / DA;
        auto gt = g.narrow(1, 0, w);
        float* gp = g.data_ptr<float>();
        at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t c = 0; c < nc; ++c) {
              const float ev = ep[b * C + c0 + c];
              float* row = gp + b * tile + c * DA;
              const float* ar = ap + b * DA;
              for (int64_t d = 0; d < DA; ++d) row[d] = ev * ar[d];
            }
        });
        auto pt = p.narrow(0, 0, rows).narrow(1, 0, w);
        at::mm_out(pt, mb, gt);
        const float* pp = p.data_ptr<float>();
        at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r)
            sqp[n0 + r] += static_cast<float>(dot_lanes(pp + r * tile, pp + r * tile, w));
        });
      }
    }
  }
  return {sq, counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dynbatch native CPU kernels for EDBA subset selection";
  m.def("residuals", &residuals, "softmax residuals and per-sample last-layer gradient norms");
  m.def("subset_sq_sums", &subset_sq_sums, "squared norms of subset-sum last-layer gradients and subset sizes");
}
