// The Python extension module cnn_attention._C. It holds no bindings: importing it loads the
// operator library libcnn_attention it links (next to it in the package), whose static
// registrations make torch.ops.cnn_attention.* available. Only Python's C API is used, so
// building it needs no pybind11 or torch/extension.h.
#include <Python.h>

#include "../build_info.h"

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "cnn-attention operators; use torch.ops.cnn_attention or the cnn_attention package.",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  // The library's description as it was compiled; the call also keeps the library a needed
  // dependency where the linker drops libraries nothing references (--as-needed).
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "build_info", cnn_attention::build_info().c_str()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
