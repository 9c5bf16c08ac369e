// Autograd of molrg::subspace_dae, registered at the Autograd key (every device). y is
// differentiable w.r.t. x, U, c, phi and bias. proj and w are saved for the backward and are
// not differentiable. The backward is molrg::subspace_dae_backward; it computes dx and dU only
// when they are needed.
//
// Written in C++ rather than with torch.library.register_autograd. The Python form ran the same
// two ops, but torch's Python autograd.Function machinery (argument defaults filled from the
// schema, redispatch, the Python backward) added about 55 us to a forward + backward. At
// (48, 2, 6) with B = 16 the step took 115 us, and the two ops alone 33 us.
// torch.compile and opcheck trace this kernel as they trace a Python one: the forward
// redispatches below autograd (to the fake kernel under tracing) and the backward calls the
// backward op through the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "op_name.h"

namespace molrg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(MOLRG_OP_NAME("subspace_dae"), "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const OptTensor&,
                                                    const OptTensor&, c10::IntArrayRef, int64_t)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(MOLRG_OP_NAME("subspace_dae_backward"), "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const Tensor&, const Tensor&, c10::IntArrayRef, int64_t, bool, bool)>();
  return op;
}

struct SubspaceDae : public torch::autograd::Function<SubspaceDae> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& U,
                               const Tensor& c, const Tensor& phi, const OptTensor& bias,
                               const OptTensor& assign, c10::IntArrayRef dims, int64_t mode) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, proj, w] = forward_op().call(x, U, c, phi, bias, assign, dims, mode);
    ctx->save_for_backward({x, U, c, phi, proj, w});
    ctx->saved_data["dims"] = dims.vec();
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({proj, w});
    // proj's and w's gradients reach the backward undefined, not as zero tensors of their
    // shapes allocated and filled per call (5-7% of a fwd+bwd at (48, 2, 6, 65536))
    ctx->set_materialize_grads(false);
    return {y, proj, w};
  }

  // One gradient per forward argument (x, U, c, phi, bias, assign, dims, mode); undefined where
  // none is needed.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    const Tensor& gy = grads[0];
    if (!gy.defined()) return out;
    // needs_input_grad counts the tensors given: x, U, c, phi, then bias if there is one
    const bool need_dx = ctx->needs_input_grad(0), need_dU = ctx->needs_input_grad(1);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const variable_list s = ctx->get_saved_variables();
    const std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    auto [dx, dU, dc, dphi, dbias] =
        backward_op().call(gy.contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], dims,
                           ctx->saved_data["mode"].toInt(), need_dx, need_dU);
    if (need_dx) out[0] = dx;
    if (need_dU) out[1] = dU;
    if (ctx->needs_input_grad(2)) out[2] = dc;
    if (ctx->needs_input_grad(3)) out[3] = dphi;
    if (has_bias && ctx->needs_input_grad(4)) out[4] = dbias;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> subspace_dae_autograd(const Tensor& x, const Tensor& U,
                                                         const Tensor& c, const Tensor& phi,
                                                         const OptTensor& bias,
                                                         const OptTensor& assign,
                                                         c10::IntArrayRef dims, int64_t mode) {
  // SubspaceDae has no forward-mode formula: a tangent on an input was dropped (jvp gave 0).
  const auto tangent = [](const Tensor& t) { return t.defined() && t._fw_grad(0).defined(); };
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(tangent(x) || tangent(U) || tangent(c) || tangent(phi) || (bias && tangent(*bias))),
      "subspace_dae: forward-mode AD (torch.func.jvp, jacfwd, forward_ad dual tensors) is not "
      "implemented by the kernel op; outside torch.compile, molrg_ext.subspace_dae runs the "
      "pure-PyTorch reference (molrg_ext.reference.subspace_dae) for it");
  const bool any_grad = x.requires_grad() || U.requires_grad() || c.requires_grad() ||
                        phi.requires_grad() || (bias && bias->requires_grad());
  if (!any_grad || !at::GradMode::is_enabled()) {  // no graph to record: the kernel alone
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(x, U, c, phi, bias, assign, dims, mode);
  }
  variable_list out = SubspaceDae::apply(x, U, c, phi, bias, assign, dims, mode);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, Autograd, m) { m.impl("subspace_dae", &subspace_dae_autograd); }

}  // namespace molrg
