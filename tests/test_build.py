"""The build (setup.py): when the CUDA sources are built, the fallbacks of a failed build, the
build info (gsae_fast/_build_info.json, read by gsae_fast._build) and a regular install.

setup.py's decisions are plain functions, called here on a fake ``nvcc`` (a shell script in a
temporary CUDA_HOME/bin that prints a chosen "release X.Y"). The install tests build copies of
the repository in temporary folders with pip (``--no-build-isolation --no-deps --target``):
a pure-Python one (GSAE_FAST_NO_EXT=1, seconds) and one real C++ build of the fallback after a
failed CUDA compile (1.5 to 3 minutes on 2 cores, depending on what else runs).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BUILD_INFO = "_build_info.json"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fake nvcc is a shell script")


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module, with setuptools.setup a no-op (and GSAE_FAST_NO_EXT=1 while it
    loads, so loading it decides nothing about this machine's toolkit)."""
    import setuptools
    calls = []
    monkeypatch.setattr(setuptools, "setup", lambda **kw: calls.append(kw))
    monkeypatch.setenv("GSAE_FAST_NO_EXT", "1")
    spec = importlib.util.spec_from_file_location("gsae_fast_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("GSAE_FAST_NO_EXT")
    assert len(calls) == 1 and "ext_modules" not in calls[0]
    return mod


def fake_toolkit(folder: Path, release: str | None, compiles: bool = False) -> Path:
    """A CUDA_HOME whose bin/nvcc answers --version with "release <release>" (nothing when
    None), records every call in calls.txt and fails anything else unless ``compiles``."""
    (folder / "bin").mkdir(parents=True)
    nvcc = folder / "bin" / "nvcc"
    version = f'echo "Cuda compilation tools, release {release}, V{release}.0"' if release else ""
    nvcc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >> "{folder}/calls.txt"
        if [ "$1" = "--version" ]; then
          echo "nvcc: NVIDIA (R) Cuda compiler driver"
          {version}
          exit 0
        fi
        echo "fake nvcc: no compiling here" >&2
        exit {0 if compiles else 1}
        """))
    nvcc.chmod(0o755)
    return folder


# --- which CUDA build: setup.cuda_plan ----------------------------------------------------------


def test_nvcc_release_parses_version(setup_py, tmp_path):
    assert setup_py.nvcc_release(str(fake_toolkit(tmp_path / "a", "12.4"))) == "12.4"
    assert setup_py.nvcc_release(str(fake_toolkit(tmp_path / "b", None))) is None
    assert setup_py.nvcc_release(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("env", [{}, {"GSAE_FAST_CUDA": "1"}])
def test_matching_major_builds_cuda(setup_py, tmp_path, env):
    home = fake_toolkit(tmp_path / "cuda", "13.2")  # minor versions may differ
    plan = setup_py.cuda_plan(env, str(home), "13.0")
    assert plan.build and plan.wanted
    assert "13.2" in plan.reason


def test_major_mismatch_skips_cuda_with_message(setup_py, tmp_path):
    home = fake_toolkit(tmp_path / "cuda", "12.4")
    plan = setup_py.cuda_plan({}, str(home), "13.0")
    assert not plan.build and plan.wanted  # skipped, loudly
    for part in ("12.4", "13.0", str(home / "bin" / "nvcc"), "CUDA_HOME", "GSAE_FAST_CUDA=0"):
        assert part in plan.reason


def test_major_mismatch_with_cuda_required_is_an_error(setup_py, tmp_path):
    home = fake_toolkit(tmp_path / "cuda", "12.4")
    with pytest.raises(setup_py.BuildConfigError, match=r"GSAE_FAST_CUDA=1 but .*12\.4.*13\.0"):
        setup_py.cuda_plan({"GSAE_FAST_CUDA": "1"}, str(home), "13.0")


def test_major_mismatch_with_cuda_required_fails_before_compiling(setup_py, tmp_path,
                                                                   monkeypatch):
    """extension_setup() runs while setup.py is read, before setup() and any compile."""
    from torch.utils import cpp_extension
    home = fake_toolkit(tmp_path / "cuda", "99.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.chdir(ROOT)  # setup.py's source globs are relative, as pip runs it
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(setup_py.BuildConfigError, match=r"99\.0.*13\.0"):
        setup_py.extension_setup({"GSAE_FAST_CUDA": "1"})
    assert (home / "calls.txt").read_text().split() == ["--version"]  # nothing compiled


def test_no_toolkit(setup_py, tmp_path):
    for home in (None, str(tmp_path)):  # none found / no bin/nvcc in it
        plan = setup_py.cuda_plan({}, home, "13.0")
        assert not plan.build and not plan.wanted  # quietly CPU-only
        with pytest.raises(setup_py.BuildConfigError, match="GSAE_FAST_CUDA=1 but no CUDA toolkit"):
            setup_py.cuda_plan({"GSAE_FAST_CUDA": "1"}, home, "13.0")


def test_cuda_off(setup_py, tmp_path):
    home = fake_toolkit(tmp_path / "cuda", "13.0")
    plan = setup_py.cuda_plan({"GSAE_FAST_CUDA": "0"}, str(home), "13.0")
    assert not plan.build and not plan.wanted
    assert not (home / "calls.txt").exists()  # nvcc not even asked


def test_torch_without_cuda_or_no_sources(setup_py, tmp_path):
    home = str(fake_toolkit(tmp_path / "cuda", "13.0"))
    for args in ((home, None, True), (home, "13.0", False)):
        plan = setup_py.cuda_plan({}, *args)
        assert not plan.build and not plan.wanted
        with pytest.raises(setup_py.BuildConfigError, match="GSAE_FAST_CUDA=1 but"):
            setup_py.cuda_plan({"GSAE_FAST_CUDA": "1"}, *args)


def test_unreadable_nvcc_version(setup_py, tmp_path):
    home = str(fake_toolkit(tmp_path / "cuda", None))
    plan = setup_py.cuda_plan({}, home, "13.0")
    assert not plan.build and plan.wanted and "release" in plan.reason
    with pytest.raises(setup_py.BuildConfigError):
        setup_py.cuda_plan({"GSAE_FAST_CUDA": "1"}, home, "13.0")


def test_bad_gsae_fast_cuda_value(setup_py):
    with pytest.raises(setup_py.BuildConfigError, match="GSAE_FAST_CUDA='yes'"):
        setup_py.cuda_plan({"GSAE_FAST_CUDA": "yes"}, None, "13.0")


# --- the fallbacks of build_ext, on a fake BuildExtension (no compiler) ------------------------


class FakeBuildExtension:
    """Stands for torch's BuildExtension: each run() records the sources and raises the next of
    ``outcomes`` (None: success)."""

    def __init__(self, outcomes, build_lib):
        self.outcomes, self.build_lib, self.runs = list(outcomes), build_lib, []
        self.extensions = [SimpleNamespace(name="gsae_fast._C", sources=["a.cpp", "k.cu"],
                                           _full_name="gsae_fast._C")]
        self.compiler = None  # the --compiler option

    @classmethod
    def with_options(cls, **kwargs):
        return cls

    def run(self):
        assert self.compiler is None, "run() again with the compiler object of the last run"
        self.runs.append(list(self.extensions[0].sources))
        self.compiler = object()
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


def run_build_ext(setup_py, tmp_path, plan, outcomes, strict=False):
    cls = setup_py.build_ext_class(SimpleNamespace(BuildExtension=FakeBuildExtension), plan,
                                   lambda: SimpleNamespace(name="gsae_fast._C", sources=["a.cpp"]),
                                   strict)
    cmd = cls(outcomes, str(tmp_path))
    cmd.run()
    info = json.loads((tmp_path / "gsae_fast" / BUILD_INFO).read_text())
    return cmd, info


def test_failed_cuda_build_is_rebuilt_without_cuda(setup_py, tmp_path, capsys):
    plan = setup_py.CudaPlan(True, True, "nvcc 13.0")
    cmd, info = run_build_ext(setup_py, tmp_path, plan, [RuntimeError("nvcc broke"), None])
    assert cmd.runs == [["a.cpp", "k.cu"], ["a.cpp"]]
    assert cmd.extensions[0]._full_name == "gsae_fast._C"  # setuptools' state kept
    assert info["ext"] == "built" and info["cuda"] == "failed" and info["cuda_wanted"]
    assert "nvcc broke" in info["reason"]
    err = capsys.readouterr().err
    assert "CUDA KERNELS NOT BUILT" in err and "nvcc broke" in err and "=" * 40 in err


def test_failed_cpu_rebuild_leaves_no_extension(setup_py, tmp_path):
    plan = setup_py.CudaPlan(True, True, "nvcc 13.0")
    cmd, info = run_build_ext(setup_py, tmp_path, plan,
                              [RuntimeError("nvcc broke"), RuntimeError("c++ broke")])
    assert len(cmd.runs) == 2 and info["ext"] == "failed" and info["cuda"] == "failed"
    assert "c++ broke" in info["reason"] and "nvcc broke" in info["reason"]


@pytest.mark.parametrize("build_cuda", [True, False])
def test_strict_build_raises(setup_py, tmp_path, build_cuda):
    plan = setup_py.CudaPlan(build_cuda, True, "why")
    with pytest.raises(RuntimeError, match="broke"):
        run_build_ext(setup_py, tmp_path, plan, [RuntimeError("broke"), None], strict=True)
    assert not (tmp_path / "gsae_fast" / BUILD_INFO).exists()


def test_skipped_cuda_is_loud_and_recorded(setup_py, tmp_path, capsys):
    plan = setup_py.CudaPlan(False, True, "nvcc at X is CUDA 12.4 but torch is built with 13.0")
    cmd, info = run_build_ext(setup_py, tmp_path, plan, [None])
    assert info == {"ext": "built", "cuda": "skipped", "cuda_wanted": True, "reason": plan.reason}
    assert "CUDA KERNELS SKIPPED: " + plan.reason in capsys.readouterr().err


# --- the build info ------------------------------------------------------------------------------


def test_build_info_lands_in_source_or_build_tree(setup_py, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_py, "ROOT", str(tmp_path / "src"))
    info = setup_py.build_info("built", "failed", True, "why")
    setup_py.write_build_info(SimpleNamespace(editable_mode=True), info)  # pip install -e
    setup_py.write_build_info(SimpleNamespace(inplace=True), info)  # build_ext --inplace
    setup_py.write_build_info(SimpleNamespace(build_lib=str(tmp_path / "lib")), info)  # install
    for folder in ("src", "lib"):
        assert json.loads((tmp_path / folder / "gsae_fast" / BUILD_INFO).read_text()) == info


@pytest.mark.parametrize("info, warns", [
    ({"ext": "built", "cuda": "built", "cuda_wanted": True, "reason": "nvcc 13.0"}, False),
    ({"ext": "built", "cuda": "failed", "cuda_wanted": True, "reason": "compile error X"}, True),
    ({"ext": "failed", "cuda": "failed", "cuda_wanted": True, "reason": "compile error X"}, True),
    ({"ext": "built", "cuda": "skipped", "cuda_wanted": True, "reason": "nvcc 12.4 vs X"}, True),
    ({"ext": "built", "cuda": "skipped", "cuda_wanted": False, "reason": "GSAE_FAST_CUDA=0"},
     False),
    ({"ext": "skipped", "cuda": "skipped", "cuda_wanted": False, "reason": "NO_EXT"}, False),
    (None, False),  # no file
    ("{not json", False),
])
def test_cuda_build_warning(tmp_path, monkeypatch, info, warns):
    from gsae_fast import _build
    path = tmp_path / BUILD_INFO
    if info is not None:
        path.write_text(info if isinstance(info, str) else json.dumps(info))
    monkeypatch.setattr(_build, "INFO_PATH", str(path))
    warning = _build.cuda_build_warning()
    if warns:
        assert "\n" not in warning and info["reason"] in warning and "CUDA" in warning
    else:
        assert warning is None


# --- installs of copies of the repository ------------------------------------------------------


def copy_source(dest: Path) -> Path:
    """What a build reads, without build outputs (a built _C, build info, caches)."""
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", BUILD_INFO, "build",
                                  "*.egg-info")
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest)
    for name in ("gsae_fast", "kernels", "csrc"):
        shutil.copytree(ROOT / name, dest / name, ignore=skip)
    return dest


def pip_install(src: Path, target: Path, **env) -> subprocess.CompletedProcess:
    """``pip install -v --target`` of ``src``; ``env`` on top of this one, without GSAE_FAST_*."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("GSAE_FAST_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
         "--disable-pip-version-check", "--no-input", "--target", str(target), "."],
        cwd=src, env=full, capture_output=True, text=True, timeout=1800)


