// XLA FFI handlers for NHWC max pooling on CPU, for ftjax.ops.pool.
//
//   FtjaxMaxPoolForward:  y[n, p, q, c] = max of x over window (p, q) (padding: -inf)
//   FtjaxMaxPoolBackward: dx[n, r, s, c] = sum of g[n, p, q, c] over the windows
//     (p, q) whose first maximum (row-major window order, as XLA's select_and_scatter
//     with >=) is input (r, s) of channel c.
//
// Why: XLA:CPU's reduce_window forward and its select_and_scatter gradient are slow,
// and the gradient written in XLA ops reads the input once per tap and assembles
// stride phases (experiments/bench/README.md). Here each is one pass over the input,
// OpenMP over images, SIMD over channels.
//
// The gradient takes each window's maximum first and then hands the window's
// cotangent to the first tap equal to it: both read the same stored floats, so the
// equality is exact, and the loops stay float-only (vectorisable) instead of
// tracking the index of a running maximum.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c, oh, ow, window_h, window_w, stride_h, stride_w, pad_top, pad_left;
};

ffi::Error Check(const Geometry& g) {
  if (g.window_h < 1 || g.window_w < 1 || g.stride_h < 1 || g.stride_w < 1 ||
      g.pad_top < 0 || g.pad_left < 0)
    return ffi::Error::InvalidArgument("window and strides must be positive, padding >= 0");
  if (g.pad_top >= g.window_h || g.pad_left >= g.window_w)
    return ffi::Error::InvalidArgument("padding must be smaller than the window");
  if (g.oh < 1 || g.ow < 1 || (g.oh - 1) * g.stride_h - g.pad_top >= g.h ||
      (g.ow - 1) * g.stride_w - g.pad_left >= g.w ||
      (g.oh - 1) * g.stride_h - g.pad_top + g.window_h <= 0 ||
      (g.ow - 1) * g.stride_w - g.pad_left + g.window_w <= 0)
    return ffi::Error::InvalidArgument(
        "the pooled spatial size does not fit x, window and strides");
  return ffi::Error::Success();
}

// The geometry of x ([n, h, w, c]) pooled to `pooled` ([n, oh, ow, c]: y, or the
// gradient's cotangent g), checked.
ffi::Error MakeGeometry(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> pooled,
                        const char* pooled_name, int64_t window_h, int64_t window_w,
                        int64_t stride_h, int64_t stride_w, int64_t pad_top,
                        int64_t pad_left, Geometry* g) {
  if (xd.size() != 4 || pooled.size() != 4)
    return ffi::Error::InvalidArgument(std::string("max pool expects NHWC x and ") +
                                       pooled_name);
  if (pooled[0] != xd[0] || pooled[3] != xd[3])
    return ffi::Error::InvalidArgument(std::string(pooled_name) +
                                       " must have x's batch and channel sizes");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], pooled[1], pooled[2], window_h, window_w,
                stride_h, stride_w, pad_top, pad_left};
  return Check(*g);
}

// The input rows / columns of output row p (column q) that lie inside x.
inline void TapRange(int64_t p, int64_t stride, int64_t pad, int64_t window, int64_t size,
                     int64_t* begin, int64_t* end) {
  const int64_t first = p * stride - pad;
  *begin = std::max<int64_t>(first, 0);
  *end = std::min<int64_t>(first + window, size);
}

// Window [r0, r1) x [s0, s1) of image xb: out[j] = its maximum in channel j. Always
// inlined into the row functions below, so each of their target clones vectorises it.
__attribute__((always_inline)) inline void WindowMax(const Geometry& g,
                                                     const float* __restrict xb,
                                                     int64_t r0, int64_t r1, int64_t s0,
                                                     int64_t s1, float* __restrict out) {
  const int64_t c = g.c;
  const float* first = xb + (r0 * g.w + s0) * c;
  std::copy(first, first + c, out);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t s = (r == r0 ? s0 + 1 : s0); s < s1; ++s) {
      const float* v = xb + (r * g.w + s) * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) out[j] = v[j] > out[j] ? v[j] : out[j];
    }
}

