"""Loads the compiled extension and checks that it matches the running torch.

A build made against another torch (a pip build-isolation environment, or torch upgraded after the build)
otherwise fails with an opaque "undefined symbol" error, or worse, loads and misbehaves.
"""
import importlib

import torch

REBUILD_HINT = (
    "Rebuild it against the installed torch from the repository root with:\n"
    "    pip install --no-build-isolation -e .\n"
    "(or `python setup.py build_ext --inplace`; set AIOLI_EXT_CPU_ONLY=1 for a quick CPU-only build)."
)


def _torch_base(version):
    return version.split("+")[0]


def load():
    """Import aioli_ext._C and return it, raising ImportError with a rebuild command when it cannot be used."""
    try:
        build_info = importlib.import_module("aioli_ext._build_info")
    except ImportError:
        build_info = None
    if build_info is not None and _torch_base(build_info.TORCH_VERSION) != _torch_base(torch.__version__):
        raise ImportError(
            f"aioli_ext was built against torch {build_info.TORCH_VERSION} but torch {torch.__version__} is "
            f"running. {REBUILD_HINT}")
    try:
        module = importlib.import_module("aioli_ext._C")
    except ImportError as exc:
        if "undefined symbol" in str(exc):
            raise ImportError(
                f"aioli_ext's compiled extension does not match torch {torch.__version__} ({exc}). "
                f"{REBUILD_HINT}") from exc
        raise ImportError(f"aioli_ext's compiled extension is missing or broken ({exc}). {REBUILD_HINT}") from exc
    built_with = module.torch_version()
    if _torch_base(built_with) != _torch_base(torch.__version__):
        raise ImportError(
            f"aioli_ext._C was compiled with torch {built_with} headers but torch {torch.__version__} is "
            f"running. {REBUILD_HINT}")
    return module


_C = load()


def cuda_built() -> bool:
    """True when the CUDA kernels were compiled into the extension (independent of whether a GPU is present)."""
    return bool(_C.cuda_built())
