"""Print the installed torch's build settings as CMake `set()` lines.

torch's own find_package(Torch) needs pieces (nvrtc, a matching CUDA
toolkit layout) that pip wheels do not always have, so the build takes the
include and library paths straight from torch.utils.cpp_extension instead.
"""
import glob
import os
import sys

import torch
import torch.utils.cpp_extension as cpp_ext


def cmake_list(items):
    return ";".join(p.replace("\\", "/") for p in items)


site_packages = os.path.dirname(os.path.dirname(torch.__file__))
# ATen's CUDA headers include cusparse.h / cublas_v2.h; pip's nvidia-* wheels
# ship them (cu13 layout: nvidia/cu13/include, cu12: nvidia/<lib>/include).
nvidia_includes = sorted(set(
    glob.glob(os.path.join(site_packages, "nvidia", "cu*", "include"))
    + glob.glob(os.path.join(site_packages, "nvidia", "*", "include"))
))

values = {
    "TORCH_VERSION": torch.__version__,
    "TORCH_INCLUDE_DIRS": cmake_list(cpp_ext.include_paths()),
    "TORCH_LIBRARY_DIRS": cmake_list(cpp_ext.library_paths()),
    "TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
    "TORCH_CUDA_VERSION": torch.version.cuda or "",
    "TORCH_NVIDIA_INCLUDE_DIRS": cmake_list(nvidia_includes),
}
for key, value in values.items():
    sys.stdout.write(f'set({key} "{value}")\n')
