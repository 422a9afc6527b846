// XLA FFI handlers that run 2-D convolutions (forward, input gradient, kernel
// gradient) with oneDNN on CPU, for ftjax.ops.onednn_conv.
//
// Why: XLA:CPU's own convolutions (YNNPACK fusions, Eigen) reach 70-160 GFLOP/s on
// the shapes of ResNet/EfficientNet fine-tuning steps where oneDNN -- the library
// behind PyTorch's CPU convolutions -- reaches 180-210 GFLOP/s on the same machine
// (experiments/bench/README.md).
//
// Layouts are those of ftjax's models: activations NHWC, kernels HWIO as flax stores
// them ([kh, kw, in/groups, out], output channels group-major). Activations are
// handed to oneDNN in place; kernels are reordered to and from oneDNN's preferred
// blocked layout (small). Primitives are built once per shape and cached.
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Dims = memory::dims;

enum class Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

struct Geometry {
  int64_t n, h, w, c;        // input
  int64_t oh, ow, o;         // output
  int64_t kh, kw, groups;    // kernel
  int64_t sh, sw, pt, pb, pl, pr;

  auto key(Kind kind) const {
    return std::make_tuple(static_cast<int>(kind), n, h, w, c, oh, ow, o, kh, kw, groups,
                           sh, sw, pt, pb, pl, pr);
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One cached plan per (kind, geometry): the primitive plus the reorders between
// the caller's HWIO kernel and the primitive's kernel layout.
struct Plan {
  dnnl::primitive conv;
  memory::desc weights_md;   // the primitive's kernel (or kernel gradient) layout
  memory::desc user_weights_md;
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;
  memory::desc src_md, dst_md;
  size_t scratchpad_bytes = 0;
  // Backward-weights only: the primitive is the stride-1 1x1 convolution on the
  // input subsampled by the strides, which Run gathers first (RtusOverflows).
  bool subsample_src = false;
};

// oneDNN 2.6's jit_1x1 backward-weights primitives (jit_avx2_1x1_convolution.cpp,
// jit_avx512_common_1x1_convolution.cpp) run a strided 1x1 convolution without
// padding whose map is an exact multiple of the stride by first copying the strided
// input into a per-thread workspace in the scratchpad ("rtus", reduce to unit
// stride). For NHWC input they place each chunk of output positions [sp, sp + os)
// at `sp * ic_block` floats into the thread's workspace but write it with a row
// stride of `ic` floats, in a workspace of `positions * ic` floats per thread. With
// fewer input channels than the primitive's channel block (8 under AVX2, 16 under
// AVX-512) the copy runs past the thread's workspace: into the next thread's
// (which is copying its own chunk at the same time -- so the kernel gradient comes
// out partly garbage, about half the runs of an 8x8x4 map with 2 threads) or past
// the end of the scratchpad (heap corruption with one thread). Upstream:
// uxlfoundation/oneDNN#6035, still open; there is no attribute or layout of ours that
// avoids the offset short of not taking that path.
//
// Such a convolution reads only the input positions (i * sh, j * sw), so its kernel
// gradient is exactly the stride-1 1x1 kernel gradient on x[:, ::sh, ::sw] (no
// padding to account for), which never takes the rtus path. Exactly the affected
// case -- that primitive, that geometry, in-channels below its channel block -- is
// routed there; every other convolution keeps its primitive (and its bits).
bool RtusOverflows(const Geometry& g, const dnnl::primitive_desc_base& pd,
                   const memory::desc& diff_weights_md) {
  const bool rtus = g.kh == 1 && g.kw == 1 && (g.sh != 1 || g.sw != 1) && g.pt == 0 &&
                    g.pb == 0 && g.pl == 0 && g.pr == 0 && g.oh * g.sh == g.h &&
                    g.ow * g.sw == g.w && g.groups == 1;
  if (!rtus || std::string(pd.impl_info_str()).rfind("jit_1x1", 0) != 0) return false;
  // The input-channel block of the primitive's kernel-gradient layout (ABcd8b8a: 8).
  int64_t ic_block = 1;
#if DNNL_VERSION_MAJOR >= 3
  const memory::dims blks = diff_weights_md.get_inner_blks();
  const memory::dims idxs = diff_weights_md.get_inner_idxs();
  for (int i = 0; i < diff_weights_md.get_inner_nblks(); ++i)
    if (idxs[i] == 1) ic_block *= blks[i];
#else
  const auto& blocking = diff_weights_md.data.format_desc.blocking;
  for (int i = 0; i < blocking.inner_nblks; ++i)
    if (blocking.inner_idxs[i] == 1) ic_block *= blocking.inner_blks[i];
#endif
  return g.c < ic_block;
}

Plan BuildPlan(Kind kind, const Geometry& g) {
  auto& eng = Engine();
  const auto f32 = memory::data_type::f32;
  memory::desc src_md({g.n, g.c, g.h, g.w}, f32, memory::format_tag::nhwc);
  memory::desc dst_md({g.n, g.o, g.oh, g.ow}, f32, memory::format_tag::nhwc);
  Dims weights_dims;
  memory::format_tag user_tag;
  if (g.groups == 1) {
    weights_dims = {g.o, g.c, g.kh, g.kw};
    user_tag = memory::format_tag::hwio;
  } else {
    weights_dims = {g.groups, g.o / g.groups, g.c / g.groups, g.kh, g.kw};
    user_tag = memory::format_tag::hwigo;
  }
  memory::desc any_weights_md(weights_dims, f32, memory::format_tag::any);
  memory::desc user_weights_md(weights_dims, f32, user_tag);
  Dims strides = {g.sh, g.sw}, pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};

  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto direct = dnnl::algorithm::convolution_direct;
  // oneDNN 3 builds primitive descriptors straight from the shapes; oneDNN 2 (Debian's
  // libdnnl-dev 2.6) goes through an operation descriptor first. Same primitives.
#if DNNL_VERSION_MAJOR >= 3
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, direct, src_md, any_weights_md, dst_md, strides,
      pad_l, pad_r, attr);
#else
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, direct, src_md,
                                      any_weights_md, dst_md, strides, pad_l, pad_r),
      attr, eng);
