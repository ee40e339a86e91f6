// CPU kernels of lipschitz_ratio and _lipschitz_ratio_backward (rows in parallel, lane-split row sums).
#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/lipschitz_checks.h"
#include "common/lipschitz_utils.h"
#include "cpu/avx2_lipschitz.h"
#include "cpu/cpu_isa.h"

namespace jit_unlearn {
namespace {

// Independent partial sums per row: they break the add-latency chain and let the compiler vectorise
// without reassociating (the summation order is fixed, whatever the instruction set, and the CUDA
// kernel's too: common/lipschitz_utils.h).
constexpr int64_t kLanes = kLipschitzLanes;
// Elements of work per parallel task, as at::internal::GRAIN_SIZE.
constexpr int64_t kGrainElements = 32768;
// Rows up to this many logits keep their gradient sums in registers (avx2::grad_row).
constexpr int64_t kRegisterRowMax = 16;

// Contiguous operands of one call.  Forward: ratio = f(out, out_perturbed, in_norm).  Backward:
// grad_out (and grad_perturbed unless null) = f(grad, out, out_perturbed, in_norm).
template <typename scalar_t, typename acc_t>
struct LipschitzArgs {
  const scalar_t* out = nullptr;            // [B, K]
  const scalar_t* out_perturbed = nullptr;  // [N, B, K]
  const acc_t* in_norm = nullptr;           // [N, B]
  const acc_t* grad = nullptr;              // [N, B]
  acc_t* ratio = nullptr;                   // [N, B]
  scalar_t* grad_out = nullptr;             // [B, K]
  scalar_t* grad_perturbed = nullptr;       // [N, B, K] or null
  int64_t N = 0, B = 0, K = 0;
};

// sum_k (a[k] - b[k])^2 in acc_t: element k into lane k % kLanes, then a pairwise tree over the lanes.
// The AVX2 and AVX-512 copies take the register form of cpu/avx2_lipschitz.h for float32 (bitwise the same).
template <CpuIsa kIsa, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE acc_t row_sq_distance(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t K) {
#ifdef JIT_UNLEARN_X86_ISA
  if constexpr (kIsa != CpuIsa::kBase && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    static_assert(kLanes == 8, "avx2::row_sq_distance sums into 8 lanes");
    return avx2::row_sq_distance(a, b, K);
  }
#endif
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] =
          lipschitz_sq_diff_accumulate<acc_t>(lanes[l], static_cast<acc_t>(a[k + l]), static_cast<acc_t>(b[k + l]));
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

// Forward rows [begin, end) of the flattened [N * B] output.  AVX2 and AVX-512 machines both run the
// AVX2 copy (kMaxIsa): the rows are too short for 16-lane vectors to pay.
template <typename scalar_t, typename acc_t>
struct ForwardRows {
  using Signature = void(const LipschitzArgs<scalar_t, acc_t>&, int64_t, int64_t);
  static constexpr CpuIsa kMaxIsa = CpuIsa::kAvx2;

  template <CpuIsa kIsa>
  static C10_ALWAYS_INLINE void run(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
    const int64_t B = a.B, K = a.K;
    // Row n * B + b pairs out_perturbed[n, b] with out[b]; b wraps instead of a division per row.
    for (int64_t row = begin, b = begin % B; row < end; ++row) {
      a.ratio[row] = row_sq_distance<kIsa, scalar_t, acc_t>(a.out + b * K, a.out_perturbed + row * K, K);
      if (++b == B) b = 0;
    }
    // A separate pass, so the sqrt and division latencies of consecutive rows overlap.
    for (int64_t row = begin; row < end; ++row) {
      a.ratio[row] = lipschitz_ratio_value<acc_t>(a.ratio[row], a.in_norm[row]);
    }
  }
};

// Backward for b in [begin, end): each b owns the row grad_out[b, :], summed over n in order.
// acc [K] and coefs [N] are the task's scratch.
template <typename scalar_t, typename acc_t>
struct BackwardRows {
  using Signature = void(const LipschitzArgs<scalar_t, acc_t>&, int64_t, int64_t, acc_t*, acc_t*);
  static constexpr CpuIsa kMaxIsa = CpuIsa::kAvx2;

