// The Python module decafa_fast._C. It only has to exist: importing it runs the static TORCH_LIBRARY_IMPL
// registrations of the other translation units (CPU kernels in csrc/cpu/, CUDA glue in csrc/cuda/). The
// schemas they implement are defined from Python, once, in decafa_fast/ops/schemas.py (op contract v2),
// when decafa_fast.ops is imported. Plain CPython API keeps pybind11 out of the build.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
