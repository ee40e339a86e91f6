// CPU kernels of lipschitz_ratio and _lipschitz_ratio_backward (rows in parallel, lane-split row sums).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/lipschitz_checks.h"
#include "common/lipschitz_utils.h"

namespace jit_unlearn {
namespace {

// Independent partial sums per row: they break the add-latency chain and let the compiler vectorise
// without reassociating (the summation order is fixed, whatever the instruction set).
constexpr int64_t kLanes = 8;
// Elements of work per parallel task, as at::internal::GRAIN_SIZE.
constexpr int64_t kGrainElements = 32768;

// sum_k (a[k] - b[k])^2 in acc_t.
template <typename scalar_t, typename acc_t>
acc_t row_sq_distance(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t K) {
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] = lipschitz_sq_diff_accumulate<acc_t>(lanes[l], static_cast<acc_t>(a[k + l]),
                                                     static_cast<acc_t>(b[k + l]));
    }
  }
  for (int64_t l = 0; k < K; ++k, ++l) {
    lanes[l] = lipschitz_sq_diff_accumulate<acc_t>(lanes[l], static_cast<acc_t>(a[k]), static_cast<acc_t>(b[k]));
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

at::ScalarType opmath_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

// ratio [N, B] in opmath dtype = ||out_b - out_perturbed_nb||_2 / in_norm_nb (0 where in_norm_nb <= 0).
at::Tensor lipschitz_ratio_cpu(const at::Tensor& out, const at::Tensor& out_perturbed, const at::Tensor& in_norm) {
  check_lipschitz_args("lipschitz_ratio", out, out_perturbed, in_norm);
  const int64_t N = out_perturbed.size(0), B = out.size(0), K = out.size(1);
  const auto acc_type = opmath_scalar_type(out.scalar_type());
  const at::Tensor o = out.contiguous();
  const at::Tensor p = out_perturbed.contiguous();
  const at::Tensor den = in_norm.to(acc_type).contiguous();
  at::Tensor ratio = at::empty({N, B}, out.options().dtype(acc_type));
  if (ratio.numel() == 0) return ratio;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lipschitz_ratio_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* o_ptr = o.const_data_ptr<scalar_t>();
    const scalar_t* p_ptr = p.const_data_ptr<scalar_t>();
    const acc_t* den_ptr = den.const_data_ptr<acc_t>();
    acc_t* r_ptr = ratio.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(K, 1));
    at::parallel_for(0, N * B, grain, [&](int64_t begin, int64_t end) {
      // Row n * B + b pairs out_perturbed[n, b] with out[b]; b wraps instead of a division per row.
      for (int64_t row = begin, b = begin % B; row < end; ++row) {
        r_ptr[row] = row_sq_distance<scalar_t, acc_t>(o_ptr + b * K, p_ptr + row * K, K);
        if (++b == B) b = 0;
      }
      // A separate pass, so the sqrt and division latencies of consecutive rows overlap.
      for (int64_t row = begin; row < end; ++row) r_ptr[row] = lipschitz_ratio_value<acc_t>(r_ptr[row], den_ptr[row]);
    });
  });
  return ratio;
}

// (grad_out [B, K] in out.dtype, grad_out_perturbed [N, B, K] in out_perturbed.dtype or [0]).
// Parallel over b: each task owns whole rows of grad_out and walks n inside, so no reduction races.
std::tuple<at::Tensor, at::Tensor> lipschitz_ratio_backward_cpu(const at::Tensor& grad, const at::Tensor& out,
                                                                const at::Tensor& out_perturbed,
                                                                const at::Tensor& in_norm,
                                                                bool compute_perturbed_grad) {
  check_lipschitz_args("_lipschitz_ratio_backward", out, out_perturbed, in_norm);
  check_lipschitz_grad("_lipschitz_ratio_backward", grad, out, out_perturbed);
  const int64_t N = out_perturbed.size(0), B = out.size(0), K = out.size(1);
  const auto acc_type = opmath_scalar_type(out.scalar_type());
  const at::Tensor o = out.contiguous();
  const at::Tensor p = out_perturbed.contiguous();
  const at::Tensor den = in_norm.to(acc_type).contiguous();
  const at::Tensor g = grad.to(acc_type).contiguous();
  at::Tensor grad_out = at::empty({B, K}, out.options());
  at::Tensor grad_pert = compute_perturbed_grad ? at::empty({N, B, K}, out_perturbed.options())
                                                : at::empty({0}, out_perturbed.options());
  if (grad_out.numel() == 0) return {grad_out, grad_pert};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lipschitz_ratio_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* o_ptr = o.const_data_ptr<scalar_t>();
    const scalar_t* p_ptr = p.const_data_ptr<scalar_t>();
    const acc_t* den_ptr = den.const_data_ptr<acc_t>();
    const acc_t* g_ptr = g.const_data_ptr<acc_t>();
    scalar_t* go_ptr = grad_out.mutable_data_ptr<scalar_t>();
    scalar_t* gp_ptr = compute_perturbed_grad ? grad_pert.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(N * K, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc_row(K), coef_col(N);
      acc_t* __restrict__ acc = acc_row.data();
      acc_t* __restrict__ coefs = coef_col.data();
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* __restrict__ ob = o_ptr + b * K;
        // All N coefficients of column b first (their sqrt/division latencies overlap), then the
        // sums over n; the N rows of the column (N * K elements) stay in cache between the passes.
        for (int64_t n = 0; n < N; ++n) coefs[n] = row_sq_distance<scalar_t, acc_t>(ob, p_ptr + (n * B + b) * K, K);
        for (int64_t n = 0; n < N; ++n) {
          coefs[n] = lipschitz_backward_coef<acc_t>(g_ptr[n * B + b], coefs[n], den_ptr[n * B + b]);
        }
        std::fill(acc_row.begin(), acc_row.end(), acc_t(0));
        for (int64_t n = 0; n < N; ++n) {
          const int64_t row = n * B + b;
          const scalar_t* __restrict__ pr = p_ptr + row * K;
          const acc_t coef = coefs[n];
          if (gp_ptr != nullptr) {
            scalar_t* __restrict__ gr = gp_ptr + row * K;
            for (int64_t k = 0; k < K; ++k) {
              const acc_t t =
                  lipschitz_grad_term<acc_t>(static_cast<acc_t>(ob[k]), static_cast<acc_t>(pr[k]), coef);
              acc[k] += t;
              gr[k] = static_cast<scalar_t>(-t);
            }
          } else {
            for (int64_t k = 0; k < K; ++k) {
              acc[k] += lipschitz_grad_term<acc_t>(static_cast<acc_t>(ob[k]), static_cast<acc_t>(pr[k]), coef);
            }
          }
        }
        scalar_t* __restrict__ gob = go_ptr + b * K;
        for (int64_t k = 0; k < K; ++k) gob[k] = static_cast<scalar_t>(acc[k]);
      }
    });
  });
  return {grad_out, grad_pert};
}

TORCH_LIBRARY_IMPL(jit_unlearn, CPU, m) {
  m.impl("lipschitz_ratio", &lipschitz_ratio_cpu);
  m.impl("_lipschitz_ratio_backward", &lipschitz_ratio_backward_cpu);
}

}  // namespace jit_unlearn
