// The Python module aioli_ext._C: loading it registers the operators (static initialisers in the other
// translation units). It also reports how it was built, so the package can check it against the running torch.
#include <Python.h>
#include <torch/headeronly/version.h>

namespace {

PyObject* cuda_built(PyObject*, PyObject*) {
#ifdef AIOLI_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(TORCH_VERSION); }

PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "True when the CUDA kernels were compiled into this module."},
    {"torch_version", torch_version, METH_NOARGS, "The torch version whose headers this module was built with."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "aioli_ext compiled kernels", -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