  template <CpuIsa kIsa>
  static C10_ALWAYS_INLINE void run(const LipschitzArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end,
                                    acc_t* __restrict__ acc, acc_t* __restrict__ coefs) {
    const int64_t N = a.N, B = a.B, K = a.K;
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* __restrict__ ob = a.out + b * K;
      // All N coefficients of b first (their sqrt/division latencies overlap), then the sums over n;
      // the N rows out_perturbed[:, b] (N * K elements) stay in cache between the two passes.
      for (int64_t n = 0; n < N; ++n) {
        coefs[n] = row_sq_distance<kIsa, scalar_t, acc_t>(ob, a.out_perturbed + (n * B + b) * K, K);
      }
      if (a.ratio != nullptr) {  // the forward's ratios too (_lipschitz_ratio_and_grad)
        for (int64_t n = 0; n < N; ++n) {
          a.ratio[n * B + b] = lipschitz_ratio_value<acc_t>(coefs[n], a.in_norm[n * B + b]);
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        coefs[n] = lipschitz_backward_coef<acc_t>(a.grad[n * B + b], coefs[n], a.in_norm[n * B + b]);
      }
#ifdef JIT_UNLEARN_X86_ISA
      if constexpr (kIsa != CpuIsa::kBase && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
        // Wider rows, and the perturbed outputs' gradient (masked stores are slow), take the loop.
        if (K <= kRegisterRowMax && a.grad_perturbed == nullptr) {
          avx2::grad_row(ob, a.out_perturbed + b * K, B * K, N, K, coefs, a.grad_out + b * K);
          continue;
        }
      }
#endif
      std::fill(acc, acc + K, acc_t(0));
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* __restrict__ pr = a.out_perturbed + (n * B + b) * K;
        const acc_t coef = coefs[n];
        if (a.grad_perturbed != nullptr) {
          scalar_t* __restrict__ gr = a.grad_perturbed + (n * B + b) * K;
          for (int64_t k = 0; k < K; ++k) {
            const acc_t t = lipschitz_grad_term<acc_t>(static_cast<acc_t>(ob[k]), static_cast<acc_t>(pr[k]), coef);
            acc[k] += t;
            gr[k] = static_cast<scalar_t>(-t);
          }
        } else {
          for (int64_t k = 0; k < K; ++k) {
            acc[k] += lipschitz_grad_term<acc_t>(static_cast<acc_t>(ob[k]), static_cast<acc_t>(pr[k]), coef);
          }
        }
      }
      scalar_t* __restrict__ gob = a.grad_out + b * K;
      for (int64_t k = 0; k < K; ++k) gob[k] = static_cast<scalar_t>(acc[k]);
    }
  }
};

at::ScalarType opmath_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ratio [N, B] in opmath dtype = ||out_b - out_perturbed_nb||_2 / in_norm_nb (0 where in_norm_nb <= 0).
at::Tensor lipschitz_ratio_cpu(const at::Tensor& out, const at::Tensor& out_perturbed, const at::Tensor& in_norm) {
  check_lipschitz_args("lipschitz_ratio", out, out_perturbed, in_norm, at::kCPU);
  const int64_t N = out_perturbed.size(0), B = out.size(0), K = out.size(1);
  const auto acc_type = opmath_scalar_type(out.scalar_type());
  const at::Tensor o = contiguous_aligned(out);
  const at::Tensor p = contiguous_aligned(out_perturbed);
  const at::Tensor den = contiguous_aligned(in_norm.to(acc_type));
  at::Tensor ratio = at::empty({N, B}, out.options().dtype(acc_type));
  if (ratio.numel() == 0) return ratio;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lipschitz_ratio_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LipschitzArgs<scalar_t, acc_t> args{.out = o.const_data_ptr<scalar_t>(),
                                              .out_perturbed = p.const_data_ptr<scalar_t>(),
                                              .in_norm = den.const_data_ptr<acc_t>(),
                                              .ratio = ratio.mutable_data_ptr<acc_t>(),
                                              .N = N,
                                              .B = B,
                                              .K = K};
    const auto rows = isa_copy<ForwardRows<scalar_t, acc_t>>();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(K, 1));
    at::parallel_for(0, N * B, grain, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  });
  return ratio;
}

