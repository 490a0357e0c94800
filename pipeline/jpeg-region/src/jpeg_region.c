/*
 * Decodes one rectangle of a JPEG at a scale of M/8, with the system's
 * libjpeg-turbo (the same library OpenCV decodes with).
 *
 * Why not cv::imdecode: it decodes every pixel. A face crop needs a window
 * that is often a tenth of the photo. libjpeg-turbo can skip the inverse DCT,
 * upsampling and colour conversion of the rows above the window
 * (jpeg_skip_scanlines), of the columns beside it (jpeg_crop_scanline) and
 * stop after its last row, so only the entropy decoding of the rows up to the
 * window's bottom is left. Errors come back as a message, never as exit().
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#define FP_OK 0
#define FP_ERROR 1
#define FP_UNSUPPORTED 2

/* One decoded rectangle: BGR rows of `width * 3` bytes, placed at (x, y) of the scaled image. */
typedef struct {
    unsigned char *pixels;
    unsigned int width;
    unsigned int height;
    unsigned int x;
    unsigned int y;
    unsigned int scaled_width;
    unsigned int scaled_height;
} fp_region;

struct fp_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void fp_error_exit(j_common_ptr cinfo) {
    struct fp_error *err = (struct fp_error *)cinfo->err;
    longjmp(err->jump, 1);
}

/* Corrupt-data warnings are not fatal, as with OpenCV: the decoder fills what is missing. */
static void fp_emit_message(j_common_ptr cinfo, int level) {
    if (level < 0) cinfo->err->num_warnings++;
}

static unsigned int clamp_u(unsigned int v, unsigned int lo, unsigned int hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* Everything after setjmp, in its own frame so that no local of the caller
 * changes between setjmp and a longjmp out of libjpeg. */
static void decode_rows(struct jpeg_decompress_struct *cinfo, int scale_num, unsigned int x, unsigned int y,
                        unsigned int w, unsigned int h, fp_region *out, unsigned char *volatile *pixels) {
    cinfo->out_color_space = JCS_EXT_BGR;
    cinfo->scale_num = (unsigned int)(scale_num < 1 ? 1 : (scale_num > 8 ? 8 : scale_num));
    cinfo->scale_denom = 8;
    jpeg_start_decompress(cinfo);

    unsigned int sw = cinfo->output_width, sh = cinfo->output_height;
    x = clamp_u(x, 0, sw - 1);
    y = clamp_u(y, 0, sh - 1);
    w = clamp_u(w, 1, sw - x);
    h = clamp_u(h, 1, sh - y);
    JDIMENSION xoffset = x, width = w;
    if (width < sw) jpeg_crop_scanline(cinfo, &xoffset, &width);
    if (y > 0) jpeg_skip_scanlines(cinfo, y);

    size_t stride = (size_t)width * 3;
    *pixels = calloc(h, stride);
    if (*pixels == NULL) ERREXIT(cinfo, JERR_OUT_OF_MEMORY);
    while (cinfo->output_scanline < y + h) {
        JSAMPROW row = *pixels + (size_t)(cinfo->output_scanline - y) * stride;
        if (jpeg_read_scanlines(cinfo, &row, 1) != 1) break;
    }
    /* The rows below the window are never decoded. */
    jpeg_abort_decompress(cinfo);

    out->width = width;
    out->height = h;
    out->x = xoffset;
    out->y = y;
    out->scaled_width = sw;
    out->scaled_height = sh;
}

/*
 * Decodes the rectangle (x, y, w, h), in pixels of the image scaled by
 * scale_num/8, clamped to that image. The columns may start left of x (to an
 * iMCU boundary): out->x says where they start. Free out->pixels with fp_free.
 */
int fp_decode_region(const unsigned char *data, unsigned long len, int scale_num,
                     unsigned int x, unsigned int y, unsigned int w, unsigned int h,
                     fp_region *out, char *message, size_t message_len) {
    struct jpeg_decompress_struct cinfo;
    struct fp_error jerr;
    unsigned char *volatile pixels = NULL;

    memset(out, 0, sizeof *out);
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = fp_error_exit;
    jerr.pub.emit_message = fp_emit_message;
    if (setjmp(jerr.jump)) {
        char text[JMSG_LENGTH_MAX];
        (*cinfo.err->format_message)((j_common_ptr)&cinfo, text);
        snprintf(message, message_len, "%s", text);
        jpeg_destroy_decompress(&cinfo);
        free(pixels);
        return FP_ERROR;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, len);
    jpeg_read_header(&cinfo, TRUE);
    /* libjpeg does not convert CMYK to BGR; the caller lets OpenCV do it. */
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        return FP_UNSUPPORTED;
    }
    decode_rows(&cinfo, scale_num, x, y, w, h, out, &pixels);
    jpeg_destroy_decompress(&cinfo);
    out->pixels = pixels;
    return FP_OK;
}

void fp_free(unsigned char *pixels) { free(pixels); }
