// The Python module stub of the compiled library. Importing lbkernels._C loads the
// shared object, whose static initialisers register the CPU/CUDA kernels with the
// dispatcher (the op schemas live in lbkernels/_library.py). It also reports which
// vectorised CPU loops were selected.
#include <Python.h>

namespace lbkernels::cpu {
const char* capability_name();
}

static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(lbkernels::cpu::capability_name());
}

static PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "Name of the vectorised CPU loops in use (DEFAULT, AVX2 or AVX512)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
