// Example: generate one image from a diffc artifact through the C API and write it as a PNG.
//
//   diffc_generate ARTIFACT "a handwritten digit seven" out.png [--seed N] [--guidance G] [--height H --width W]
//                  [--negative TEXT] [--threads T] [--lora FILE[:SCALE]]...
//
// --lora applies a LoRA at run time (diffc_set_loras), repeatable: a .safetensors file or a bundled name
// ("demo-bold"), with an optional scale after the last colon (default 1.0).

#include "diffc.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0) {
    static uint32_t table[256];
    static bool ready = false;
    if (!ready) {
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
        ready = true;
    }
    crc = ~crc;
    for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
}

void chunk(std::vector<uint8_t>& png, const char* type, const std::vector<uint8_t>& data) {
    put_u32(png, static_cast<uint32_t>(data.size()));
    std::vector<uint8_t> body(type, type + 4);
    body.insert(body.end(), data.begin(), data.end());
    png.insert(png.end(), body.begin(), body.end());
    put_u32(png, crc32(body.data(), body.size()));
}

// A minimal PNG encoder (8-bit RGB, filter 0, zlib with stored deflate blocks): no library needed.
bool write_png(const std::string& path, const uint8_t* rgb, int height, int width) {
    std::vector<uint8_t> raw;
    raw.reserve(static_cast<size_t>(height) * (width * 3 + 1));
    for (int y = 0; y < height; ++y) {
        raw.push_back(0);
        raw.insert(raw.end(), rgb + static_cast<size_t>(y) * width * 3, rgb + static_cast<size_t>(y + 1) * width * 3);
    }
    std::vector<uint8_t> z = {0x78, 0x01};
    uint32_t a = 1, b = 0;
    for (uint8_t v : raw) {
        a = (a + v) % 65521;
        b = (b + a) % 65521;
    }
    size_t pos = 0;
    do {
        size_t len = std::min<size_t>(65535, raw.size() - pos);
        z.push_back(pos + len == raw.size() ? 1 : 0);
        z.push_back(static_cast<uint8_t>(len & 0xFF));
        z.push_back(static_cast<uint8_t>(len >> 8));
        z.push_back(static_cast<uint8_t>(~len & 0xFF));
        z.push_back(static_cast<uint8_t>((~len >> 8) & 0xFF));
        z.insert(z.end(), raw.begin() + pos, raw.begin() + pos + len);
        pos += len;
    } while (pos < raw.size());
    put_u32(z, (b << 16) | a);

    std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    std::vector<uint8_t> ihdr;
    put_u32(ihdr, static_cast<uint32_t>(width));
    put_u32(ihdr, static_cast<uint32_t>(height));
    ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8-bit, truecolour, deflate, filter 0, no interlace
    chunk(png, "IHDR", ihdr);
    chunk(png, "IDAT", z);
    chunk(png, "IEND", {});
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(png.data()), static_cast<std::streamsize>(png.size()));
    return static_cast<bool>(f);
}

// FILE[:SCALE] -> (file, scale), as `diffc run --lora` reads it: the scale is split off at the last colon only
// when what follows is a number, so a path with colons still works.
void parse_lora(const std::string& text, std::string& file, double& scale) {
    file = text;
    scale = 1.0;
    size_t colon = text.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) return;
    const char* tail = text.c_str() + colon + 1;
    char* end = nullptr;
    double v = std::strtod(tail, &end);
    if (end != nullptr && *end == '\0') {
        file = text.substr(0, colon);
        scale = v;
    }
}

int usage() {
    std::fprintf(stderr,
                 "usage: diffc_generate ARTIFACT PROMPT OUT.png [--seed N] [--guidance G] [--height H] [--width W] "
                 "[--negative TEXT] [--threads T] [--lora FILE[:SCALE]]...\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) return usage();
    diffc_options opts;
    diffc_options_init(&opts);
    diffc_request req;
    diffc_request_init(&req);
    req.prompt = argv[2];
    std::vector<std::string> lora_files;
    std::vector<double> lora_scales;
    for (int i = 4; i < argc; ++i) {
        std::string flag = argv[i];
        if (i + 1 >= argc) return usage();
        const char* v = argv[++i];
        if (flag == "--seed") req.seed = std::strtoull(v, nullptr, 10);
        else if (flag == "--guidance") req.guidance = std::strtof(v, nullptr);
        else if (flag == "--height") req.height = opts.height = std::atoi(v);  // open for the size it asks for
        else if (flag == "--width") req.width = opts.width = std::atoi(v);
        else if (flag == "--negative") req.negative_prompt = v;
        else if (flag == "--threads") opts.threads = std::atoi(v);
        else if (flag == "--lora") {
            lora_files.emplace_back();
            lora_scales.push_back(1.0);
            parse_lora(v, lora_files.back(), lora_scales.back());
        }
        else return usage();
    }

    diffc_pipeline* pipe = nullptr;
    if (diffc_open(argv[1], &opts, &pipe) != DIFFC_OK) {
        std::fprintf(stderr, "error %d: %s\n", diffc_last_error_code(), diffc_last_error_message());
        return 1;
    }
    if (!lora_files.empty()) {
        std::vector<const char*> files;
        for (const std::string& f : lora_files) files.push_back(f.c_str());
        if (diffc_set_loras(pipe, files.data(), lora_scales.data(), files.size()) != DIFFC_OK) {
            std::fprintf(stderr, "error %d: %s\n", diffc_last_error_code(), diffc_last_error_message());
            diffc_close(pipe);
            return 1;
        }
    }
    int height = req.height, width = req.width;
    if ((height == 0 || width == 0) && diffc_default_size(pipe, &height, &width) != DIFFC_OK) {
        std::fprintf(stderr, "error %d: %s\n", diffc_last_error_code(), diffc_last_error_message());
        diffc_close(pipe);
        return 1;
    }
    req.height = height;
    req.width = width;
    std::vector<uint8_t> rgb(static_cast<size_t>(height) * width * 3);
    int h = 0, w = 0;
    if (diffc_generate(pipe, &req, rgb.data(), rgb.size(), &h, &w) != DIFFC_OK) {
        std::fprintf(stderr, "error %d: %s\n", diffc_last_error_code(), diffc_last_error_message());
        diffc_close(pipe);
        return 1;
    }
    diffc_close(pipe);
    if (!write_png(argv[3], rgb.data(), h, w)) {
        std::fprintf(stderr, "error: cannot write %s\n", argv[3]);
        return 1;
    }
    std::printf("wrote %s (%dx%d)\n", argv[3], w, h);
    return 0;
}