#endif

  Plan plan;
  plan.src_md = src_md;
  plan.dst_md = dst_md;
  plan.user_weights_md = user_weights_md;
  if (kind == Kind::kForward) {
    plan.conv = dnnl::convolution_forward(fwd_pd);
    plan.weights_md = fwd_pd.weights_desc();
    plan.scratchpad_bytes = fwd_pd.scratchpad_desc().get_size();
  } else if (kind == Kind::kBackwardData) {
#if DNNL_VERSION_MAJOR >= 3
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, direct, src_md, any_weights_md, dst_md, strides, pad_l, pad_r, fwd_pd, attr);
#else
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        dnnl::convolution_backward_data::desc(direct, src_md, any_weights_md, dst_md, strides,
                                              pad_l, pad_r),
        attr, eng, fwd_pd);
#endif
    plan.conv = dnnl::convolution_backward_data(pd);
    plan.weights_md = pd.weights_desc();
    plan.scratchpad_bytes = pd.scratchpad_desc().get_size();
  } else {
#if DNNL_VERSION_MAJOR >= 3
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, direct, src_md, any_weights_md, dst_md, strides, pad_l, pad_r, fwd_pd, attr);
#else
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        dnnl::convolution_backward_weights::desc(direct, src_md, any_weights_md, dst_md,
                                                 strides, pad_l, pad_r),
        attr, eng, fwd_pd);
#endif
    if (RtusOverflows(g, pd, pd.diff_weights_desc())) {
      Geometry unit = g;  // the same convolution on x[:, ::sh, ::sw]
      unit.h = g.oh;
      unit.w = g.ow;
      unit.sh = unit.sw = 1;
      Plan subsampled = BuildPlan(kind, unit);
      subsampled.subsample_src = true;
      return subsampled;
    }
    plan.conv = dnnl::convolution_backward_weights(pd);
    plan.weights_md = pd.diff_weights_desc();
    plan.scratchpad_bytes = pd.scratchpad_desc().get_size();
  }
  plan.reorder_weights = plan.weights_md != user_weights_md;
  if (plan.reorder_weights) {
    plan.weights_reorder =
        kind == Kind::kBackwardWeights
            ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, plan.weights_md, eng,
                                                           user_weights_md))
            : dnnl::reorder(dnnl::reorder::primitive_desc(eng, user_weights_md, eng,
                                                           plan.weights_md));
  }
  return plan;
}

