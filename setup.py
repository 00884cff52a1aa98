"""Build of gsae_fast and its compiled extension gsae_fast._C.

Metadata lives in pyproject.toml; this file only describes the extension. Build in place with
    pip install --no-build-isolation -e .
(torch must already be installed: the extension is compiled against the torch you have).

Environment:
    GSAE_FAST_CUDA=0/1     force the CUDA sources (csrc/cuda/*.cu) off / on (default: on when
                           a CUDA toolkit is found and there are CUDA sources).
    TORCH_CUDA_ARCH_LIST   GPU targets; defaults to "8.0;9.0" when no GPU is visible.
    GSAE_FAST_MARCH        -march for the CPU kernels (default "native": the package is built
                           on the machine that runs it; set e.g. "x86-64-v3" for a portable build).
    GSAE_FAST_NO_EXT=1     skip the extension (pure-PyTorch package).
A failed compile does not fail the install: the package then runs on its PyTorch executor and
says so once, at import.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _warn(msg):
    print(f"gsae_fast setup: {msg}", file=sys.stderr)


def extension_setup():
    if os.environ.get("GSAE_FAST_NO_EXT") == "1":
        _warn("GSAE_FAST_NO_EXT=1: building without the compiled extension")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn("torch is not importable at build time: building without the compiled extension "
              "(install torch, then `pip install --no-build-isolation -e .`)")
        return {}

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/emu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    want_cuda = os.environ.get("GSAE_FAST_CUDA")
    toolkit = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if want_cuda == "1" and not toolkit:
        raise RuntimeError("GSAE_FAST_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    use_cuda = bool(cuda_sources) and toolkit and want_cuda != "0" and torch.version.cuda is not None
    if use_cuda and not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    march = os.environ.get("GSAE_FAST_MARCH", "native")
    cxx = ["-O3", "-fopenmp", "-Wno-unused-parameter"]
    if march:
        cxx.append(f"-march={march}")
    extra = {"cxx": cxx}
    kind = cpp_extension.CppExtension
    sources = cpp_sources
    if use_cuda:
        kind = cpp_extension.CUDAExtension
        sources = cpp_sources + cuda_sources
        extra["nvcc"] = ["-O3"]
        _warn(f"building CUDA sources for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    ext = kind(
        name="gsae_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=[("GSAE_FAST_WITH_CUDA", "1")] if use_cuda else [],
    )

    class BuildExtOptional(cpp_extension.BuildExtension):
        """A compile error leaves a working pure-PyTorch package instead of a failed install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any toolchain failure
                if os.environ.get("GSAE_FAST_REQUIRE_EXT") == "1":
                    raise
                _warn(f"the compiled extension was not built ({type(e).__name__}: {e}); "
                      "gsae_fast will use its PyTorch executor")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtOptional.with_options(use_ninja=True)}}


setup(
    packages=["gsae_fast", "gsae_fast.kernels"],
    package_dir={"gsae_fast": "gsae_fast", "gsae_fast.kernels": "kernels"},
    **extension_setup(),
)
