// The ops that take activations run in float32 under torch.autocast (molrg_ext/_autocast.py says
// why): on the AutocastCPU and AutocastCUDA keys, one boxed kernel casts every floating tensor
// argument on the autocast device to float32 (at::autocast::cached_cast: float64 and other
// devices are left alone, as torch's own float32-policy ops do) and calls the op again below
// autocast. In C++ rather than with torch.library.register_autocast, whose Python kernel added
// about 20 us to every call made under autocast.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace molrg {
namespace {

constexpr const char* kOps[] = {"subspace_dae", "hard_assign", "optimal_denoiser",
                                "dae_jacobian_spectrum"};

// Handles Tensor and Tensor? arguments (replaced on the stack by their casts): an op with a
// Tensor[] argument or one written in place needs more here (python_tests/test_autocast.py
// checks the four schemas).
template <c10::DeviceType D>
void float32_below_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet,
                            torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(D));
  const size_t n = op.schema().arguments().size();
  for (size_t i = stack->size() - n; i < stack->size(); ++i) {
    c10::IValue& v = (*stack)[i];
    if (v.isTensor()) v = at::autocast::cached_cast(at::kFloat, v.toTensor(), D);
  }
  op.callBoxed(stack);
}

template <c10::DeviceType D>
void register_float32(torch::Library& m) {
  for (const char* name : kOps)
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&float32_below_autocast<D>>());
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, AutocastCPU, m) { register_float32<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(molrg, AutocastCUDA, m) { register_float32<c10::DeviceType::CUDA>(m); }

}  // namespace molrg
