/* Exercises the C API's error paths from plain C; prints one line per case: NAME CODE MESSAGE.
 * usage: diffc_capi_errors GOOD_ARTIFACT [LORA]  (LORA: a LoRA file for that artifact; its cases run with it) */
#include "diffc.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void report(const char* name, diffc_status s) {
    printf("%s %d %s\n", name, (int)s, s == DIFFC_OK ? "" : diffc_last_error_message());
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: diffc_capi_errors GOOD_ARTIFACT\n");
        return 2;
    }
    diffc_pipeline* pipe = NULL;
    report("missing_artifact", diffc_open("/nonexistent/artifact.diffc", NULL, &pipe));
    report("null_out", diffc_open(argv[1], NULL, NULL));
    diffc_status s = diffc_open(argv[1], NULL, &pipe);
    report("open", s);
    if (s != DIFFC_OK) return 1;

    diffc_request req;
    diffc_request_init(&req);
    req.prompt = "a handwritten digit one";
    unsigned char* buf = malloc(4096 * 4096 * 3);
    report("null_buffer", diffc_generate(pipe, &req, NULL, 100, NULL, NULL));
    report("small_buffer", diffc_generate(pipe, &req, buf, 10, NULL, NULL));
    req.height = 4096;
    req.width = 4096;
    report("bad_size", diffc_generate(pipe, &req, buf, (size_t)4096 * 4096 * 3, NULL, NULL));
    req.height = 0;
    req.width = 0;
    report("null_prompt", (req.prompt = NULL, diffc_generate(pipe, &req, buf, 100, NULL, NULL)));
    req.prompt = "a handwritten digit one";
    int h = 0, w = 0;
    report("generate", diffc_generate(pipe, &req, buf, (size_t)4096 * 4096 * 3, &h, &w));
    printf("size %d %d\n", h, w);

    /* run-time LoRAs: bad input is refused with the pipeline unchanged; a good one applies, count 0 clears */
    report("lora_null_pipeline", diffc_set_loras(NULL, NULL, NULL, 0));
    report("lora_null_files", diffc_set_loras(pipe, NULL, NULL, 1));
    const char* missing[] = {"/nonexistent/lora.safetensors"};
    double one[] = {1.0};
    report("lora_missing", diffc_set_loras(pipe, missing, one, 1));
    if (argc > 2) {
        const char* lora[] = {argv[2]};
        double nan_scale[] = {NAN};
        report("lora_nan_scale", diffc_set_loras(pipe, lora, nan_scale, 1));
        report("lora_set", diffc_set_loras(pipe, lora, one, 1));
        report("lora_generate", diffc_generate(pipe, &req, buf, (size_t)4096 * 4096 * 3, &h, &w));
        report("lora_clear", diffc_set_loras(pipe, NULL, NULL, 0));
    }
    diffc_close(pipe);

    /* a size given at open: checked there, and what requests without a size produce */
    diffc_options opts;
    diffc_options_init(&opts);
    opts.height = 4096;
    report("open_bad_size", diffc_open(argv[1], &opts, &pipe));
    opts.height = -1;
    report("open_negative_size", diffc_open(argv[1], &opts, &pipe));
    opts.height = 48;
    opts.width = 32;
    s = diffc_open(argv[1], &opts, &pipe);
    report("open_sized", s);
    if (s != DIFFC_OK) return 1;
    report("default_size", diffc_default_size(pipe, &h, &w));
    printf("opened_default %d %d\n", h, w);
    report("generate_sized", diffc_generate(pipe, &req, buf, (size_t)4096 * 4096 * 3, &h, &w));
    printf("opened_size %d %d\n", h, w);
    free(buf);
    diffc_close(pipe);
    return 0;
}
