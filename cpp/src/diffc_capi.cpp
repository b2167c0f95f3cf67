// diffc C API implementation: embeds CPython through pybind11 and calls diffc.runtime.capi.
// See include/diffc.h for the contract (lifetime, threads, errors). No exception leaves this file.

#include "diffc.h"

#include <pybind11/embed.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>

namespace py = pybind11;

#ifndef DIFFC_PYTHON_EXECUTABLE
#define DIFFC_PYTHON_EXECUTABLE "python3"
#endif

struct diffc_pipeline {
    py::object pipe;  // diffc.runtime.Pipeline; touched only with the GIL held
    std::mutex mu;    // one generation at a time per handle
};

namespace {

thread_local diffc_status t_code = DIFFC_OK;
thread_local std::string t_message;

std::once_flag g_init_once;
diffc_status g_init_code = DIFFC_OK;
std::string g_init_message;

diffc_status fail(diffc_status code, std::string message) {
    t_code = code;
    t_message = std::move(message);
    return code;
}

diffc_status ok() {
    t_code = DIFFC_OK;
    t_message.clear();
    return DIFFC_OK;
}

// Start the interpreter of the environment diffc is installed in, import the C API module, then release
// the GIL so that any thread can take it (the main thread keeps no Python state of its own).
void start_python() {
    const char* exe = std::getenv("DIFFC_PYTHON");
    if (exe == nullptr || *exe == '\0') exe = DIFFC_PYTHON_EXECUTABLE;
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0;  // the host application owns its signals
    config.parse_argv = 0;
    PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, exe);
    if (!PyStatus_Exception(st)) st = PyConfig_SetBytesString(&config, &config.executable, exe);
    if (PyStatus_Exception(st)) {
        PyConfig_Clear(&config);
        g_init_code = DIFFC_ERR_PYTHON;
        g_init_message = std::string("cannot configure the embedded Python for ") + exe;
        return;
    }
    try {
        py::initialize_interpreter(&config, 0, nullptr, false);
    } catch (const std::exception& e) {
        g_init_code = DIFFC_ERR_PYTHON;
        g_init_message = std::string("cannot start the embedded Python (") + exe + "): " + e.what() +
                         "; set DIFFC_PYTHON to the python3 of the environment where diffc is installed";
        return;
    }
    try {
        py::module_::import("diffc.runtime.capi");
    } catch (const py::error_already_set& e) {
        g_init_code = DIFFC_ERR_PYTHON;
        g_init_message = std::string("the embedded Python (") + exe + ") cannot import diffc: " + e.what() +
                         "; install diffc there (pip install diffc) or set DIFFC_PYTHON to the right python3";
    }
    PyEval_SaveThread();
}

diffc_status ensure_python() {
    std::call_once(g_init_once, start_python);
    if (g_init_code != DIFFC_OK) return fail(g_init_code, g_init_message);
    return DIFFC_OK;
}

// Map the Python exception currently held in `e` to a status (GIL held).
diffc_status fail_python(py::error_already_set& e) {
    int code = DIFFC_ERR_INTERNAL;
    std::string message;
    try {
        py::module_ capi = py::module_::import("diffc.runtime.capi");
        code = capi.attr("status_of")(e.value()).cast<int>();
        message = py::str(e.value()).cast<std::string>();
        if (code == DIFFC_ERR_INTERNAL) {
            message = py::str(e.type().attr("__name__")).cast<std::string>() + ": " + message;
        }
    } catch (...) {
        message = e.what();
    }
    return fail(static_cast<diffc_status>(code), message);
}

}  // namespace

