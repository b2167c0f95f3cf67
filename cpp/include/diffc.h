/*
 * diffc C API: embed the diffc runtime (artifact -> image) in a C or C++ application.
 *
 * The implementation embeds CPython (pybind11) and drives `diffc.runtime`, which runs the fixed-step loop
 * with numpy + onnxruntime; torch is never imported. No C++ or Python exception crosses this boundary: every
 * function returns a status code, and the thread's last error (code + message) says what went wrong.
 *
 * Lifetime
 *   - The embedded interpreter starts on the first diffc_open() and lives until the process exits (CPython
 *     cannot be restarted reliably once extension modules such as numpy are loaded). diffc_close() frees the
 *     pipeline's engines; it does not stop the interpreter.
 *   - The Python environment is the one diffc was installed into: the `python3` found when the library was
 *     configured (CMake variable Python_EXECUTABLE), or the interpreter named by the environment variable
 *     DIFFC_PYTHON at the first diffc_open().
 *
 * Thread safety
 *   - A diffc_pipeline* may be shared between threads: calls on one handle are serialized by a lock inside
 *     the handle (one generation at a time per handle). Different handles generate concurrently (onnxruntime
 *     releases the Python GIL while it computes). Open one handle per thread for parallel generations.
 *   - diffc_close() must not run while another thread is using the same handle; after it returns, the
 *     handle is invalid.
 *   - diffc_last_error_code()/diffc_last_error_message() are per thread: they describe the last failing call
 *     made by the calling thread. The message pointer stays valid until that thread's next diffc call.
 */
#ifndef DIFFC_H
#define DIFFC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DIFFC_API_VERSION 3 /* 2: diffc_options.height / width; 3: diffc_set_loras */

typedef enum diffc_status {
    DIFFC_OK = 0,
    DIFFC_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a buffer too small, a non-positive size ... */
    DIFFC_ERR_ARTIFACT = 2,         /* missing/corrupt/modified artifact or manifest: rebuild it */
    DIFFC_ERR_INPUT = 3,            /* a request outside what the artifact was built for (size, batch) */
    DIFFC_ERR_BACKEND = 4,          /* the artifact's backend is not available here */
    DIFFC_ERR_PYTHON = 5,           /* the embedded Python environment could not start or import diffc */
    DIFFC_ERR_INTERNAL = 6          /* anything else; the message has the details */
} diffc_status;

typedef struct diffc_pipeline diffc_pipeline;

typedef struct diffc_options {
    int threads;        /* onnxruntime intra-op threads; 0 = the profile's (0 there: onnxruntime picks) */
    const char* device; /* "cpu" (or NULL): the backend device; other devices need a GPU artifact */
    int verify;         /* nonzero: check every file's sha256 at open (recommended); 0: skip */
    /* The image size to prepare for, in pixels (0: the artifact's default): checked at open, engines specialized
     * by shape (OpenVINO) are compiled for it there instead of the default, and requests with height = width = 0
     * produce it. Other sizes still work; a shape-specialized engine then compiles again at that request. */
    int height;
    int width;
} diffc_options;

typedef struct diffc_request {
    const char* prompt;          /* required, UTF-8 */
    const char* negative_prompt; /* NULL: none */
    uint64_t seed;
    float guidance; /* <= 0: the artifact's default guidance scale */
    int height;     /* pixels; 0: the artifact's default */
    int width;      /* pixels; 0: the artifact's default */
} diffc_request;

/* Fill `opts` with defaults (threads 0, device "cpu", verify 1, the artifact's default size). */
void diffc_options_init(diffc_options* opts);
/* Fill `req` with defaults (no negative prompt, seed 0, default guidance and size). */
void diffc_request_init(diffc_request* req);

/* Open an artifact folder. On success *out is a new handle; on failure *out is NULL. `opts` may be NULL. */
diffc_status diffc_open(const char* artifact_dir, const diffc_options* opts, diffc_pipeline** out);

/* The size a request with height = width = 0 produces: the size given at open, or the artifact's default. */
diffc_status diffc_default_size(diffc_pipeline* pipeline, int* height, int* width);

/* Generate one image into the caller-owned buffer `rgb` of `rgb_size` bytes (at least height*width*3):
 * row-major, 8-bit RGB, no padding. *out_height / *out_width (may be NULL) receive the image size. */
diffc_status diffc_generate(diffc_pipeline* pipeline, const diffc_request* request, uint8_t* rgb, size_t rgb_size,
                            int* out_height, int* out_width);

/* Apply LoRAs at run time, without a rebuild: `files[i]` (a LoRA .safetensors in the peft / diffusers / kohya /
 * A1111 layout, or a bundled name such as "demo-bold") at `scales[i]` (1.0: as trained), on top of the artifact's
 * weights, replacing the LoRAs set before; several add up. `count` = 0 (`files` / `scales` may then be NULL):
 * back to the artifact's own weights, exactly. Only the engines whose weights change are reopened (onnxruntime and
 * OpenVINO artifacts; others: DIFFC_ERR_INPUT saying to fuse the LoRA at build with `diffc build --lora`).
 * Every file is read and checked before any engine is touched: on failure (DIFFC_ERR_INPUT for a missing, corrupt
 * or foreign LoRA or a non-finite scale) the pipeline keeps the LoRAs it had. Serialized with generations on the
 * same handle, like every call. */
diffc_status diffc_set_loras(diffc_pipeline* pipeline, const char* const* files, const double* scales, size_t count);

/* Free the handle (NULL is fine). */
void diffc_close(diffc_pipeline* pipeline);

/* The calling thread's last error: a diffc_status, and a message saying what to do (never NULL). */
diffc_status diffc_last_error_code(void);
const char* diffc_last_error_message(void);

#ifdef __cplusplus
}
#endif

#endif /* DIFFC_H */