// One output row of one image. target_clones: one build runs AVX-512 / AVX2 code
// where the CPU has it (the OpenMP-outlined caller cannot be cloned, hence a helper).
__attribute__((target_clones("avx512f", "avx2", "default")))
void ForwardRow(const Geometry& g, const float* __restrict xb, float* __restrict yrow,
                int64_t p) {
  int64_t r0, r1;
  TapRange(p, g.stride_h, g.pad_top, g.window_h, g.h, &r0, &r1);
  for (int64_t q = 0; q < g.ow; ++q) {
    int64_t s0, s1;
    TapRange(q, g.stride_w, g.pad_left, g.window_w, g.w, &s0, &s1);
    WindowMax(g, xb, r0, r1, s0, s1, yrow + q * g.c);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void BackwardRow(const Geometry& g, const float* __restrict xb, const float* __restrict grow,
                 float* __restrict dxb, float* __restrict best, float* __restrict rest,
                 int64_t p) {
  const int64_t c = g.c;
  int64_t r0, r1;
  TapRange(p, g.stride_h, g.pad_top, g.window_h, g.h, &r0, &r1);
  for (int64_t q = 0; q < g.ow; ++q) {
    int64_t s0, s1;
    TapRange(q, g.stride_w, g.pad_left, g.window_w, g.w, &s0, &s1);
    WindowMax(g, xb, r0, r1, s0, s1, best);
    // rest: the part of the window's cotangent not yet handed out (all of it until
    // the first tap that equals the maximum takes it).
    std::copy(grow + q * c, grow + (q + 1) * c, rest);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t s = s0; s < s1; ++s) {
        const float* v = xb + (r * g.w + s) * c;
        float* d = dxb + (r * g.w + s) * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          const bool hit = v[j] == best[j];
          d[j] += hit ? rest[j] : 0.f;
          rest[j] = hit ? 0.f : rest[j];
        }
      }
  }
}

ffi::Error MaxPoolForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                          int64_t window_h, int64_t window_w, int64_t stride_h,
                          int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), y->dimensions(), "y", window_h, window_w,
                            stride_h, stride_w, pad_top, pad_left, &g);
      !e.success())
    return e;
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
#pragma omp parallel for schedule(static) collapse(2)
  for (int64_t b = 0; b < g.n; ++b)
    for (int64_t p = 0; p < g.oh; ++p)
      ForwardRow(g, xs + b * g.h * g.w * g.c, ys + ((b * g.oh) + p) * g.ow * g.c, p);
  return ffi::Error::Success();
}

ffi::Error MaxPoolBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                           ffi::ResultBuffer<ffi::F32> dx, int64_t window_h, int64_t window_w,
                           int64_t stride_h, int64_t stride_w, int64_t pad_top,
                           int64_t pad_left) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), gy.dimensions(), "g", window_h, window_w,
                            stride_h, stride_w, pad_top, pad_left, &g);
      !e.success())
    return e;
  auto xd = x.dimensions(), dd = dx->dimensions();
  for (size_t i = 0; i < xd.size(); ++i)
    if (dd.size() != xd.size() || dd[i] != xd[i])
      return ffi::Error::InvalidArgument("dx must have x's shape");
  const float* xs = x.typed_data();
  const float* gs = gy.typed_data();
  float* out = dx->typed_data();
  const int64_t image = g.h * g.w * g.c;
  // Whole images per thread: overlapping windows of one image add into the same dx.
#pragma omp parallel
  {
    std::vector<float> best(g.c), rest(g.c);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < g.n; ++b) {
      float* dxb = out + b * image;
      std::fill(dxb, dxb + image, 0.f);
      for (int64_t p = 0; p < g.oh; ++p)
        BackwardRow(g, xs + b * image, gs + (b * g.oh + p) * g.ow * g.c, dxb, best.data(),
                    rest.data(), p);
    }
  }
  return ffi::Error::Success();
}

// Both handlers take the pooling geometry as the same six attributes.
template <typename Binding>
auto WithPoolAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("window_h")
      .template Attr<int64_t>("window_w")
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_left");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxMaxPoolForward, MaxPoolForward,
                              WithPoolAttrs(ffi::Ffi::Bind()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxMaxPoolBackward, MaxPoolBackward,
                              WithPoolAttrs(ffi::Ffi::Bind()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Ret<ffi::Buffer<ffi::F32>>()));