const Plan& GetPlan(Kind kind, const Geometry& g) {
  static std::mutex mu;
  static auto* plans = new std::map<decltype(g.key(kind)), std::unique_ptr<Plan>>();
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = (*plans)[g.key(kind)];
  if (!slot) slot = std::make_unique<Plan>(BuildPlan(kind, g));
  return *slot;
}

// Per-thread scratch (XLA may run two custom calls at once on its threads).
struct Scratch {
  std::vector<char> weights, pad;
  std::vector<float> src;  // the subsampled input of a Plan::subsample_src call
  float* Src(size_t count) {
    if (src.size() < count) src.resize(count);
    return src.data();
  }
  void* Weights(size_t bytes) {
    if (weights.size() < bytes) weights.resize(bytes);
    return weights.data();
  }
  void* Pad(size_t bytes) {
    if (pad.size() < bytes) pad.resize(bytes);
    return pad.data();
  }
};
Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

ffi::Error Run(Kind kind, const Geometry& g, float* src, float* weights, float* dst) {
  try {
    const Plan& plan = GetPlan(kind, g);
    auto& eng = Engine();
    thread_local dnnl::stream stream(Engine());
    Scratch& scratch = ThreadScratch();
    if (plan.subsample_src) {  // x[:, ::sh, ::sw] for the stride-1 primitive
      float* sub = scratch.Src(static_cast<size_t>(g.n * g.oh * g.ow * g.c));
      for (int64_t b = 0; b < g.n; ++b)
        for (int64_t i = 0; i < g.oh; ++i)
          for (int64_t j = 0; j < g.ow; ++j)
            std::copy_n(src + ((b * g.h + i * g.sh) * g.w + j * g.sw) * g.c, g.c,
                        sub + ((b * g.oh + i) * g.ow + j) * g.c);
      src = sub;
    }
    memory src_mem(plan.src_md, eng, src), dst_mem(plan.dst_md, eng, dst);
    memory user_weights(plan.user_weights_md, eng, weights);
    memory weights_mem = plan.reorder_weights
                             ? memory(plan.weights_md, eng,
                                      scratch.Weights(plan.weights_md.get_size()))
                             : user_weights;
    memory pad_mem(memory::desc({static_cast<int64_t>(plan.scratchpad_bytes)},
                                memory::data_type::u8, memory::format_tag::x),
                   eng, scratch.Pad(plan.scratchpad_bytes));
    // The three primitives take the same three tensors under different names; the
    // kernel (gradient) is reordered before the call, or after it for backward-weights.
    const bool kernel_is_output = kind == Kind::kBackwardWeights;
    if (plan.reorder_weights && !kernel_is_output)
      plan.weights_reorder.execute(stream, user_weights, weights_mem);
    plan.conv.execute(
        stream, {{kind == Kind::kBackwardData ? DNNL_ARG_DIFF_SRC : DNNL_ARG_SRC, src_mem},
                 {kernel_is_output ? DNNL_ARG_DIFF_WEIGHTS : DNNL_ARG_WEIGHTS, weights_mem},
                 {kind == Kind::kForward ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST, dst_mem},
                 {DNNL_ARG_SCRATCHPAD, pad_mem}});
    if (plan.reorder_weights && kernel_is_output)
      plan.weights_reorder.execute(stream, weights_mem, user_weights);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                        ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr, int64_t groups, Geometry* g) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4)
    return ffi::Error::InvalidArgument("expected NHWC input/output and HWIO kernel");
  *g = Geometry{x[0], x[1], x[2], x[3], y[1], y[2], y[3], k[0], k[1], groups,
                sh, sw, pt, pb, pl, pr};
  if (groups < 1 || g->c != k[2] * groups || g->o != k[3] || g->o % groups != 0 ||
      y[0] != x[0])
    return ffi::Error::InvalidArgument("inconsistent convolution shapes");
  if ((g->h + pt + pb - g->kh) / sh + 1 != g->oh || (g->w + pl + pr - g->kw) / sw + 1 != g->ow)
    return ffi::Error::InvalidArgument("output size does not match strides and padding");
  return ffi::Error::Success();
}

