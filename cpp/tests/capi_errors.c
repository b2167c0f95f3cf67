/* Exercises the C API's error paths from plain C; prints one line per case: NAME CODE MESSAGE.
 * usage: diffc_capi_errors GOOD_ARTIFACT */
#include "diffc.h"

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
