// The Python extension module cnn_attention._C. It holds no bindings: importing it loads the
// operator library, whose static registrations make torch.ops.cnn_attention.* available.
// Only the stable limited C API is used, so building it needs no pybind11 or torch/extension.h.
#include <Python.h>

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "cnn-attention operators; use torch.ops.cnn_attention or the cnn_attention package.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}

}
