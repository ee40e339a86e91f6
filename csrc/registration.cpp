// Every schema of the jit_unlearn operator library, in one TORCH_LIBRARY block.
// Device kernels register themselves in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(jit_unlearn, m) {
  // x_tilde [N, *x.shape] and in_norm [N, B] = ||x_i - x_tilde_ni||_2 over each flattened sample.
  // Noise is Philox4x32-10 + Box-Muller (csrc/common/rng_utils.h); clamp uses the whole-batch range.
  m.def("perturb(Tensor x, int num_samples, float sigma, int seed, int offset, bool clamp) -> (Tensor, Tensor)");
  // The same into the caller's contiguous x_tilde [N, *x.shape] and in_norm [N, B] (a loop reuses them).
  m.def(
      "_perturb_out(Tensor x, int num_samples, float sigma, int seed, int offset, bool clamp, Tensor(a!) x_tilde, "
      "Tensor(b!) in_norm) -> ()");
  // ratios [N, B] = ||out_b - out_perturbed_nb||_2 / in_norm_nb (0 where in_norm_nb == 0).
  m.def("lipschitz_ratio(Tensor out, Tensor out_perturbed, Tensor in_norm) -> Tensor");
  // Gradients w.r.t. out [B, K] and out_perturbed [N, B, K]; the second is empty ([0]) unless requested.
  m.def(
      "_lipschitz_ratio_backward(Tensor grad, Tensor out, Tensor out_perturbed, Tensor in_norm, "
      "bool compute_perturbed_grad) -> (Tensor, Tensor)");
  // Both at once, for callers that hold out_perturbed constant (JiT): the ratios [N, B] and the
  // gradient w.r.t. out [B, K] of sum(grad * ratio), in one pass over out_perturbed.
  m.def("_lipschitz_ratio_and_grad(Tensor grad, Tensor out, Tensor out_perturbed, Tensor in_norm) -> (Tensor, Tensor)");
  // acc[i] += scale * g[i]^2 ("square") or scale * |g[i]| ("abs").  The argument is not called `mode`:
  // torch.compile's auto-functionalization passes op arguments as keywords, and `mode` collides there.
  m.def("accumulate_importance_(Tensor(a!)[] acc, Tensor[] grads, str importance_mode, float scale) -> ()");
  // SSD dampening (docs/METHODS.md §2); returns the selected-element count per tensor (int64 [T]).
  m.def(
      "ssd_dampen_(Tensor(a!)[] params, Tensor[] imp_forget, Tensor[] imp_full, float alpha, float lam, "
      "float exponent) -> Tensor");
  // params[i] = masks[i] ? init[i] : params[i].
  m.def("masked_reset_(Tensor(a!)[] params, Tensor[] init, Tensor[] masks) -> ()");
}

// Importing jit_unlearn._C from Python loads this library and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
