"""Package-level behaviour: import in a fresh interpreter, op registration, CLI dispatch."""

import pytest
import torch

import molrg_ext
from molrg_ext import cli


def test_import_first_in_fresh_interpreter_registers_ops(tmp_path, fresh_interpreter):
    code = ("import molrg_ext, torch; "
            "print(torch._C._dispatch_has_kernel_for_dispatch_key('molrg::subspace_dae', 'CPU'))")
    assert fresh_interpreter(code, tmp_path) == "True"


def test_import_does_not_load_scipy_or_sklearn(tmp_path, fresh_interpreter):
    # scipy.optimize (Hungarian matching) and scikit-learn are imported where they are used:
    # importing them with the package had added 0.4-0.6 s to every `import molrg_ext`
    code = ("import sys, molrg_ext; "
            "print(sorted(m for m in ('scipy', 'sklearn') if m in sys.modules))")
    assert fresh_interpreter(code, tmp_path) == "[]"


def test_ops_have_cpu_kernels_and_flag():
    for op in ("subspace_dae", "subspace_dae_backward", "hard_assign"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"molrg::{op}", "CPU")
    assert isinstance(molrg_ext.built_with_cuda, bool)


def test_cli_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_cli_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2


def test_every_cli_command_module_exists():
    import importlib
    for name, (module, _) in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_cli_refused_settings_are_usage_errors(capsys, tmp_path):
    # K d > n: the library's ValueError becomes argparse's one-line error and exit status 2
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--K", "2", "--d", "30", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "molrg demo: error: sample_molrg: orthogonal bases need sum(dims) = 60 <= n = 48" in err
    assert "Traceback" not in err


def test_cli_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "training samples per subspace (default: 16)" in out
    assert "(default: runs/demo)" in out


def test_cli_demo_runs_and_recovers(tmp_path):
    import json

    out = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "60", "--instances", "2", "--out", str(out)]) == 0
    res = json.loads((out / "demo.json").read_text())
    assert (out / "demo.png").stat().st_size > 0
    # eq. (48) initialisation near the truth with N_k = 16 >> d = 4: every instance recovered
    assert len(res["distances"]) == 2 and all(d < 0.5 for d in res["distances"])
    assert res["success"] == [True, True] and res["loss"][-1] < res["loss"][0]


def test_cli_help_shows_zero_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["gl-score", "--help"])
    assert "--seed SEED           (default: 0)" in capsys.readouterr().out


def test_no_module_uses_pyplot_or_switches_the_backend():
    """Library code draws on matplotlib.figure.Figure (experiments._common.subplots): pyplot is
    not thread-safe and keeps figures alive, and matplotlib.use switches the whole process's
    backend (a notebook's too)."""
    import pathlib
    import re

    root = pathlib.Path(molrg_ext.__file__).parent
    bad = re.compile(r"matplotlib\.use\(|^\s*(import|from)\s+matplotlib\b.*\bpyplot\b")
    found = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert found == []


def test_build_records_its_torch_and_mismatches_are_named():
    # the build in use was made against the running torch
    assert molrg_ext._C.torch_version == torch.__version__
    assert molrg_ext._build_mismatch("2.13.0+cpu", "2.13.1") is None
    assert molrg_ext._build_mismatch("unknown", "2.14.0") is None
    msg = molrg_ext._build_mismatch("2.13.0+cpu", "2.14.1+cu130")
    assert "built against torch 2.13.0+cpu but runs with torch 2.14.1+cu130" in msg
    assert "--no-build-isolation" in msg


def test_a_build_that_does_not_load_is_named(package_copy):
    """A compiled module for this Python that fails to load (another torch release's build gives
    an undefined symbol) is reported as such, not as a source tree without a build."""
    out = package_copy(b"not a library")()
    assert out.returncode != 0
    assert "compiled module" in out.stderr and "did not load with torch" in out.stderr
    assert "holds no built extension" not in out.stderr


def test_version_is_written_once_in_effect():
    """__version__ and pyproject.toml's version (source tree) or the installed metadata agree."""
    import importlib.metadata
    import pathlib
    import re

    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.exists():
        m = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M)
        assert m and m.group(1) == molrg_ext.__version__
    try:
        installed = importlib.metadata.version("molrg_ext")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and not pyproject.exists():
        assert installed == molrg_ext.__version__
