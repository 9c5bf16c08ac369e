// Python module molrg_ext._C. Importing it loads this shared library, which registers the
// torch.ops.molrg.* operators; the module itself only reports how the library was built.
#ifndef MOLRG_TORCH_VERSION
#define MOLRG_TORCH_VERSION "unknown"
#endif
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "molrg_ext native operators (registered as torch.ops.molrg.*)";
#ifdef MOLRG_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.attr("torch_version") = MOLRG_TORCH_VERSION;  // torch.__version__ of the build
}
