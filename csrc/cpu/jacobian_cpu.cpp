// CPU implementation of molrg::dae_jacobian_spectrum and molrg::sym_eig. Math in
// kernels/jacobian.h and kernels/sym_eig.h; this file validates, allocates per-thread scratch and
// parallelises over samples.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "../jacobian_checks.h"
#include "../kernels/jacobian.h"
#include "flush_subnormals.h"

namespace molrg {
namespace {

using namespace molrg::kernels;

constexpr const char* kSpec = "dae_jacobian_spectrum";
constexpr const char* kEig = "sym_eig";

std::tuple<at::Tensor, at::Tensor> dae_jacobian_spectrum_cpu(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& R, const at::Tensor& c,
    const at::Tensor& phi, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& assign, at::IntArrayRef dims, int64_t mode, bool vectors) {
  const JacobianSizes js =
      check_jacobian_inputs(x, U, R, c, phi, bias, assign, dims, mode, kSpec);
  const DaeSizes& s = js.s;
  const int64_t D = js.st.D, r = js.st.r;
  const std::vector<int32_t>& offs = js.st.offs;

  auto svals = at::empty({s.P, s.B, r}, x.options());
  auto vecs = vectors ? at::empty({s.P, s.B, r, r}, x.options()) : at::empty({0}, x.options());
  const int64_t total = s.P * s.B;
  if (total == 0) return {svals, vecs};

  const at::Tensor S = stacked_gram_blocks(R, s, js.st);  // [P, K, r, r]

  std::atomic<bool> failed{false};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dae_jacobian_spectrum_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* Up = U.data_ptr<scalar_t>();
    const scalar_t* Rp = R.data_ptr<scalar_t>();
    const scalar_t* Sp = S.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* php = phi.data_ptr<scalar_t>();
    const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
    const int64_t* ap = assign ? assign->data_ptr<int64_t>() : nullptr;
    scalar_t* sp = svals.data_ptr<scalar_t>();
    scalar_t* vp = vectors ? vecs.data_ptr<scalar_t>() : nullptr;
    const int K = (int)s.K, n = (int)s.n, dm = (int)s.dm, ri = (int)r, Di = (int)D;
    const int32_t* dp = s.dims.data();
    const int32_t* op = offs.data();
    const int64_t work = dae_jacobian_work(K, dm, ri, vectors);
    // One sample costs ~ n D + K r^2 + r^3: a small grain keeps both cores busy.
    const int64_t per = std::max<int64_t>(1, n * D + r * r * r);
    const int64_t grain = std::max<int64_t>(1, 262144 / per);
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      const cpu::FlushSubnormals ftz;  // far components' soft-max weights (flush_subnormals.h)
      std::vector<scalar_t> buf(work);
      std::vector<int32_t> order(ri);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t p = idx / s.B;
        const int k0 = ap ? (int)ap[idx] : -1;
        const bool ok = dae_jacobian_sample<scalar_t>(
            xp + idx * n, Up + p * K * n * dm, Rp + p * ri * Di, Sp + p * K * ri * ri, K, n, dm,
            ri, Di, dp, op, cp[idx], php[idx], bp ? bp + idx * K : nullptr, (int)mode, k0,
            sp + idx * ri, vp ? vp + idx * ri * ri : nullptr, buf.data(), order.data());
        if (!ok) failed.store(true, std::memory_order_relaxed);
      }
    });
  });
  TORCH_CHECK(!failed.load(), kSpec,
              ": the symmetric eigensolver did not converge for some sample (extreme values?)");
  return {svals, vecs};
}

std::tuple<at::Tensor, at::Tensor> sym_eig_cpu(const at::Tensor& A, bool vectors) {
  check_float(A, kEig, "A");
  SymEigSetup e = prepare_sym_eig(A, vectors, kEig);
  const int64_t n = e.n, total = e.total;
  auto& evals = e.evals;
  auto& evecs = e.evecs;
  if (!e.Ac.defined()) return {evals, evecs};
  auto& Ac = e.Ac;

  std::atomic<bool> failed{false};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "sym_eig_cpu", [&] {
    scalar_t* Ap = Ac.data_ptr<scalar_t>();
    scalar_t* ep = evals.data_ptr<scalar_t>();
    scalar_t* vp = vectors ? evecs.data_ptr<scalar_t>() : nullptr;
    const int ni = (int)n;
    const int64_t nn = n * n;
    const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(1, nn * n));
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> lam(n), e(n), tmp(n), Vt(vectors ? nn : 0), neg(n);
      std::vector<int32_t> order(n);
      for (int64_t idx = begin; idx < end; ++idx) {
        const bool ok = sym_eig_unsorted<scalar_t>(Ap + idx * nn, ni, lam.data(),
                                                   vectors ? Vt.data() : nullptr, e.data(),
                                                   tmp.data());
        if (!ok) failed.store(true, std::memory_order_relaxed);
        for (int i = 0; i < ni; ++i) neg[i] = -lam[i];
        argsort_desc(neg.data(), ni, order.data());  // ascending eigenvalues
        for (int i = 0; i < ni; ++i) ep[idx * n + i] = lam[order[i]];
        if (vp) {
          for (int i = 0; i < ni; ++i) {
            const scalar_t* v = Vt.data() + (int64_t)order[i] * n;
            for (int j = 0; j < ni; ++j) vp[idx * nn + (int64_t)j * n + i] = v[j];
          }
        }
      }
    });
  });
  TORCH_CHECK(!failed.load(), kEig, ": the QR iteration did not converge for some matrix");
  return {evals, evecs};
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, CPU, m) {
  m.impl("dae_jacobian_spectrum", &dae_jacobian_spectrum_cpu);
  m.impl("sym_eig", &sym_eig_cpu);
}

}  // namespace molrg
