// The module definition (PYBIND11_MODULE) only.  Binding code lives in one file per concept,
// cpp/bind_*.cpp (moments, hvp, tiles): arguments are converted and checked with the GIL held,
// then the GIL is released for the pure C++ core while the caller polls for Ctrl-C
// (bind_common.hpp).
#include <pybind11/pybind11.h>

#include "wsbound/model.hpp"

namespace py = pybind11;

void bind_moments(py::module_& m);  // bind_moments.cpp
void bind_hvp(py::module_& m);      // bind_hvp.cpp
void bind_tiles(py::module_& m);    // bind_tiles.cpp

#ifndef WSB_MODULE_NAME
#define WSB_MODULE_NAME _core
#endif

PYBIND11_MODULE(WSB_MODULE_NAME, m) {
    m.doc() = "wsbound_fast compiled core: exact tr(H) and tr(H^2) of MLP cross-entropy curvature";
    py::register_exception<wsb::Cancelled>(m, "Cancelled", PyExc_KeyboardInterrupt);
    bind_moments(m);
    bind_hvp(m);
    bind_tiles(m);
}
