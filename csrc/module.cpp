// The Python module rlops._C that setup.py builds: importing it loads the library, whose
// TORCH_LIBRARY block (ops.cpp) registers torch.ops.rlops_cuda. It defines nothing else.
#include <Python.h>

static struct PyModuleDef rlops_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "rlops' CUDA kernels; importing registers torch.ops.rlops_cuda", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rlops_c_module); }
