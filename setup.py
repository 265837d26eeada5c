"""Build script for the aioli_ext torch extension.

One extension module, ``aioli_ext._C``, holds every kernel:

* CPU kernels are always built. Files named ``*_avx2.cpp`` / ``*_avx512.cpp`` are compiled a second and
  third time with that ISA's flags (at::vec only vectorises when the translation unit is compiled for the
  ISA); the runtime picks one from the CPU's capability.
* CUDA kernels are built whenever torch is a CUDA build and an nvcc is found (``CUDA_HOME``, ``CUDA_PATH``,
  ``/usr/local/cuda`` or the ``nvcc`` on PATH) -- never from whether a GPU is present.

Environment switches:
  AIOLI_EXT_CPU_ONLY=1     skip the CUDA kernels even when they could be built (quick iteration).
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;9.0+PTX").
  MAX_JOBS                 parallel compile jobs (ninja).
  AIOLI_EXT_DEBUG=1        -O0 -g builds.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "aioli_ext"))


def _nvcc_home():
    """Return the CUDA toolkit root that holds bin/nvcc, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a wrapper script; the toolkit it execs is found by realpath or by
        # the candidates above.
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


# torch.utils.cpp_extension reads CUDA_HOME once, at import: set it before importing.
_cuda_home = _nvcc_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

CPU_ONLY = os.environ.get("AIOLI_EXT_CPU_ONLY", "0") not in ("", "0", "false", "False")
WITH_CUDA = (not CPU_ONLY) and torch.version.cuda is not None and _cuda_home is not None
DEBUG = os.environ.get("AIOLI_EXT_DEBUG", "0") == "1"

ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2",
             "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mbmi", "-mbmi2", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def _isa_of(path):
    for isa in ISA_FLAGS:
        if path.endswith(f"_{isa}.cpp"):
            return isa
    return None


def _sources():
    cpu = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda = sorted(glob.glob("csrc/cuda/*.cu")) if WITH_CUDA else []
    return cpu, cuda


def _extra_include_dirs():
    dirs = [os.path.join(ROOT, "csrc")]
    if WITH_CUDA:
        # Some CUDA headers (cusparse.h and friends) ship in the nvidia pip packages, not the toolkit.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    return dirs


def _write_build_info():
    with open(os.path.join(ROOT, "aioli_ext", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time: what the compiled extension was built against.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {WITH_CUDA!r}\n")
        f.write(f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if WITH_CUDA else None!r}\n")


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension plus per-ISA compilation of the *_avx2.cpp / *_avx512.cpp files."""

    def build_extension(self, ext):
        isa_sources = [s for s in ext.sources if _isa_of(s)]
        ext.sources = [s for s in ext.sources if not _isa_of(s)]
        cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) \
            else list(ext.extra_compile_args)
        for isa, flags in ISA_FLAGS.items():
            srcs = [s for s in isa_sources if _isa_of(s) == isa]
            if not srcs:
                continue
            objects = self.compiler.compile(
                srcs,
                output_dir=os.path.join(self.build_temp, f"isa_{isa}"),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": cxx + flags, "nvcc": []},
                depends=ext.depends,
            )
            ext.extra_objects = list(ext.extra_objects or []) + list(objects)
        super().build_extension(ext)


def _extension():
    cpu_sources, cuda_sources = _sources()
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    # -fopenmp: at::parallel_for is inline OpenMP in the headers; without it every CPU kernel runs on one thread
    # (the pragma is silently dropped). The extension then shares torch's bundled libgomp.so.1.
    cxx = opt + ["-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    macros = []
    if WITH_CUDA:
        macros.append(("AIOLI_WITH_CUDA", "1"))
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "aioli_ext._C",
            cpu_sources + cuda_sources,
            include_dirs=_extra_include_dirs(),
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "aioli_ext._C",
        cpu_sources,
        include_dirs=_extra_include_dirs(),
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


_write_build_info()
print(f"aioli_ext: building CPU kernels{' + CUDA kernels (CUDA_HOME=' + _cuda_home + ')' if WITH_CUDA else ''}"
      f"{' [CPU-only switch on]' if CPU_ONLY else ''}", file=sys.stderr)

setup(
    name="aioli_ext",
    version="0.1.0",
    description="Online data mixing (Aioli) for PyTorch: fused per-group loss kernels and a resumable mixture sampler",
    packages=find_packages(include=["aioli_ext", "aioli_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"train": ["tqdm", "matplotlib"], "test": ["pytest", "pytest-benchmark", "scipy"],
                    # aioli_ext.integrations.huggingface (MixingTrainer); the Trainer itself needs accelerate.
                    "hf": ["transformers>=4.50", "accelerate>=1.1"]},
    entry_points={"console_scripts": ["aioli-ext=aioli_ext.__main__:main"]},
)
