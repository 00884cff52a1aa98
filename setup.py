"""Build of gsae_fast and its compiled extension gsae_fast._C.

Metadata lives in pyproject.toml; this file only describes the extension. Build in place with
    pip install --no-build-isolation -e .
(torch must already be installed: the extension is compiled against the torch you have).

The extension holds the C++ kernels (csrc/*.cpp, csrc/cpu/*.cpp, csrc/emu/*.cpp) and, when
torch is built with CUDA and a CUDA toolkit of the same major version is found, the CUDA
kernels (csrc/cuda/*.cu, csrc/cuda/*.cpp). The toolkit's version is read from `nvcc --version`
before anything compiles (torch.utils.cpp_extension would otherwise stop the whole build on a
major mismatch, with a terser message).

Environment:
    GSAE_FAST_CUDA         unset (default): build the CUDA sources when the above holds. A
                           toolkit of another major version, or a failed compile of the CUDA
                           sources, then builds the extension without them and says so in a
                           banner on stderr (and in the build info below).
                           1: the CUDA sources must build: no toolkit, a version mismatch
                           (checked before any compile) or a failed compile fails the install.
                           0: leave the CUDA sources out.
    GSAE_FAST_REQUIRE_EXT=1  any failed compile, of the CUDA sources too, fails the install
                           instead of falling back to the extension without CUDA kernels, or
                           to no extension. (A toolkit of the wrong version is skipped, not a
                           failed compile: GSAE_FAST_CUDA=1 requires the CUDA kernels.)
    GSAE_FAST_NO_EXT=1     skip the extension (pure-PyTorch package).
    CUDA_HOME              the CUDA toolkit (else torch's search: nvcc on PATH, /usr/local/cuda).
    TORCH_CUDA_ARCH_LIST   GPU targets; defaults to "8.0;9.0" when no GPU is visible.
    GSAE_FAST_MARCH        -march for the CPU kernels (default "native": the package is built
                           on the machine that runs it; set e.g. "x86-64-v3" for a portable build).
    MAX_JOBS               parallel compile jobs (torch.utils.cpp_extension's ninja build).

A failed compile without GSAE_FAST_REQUIRE_EXT / GSAE_FAST_CUDA=1 does not fail the install: the
package then runs without the CUDA kernels (or, if the C++ part failed too, on its PyTorch
executor) and says so at import.

Build info: `pip install -q` hides this script's output, so each build also writes
gsae_fast/_build_info.json (git-ignored; in the source tree for an editable or --inplace build,
installed with the package otherwise):
    {"ext": "built" | "failed" | "skipped", "cuda": "built" | "failed" | "skipped",
     "cuda_wanted": true when a skipped or failed CUDA part deserves a warning, "reason": "..."}
gsae_fast/_build.py reads it (cuda_build_warning()).
"""
import glob
import json
import os
import re
import subprocess
import sys
from typing import NamedTuple, Optional

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_build_info.json"  # in the gsae_fast package; read by gsae_fast/_build.py
CUDA_SOURCE_GLOBS = ("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
CPP_SOURCE_GLOBS = ("csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/emu/*.cpp")


def _warn(msg):
    print(f"gsae_fast setup: {msg}", file=sys.stderr)


def _banner(*lines):
    """Lines that `pip install -v` or a build log should not let anyone miss."""
    rule = "gsae_fast setup: " + "=" * 78
    print("\n".join([rule] + [f"gsae_fast setup: {line}" for line in lines] + [rule]),
          file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------
# Whether to build the CUDA sources: plain functions of the environment, the toolkit and torch
# (tests/test_build.py calls them with a fake nvcc).


class BuildConfigError(RuntimeError):
    """The environment asks for a build that cannot happen (raised before any compile)."""


class CudaPlan(NamedTuple):
    build: bool   # compile the CUDA sources
    wanted: bool  # when not built: the CUDA kernels were expected here, so say so loudly
    reason: str   # one line: the toolkit used, or why the CUDA sources are left out


def nvcc_release(cuda_home: str) -> Optional[str]:
    """"X.Y" from `CUDA_HOME/bin/nvcc --version` ("... release X.Y, VX.Y.Z"), None if nvcc does
    not run or does not say."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def cuda_plan(env, cuda_home: Optional[str], torch_cuda: Optional[str],
              have_sources: bool = True) -> CudaPlan:
    """Build the CUDA sources or not, from GSAE_FAST_CUDA in ``env``, the toolkit at
    ``cuda_home`` (None: none found), torch.version.cuda (None: a torch without CUDA) and
    whether there are CUDA sources. Raises BuildConfigError where GSAE_FAST_CUDA=1 cannot be
    met (or has a value other than 0 / 1)."""
    flag = env.get("GSAE_FAST_CUDA", "")
    if flag not in ("", "0", "1"):
        raise BuildConfigError(f"GSAE_FAST_CUDA={flag!r}: use 1 (CUDA kernels required), "
                               "0 (no CUDA kernels) or leave it unset (CUDA kernels when possible)")
    if flag == "0":
        return CudaPlan(False, False, "GSAE_FAST_CUDA=0")

    def skip(reason, wanted=False):
        if flag == "1":
            raise BuildConfigError(f"GSAE_FAST_CUDA=1 but {reason}")
        return CudaPlan(False, wanted, reason)

    if not have_sources:
        return skip("there are no CUDA sources (csrc/cuda)")
    if torch_cuda is None:
        return skip("this torch is built without CUDA (torch.version.cuda is None)")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not os.path.exists(nvcc):
        where = f"{nvcc} does not exist" if nvcc else "none found"
        return skip(f"no CUDA toolkit ({where}): set CUDA_HOME to a CUDA {torch_cuda} toolkit")
    release = nvcc_release(cuda_home)
    if release is None:
        return skip(f"`{nvcc} --version` does not give a CUDA release (\"release X.Y\")",
                    wanted=True)
    major, torch_major = release.split(".")[0], torch_cuda.split(".")[0]
    if major != torch_major:
        return skip(f"nvcc at {nvcc} is CUDA {release}, torch is built with CUDA {torch_cuda} "
                    f"(the major versions must match): point CUDA_HOME at a CUDA {torch_major}.x "
                    "toolkit, or set GSAE_FAST_CUDA=0 to build without the CUDA kernels",
                    wanted=True)
    return CudaPlan(True, True, f"nvcc {release} at {nvcc}, torch built with CUDA {torch_cuda}")


# ---------------------------------------------------------------------------------------------
# The build info file.


def build_info(ext: str, cuda: str, cuda_wanted: bool, reason: str) -> dict:
    return {"ext": ext, "cuda": cuda, "cuda_wanted": cuda_wanted, "reason": reason}


def write_build_info(cmd, info: dict) -> None:
    """gsae_fast/_build_info.json where the built package is: the source tree for an editable or
    --inplace build (`cmd.editable_mode` / `cmd.inplace`), else the build tree that gets
    installed (`cmd.build_lib`)."""
    in_source = getattr(cmd, "editable_mode", False) or getattr(cmd, "inplace", False)
    folder = os.path.join(ROOT if in_source else cmd.build_lib, "gsae_fast")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")


def build_py_class(info: dict):
    """build_py that also writes the build info known before any compile (the whole info when
    there is no extension; build_ext overwrites it with the outcome otherwise)."""

    class BuildPyWithInfo(build_py):
        def run(self):
            super().run()
            write_build_info(self, info)

    return BuildPyWithInfo


# ---------------------------------------------------------------------------------------------
# The extension.


def build_ext_class(cpp_extension, plan: CudaPlan, cpu_extension, strict: bool):
    """torch's BuildExtension with the fallbacks: a failed build with the CUDA sources is built
    again without them (``cpu_extension()``: a fresh extension of the C++ sources alone); a
    failed build of those leaves the pure-PyTorch package. ``strict``: any failure raises."""

    class BuildExtWithFallback(cpp_extension.BuildExtension):
        def run(self):
            compiler = self.compiler  # run() replaces the option by a compiler object
            info = build_info("built", "built" if plan.build else "skipped", plan.wanted,
                              plan.reason)
            if plan.build:
                _warn(f"building the CUDA sources ({plan.reason}) for "
                      f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
            elif plan.wanted:
                _banner("CUDA KERNELS SKIPPED: " + plan.reason,
                        "The extension is built without them: the CPU kernels work, "
                        'backend="cuda" will not.')
            else:
                _warn(f"building without the CUDA sources: {plan.reason}")
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any toolchain failure
                if strict:
                    raise
                if not plan.build:
                    info = self._failed(info, e)
                else:
                    _banner("CUDA KERNELS NOT BUILT: the build with the CUDA sources (csrc/cuda) "
                            "failed:",
                            f"    {_one_line(e)}  (the compiler's output is above)",
                            "Building gsae_fast._C again without them: the CPU kernels will work, "
                            'backend="cuda" will not.',
                            "GSAE_FAST_CUDA=1 or GSAE_FAST_REQUIRE_EXT=1 make this an error; "
                            "GSAE_FAST_CUDA=0 leaves the CUDA sources out.")
                    info.update(cuda="failed", reason=f"the build with the CUDA sources failed "
                                                      f"({_one_line(e)})")
                    # The same Extension object (setuptools keeps per-extension state on it),
                    # turned into the C++-only one: sources, macros, include and library paths.
                    self.extensions[0].__dict__.update(vars(cpu_extension()))
                    self.compiler = compiler
                    try:
                        super().run()
                    except Exception as e2:  # noqa: BLE001
                        info = self._failed(info, e2)
                    else:
                        _warn("built gsae_fast._C without the CUDA kernels")
            write_build_info(self, info)

        @staticmethod
        def _failed(info, e):
            _warn(f"the compiled extension was not built ({_one_line(e)}); gsae_fast will use "
                  "its PyTorch executor (GSAE_FAST_REQUIRE_EXT=1 makes this an error)")
            reason = f"the C++ extension failed to compile ({_one_line(e)})"
            if info["cuda"] == "failed":
                reason += f"; before that, {info['reason']}"
            return dict(info, ext="failed", reason=reason)

    return BuildExtWithFallback.with_options(use_ninja=True)


def extension_setup(env=os.environ):
    """The setup() arguments for the extension and the build info."""
    if env.get("GSAE_FAST_NO_EXT") == "1":
        _warn("GSAE_FAST_NO_EXT=1: building without the compiled extension")
        info = build_info("skipped", "skipped", False, "GSAE_FAST_NO_EXT=1")
        return {"cmdclass": {"build_py": build_py_class(info)}}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn("torch is not importable at build time: building without the compiled extension "
              "(install torch, then `pip install --no-build-isolation -e .`)")
        info = build_info("skipped", "skipped", False, "torch was not importable at build time")
        return {"cmdclass": {"build_py": build_py_class(info)}}

    cpp_sources = sorted(f for p in CPP_SOURCE_GLOBS for f in glob.glob(p))
    cuda_sources = sorted(f for p in CUDA_SOURCE_GLOBS for f in glob.glob(p))
    # Raises (before any compile) where GSAE_FAST_CUDA=1 cannot be met.
    plan = cuda_plan(env, cpp_extension.CUDA_HOME, torch.version.cuda, bool(cuda_sources))
    if plan.build and not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    march = env.get("GSAE_FAST_MARCH", "native")

    def make_extension(cuda: bool):
        # Fresh lists on every call: CUDAExtension appends to the ones it is given.
        cxx = ["-O3", "-fopenmp", "-Wno-unused-parameter"] + ([f"-march={march}"] if march else [])
        kind, extra = cpp_extension.CppExtension, {"cxx": cxx}
        if cuda:
            kind, extra["nvcc"] = cpp_extension.CUDAExtension, ["-O3"]
        return kind(
            name="gsae_fast._C",
            sources=cpp_sources + (cuda_sources if cuda else []),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=[("GSAE_FAST_WITH_CUDA", "1")] if cuda else [],
        )

    strict = env.get("GSAE_FAST_REQUIRE_EXT") == "1" or env.get("GSAE_FAST_CUDA") == "1"
    # What build_py records until build_ext has the outcome (if it never runs, it stays).
    pending = build_info("failed", "failed" if plan.build else "skipped", plan.wanted,
                         "the extension's build (build_ext) did not run to its end")
    return {
        "ext_modules": [make_extension(plan.build)],
        "cmdclass": {
            "build_py": build_py_class(pending),
            "build_ext": build_ext_class(cpp_extension, plan, lambda: make_extension(False),
                                         strict),
        },
    }


setup(
    packages=["gsae_fast", "gsae_fast.data", "gsae_fast.interp", "gsae_fast.saes",
              "gsae_fast.kernels"],
    package_dir={"gsae_fast": "gsae_fast", "gsae_fast.kernels": "kernels"},
    package_data={"gsae_fast": [BUILD_INFO, "dashboard_assets/*"]},
    **extension_setup(),
)
