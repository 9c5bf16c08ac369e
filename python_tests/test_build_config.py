"""The CMake configuration against a CUDA build of torch on a machine without a CUDA toolkit.

The default Linux wheel of torch on PyPI is a CUDA build, and torch's CMake config
(find_package(Torch)) stops with a fatal error when it cannot find a CUDA toolkit. The CPU kernels
need none, so the project must configure there (MOLRG_CUDA=OFF, and AUTO when no nvcc is found)
without asking torch's CMake config. A stand-in torch package reproduces that machine: it reports
CUDA, its CMake config fails, and its include/ and lib/ folders hold the names the build links.
Configure only; nothing is compiled.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="needs the source tree"),
    pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("make") is None,
                       reason="needs cmake and make"),
]


def _stand_in_torch(base, cxx11_abi):
    pkg = base / "torch"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "include" / "torch" / "csrc" / "api" / "include").mkdir(parents=True)
    (pkg / "lib").mkdir()
    for lib in ("c10", "torch_cpu", "torch"):
        (pkg / "lib" / f"lib{lib}.so").write_bytes(b"")
    config = pkg / "share" / "cmake" / "Torch"
    config.mkdir(parents=True)
    (config / "TorchConfig.cmake").write_text(
        'message(FATAL_ERROR "stand-in CUDA torch: no CUDA toolkit found")\n')
    (pkg / "__init__.py").write_text(
        "__version__ = '2.99.0+cu999'\n"
        "from . import utils, version\n"
        f"def compiled_with_cxx11_abi():\n    return {cxx11_abi}\n")
    (pkg / "version.py").write_text("cuda = '99.0'\n")
    (pkg / "utils" / "__init__.py").write_text(
        "import os\n"
        "cmake_prefix_path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'share',"
        " 'cmake')\n")
    return pkg


def _configure(tmp_path, cuda, env_extra):
    build = tmp_path / f"build-{cuda}"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), **env_extra)
    out = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Unix Makefiles",
         f"-DPython_EXECUTABLE={sys.executable}", f"-DMOLRG_CUDA={cuda}"],
        capture_output=True, text=True, env=env, timeout=300)
    return out, build


@pytest.mark.parametrize("cuda,cxx11_abi", [("OFF", True), ("AUTO", False)])
def test_cpu_build_configures_against_cuda_torch_without_toolkit(tmp_path, cuda, cxx11_abi):
    pkg = _stand_in_torch(tmp_path / "site", cxx11_abi)
    # AUTO: no CUDA compiler to be found (CUDACXX names one that does not exist)
    out, build = _configure(tmp_path, cuda, {"CUDACXX": str(tmp_path / "no-nvcc")})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "stand-in CUDA torch" not in log          # torch's CMake config was not asked
    assert f"CUDA kernels OFF (MOLRG_CUDA={cuda}, torch CUDA=1)" in log
    cache = (build / "CMakeCache.txt").read_text()
    for lib in ("c10", "torch_cpu", "torch"):
        assert f"_molrg_lib_{lib}:FILEPATH={pkg / 'lib' / f'lib{lib}.so'}" in cache
    flags = (build / "CMakeFiles" / "_C.dir" / "flags.make").read_text()
    assert f"-D_GLIBCXX_USE_CXX11_ABI={int(cxx11_abi)}" in flags
    assert f"-isystem {pkg / 'include'}" in flags
    assert f"-isystem {pkg / 'include' / 'torch' / 'csrc' / 'api' / 'include'}" in flags


def test_cuda_on_without_nvcc_is_a_clear_error(tmp_path):
    _stand_in_torch(tmp_path / "site", True)
    out, _ = _configure(tmp_path, "ON", {"CUDACXX": str(tmp_path / "no-nvcc")})
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "MOLRG_CUDA=ON but nvcc was not found" in log
    assert "stand-in CUDA torch" not in log


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_build_uses_torchs_cmake_config_and_names_the_way_out(tmp_path):
    # with nvcc found, AUTO builds the CUDA kernels, which take torch's CMake config (here the
    # stand-in's, which fails as a real one does without the CUDA libraries); the log says how to
    # build the CPU kernels alone
    _stand_in_torch(tmp_path / "site", True)
    out, _ = _configure(tmp_path, "AUTO", {})
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "CUDA kernels ON (MOLRG_CUDA=AUTO, torch CUDA=1)" in log
    assert "MOLRG_CUDA=OFF builds the CPU kernels alone" in log
    assert "stand-in CUDA torch" in log
