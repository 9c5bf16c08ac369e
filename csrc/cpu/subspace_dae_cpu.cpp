// CPU implementation of molrg::subspace_dae, subspace_dae_backward and hard_assign.
// Small bases (one instance's U up to 64 KiB, e.g. n = 48): the sample-blocked kernels of
// cpu/dae_blocks.h, which pack U once per call into panels and run blocks of samples through
// register-tiled products (tiles.h), the soft-max math per sample from kernels/. Blocks are split
// with at::parallel_for; backward keeps one gradient accumulator per thread (or per instance when
// there are enough instances) and reduces once. Large bases: batched GEMMs (at::bmm) with the
// per-sample math in between.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "dae_panels_at.h"
#include "huge_pages.h"

namespace molrg {
namespace {

using namespace molrg::kernels;

constexpr const char* kFwd = "subspace_dae";
constexpr const char* kBwd = "subspace_dae_backward";

// Large panels (U of one instance beyond ~64 KiB, e.g. n = 3072, K d = 400) do not stay in cache
// while samples stream past, so the per-sample kernels would re-read U from memory for every
// sample. There the projections, reconstructions and gradient contractions run as batched GEMMs
// over all samples (at::bmm), and only the O(B K dm) per-sample soft-max math is hand-written.
// That math runs under FTZ/DAZ (cpu/flush_subnormals.h), so the coefficient and gradient rows it
// hands to the GEMMs hold no subnormal: with 0.45% of them subnormal (far components' weights) in
// the n = 3072 benchmark problem, one MKL GEMM over them ran 13x slower (41 -> 534 ms).
bool use_gemm(const DaeSizes& s, const at::Tensor& x) {
  return s.n * s.K * s.dm * (int64_t)x.element_size() > 64 * 1024;
}

// An uninitialised output like t ([P, B, n] y or dx), asking for huge pages before its first touch
// (cpu::advise_huge_pages).
at::Tensor empty_output(at::IntArrayRef sizes, const at::Tensor& like) {
  auto out = at::empty(sizes, like.options());
  cpu::advise_huge_pages(out.data_ptr(), (std::size_t)out.nbytes());
  return out;
}

// Ubar [P, n, K*dm] = [U_1 ... U_K] with the padded columns zeroed.
at::Tensor stacked_bases(const at::Tensor& U, const DaeSizes& s) {
  std::vector<int64_t> d(s.dims.begin(), s.dims.end());
  auto dk = at::tensor(d, at::TensorOptions().dtype(at::kLong)).view({s.K, 1, 1});
  auto mask = (at::arange(s.dm, at::TensorOptions().dtype(at::kLong)).view({1, 1, s.dm}) < dk)
                  .to(U.scalar_type());
  return (U * mask).permute({0, 2, 1, 3}).reshape({s.P, s.n, s.K * s.dm});
}

// Hard mode on the GEMM path: each sample uses one component, so after the projection onto all
// K bases (needed for the assignment) the reconstruction and the whole backward run per
// (instance, component) group of samples against U_k [n, d_k] alone: 2 n K d + 10 n d flops per
// sample instead of 10 n K d. Each group costs a handful of ATen calls (~0.1 ms), so groups are
// used only when the samples carry enough work: B n dmax >= 2^21 (e.g. n = 3072, d = 40, B >= 18).
bool use_hard_groups(const DaeSizes& s, int64_t mode) {
  return mode == kHard && s.B * s.n * s.dm >= (int64_t(1) << 21);
}

// Calls f(p, k, idx) for every non-empty group: idx (int64) = the rows of instance p whose
// component comp [P, B] is k.
template <typename F>
void for_each_group(const at::Tensor& comp, const DaeSizes& s, F&& f) {
  for (int64_t p = 0; p < s.P; ++p) {
    auto order = std::get<1>(comp[p].sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
    auto counts = at::bincount(comp[p], {}, s.K);
    const int64_t* cp = counts.data_ptr<int64_t>();
    int64_t start = 0;
    for (int64_t k = 0; k < s.K; ++k) {
      if (cp[k] > 0) f(p, k, order.narrow(0, start, cp[k]));
      start += cp[k];
    }
  }
}

// y of every sample from its own component: y_t = c_t U_k P_{t,k} (k = comp[p, t]).
at::Tensor hard_reconstruct_groups(const at::Tensor& U, const at::Tensor& c,
                                   const at::Tensor& projf, const at::Tensor& comp,
                                   const DaeSizes& s) {
  auto y = empty_output({s.P, s.B, s.n}, projf);
  for_each_group(comp, s, [&](int64_t p, int64_t k, const at::Tensor& idx) {
    const int64_t dk = s.dims[k];
    auto Pk = projf[p].narrow(1, k * s.dm, dk).index_select(0, idx);  // [m, d_k]
    auto coef = Pk * c[p].index_select(0, idx).unsqueeze(1);
    y[p].index_copy_(0, idx, at::mm(coef, U[p][k].narrow(1, 0, dk).t()));
  });
  return y;
}

// Backward of the hard mode by (instance, component) groups (the kernels::dae_dP_from_r hard
// formulas): r = U_k^T g, dP_k = c r, dc = <r, P_k>, dx = U_k dP_k,
// dU_k = sum over the group of x dP_k^T + g (c P_k)^T; dphi = dbias = 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hard_backward_groups(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& U, const at::Tensor& c,
    const at::Tensor& proj, const at::Tensor& w, const DaeSizes& s, bool need_dx, bool need_dU) {
  auto dx = need_dx ? empty_output(x.sizes(), x) : at::empty({0}, x.options());
  auto dU = need_dU ? at::zeros_like(U) : at::empty({0}, x.options());
  auto dc = at::empty({s.P, s.B}, x.options());
  auto dphi = at::zeros({s.P, s.B}, x.options());
  auto dbias = at::zeros({s.P, s.B, s.K}, x.options());
  auto comp = w.argmax(-1);  // w is one-hot
  for_each_group(comp, s, [&](int64_t p, int64_t k, const at::Tensor& idx) {
    const int64_t dk = s.dims[k];
    auto Uk = U[p][k].narrow(1, 0, dk);                                    // [n, d_k]
    auto g = grad_y[p].index_select(0, idx);                               // [m, n]
    auto Pk = proj[p].select(1, k).narrow(1, 0, dk).index_select(0, idx);  // [m, d_k]
    auto ck = c[p].index_select(0, idx).unsqueeze(1);
    auto r = at::mm(g, Uk);
    dc[p].index_copy_(0, idx, (r * Pk).sum(1));
    auto dP = r * ck;
    if (need_dx) dx[p].index_copy_(0, idx, at::mm(dP, Uk.t()));
    if (need_dU) {
      auto dUk = at::mm(x[p].index_select(0, idx).t(), dP);
      dUk.addmm_(g.t(), Pk * ck);
      dU[p][k].narrow(1, 0, dk).copy_(dUk);
    }
  });
  return {dx, dU, dc, dphi, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_gemm(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& c, const at::Tensor& phi,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& assign,
    const DaeSizes& s, int64_t mode) {
  auto Ub = stacked_bases(U, s);
  auto projf = at::bmm(x, Ub);  // [P, B, K*dm], padded columns exactly 0
  auto w = at::empty({s.P, s.B, s.K}, x.options());
  const bool groups = use_hard_groups(s, mode);
  auto coef = groups ? at::Tensor() : at::empty_like(projf);
  auto comp = groups ? at::empty({s.P, s.B}, x.options().dtype(at::kLong)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "subspace_dae_cpu_gemm", [&] {
    const scalar_t* pp = projf.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* php = phi.data_ptr<scalar_t>();
    const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
    const int64_t* ap = assign ? assign->data_ptr<int64_t>() : nullptr;
    scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* cf = groups ? nullptr : coef.data_ptr<scalar_t>();
    int64_t* kp = groups ? comp.data_ptr<int64_t>() : nullptr;
    const int K = (int)s.K, dm = (int)s.dm;
    parallel_for_flushed(0, s.P * s.B, 1024, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> sq(K);
      for (int64_t idx = begin; idx < end; ++idx) {
        const scalar_t* pk = pp + idx * K * dm;
        for (int k = 0; k < K; ++k) {
          scalar_t acc = 0;
          for (int j = 0; j < s.dims[k]; ++j) acc += pk[k * dm + j] * pk[k * dm + j];
          sq[k] = acc;
        }
        int k0 = ap ? (int)ap[idx] : -1;
        if (mode == kHard && k0 < 0) k0 = dae_argmax(sq.data(), K);
        dae_weights<scalar_t>(sq.data(), bp ? bp + idx * K : nullptr, php[idx], K, (int)mode,
                              k0, wp + idx * K);
        if (kp) {
          kp[idx] = k0;
          continue;
        }
        for (int k = 0; k < K; ++k) {
          const scalar_t a = cp[idx] * wp[idx * K + k];
          for (int j = 0; j < dm; ++j) cf[idx * K * dm + k * dm + j] = a * pk[k * dm + j];
        }
      }
    });
  });
  at::Tensor y;
  if (groups) {
    y = hard_reconstruct_groups(U, c, projf, comp, s);
  } else {
    y = empty_output(x.sizes(), x);
    at::bmm_out(y, coef, Ub.transpose(1, 2));
  }
  return {y, projf.view({s.P, s.B, s.K, s.dm}), w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_gemm(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& U, const at::Tensor& c,
    const at::Tensor& phi, const at::Tensor& proj, const at::Tensor& w, const DaeSizes& s,
    int64_t mode, bool need_dx, bool need_dU) {
  if (use_hard_groups(s, mode))
    return hard_backward_groups(grad_y, x, U, c, proj, w, s, need_dx, need_dU);
  auto Ub = stacked_bases(U, s);
  auto r = at::bmm(grad_y, Ub);  // [P, B, K*dm]
  auto dP = r;                   // overwritten in place: r is not needed after dP
  auto A = need_dU ? at::empty_like(r) : at::Tensor();
  auto dc = at::empty({s.P, s.B}, x.options());
  auto dphi = at::empty({s.P, s.B}, x.options());
  auto dbias = at::empty({s.P, s.B, s.K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "subspace_dae_backward_cpu_gemm", [&] {
    const scalar_t* pp = proj.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* php = phi.data_ptr<scalar_t>();
    scalar_t* dPp = dP.data_ptr<scalar_t>();
    scalar_t* Ap = need_dU ? A.data_ptr<scalar_t>() : nullptr;
    scalar_t* dcp = dc.data_ptr<scalar_t>();
    scalar_t* dphip = dphi.data_ptr<scalar_t>();
    scalar_t* dbp = dbias.data_ptr<scalar_t>();
    const int K = (int)s.K, dm = (int)s.dm;
    const int32_t* dp = s.dims.data();
    parallel_for_flushed(0, s.P * s.B, 1024, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> rpk(K);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t o = idx * K * dm;
        dae_dP_from_r<scalar_t>(dPp + o, pp + o, wp + idx * K, cp[idx], php[idx], K, dm, dp,
                                (int)mode, dPp + o, dbp + idx * K, rpk.data(), dcp + idx,
                                dphip + idx);
        if (Ap)
          for (int k = 0; k < K; ++k) {
            const scalar_t a = cp[idx] * wp[idx * K + k];
            for (int j = 0; j < dm; ++j) Ap[o + k * dm + j] = a * pp[o + k * dm + j];
          }
      }
    });
  });
  auto dx = need_dx ? empty_output(x.sizes(), x) : at::empty({0}, x.options());
  if (need_dx) at::bmm_out(dx, dP, Ub.transpose(1, 2));
  at::Tensor dU = at::empty({0}, x.options());
  if (need_dU) {
    auto dUb = at::bmm(x.transpose(1, 2), dP);  // [P, n, K*dm]
    dUb.baddbmm_(grad_y.transpose(1, 2), A);
    dU = dUb.view({s.P, s.n, s.K, s.dm}).permute({0, 2, 1, 3}).contiguous();
  }
  return {dx, dU, dc, dphi, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> subspace_dae_cpu(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& c, const at::Tensor& phi,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& assign,
    at::IntArrayRef dims, int64_t mode) {
  check_dae_mode(mode, kFwd);
  DaeSizes s = check_dae_xU(x, U, dims, kFwd);
  check_dae_scales(c, phi, s, x, kFwd);
  check_finite(U, kFwd, "U");  // small; NaN/Inf in x stay in their own samples' outputs
  check_finite(c, kFwd, "c");
  check_finite(phi, kFwd, "phi");
  if (bias) check_dae_bias(*bias, s, x, kFwd);
  if (assign) check_dae_assign(*assign, mode, s, x, kFwd);

  if (s.P * s.B > 0 && use_gemm(s, x)) return forward_gemm(x, U, c, phi, bias, assign, s, mode);
  auto y = empty_output(x.sizes(), x);
  auto proj = at::empty({s.P, s.B, s.K, s.dm}, x.options());
  auto w = at::empty({s.P, s.B, s.K}, x.options());
  if (s.P * s.B == 0) return {y, proj, w};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "subspace_dae_cpu", [&] {
    const cpu::PanelGeom g = cpu::panel_geom<scalar_t>((int)s.n, (int)s.K, (int)s.dm);
    auto pan = pack_panels<scalar_t>(U, g, s);
    const scalar_t* panp = pan.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* php = phi.data_ptr<scalar_t>();
    const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
    const int64_t* ap = assign ? assign->data_ptr<int64_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* pp = proj.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    const bool stream_y = cpu::stream_rows(yp, s.n, y.numel() * (int64_t)sizeof(scalar_t));
    parallel_blocks<scalar_t>(g, s.P, s.B, false, [&](int64_t p, int64_t start, int S, auto& sc,
                                                      int64_t) {
      const int64_t i0 = p * s.B + start;
      cpu::RangePrefetch ahead;
      cpu::add_next_block(ahead, xp + i0 * s.n, start, S, s.B, s.n);
      sc.with_ahead(ahead, [&](cpu::RangePrefetch* pf) {
        cpu::dae_forward_block<scalar_t>(
            xp + i0 * s.n, S, {panp + p * g.size(), g}, s.dims.data(), cp + i0, php + i0,
            bp ? bp + i0 * s.K : nullptr, ap ? ap + i0 : nullptr, (int)mode,
            pp + i0 * s.K * s.dm, wp + i0 * s.K, yp + i0 * s.n, sc, stream_y, pf);
      });
      if (stream_y) cpu::stream_fence();
    });
  });
  return {y, proj, w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> subspace_dae_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& U, const at::Tensor& c,
    const at::Tensor& phi, const at::Tensor& proj, const at::Tensor& w, at::IntArrayRef dims,
    int64_t mode, bool need_dx, bool need_dU) {
  check_dae_mode(mode, kBwd);
  DaeSizes s = check_dae_xU(x, U, dims, kBwd);
  check_dae_scales(c, phi, s, x, kBwd);
  check_like(grad_y, x, kBwd, "grad_y", "x");
  check_shape(grad_y, x.sizes(), kBwd, "grad_y");
  check_contig(grad_y, kBwd, "grad_y");
  check_like(proj, x, kBwd, "proj", "x");
  check_shape(proj, {s.P, s.B, s.K, s.dm}, kBwd, "proj");
  check_contig(proj, kBwd, "proj");
  check_like(w, x, kBwd, "w", "x");
  check_shape(w, {s.P, s.B, s.K}, kBwd, "w");
  check_contig(w, kBwd, "w");

  if (s.P * s.B > 0 && use_gemm(s, x))
    return backward_gemm(grad_y, x, U, c, phi, proj, w, s, mode, need_dx, need_dU);
  auto dx = need_dx ? empty_output(x.sizes(), x) : at::empty({0}, x.options());
  auto dU = need_dU ? at::empty_like(U) : at::empty({0}, x.options());
  auto dc = at::empty({s.P, s.B}, x.options());
  auto dphi = at::empty({s.P, s.B}, x.options());
  auto dbias = at::empty({s.P, s.B, s.K}, x.options());
  if (s.P * s.B == 0) {
    if (need_dU) dU.zero_();
    return {dx, dU, dc, dphi, dbias};
  }

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "subspace_dae_backward_cpu", [&] {
    const cpu::PanelGeom g = cpu::panel_geom<scalar_t>((int)s.n, (int)s.K, (int)s.dm);
    auto pan = pack_panels<scalar_t>(U, g, s);
    std::optional<GradAccumulators<scalar_t>> acc;
    if (need_dU) acc.emplace(g, s.P, s.B, x.options());
    const scalar_t* panp = pan.data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* php = phi.data_ptr<scalar_t>();
    const scalar_t* pp = proj.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t* dcp = dc.data_ptr<scalar_t>();
    scalar_t* dphip = dphi.data_ptr<scalar_t>();
    scalar_t* dbp = dbias.data_ptr<scalar_t>();
    const int64_t K = s.K, n = s.n, D = s.K * s.dm;
    const bool by_instance = acc && acc->by_instance;
    const bool stream_dx = dxp && cpu::stream_rows(dxp, n, dx.numel() * (int64_t)sizeof(scalar_t));
    parallel_blocks<scalar_t>(g, s.P, s.B, by_instance, [&](int64_t p, int64_t start, int S,
                                                             auto& sc, int64_t slot) {
      const int64_t i0 = p * s.B + start;
      cpu::RangePrefetch ahead;
      cpu::add_next_block(ahead, gp + i0 * n, start, S, s.B, n);
      if (acc) cpu::add_next_block(ahead, xp + i0 * n, start, S, s.B, n);
      sc.with_ahead(ahead, [&](cpu::RangePrefetch* pf) {
        cpu::dae_backward_block<scalar_t>(
            gp + i0 * n, xp + i0 * n, S, {panp + p * g.size(), g}, s.dims.data(), cp + i0,
            php + i0, pp + i0 * D, wp + i0 * K, (int)mode, dxp ? dxp + i0 * n : nullptr,
            dcp + i0, dphip + i0, dbp + i0 * K, acc ? acc->of(slot) : nullptr, sc, stream_dx, pf);
      });
      if (stream_dx) cpu::stream_fence();
    });
    if (acc) acc->unpack(g, s, dU);
  });
  return {dx, dU, dc, dphi, dbias};
}

at::Tensor hard_assign_cpu(const at::Tensor& x, const at::Tensor& U, at::IntArrayRef dims) {
  DaeSizes s = check_dae_xU(x, U, dims, "hard_assign", "x0");
  // An argmax of NaN energies would be a silent label; the scans also give the range shifts
  // (checks.h): far from unit scale, float32 energies overflow or flush to zero and tie at k = 0.
  const auto [xs, us] = assign_shifts(check_finite_absmax(x, "hard_assign", "x0"),
                                       check_finite_absmax(U, "hard_assign", "U"), dtype_emax(x));
  if (xs != 0 || us != 0)  // argmax_k ||U_k^T x|| does not change with either scale
    return hard_assign_cpu(times_pow2(x, -xs), times_pow2(U, -us), dims);
  auto out = at::empty({s.P, s.B}, x.options().dtype(at::kLong));
  const int64_t total = s.P * s.B;
  if (total == 0) return out;
  if (use_gemm(s, x)) {
    auto sq = at::bmm(x, stacked_bases(U, s)).view({s.P, s.B, s.K, s.dm}).square().sum(-1);
    return sq.argmax(-1);  // first maximum: ties go to the lowest k
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hard_assign_cpu", [&] {
    const cpu::PanelGeom g = cpu::panel_geom<scalar_t>((int)s.n, (int)s.K, (int)s.dm);
    auto pan = pack_panels<scalar_t>(U, g, s);
    const scalar_t* panp = pan.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int64_t* op = out.data_ptr<int64_t>();
    parallel_blocks<scalar_t>(g, s.P, s.B, false, [&](int64_t p, int64_t start, int S, auto& sc,
                                                      int64_t) {
      const int64_t i0 = p * s.B + start;
      cpu::RangePrefetch ahead;
      cpu::add_next_block(ahead, xp + i0 * s.n, start, S, s.B, s.n);
      sc.with_ahead(ahead, [&](cpu::RangePrefetch* pf) {
        cpu::assign_block<scalar_t>(xp + i0 * s.n, S, {panp + p * g.size(), g}, op + i0, sc, pf);
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, CPU, m) {
  m.impl("subspace_dae", &subspace_dae_cpu);
  m.impl("subspace_dae_backward", &subspace_dae_backward_cpu);
  m.impl("hard_assign", &hard_assign_cpu);
}

}  // namespace molrg