extern "C" {

void diffc_options_init(diffc_options* opts) {
    if (opts == nullptr) return;
    opts->threads = 0;
    opts->device = "cpu";
    opts->verify = 1;
    opts->height = 0;
    opts->width = 0;
}

void diffc_request_init(diffc_request* req) {
    if (req == nullptr) return;
    std::memset(req, 0, sizeof(*req));
}

diffc_status diffc_open(const char* artifact_dir, const diffc_options* opts, diffc_pipeline** out) {
    if (out == nullptr) return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_open: `out` must not be NULL");
    *out = nullptr;
    if (artifact_dir == nullptr) return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_open: `artifact_dir` must not be NULL");
    diffc_options defaults;
    diffc_options_init(&defaults);
    if (opts == nullptr) opts = &defaults;
    if (opts->threads < 0) return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_open: `threads` must be >= 0");
    if (opts->height < 0 || opts->width < 0)
        return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_open: height and width must be >= 0 (0 = default)");
    if (diffc_status s = ensure_python(); s != DIFFC_OK) return s;
    try {
        py::gil_scoped_acquire gil;
        try {
            py::module_ capi = py::module_::import("diffc.runtime.capi");
            py::object pipe = capi.attr("open_pipeline")(artifact_dir, opts->threads,
                                                         opts->device ? opts->device : "cpu", opts->verify != 0,
                                                         opts->height, opts->width);
            auto* handle = new (std::nothrow) diffc_pipeline();
            if (handle == nullptr) return fail(DIFFC_ERR_INTERNAL, "diffc_open: out of memory");
            handle->pipe = std::move(pipe);
            *out = handle;
            return ok();
        } catch (py::error_already_set& e) {
            return fail_python(e);
        }
    } catch (const std::exception& e) {
        return fail(DIFFC_ERR_INTERNAL, std::string("diffc_open: ") + e.what());
    } catch (...) {
        return fail(DIFFC_ERR_INTERNAL, "diffc_open: unknown C++ exception");
    }
}

diffc_status diffc_default_size(diffc_pipeline* pipeline, int* height, int* width) {
    if (pipeline == nullptr || height == nullptr || width == nullptr)
        return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_default_size: arguments must not be NULL");
    try {
        std::lock_guard<std::mutex> lock(pipeline->mu);
        py::gil_scoped_acquire gil;
        try {
            auto hw = py::module_::import("diffc.runtime.capi").attr("default_size")(pipeline->pipe);
            auto t = hw.cast<std::pair<int, int>>();
            *height = t.first;
            *width = t.second;
            return ok();
        } catch (py::error_already_set& e) {
            return fail_python(e);
        }
    } catch (const std::exception& e) {
        return fail(DIFFC_ERR_INTERNAL, std::string("diffc_default_size: ") + e.what());
    }
}

diffc_status diffc_generate(diffc_pipeline* pipeline, const diffc_request* request, uint8_t* rgb, size_t rgb_size,
                            int* out_height, int* out_width) {
    if (pipeline == nullptr) return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_generate: `pipeline` must not be NULL");
    if (request == nullptr || request->prompt == nullptr)
        return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_generate: `request` and `request->prompt` must not be NULL");
    if (rgb == nullptr) return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_generate: the output buffer `rgb` is NULL");
    if (request->height < 0 || request->width < 0)
        return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_generate: height and width must be >= 0 (0 = default)");
    int height = request->height, width = request->width;
    if (height == 0 || width == 0) {
        int dh = 0, dw = 0;
        if (diffc_status s = diffc_default_size(pipeline, &dh, &dw); s != DIFFC_OK) return s;
        if (height == 0) height = dh;
        if (width == 0) width = dw;
    }
    const size_t needed = static_cast<size_t>(height) * static_cast<size_t>(width) * 3u;
    if (rgb_size < needed)
        return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_generate: the output buffer holds " + std::to_string(rgb_size) +
                                                    " bytes but a " + std::to_string(height) + "x" +
                                                    std::to_string(width) + " RGB image needs " +
                                                    std::to_string(needed));
    try {
        std::lock_guard<std::mutex> lock(pipeline->mu);
        py::gil_scoped_acquire gil;
        try {
            py::object neg = request->negative_prompt ? py::object(py::str(request->negative_prompt)) : py::none();
            py::tuple result = py::module_::import("diffc.runtime.capi")
                                   .attr("generate")(pipeline->pipe, request->prompt, neg, request->seed,
                                                     request->guidance, height, width);
            std::string bytes = result[0].cast<std::string>();
            if (bytes.size() != needed)
                return fail(DIFFC_ERR_INTERNAL, "diffc_generate: the runtime returned " + std::to_string(bytes.size()) +
                                                    " bytes, expected " + std::to_string(needed));
            std::memcpy(rgb, bytes.data(), bytes.size());
            if (out_height) *out_height = result[1].cast<int>();
            if (out_width) *out_width = result[2].cast<int>();
            return ok();
        } catch (py::error_already_set& e) {
            return fail_python(e);
        }
    } catch (const std::exception& e) {
        return fail(DIFFC_ERR_INTERNAL, std::string("diffc_generate: ") + e.what());
    } catch (...) {
        return fail(DIFFC_ERR_INTERNAL, "diffc_generate: unknown C++ exception");
    }
}

diffc_status diffc_set_loras(diffc_pipeline* pipeline, const char* const* files, const double* scales, size_t count) {
    if (pipeline == nullptr) return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_set_loras: `pipeline` must not be NULL");
    if (count > 0 && (files == nullptr || scales == nullptr))
        return fail(DIFFC_ERR_INVALID_ARGUMENT,
                    "diffc_set_loras: `files` and `scales` must not be NULL when `count` > 0 (count 0: no LoRA)");
    for (size_t i = 0; i < count; ++i)
        if (files[i] == nullptr)
            return fail(DIFFC_ERR_INVALID_ARGUMENT, "diffc_set_loras: files[" + std::to_string(i) + "] is NULL");
    try {
        std::lock_guard<std::mutex> lock(pipeline->mu);
        py::gil_scoped_acquire gil;
        try {
            // (file, scale) pairs in order, so a file given twice adds up as two LoRAs would; the scales are
            // checked (finite) by diffc.runtime.lora like every other entry point's
            py::list loras;
            for (size_t i = 0; i < count; ++i)
                loras.append(py::make_tuple(py::str(files[i]), scales[i]));
            pipeline->pipe.attr("set_loras")(loras);
            return ok();
        } catch (py::error_already_set& e) {
            return fail_python(e);
        }
    } catch (const std::exception& e) {
        return fail(DIFFC_ERR_INTERNAL, std::string("diffc_set_loras: ") + e.what());
    } catch (...) {
        return fail(DIFFC_ERR_INTERNAL, "diffc_set_loras: unknown C++ exception");
    }
}

void diffc_close(diffc_pipeline* pipeline) {
    if (pipeline == nullptr) return;
    try {
        py::gil_scoped_acquire gil;
        pipeline->pipe = py::object();  // drop the Python reference (frees the engines) with the GIL held
    } catch (...) {
    }
    delete pipeline;
}

diffc_status diffc_last_error_code(void) { return t_code; }

const char* diffc_last_error_message(void) { return t_message.c_str(); }

}  // extern "C"