PROBE = r"""
import json, sys
# An editable install of gsae_fast in this environment (the usual dev setup) has a finder that
# would hand out its submodules (gsae_fast._C) missing from the target: leave it out.
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
import torch
import gsae_fast
from gsae_fast import _build
out = {"gsae_fast": gsae_fast.__file__, "info": _build.build_info(),
       "warning": _build.cuda_build_warning()}
if "kernels" in sys.argv:
    import gsae_fast.kernels
    out["kernels"] = gsae_fast.kernels.__file__
try:
    from gsae_fast import _C
except ImportError:
    out["_C"] = None
else:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    out.update(_C=_C.__file__, cpu=has("gsae_fast_C::gated_encode", "CPU"),
               cuda=has("gsae_fast_C::gated_encode", "CUDA"))
print(json.dumps(out))
"""


def probe(target: Path, cwd: Path, *args) -> dict:
    """gsae_fast imported from ``target`` alone (cwd outside the repository)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSAE_FAST_")}
    env["PYTHONPATH"] = str(target)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("gsae_fast", "kernels", "_C"):
        if out.get(key):
            assert Path(out[key]).resolve().is_relative_to(target.resolve()), (key, out[key])
    return out


def test_regular_install_imports_kernels(tmp_path):
    """`pip install .` (not -e): gsae_fast.kernels (package_dir kernels/) and the build info are
    installed with the package."""
    pytest.importorskip("triton")
    src = copy_source(tmp_path / "src")
    target = tmp_path / "target"
    r = pip_install(src, target, GSAE_FAST_NO_EXT="1")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (target / "gsae_fast" / "kernels" / "__init__.py").exists()
    out = probe(target, tmp_path, "kernels")
    assert out["kernels"] and out["_C"] is None
    assert out["info"] == {"ext": "skipped", "cuda": "skipped", "cuda_wanted": False,
                           "reason": "GSAE_FAST_NO_EXT=1"}
    assert out["warning"] is None
    record = next(target.glob("gsae_fast-*.dist-info")) / "RECORD"
    assert f"gsae_fast/{BUILD_INFO}," in record.read_text()


def test_failed_cuda_build_falls_back_to_cpu_extension(tmp_path):
    """A toolkit of torch's version whose nvcc fails every compile: the install still succeeds,
    says so in a banner, records "failed", and its _C has the CPU kernels and no CUDA ones;
    GSAE_FAST_REQUIRE_EXT=1 turns the same build into a failed install."""
    if torch.version.cuda is None:
        pytest.skip("this torch is built without CUDA: setup.py skips the CUDA sources")
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    src = copy_source(tmp_path / "src")
    home = fake_toolkit(tmp_path / "cuda", torch.version.cuda)
    # Both installs build in src/build: the strict one compiles the first C++ objects (with the
    # CUDA flags) before ninja reaches the .cu file; the second finds them up to date, and with
    # 2 jobs ninja then starts the CUDA sources, so only the C++-only rebuild compiles much.
    env = dict(CUDA_HOME=str(home), TORCH_CUDA_ARCH_LIST="8.0", MAX_JOBS="2")

    r = pip_install(src, tmp_path / "strict", GSAE_FAST_REQUIRE_EXT="1", **env)
    log = r.stdout + r.stderr
    assert r.returncode != 0, log[-4000:]
    assert "fake nvcc: no compiling here" in log and "CUDA KERNELS NOT BUILT" not in log
    assert not (tmp_path / "strict" / "gsae_fast").exists()

    target = tmp_path / "target"
    r = pip_install(src, target, **env)
    log = r.stdout + r.stderr  # pip -v relays the build's stderr on its stdout
    assert r.returncode == 0, log[-4000:]
    assert "fake nvcc: no compiling here" in log
    assert "CUDA KERNELS NOT BUILT" in log and "built gsae_fast._C without the CUDA kernels" in log
    out = probe(target, tmp_path)
    assert out["info"]["ext"] == "built" and out["info"]["cuda"] == "failed"
    assert out["_C"] and out["cpu"] is True and out["cuda"] is False
    assert "failed to compile" in out["warning"]
