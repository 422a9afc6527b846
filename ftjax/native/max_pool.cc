// XLA FFI handler for the gradient of NHWC max pooling on CPU, for
// ftjax.models.pool: dx[n, r, s, c] = sum of g[n, p, q, c] over the windows (p, q)
// whose first maximum (row-major window order, as XLA's select_and_scatter with >=)
// is input (r, s) of channel c. Padding counts as -inf.
//
// Why: written in XLA ops this gradient reads the input once per window tap and
// assembles stride phases; on ResNet-18's stem pool (32x56x56x64, 3x3/2) forward and
// gradient took 24 ms that way (experiments/bench/README.md). Here it is one pass.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error MaxPoolBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> dx, int64_t window_h, int64_t window_w,
                           int64_t stride_h, int64_t stride_w, int64_t pad_top,
                           int64_t pad_left) {
  auto xd = x.dimensions(), gd = g.dimensions(), dd = dx->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || dd.size() != 4)
    return ffi::Error::InvalidArgument("max pool gradient expects NHWC x, g and dx");
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3], oh = gd[1], ow = gd[2];
  for (int i = 0; i < 4; ++i)
    if (dd[i] != xd[i]) return ffi::Error::InvalidArgument("dx must have x's shape");
  if (gd[0] != n || gd[3] != c)
    return ffi::Error::InvalidArgument("g must have x's batch and channel sizes");
  if (window_h < 1 || window_w < 1 || stride_h < 1 || stride_w < 1 || pad_top < 0 ||
      pad_left < 0)
    return ffi::Error::InvalidArgument("window and strides must be positive, padding >= 0");
  if ((oh - 1) * stride_h - pad_top >= h || (ow - 1) * stride_w - pad_left >= w)
    return ffi::Error::InvalidArgument("g's spatial size does not fit x, window and strides");
  const float* xs = x.typed_data();
  const float* gs = g.typed_data();
  float* out = dx->typed_data();
  const int64_t taps = window_h * window_w;
#pragma omp parallel
  {
    std::vector<float> best(c);
    std::vector<int32_t> chosen(c);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      float* dxb = out + b * h * w * c;
      std::fill(dxb, dxb + h * w * c, 0.f);
      const float* xb = xs + b * h * w * c;
      for (int64_t p = 0; p < oh; ++p) {
        for (int64_t q = 0; q < ow; ++q) {
          std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
          std::fill(chosen.begin(), chosen.end(), -1);
          float* bp = best.data();
          int32_t* cp = chosen.data();
          for (int64_t t = 0; t < taps; ++t) {
            const int64_t r = p * stride_h - pad_top + t / window_w;
            const int64_t s = q * stride_w - pad_left + t % window_w;
            if (r < 0 || r >= h || s < 0 || s >= w) continue;
            const float* v = xb + (r * w + s) * c;
            const int32_t tap = static_cast<int32_t>(t);
#pragma omp simd
            for (int64_t j = 0; j < c; ++j) {
              const bool take = v[j] > bp[j] || cp[j] < 0;  // strictly greater: first maximum
              bp[j] = take ? v[j] : bp[j];
              cp[j] = take ? tap : cp[j];
            }
          }
          const float* gv = gs + ((b * oh + p) * ow + q) * c;
          for (int64_t t = 0; t < taps; ++t) {
            const int64_t r = p * stride_h - pad_top + t / window_w;
            const int64_t s = q * stride_w - pad_left + t % window_w;
            if (r < 0 || r >= h || s < 0 || s >= w) continue;
            float* d = dxb + (r * w + s) * c;
            const int32_t tap = static_cast<int32_t>(t);
#pragma omp simd
            for (int64_t j = 0; j < c; ++j) d[j] += cp[j] == tap ? gv[j] : 0.f;
          }
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxMaxPoolBackward, MaxPoolBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window_h")
                                  .Attr<int64_t>("window_w")
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