// The backward of both ops: (grad_out [B, K] in out.dtype, grad_out_perturbed [N, B, K] in
// out_perturbed.dtype or [0], ratio [N, B] in opmath when with_ratio, else undefined).  Parallel
// over b: each task owns whole rows of grad_out (and the ratios of its b) and walks n inside, so
// no reduction races.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const char* op, const at::Tensor& grad,
                                                            const at::Tensor& out, const at::Tensor& out_perturbed,
                                                            const at::Tensor& in_norm, bool compute_perturbed_grad,
                                                            bool with_ratio) {
  check_lipschitz_args(op, out, out_perturbed, in_norm, at::kCPU);
  check_lipschitz_grad(op, grad, out, out_perturbed);
  const int64_t N = out_perturbed.size(0), B = out.size(0), K = out.size(1);
  const auto acc_type = opmath_scalar_type(out.scalar_type());
  const at::Tensor o = contiguous_aligned(out);
  const at::Tensor p = contiguous_aligned(out_perturbed);
  const at::Tensor den = contiguous_aligned(in_norm.to(acc_type));
  const at::Tensor g = contiguous_aligned(grad.to(acc_type));
  at::Tensor grad_out = at::empty({B, K}, out.options());
  at::Tensor grad_pert =
      compute_perturbed_grad ? at::empty({N, B, K}, out_perturbed.options()) : at::empty({0}, out_perturbed.options());
  at::Tensor ratio = with_ratio ? at::empty({N, B}, out.options().dtype(acc_type)) : at::Tensor();
  if (B == 0 || (K == 0 && !with_ratio)) return {grad_out, grad_pert, ratio};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lipschitz_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LipschitzArgs<scalar_t, acc_t> args{
        .out = o.const_data_ptr<scalar_t>(),
        .out_perturbed = p.const_data_ptr<scalar_t>(),
        .in_norm = den.const_data_ptr<acc_t>(),
        .grad = g.const_data_ptr<acc_t>(),
        .ratio = with_ratio ? ratio.mutable_data_ptr<acc_t>() : nullptr,
        .grad_out = grad_out.mutable_data_ptr<scalar_t>(),
        .grad_perturbed = compute_perturbed_grad ? grad_pert.mutable_data_ptr<scalar_t>() : nullptr,
        .N = N,
        .B = B,
        .K = K};
    const auto rows = isa_copy<BackwardRows<scalar_t, acc_t>>();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(N * K, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(K), coefs(N);
      rows(args, begin, end, acc.data(), coefs.data());
    });
  });
  return {grad_out, grad_pert, ratio};
}

std::tuple<at::Tensor, at::Tensor> lipschitz_ratio_backward_cpu(const at::Tensor& grad, const at::Tensor& out,
                                                                const at::Tensor& out_perturbed,
                                                                const at::Tensor& in_norm,
                                                                bool compute_perturbed_grad) {
  auto [grad_out, grad_pert, unused] =
      backward_cpu("_lipschitz_ratio_backward", grad, out, out_perturbed, in_norm, compute_perturbed_grad, false);
  return {grad_out, grad_pert};
}

// (ratio [N, B] in opmath, grad_out [B, K] in out.dtype): lipschitz_ratio and the out-gradient of
// _lipschitz_ratio_backward, bitwise as those two ops give them, in one pass.
std::tuple<at::Tensor, at::Tensor> lipschitz_ratio_and_grad_cpu(const at::Tensor& grad, const at::Tensor& out,
                                                                const at::Tensor& out_perturbed,
                                                                const at::Tensor& in_norm) {
  auto [grad_out, unused, ratio] =
      backward_cpu("_lipschitz_ratio_and_grad", grad, out, out_perturbed, in_norm, false, true);
  return {ratio, grad_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_unlearn, CPU, m) {
  m.impl("lipschitz_ratio", &lipschitz_ratio_cpu);
  m.impl("_lipschitz_ratio_backward", &lipschitz_ratio_backward_cpu);
  m.impl("_lipschitz_ratio_and_grad", &lipschitz_ratio_and_grad_cpu);
}

}  // namespace jit_unlearn
