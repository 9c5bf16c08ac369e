"""The benchmark runner (`python -m benchmarks` / `molrg bench`) on tiny shapes: every case runs,
the table's ratios are consistent with the times, and the JSON keeps them with the machine's
measured peak."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from molrg_ext import bench
from molrg_ext._cpu_features import cpu_flags
from molrg_ext._cuda_check import cuda_skip_reason


def test_run_writes_rows_with_ratios_and_peak(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    rows = bench.run(dae_shapes=[(16, 2, 3, 128)], train_shapes=[(16, 2, 3, 32, 2)],
                     peers=("eager",), modes=("soft", "hard"), repeats=1, out=str(out),
                     progress=False, jacobian_shapes=[(8, 2, 2, 4)])
    kinds = [(r["kind"], r["mode"]) for r in rows]
    assert kinds == [("dae", "soft"), ("dae", "hard"), ("train", "hard"), ("train", "soft"),
                     ("jacobian", "soft")]
    for r in rows:
        t = r["seconds"]
        assert t["ours"] > 0 and t["eager"] > 0
        assert abs(r["speedup"]["eager"] - t["eager"] / t["ours"]) < 1e-12
        if r["kind"] == "jacobian":  # no flop count: the op and its peers do different work
            assert r["flops"] is None and r["gflops_ours"] is None
        else:
            assert r["flops"] > 0
            assert r["gflops_ours"] == pytest.approx(r["flops"] / t["ours"] / 1e9)
        assert ("eager-loop" in t) == (r["kind"] != "dae")
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["meta"]["threads"] == torch.get_num_threads() == 1
    assert saved["meta"]["peak_gflops_fp32"] > 0


def _devices(op):
    reason = cuda_skip_reason(op)
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(reason is not None,
                                                                  reason=reason or "")])]


@pytest.mark.parametrize("device", _devices("dae_jacobian_spectrum"))
@pytest.mark.parametrize("impl", ["eager", "compile", "eager-loop"])
def test_jacobian_cases_agree_with_the_fused_op(impl, device, one_thread):
    # every peer of the Jacobian rows computes the same spectrum: its top K d singular values
    # are ours, the other n - K d are zero (J = c sum_k w_k U_k U_k^T + rank-K terms)
    n, K, d, B = 10, 2, 3, 5
    ours = bench.make_jacobian_case("ours", n, K, d, B, device=device)()
    sv = bench.make_jacobian_case(impl, n, K, d, B, device=device)()
    assert ours.device.type == sv.device.type == device
    assert ours.shape == (B, K * d) and sv.shape == (B, n)
    assert ours.min() > 0
    torch.testing.assert_close(sv[:, : K * d], ours, rtol=1e-4, atol=1e-5)
    assert sv[:, K * d:].abs().max() < 1e-4
    with pytest.raises(ValueError, match="unknown impl"):
        bench.make_jacobian_case("numpy", n, K, d, B)


@pytest.mark.parametrize("device", _devices("train_step"))
@pytest.mark.parametrize("impl", ["ours", "eager", "compile", "eager-loop"])
def test_train_cases_step_on_their_device(impl, device, one_thread):
    # each case is a whole step: it returns the gradient of U (on the case's device), and the
    # steps differ (fresh draws each call)
    n, K, d, M, P = 8, 2, 2, 16, 2
    step = bench.make_train_case(impl, n, K, d, M, P, N=32, device=device)
    g1 = step()
    g1 = (g1[1] if isinstance(g1, tuple) else g1).clone()
    g2 = step()
    g2 = g2[1] if isinstance(g2, tuple) else g2
    assert g1.device.type == device and torch.isfinite(g1).all() and g1.abs().sum() > 0
    assert not torch.equal(g1, g2)


def test_peaks_count_the_threads_in_use():
    n1, n2 = bench.nominal_peak_gflops(threads=1), bench.nominal_peak_gflops(threads=2)
    if n1 is None:
        pytest.skip("no /proc/cpuinfo clock on this machine")
    assert n2 == pytest.approx(n1 * min(2, os.cpu_count()))
    assert bench.peak_gflops(size=256, repeats=2) > 0


def test_nominal_peak_counts_fma_lanes_by_core():
    def cpuinfo(vendor, family, flags, mhz=2000.0):
        return "".join(f"processor\t: {i}\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
                       f"cpu MHz\t\t: {mhz}\nflags\t\t: fpu fma avx2 {flags}\n\n"
                       for i in range(2))

    # 2 cores x 2 FMA units x lanes x 2 flops x 2 GHz
    assert bench.nominal_peak_gflops(2, cpuinfo("GenuineIntel", "6", "avx512f")) == 256.0
    assert bench.nominal_peak_gflops(2, cpuinfo("GenuineIntel", "6", "")) == 128.0
    assert bench.nominal_peak_gflops(1, cpuinfo("GenuineIntel", "6", "avx512f")) == 128.0
    # Zen 4 splits 512-bit FMAs over its two 256-bit units; Zen 3 has no AVX-512
    assert bench.nominal_peak_gflops(2, cpuinfo("AuthenticAMD", "25", "avx512f")) == 128.0
    assert bench.nominal_peak_gflops(2, cpuinfo("AuthenticAMD", "25", "")) == 128.0
    assert bench.nominal_peak_gflops(2, cpuinfo("AuthenticAMD", "26", "avx512f")) == 256.0
    assert bench.nominal_peak_gflops(2, "processor : 0\n") is None


def test_merge_runs_keeps_each_implementation_minimum():
    from molrg_ext.bench_report import markdown_table, merge_runs

    def run(ours, eager, peak):
        row = {"kind": "dae", "shape": [48, 2, 6, 1024], "mode": "soft",
               "seconds": {"ours": ours, "eager": eager}, "gflops_ours": 6.0e6 / ours / 1e9,
               "speedup": {"eager": eager / ours}}
        return {"meta": {"threads": 2, "peak_gflops_fp32": peak, "loadavg": [1, 1, 1]},
                "rows": [row]}

    merged = merge_runs([run(2e-3, 5e-3, 150.0), run(1e-3, 6e-3, 170.0)])
    (row,) = merged["rows"]
    assert row["seconds"] == {"ours": 1e-3, "eager": 5e-3}
    assert row["speedup"]["eager"] == pytest.approx(5.0)
    assert row["gflops_ours"] == pytest.approx(6.0)
    assert row["seconds_per_run"] == [{"ours": 2e-3, "eager": 5e-3}, {"ours": 1e-3, "eager": 6e-3}]
    assert merged["meta"]["peak_gflops_fp32"] == 170.0 and merged["meta"]["runs"] == 2
    table = markdown_table(merged).splitlines()
    assert table[0] == "| kind | shape | mode | ours ms | eager ms | x eager | GFLOP/s | % of sgemm 170 |"
    assert table[2] == "| dae | (48, 2, 6, 1024) | soft | 1.00 | 5.00 | 5.00 | 6.0 | 4 |"
    with pytest.raises(ValueError, match="no runs"):
        merge_runs([])


def test_floor_table_compares_targets_with_the_machine_floor():
    from molrg_ext.bench_report import dae_bytes, floor_table

    assert dae_bytes(48, 2, 6, 1) == 4 * 4 * 48  # x, y; g, x
    row = {"kind": "dae", "shape": [48, 2, 6, 65536], "mode": "soft", "flops": 3.77e8,
           "seconds": {"ours": 8e-3, "eager": 25e-3, "compile": 17e-3}}
    roof = {"fma_peak_gflops": 190.0, "read_gbs": 20.0, "triad_gbs": 23.0}
    line = floor_table({"rows": [row]}, roof).splitlines()[2]
    # compute 3.77e8 / 190e9 = 1.98 ms; memory 65536 * 768 B / 23 GB/s = 2.19 ms;
    # target 17 ms / 10 = 1.70 ms, below the floor: it needs 2.19 / 1.70 = 129% of the bandwidth
    assert line == ("| dae | (48, 2, 6, 65536) | soft | 1.98 | 2.19 | >= 10x eager/compile | 1.70 |"
                    " 129 | yes |")
    row["seconds"]["compile"] = 40e-3  # then 25 ms / 10 = 2.5 ms: above 2.19: 88% of the bandwidth
    assert floor_table({"rows": [row]}, roof).splitlines()[2].endswith("| 2.50 | 88 | no |")
    row["seconds"]["eager"] = 20e-3
    assert floor_table({"rows": [row]}, roof).splitlines()[2].endswith("| 2.00 | 109 | yes |")
    # a roofline file with one entry per thread count: the benchmark's own count is used
    both = {"threads_1": {"fma_peak_gflops": 1.0, "read_gbs": 1.0, "triad_gbs": 1.0},
            "threads_2": roof}
    merged = {"rows": [row], "meta": {"threads": 2}}
    assert floor_table(merged, both) == floor_table({"rows": [row]}, roof)
    with pytest.raises(ValueError, match="threads_4"):
        floor_table({"rows": [row], "meta": {"threads": 4}}, both)
    # a cache-resident triad: x, g, y of 65536 x 48 floats are 36 MiB, within a 36 MiB set, so
    # the memory floor is 50.3 MB / 62 GB/s = 0.81 ms and the compute floor (1.98) binds; at
    # B = 65537 the arrays no longer fit and the streaming 23 GB/s is used again
    cached = dict(roof, cached_triad_gbs=62.0, cached_set_mib=36)
    assert floor_table({"rows": [row]}, cached).splitlines()[2] == (
        "| dae | (48, 2, 6, 65536) | soft | 1.98 | 0.81 | >= 10x eager/compile | 2.00 | 99 | no |")
    big = dict(row, shape=[48, 2, 6, 65537])
    assert "| 2.19 |" in floor_table({"rows": [big]}, cached).splitlines()[2]
    # training rows: the drawn rows' cache lines at the probe's scattered-line rate
    from molrg_ext.bench_report import train_lines

    assert train_lines(48, 2, 6, 1024, 64) == 64 * 1024 * 3
    assert train_lines(37, 2, 6, 10, 1) == 10 * 3  # 148 bytes: at least 3 lines
    trow = {"kind": "train", "shape": [48, 2, 6, 1024, 64], "mode": "hard", "flops": 3.0e8,
            "seconds": {"ours": 9e-3, "eager-loop": 108e-3}}
    assert floor_table({"rows": [trow]}, roof).splitlines()[2] == (
        "| train | (48, 2, 6, 1024, 64) | hard | 1.58 | - | >= 20x eager-loop | 5.40 | 29 | no |")
    # 196608 lines x 20 ns / 2 threads = 1.97 ms; with 80 ns per line 7.86 ms, above 5.4 ms
    roof_lines = dict(roof, threads=2, random_line_ns=20.0)
    assert floor_table({"rows": [trow]}, roof_lines).splitlines()[2] == (
        "| train | (48, 2, 6, 1024, 64) | hard | 1.58 | 1.97 | >= 20x eager-loop | 5.40 | 36 |"
        " no |")
    roof_lines["random_line_ns"] = 80.0
    line = floor_table({"rows": [trow]}, roof_lines).splitlines()[2]
    assert line.endswith("| 7.86 | >= 20x eager-loop | 5.40 | 146 | yes |")
    # rows of three lines (n = 48 float32) at the probe's row rate when it has one: 10 ns -> 0.98
    roof_lines["row3_line_ns"] = 10.0
    line = floor_table({"rows": [trow]}, roof_lines).splitlines()[2]
    assert line.endswith("| 0.98 | >= 20x eager-loop | 5.40 | 29 | no |")
    trow64 = dict(trow, shape=[64, 2, 6, 1024, 64])  # 256-byte rows: four lone lines each
    line = floor_table({"rows": [trow64]}, roof_lines).splitlines()[2]
    assert "| 10.49 |" in line  # 262144 lines x 80 ns / 2 threads


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("git") is None,
                    reason="needs g++ and git")
def test_paired_harness_builds_and_compares(tmp_path):
    # benchmarks/paired/run.sh links csrc/ of HEAD (A) and of the working tree (B) into one
    # binary and alternates them; the same kernels give a ratio near 1
    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", str(root / "benchmarks/paired/run.sh"), "HEAD", "soft", "4",
                          "64"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    m = re.search(r"B/A median ([0-9.]+) \(quartiles ([0-9.]+), ([0-9.]+)\) over 4 pairs",
                  out.stdout)
    assert m, out.stdout
    assert 0.5 < float(m.group(1)) < 2.0
    # it also compares the two builds' outputs: with csrc/ unchanged since HEAD they are the
    # same code, and their slot losses and gradients must agree to the bit
    assert "outputs: A and B" in out.stdout
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "csrc"],
                           capture_output=True, text=True).stdout.strip()
    if not dirty:
        assert "bit-identical" in out.stdout, out.stdout


def _has_avx512():
    flags = cpu_flags()
    return flags is not None and "avx512f" in flags


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("git") is None,
                    reason="needs g++ and git")
@pytest.mark.skipif(not _has_avx512(), reason="no AVX-512: the native build is the AVX2 one")
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_avx2_and_avx512_kernels_agree(mode):
    # The CPU kernels have an AVX-512 path (64-byte tiles, 16-lane Philox) and an AVX2 one, and
    # -march=native picks one at build time, so a machine tests only its own. Here the paired
    # harness links HEAD's kernels built natively (AVX-512) with the working tree's built with
    # -mno-avx512f: same draws and the same sums in the same order, so the gradients agree to the
    # bit; a slot's loss adds its squared residual in 16 or 8 vector lanes (last bits only).
    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    if subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "csrc"],
                      capture_output=True, text=True).stdout.strip():
        pytest.skip("csrc/ differs from HEAD")
    env = dict(os.environ, OMP_NUM_THREADS="1", B_FLAGS="-mno-avx512f")
    out = subprocess.run(["bash", str(root / "benchmarks/paired/run.sh"), "HEAD", mode, "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    if "bit-identical" in out.stdout:
        return
    m = re.search(r"slot losses ([0-9.e+-]+), gradients ([0-9.e+-]+) \(elementwise\)",
                  out.stdout)
    assert m, out.stdout
    assert float(m.group(2)) == 0, out.stdout
    assert float(m.group(1)) < 1e-5, out.stdout


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("git") is None
                    or shutil.which("ninja") is None, reason="needs cmake, ninja and git")
def test_op_paired_harness_builds_and_compares():
    # benchmarks/paired/op_run.sh builds HEAD's extension with its namespaces renamed (molrg_ref)
    # and times torch.ops.molrg.train_step (then the denoiser's and the optimal denoiser's forward
    # and backward ops) against it call by call; with the tested build at HEAD too (CI installs
    # HEAD), both are the same code and must agree
    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    env = dict(os.environ, PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "csrc"],
                           capture_output=True, text=True).stdout.strip()
    # the training step, then the denoiser's forward and backward ops (same build of HEAD)
    for op, exact in (("train", "gradients"), ("dae", "y")):
        out = subprocess.run(["bash", str(root / "benchmarks/paired/op_run.sh"), "HEAD", "4", "64",
                              "4", op], capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        for mode in ("hard", "soft"):
            m = re.search(mode + " " + op + r" M=64 P=4: .* this/ref median ([0-9.]+) \(quartiles",
                          out.stdout)
            assert m, out.stdout
            assert 0.2 < float(m.group(1)) < 5.0
        if not dirty:
            assert out.stdout.count(f"outputs agree ({exact} bit-identical") == 2, out.stdout
    # the optimal denoiser's forward and backward (one mode; its shape is B,N,n)
    out = subprocess.run(["bash", str(root / "benchmarks/paired/op_run.sh"), "HEAD", "4", "1", "1",
                          "optimal", "64,500,16"], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"optimal B=64 N=500 n=16: .* this/ref median ([0-9.]+) \(quartiles", out.stdout)
    assert m, out.stdout
    assert 0.2 < float(m.group(1)) < 5.0
    if not dirty:
        assert "optimal: outputs agree (bit-identical)" in out.stdout, out.stdout


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_peers_compute_what_ours_computes(mode):
    """The benchmark's eager peers and the fused ops agree before anything is timed: the
    denoiser's gradient wrt U, and the training step's loss and gradient on the same draws
    (philox_draws); measured differences 2e-7 to 4e-6 of the largest entry."""
    import molrg_ext

    x, U, c, phi, gy = bench._problem(48, 2, 6, 256)
    dims = [6, 6]
    U1, U2 = U.clone().requires_grad_(), U.clone().requires_grad_()
    (molrg_ext.subspace_dae(x, U1, c, phi, None, dims, mode) * gy).sum().backward()
    (bench.eager_dae(x, U2, c, phi, dims, mode) * gy).sum().backward()
    torch.testing.assert_close(U1.grad, U2.grad, rtol=0, atol=1e-5 * U2.grad.abs().max().item())

    P, N, n, M = 3, 50, 48, 64
    g = torch.Generator().manual_seed(5)
    X = torch.randn(P, N, n, generator=g)
    U0 = torch.randn(P, 2, n, 6, generator=g) / n ** 0.5
    lv = bench._levels()
    loss, grad = molrg_ext.train_step(X, U0, dims, lv, M, 11, 4, mode)
    i, lev, eps = molrg_ext.philox_draws(11, 4, P, M, N, lv.L, n)
    Ug = U0.clone().requires_grad_()
    ref = bench.eager_train_loss(Ug, X, lv.table(torch.float32), i, lev, eps, dims, mode)
    ref.backward()
    torch.testing.assert_close(loss.sum(), ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, Ug.grad, rtol=0, atol=1e-4 * Ug.grad.abs().max().item())


def test_train_flops_count_the_work_of_each_mode():
    # hard: the clean projection on all K (the assignment), then one component: 2nKd + 10nd
    assert bench.train_flops(48, 2, 6, 1, 1, "hard") == 2 * 48 * 12 + 10 * 48 * 6 == 4032
    assert bench.train_flops(48, 2, 6, 1, 1, "soft") == 10 * 48 * 12
    assert bench.train_flops(48, 2, 6, 1024, 64, "hard") == 4032 * 1024 * 64


def test_unavailable_peer_stays_none_on_cuda():
    """A peer that is not available (make_*_case returned None, e.g. CuPy not installed) is
    skipped by the benchmarks; on CUDA it must not be wrapped into a synchronising callable that
    then fails with 'NoneType is not callable'."""
    from molrg_ext.bench import _synced_on_cuda

    assert _synced_on_cuda(None, "cuda") is None and _synced_on_cuda(None, "cpu") is None
    f = lambda: 3  # noqa: E731
    assert _synced_on_cuda(f, "cpu") is f
    assert _synced_on_cuda(f, "cuda") is not f  # wrapped: synchronises before returning


def test_readme_benchmark_command_collects_every_suite():
    """`pytest benchmarks --benchmark-only` (README) collects the bench_*.py suites: with
    pytest's default file pattern (test_*.py) it collected nothing and exited with status 5."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks").is_dir():
        pytest.skip("needs the source tree (benchmarks/)")
    # pytest's entry script, as a user runs it: `python -m pytest` from the repository root would
    # import the source tree's molrg_ext, which has no built extension in a clean clone (CI)
    script = Path(sys.executable).with_name("pytest")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "pytest"]
    out = subprocess.run(cmd + ["benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    collected = {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}
    suites = {f"benchmarks/{p.name}" for p in (root / "benchmarks").glob("bench_*.py")}
    cuda_only = {"benchmarks/bench_cuda.py", "benchmarks/bench_optimal_denoiser_cuda.py"}
    assert suites - cuda_only <= collected, sorted(suites - cuda_only - collected)


def test_source_tree_without_extension_says_why_it_cannot_import(tmp_path):
    """`python -m benchmarks` from a clean clone's root (the package installed into the venv)
    imported the source tree's molrg_ext, which has no _C there, and failed with "cannot import
    name '_C' from partially initialized module". The error now says what happened and what to
    run instead (`make bench` runs the `molrg bench` entry point)."""
    src = Path(__file__).resolve().parents[1] / "molrg_ext"
    if not src.is_dir():
        pytest.skip("needs the source tree (molrg_ext/)")
    shutil.copytree(src, tmp_path / "molrg_ext",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import molrg_ext"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "holds no built extension (_C)" in out.stderr and "molrg bench" in out.stderr, \
        out.stderr[-2000:]
