// 2-D convolution forward, backward-data and backward-weights through
// oneDNN's own primitives, exposed to XLA as typed FFI custom calls.
//
// Why: XLA's CPU backend can send a forward convolution to oneDNN, but it
// lowers the weight gradient as another forward convolution over transposed
// copies of the activation and the output gradient (a window as large as the
// image, a 3x3 output); oneDNN's backward-weights primitive reads the NHWC
// arrays as they are, without the copies (measurements: docs/performance.md).
//
// Layouts (row-major, as XLA's CPU buffers are): activations NHWC, kernels
// HWIO (flax's). Weights are reordered to whatever format oneDNN's chosen
// implementation wants (they are small); activations never are.
// Primitives are cached per shape and thread-safe to share.

#include <cstdint>
#include <map>
#include <string>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// N, H, W, Ci, Ho, Wo, Co, KH, KW, stride h/w, pad top/left/bottom/right.
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t>;

struct Geometry {
  int64_t n, h, w, ci, ho, wo, co, kh, kw, sh, sw, pt, pl, pb, pr;

  memory::desc Src() const {
    return memory::desc({n, ci, h, w}, memory::data_type::f32,
                        memory::format_tag::nhwc);
  }
  memory::desc Dst() const {
    return memory::desc({n, co, ho, wo}, memory::data_type::f32,
                        memory::format_tag::nhwc);
  }
  memory::desc WeightsHwio() const {
    return memory::desc({co, ci, kh, kw}, memory::data_type::f32,
                        memory::format_tag::hwio);
  }
  memory::desc WeightsAny() const {
    return memory::desc({co, ci, kh, kw}, memory::data_type::f32,
                        memory::format_tag::any);
  }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }

  dnnl::convolution_forward::primitive_desc Forward() const {
    return dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training,
        dnnl::algorithm::convolution_direct, Src(), WeightsAny(), Dst(),
        Strides(), PadL(), PadR(), Attr());
  }

  // A user-provided scratchpad: with the library's own, one primitive may
  // not run on two threads at once, and XLA may run independent
  // convolutions of the same shape concurrently (e.g. unrolled seeds).
  static dnnl::primitive_attr Attr() {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return attr;
  }
};

// One convolution kind at one geometry: the primitive, plus reorders that
// bring the weights (or their gradient) between HWIO and its own format.
struct Plan {
  dnnl::primitive conv;
  memory::desc scratchpad_md;
  memory::desc weights_md;  // the primitive's weights format
  bool reorder = false;
  dnnl::reorder to_native;    // HWIO -> native (forward, backward-data)
  dnnl::reorder from_native;  // native -> HWIO (backward-weights)
};

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

Plan MakePlan(const Geometry& g, Kind kind) {
  Plan plan;
  auto fwd = g.Forward();
  if (kind == kForward) {
    plan.conv = dnnl::convolution_forward(fwd);
    plan.scratchpad_md = fwd.scratchpad_desc();
    plan.weights_md = fwd.weights_desc();
  } else if (kind == kBackwardData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(),
        g.WeightsAny(), g.Dst(), g.Strides(), g.PadL(), g.PadR(), fwd,
        Geometry::Attr());
    plan.conv = dnnl::convolution_backward_data(pd);
    plan.scratchpad_md = pd.scratchpad_desc();
    plan.weights_md = pd.weights_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(),
        g.WeightsAny(), g.Dst(), g.Strides(), g.PadL(), g.PadR(), fwd,
        Geometry::Attr());
    plan.conv = dnnl::convolution_backward_weights(pd);
    plan.scratchpad_md = pd.scratchpad_desc();
    plan.weights_md = pd.diff_weights_desc();
  }
  plan.reorder = plan.weights_md != g.WeightsHwio();
  if (plan.reorder) {
    memory hwio(g.WeightsHwio(), Engine(), DNNL_MEMORY_NONE);
    memory native(plan.weights_md, Engine(), DNNL_MEMORY_NONE);
    if (kind == kBackwardWeights) {
      plan.from_native = dnnl::reorder(native, hwio);
    } else {
      plan.to_native = dnnl::reorder(hwio, native);
    }
  }
  return plan;
}