// One handler per kind, with the operands in the order the Python side passes them:
//   forward(x, kernel) -> y,  backward_data(dy, kernel) -> dx,  backward_weights(x, dy) -> dkernel.
template <Kind kind>
ffi::Error Convolve(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t pt,
                    int64_t pb, int64_t pl, int64_t pr, int64_t groups) {
  float* x = kind == Kind::kBackwardData ? out->typed_data() : a.typed_data();
  float* kernel = kind == Kind::kBackwardWeights ? out->typed_data() : b.typed_data();
  float* y = kind == Kind::kForward            ? out->typed_data()
             : kind == Kind::kBackwardData ? a.typed_data()
                                           : b.typed_data();
  auto x_dims = kind == Kind::kBackwardData ? out->dimensions() : a.dimensions();
  auto kernel_dims = kind == Kind::kBackwardWeights ? out->dimensions() : b.dimensions();
  auto y_dims = kind == Kind::kForward            ? out->dimensions()
                : kind == Kind::kBackwardData ? a.dimensions()
                                              : b.dimensions();
  Geometry g;
  if (auto e = MakeGeometry(x_dims, kernel_dims, y_dims, sh, sw, pt, pb, pl, pr, groups, &g);
      !e.success())
    return e;
  return Run(kind, g, x, kernel, y);
}

// Both gradients in one call: backward_data(dy, kernel) -> dx, then
// backward_weights(x, dy) -> dkernel. One call makes the kernel gradient -- and so
// the optimizer's in-place update of a donated kernel -- depend on the last read of
// the kernel, which lets XLA drop the copy it otherwise makes of every kernel at the
// start of a training step (a copy that also runs beside, and slows, the first
// convolution).
ffi::Error ConvolveBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                            ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx,
                            ffi::ResultBuffer<ffi::F32> dkernel, int64_t sh, int64_t sw,
                            int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t groups) {
  if (x.dimensions().size() != dx->dimensions().size() ||
      kernel.dimensions().size() != dkernel->dimensions().size())
    return ffi::Error::InvalidArgument("expected NHWC input/output and HWIO kernel");
  for (size_t i = 0; i < x.dimensions().size(); ++i)
    if (x.dimensions()[i] != dx->dimensions()[i])
      return ffi::Error::InvalidArgument("input gradient shape differs from the input's");
  for (size_t i = 0; i < kernel.dimensions().size(); ++i)
    if (kernel.dimensions()[i] != dkernel->dimensions()[i])
      return ffi::Error::InvalidArgument("kernel gradient shape differs from the kernel's");
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), kernel.dimensions(), dy.dimensions(), sh, sw, pt,
                            pb, pl, pr, groups, &g);
      !e.success())
    return e;
  if (auto e = Run(Kind::kBackwardData, g, dx->typed_data(), kernel.typed_data(),
                   dy.typed_data());
      !e.success())
    return e;
  return Run(Kind::kBackwardWeights, g, x.typed_data(), dkernel->typed_data(),
             dy.typed_data());
}

}  // namespace

#define FTJAX_CONV_ATTRS                                                        \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top") \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left")                    \
      .Attr<int64_t>("pad_right").Attr<int64_t>("groups")

#define FTJAX_CONV_HANDLER(name, kind)                                                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Convolve<kind>,                                  \
                                ffi::Ffi::Bind()                                       \
                                    .Arg<ffi::Buffer<ffi::F32>>()                      \
                                    .Arg<ffi::Buffer<ffi::F32>>()                      \
                                    .Ret<ffi::Buffer<ffi::F32>>() FTJAX_CONV_ATTRS);

FTJAX_CONV_HANDLER(FtjaxOnednnConvForward, Kind::kForward)
FTJAX_CONV_HANDLER(FtjaxOnednnConvBackwardData, Kind::kBackwardData)
FTJAX_CONV_HANDLER(FtjaxOnednnConvBackwardWeights, Kind::kBackwardWeights)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxOnednnConvBackward, ConvolveBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() FTJAX_CONV_ATTRS);
