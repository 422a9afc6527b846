// XLA FFI handlers for the per-channel sums of BatchNorm on CPU, for
// ftjax.ops.channel_sums. The activation is NHWC, i.e. an [M, C] row-major
// matrix; each handler reads its inputs once and returns two [C] sums:
//
//   moments(x)              -> (sum_m x,  sum_m x^2)
//   centred_sums(dy, x, mu) -> (sum_m dy, sum_m dy * (x - mu))
//
// Why: XLA:CPU computes each of those sums in its own pass over the activation;
// on EfficientNet-Lite0 b32/96 these passes took ~40 ms of a ~210 ms training step
// (experiments/bench/README.md). One pass on all cores halves the memory traffic.
//
// Accuracy: rows are summed in float32 blocks of kBlockRows, the blocks in double,
// so the result does not degrade with M the way one float accumulator would.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 64;

// Runs add_row(row, sum1, sum2) over rows [0, m), accumulating into per-thread
// buffers; writes the totals to out1, out2 ([c] each).
template <typename AddRow>
void ChannelSums(int64_t m, int64_t c, AddRow add_row, float* out1, float* out2) {
  const int nthr = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), m / kBlockRows)));
  std::vector<double> partial(static_cast<size_t>(nthr) * 2 * c, 0.0);
#pragma omp parallel num_threads(nthr)
  {
    const int t = omp_get_thread_num();
    const int64_t begin = m * t / nthr, end = m * (t + 1) / nthr;
    double* total1 = partial.data() + static_cast<size_t>(t) * 2 * c;
    double* total2 = total1 + c;
    std::vector<float> block1(c), block2(c);
    for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
      std::fill(block1.begin(), block1.end(), 0.f);
      std::fill(block2.begin(), block2.end(), 0.f);
      const int64_t r1 = std::min(end, r0 + kBlockRows);
      for (int64_t r = r0; r < r1; ++r) add_row(r, block1.data(), block2.data());
      for (int64_t j = 0; j < c; ++j) {
        total1[j] += block1[j];
        total2[j] += block2[j];
      }
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    double s1 = 0.0, s2 = 0.0;
    for (int t = 0; t < nthr; ++t) {
      s1 += partial[static_cast<size_t>(t) * 2 * c + j];
      s2 += partial[static_cast<size_t>(t) * 2 * c + c + j];
    }
    out1[j] = static_cast<float>(s1);
    out2[j] = static_cast<float>(s2);
  }
}

ffi::Error CheckChannels(int64_t channels, ffi::Span<const int64_t> dims, const char* what) {
  if (dims.size() == 0 || dims.back() != channels)
    return ffi::Error::InvalidArgument(std::string(what) + " must end in the channel axis (" +
                                       std::to_string(channels) + ")");
  return ffi::Error::Success();
}

ffi::Error Moments(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> sum,
                   ffi::ResultBuffer<ffi::F32> sum_sq) {
  const int64_t c = sum->element_count();
  if (auto e = CheckChannels(c, x.dimensions(), "x"); !e.success()) return e;
  if (sum_sq->element_count() != c)
    return ffi::Error::InvalidArgument("the two sums must have one entry per channel");
  const int64_t m = c ? x.element_count() / c : 0;
  const float* xs = x.typed_data();
  ChannelSums(
      m, c,
      [xs, c](int64_t r, float* __restrict s1, float* __restrict s2) {
        const float* row = xs + r * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          s1[j] += row[j];
          s2[j] += row[j] * row[j];
        }
      },
      sum->typed_data(), sum_sq->typed_data());
  return ffi::Error::Success();
}

ffi::Error CentredSums(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> sum_dy,
                       ffi::ResultBuffer<ffi::F32> sum_dy_centred) {
  const int64_t c = mean.element_count();
  if (auto e = CheckChannels(c, x.dimensions(), "x"); !e.success()) return e;
  if (dy.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("dy and x must have the same shape");
  if (sum_dy->element_count() != c || sum_dy_centred->element_count() != c)
    return ffi::Error::InvalidArgument("the two sums must have one entry per channel");
  const int64_t m = c ? x.element_count() / c : 0;
  const float* gs = dy.typed_data();
  const float* xs = x.typed_data();
  const float* mu = mean.typed_data();
  ChannelSums(
      m, c,
      [gs, xs, mu, c](int64_t r, float* __restrict s1, float* __restrict s2) {
        const float* g = gs + r * c;
        const float* row = xs + r * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          s1[j] += g[j];
          s2[j] += g[j] * (row[j] - mu[j]);
        }
      },
      sum_dy->typed_data(), sum_dy_centred->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxChannelMoments, Moments,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxChannelCentredSums, CentredSums,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