const Plan& GetPlan(const Geometry& g, Kind kind) {
  static std::mutex mu;
  static auto* cache = new std::map<Key, std::unique_ptr<Plan>>();
  Key key{kind, g.n, g.h, g.w, g.ci, g.ho, g.wo, g.co, g.kh, g.kw, g.sh,
          g.sw, g.pt, g.pl, g.pb, g.pr};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it == cache->end()) {
    it = cache->emplace(key, std::make_unique<Plan>(MakePlan(g, kind))).first;
  }
  return *it->second;
}

// Per-thread scratch memory, grown as needed and reused across calls.
float* ThreadBuffer(int slot, size_t bytes) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& b = buffers[slot];
  if (b.size() * sizeof(float) < bytes) b.resize(bytes / sizeof(float) + 1);
  return b.data();
}

dnnl::stream& ThreadStream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// Runs `kind` with activation `x` (NHWC), output-side array `y` (NHWC) and
// kernel `w` (HWIO); which of them are written depends on the kind.
ffi::Error Run(Kind kind, float* x, float* w, float* y,
               ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
               ffi::Span<const int64_t> yd, int64_t sh, int64_t sw,
               int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1],
             sh,    sw,    pt,    pl,    pb,    pr};
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("convolution operands must be 4-D");
  }
  if (yd[0] != g.n || wd[2] != g.ci || wd[3] != g.co ||
      g.ho != (g.h + g.pt + g.pb - g.kh) / g.sh + 1 ||
      g.wo != (g.w + g.pl + g.pr - g.kw) / g.sw + 1) {
    return ffi::Error::InvalidArgument("inconsistent convolution shapes");
  }
  try {
    const Plan& plan = GetPlan(g, kind);
    dnnl::stream& stream = ThreadStream();
    memory src(g.Src(), Engine(), x);
    memory dst(g.Dst(), Engine(), y);
    memory hwio(g.WeightsHwio(), Engine(), w);
    memory scratchpad(plan.scratchpad_md, Engine(),
                      ThreadBuffer(0, plan.scratchpad_md.get_size()));
    memory weights = hwio;
    if (plan.reorder) {
      weights = memory(plan.weights_md, Engine(),
                       ThreadBuffer(1, plan.weights_md.get_size()));
    }
    if (kind != kBackwardWeights && plan.reorder) {
      plan.to_native.execute(stream, hwio, weights);
    }
    if (kind == kForward) {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src},
                                 {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DST, dst},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (kind == kBackwardData) {
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src},
                                 {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_DST, dst},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src},
                                 {DNNL_ARG_DIFF_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_DST, dst},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (plan.reorder) plan.from_native.execute(stream, weights, hwio);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  return Run(kForward, x.typed_data(), w.typed_data(), y->typed_data(),
             x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pl,
             pb, pr);
}

ffi::Error BackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                            int64_t sw, int64_t pt, int64_t pl, int64_t pb,
                            int64_t pr) {
  return Run(kBackwardData, dx->typed_data(), w.typed_data(),
             dy.typed_data(), dx->dimensions(), w.dimensions(),
             dy.dimensions(), sh, sw, pt, pl, pb, pr);
}

ffi::Error BackwardWeightsImpl(ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                               int64_t sw, int64_t pt, int64_t pl, int64_t pb,
                               int64_t pr) {
  return Run(kBackwardWeights, x.typed_data(), dw->typed_data(),
             dy.typed_data(), x.dimensions(), dw->dimensions(),
             dy.dimensions(), sh, sw, pt, pl, pb, pr);
}

template <typename B>
auto Attrs(B binding) {
  return std::move(binding).template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    NcConvForward, ForwardImpl,
    Attrs(ffi::Ffi::Bind()
              .Arg<ffi::Buffer<ffi::F32>>()
              .Arg<ffi::Buffer<ffi::F32>>()
              .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    NcConvBackwardData, BackwardDataImpl,
    Attrs(ffi::Ffi::Bind()
              .Arg<ffi::Buffer<ffi::F32>>()
              .Arg<ffi::Buffer<ffi::F32>>()
              .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    NcConvBackwardWeights, BackwardWeightsImpl,
    Attrs(ffi::Ffi::Bind()
              .Arg<ffi::Buffer<ffi::F32>>()
              .Arg<ffi::Buffer<ffi::F32>>()
              .Ret<ffi::Buffer<ffi::F32>>()));
