// 2-D convolutions on the CPU with oneDNN, as XLA FFI handlers: forward, backward-data and
// backward-weights, for NHWC activations and HWIO kernels (the layouts the models use), float32 or
// bfloat16, any strides and explicit padding, no dilation, no groups.
//
// oneDNN picks its own layout for the kernel (a blocked one, for speed); the HWIO kernel is reordered
// into it, and the weight gradient out of it. Primitives are built once per shape and cached; each
// call gets its own scratchpad, so that calls from several XLA threads (one per device) can run at
// once.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum class Pass { kForward, kBackwardData, kBackwardWeights };

// What determines a primitive: the pass, the data type, and every size.
using Key = std::tuple<int, int, std::vector<int64_t>>;

struct Conv {
  // The convolution primitive and the layout oneDNN chose for its kernel (or kernel gradient).
  dnnl::primitive conv;
  memory::desc weights;
  memory::desc scratchpad;
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;  // HWIO -> chosen layout (forward, backward-data) or back (backward-weights)
  memory::desc hwio;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// The primitive of one pass, with the kernel layout and scratchpad size it was built for.
template <typename Primitive>
void Fill(Conv& conv, const typename Primitive::primitive_desc& desc, const memory::desc& weights) {
  conv.conv = Primitive(desc);
  conv.weights = weights;
  conv.scratchpad = desc.scratchpad_desc();
}

struct Shape {
  int64_t n, h, w, c;     // input NHWC
  int64_t kh, kw, o;      // kernel HWIO (I == c)
  int64_t oh, ow;         // output spatial size
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right;
};

const Conv& GetConv(Pass pass, memory::data_type type, const Shape& s) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Conv>> cache;
  Key key{static_cast<int>(pass), static_cast<int>(type),
          {s.n, s.h, s.w, s.c, s.kh, s.kw, s.o, s.oh, s.ow, s.stride_h, s.stride_w, s.pad_top, s.pad_bottom,
           s.pad_left, s.pad_right}};
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return *found->second;

  auto& engine = Engine();
  const memory::dims src_dims{s.n, s.c, s.h, s.w}, dst_dims{s.n, s.o, s.oh, s.ow};
  const memory::dims weights_dims{s.o, s.c, s.kh, s.kw};
  const memory::dims strides{s.stride_h, s.stride_w};
  const memory::dims padding_l{s.pad_top, s.pad_left}, padding_r{s.pad_bottom, s.pad_right};
  const memory::desc src(src_dims, type, memory::format_tag::nhwc);
  const memory::desc dst(dst_dims, type, memory::format_tag::nhwc);
  const memory::desc any_weights(weights_dims, type, memory::format_tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  attr.set_fpmath_mode(dnnl::fpmath_mode::strict);

  auto conv = std::make_unique<Conv>();
  conv->hwio = memory::desc(weights_dims, type, memory::format_tag::hwio);
  auto forward = dnnl::convolution_forward::primitive_desc(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, any_weights, dst,
      strides, padding_l, padding_r, attr);
  if (pass == Pass::kForward) {
    Fill<dnnl::convolution_forward>(*conv, forward, forward.weights_desc());
  } else if (pass == Pass::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc backward(
        engine, dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, padding_l, padding_r,
        forward, attr);
    Fill<dnnl::convolution_backward_data>(*conv, backward, backward.weights_desc());
  } else {
    dnnl::convolution_backward_weights::primitive_desc backward(
        engine, dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, padding_l, padding_r,
        forward, attr);
    Fill<dnnl::convolution_backward_weights>(*conv, backward, backward.diff_weights_desc());
  }
  conv->reorder_weights = conv->weights != conv->hwio;
  if (conv->reorder_weights) {
    conv->weights_reorder = pass == Pass::kBackwardWeights
                                ? dnnl::reorder(dnnl::reorder::primitive_desc(engine, conv->weights, engine, conv->hwio))
                                : dnnl::reorder(dnnl::reorder::primitive_desc(engine, conv->hwio, engine, conv->weights));
  }
  return *cache.emplace(key, std::move(conv)).first->second;
}

template <ffi::DataType T>
ffi::Error Run(Pass pass, ffi::AnyBuffer activations, ffi::AnyBuffer other, ffi::AnyBuffer result, int64_t stride_h,
               int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  // Forward: (x, w) -> y. Backward-data: (dy, w) -> dx. Backward-weights: (x, dy) -> dw.
  Shape s{};
  s.stride_h = stride_h, s.stride_w = stride_w;
  s.pad_top = pad_top, s.pad_bottom = pad_bottom, s.pad_left = pad_left, s.pad_right = pad_right;
  auto dims = [](const ffi::AnyBuffer& b) { return b.dimensions(); };
  if (pass == Pass::kForward) {
    auto x = dims(activations), w = dims(other), y = dims(result);
    s.n = x[0], s.h = x[1], s.w = x[2], s.c = x[3];
    s.kh = w[0], s.kw = w[1], s.o = w[3], s.oh = y[1], s.ow = y[2];
  } else if (pass == Pass::kBackwardData) {
    auto dy = dims(activations), w = dims(other), dx = dims(result);
    s.n = dx[0], s.h = dx[1], s.w = dx[2], s.c = dx[3];
    s.kh = w[0], s.kw = w[1], s.o = w[3], s.oh = dy[1], s.ow = dy[2];
  } else {
    auto x = dims(activations), dy = dims(other), dw = dims(result);
    s.n = x[0], s.h = x[1], s.w = x[2], s.c = x[3];
    s.kh = dw[0], s.kw = dw[1], s.o = dw[3], s.oh = dy[1], s.ow = dy[2];
  }
  constexpr auto type = T == ffi::DataType::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
  try {
    const Conv& conv = GetConv(pass, type, s);
    auto& engine = Engine();
    dnnl::stream stream(engine);
    const memory::dims src_dims{s.n, s.c, s.h, s.w}, dst_dims{s.n, s.o, s.oh, s.ow};
    const memory::desc src_md(src_dims, type, memory::format_tag::nhwc);
    const memory::desc dst_md(dst_dims, type, memory::format_tag::nhwc);
    // Uninitialised on purpose (oneDNN writes before it reads): zeroing them costs a pass per call.
    std::unique_ptr<uint8_t[]> scratchpad_bytes(new uint8_t[conv.scratchpad.get_size()]);
    memory scratchpad(conv.scratchpad, engine, scratchpad_bytes.get());
    std::unique_ptr<uint8_t[]> weights_bytes(new uint8_t[conv.reorder_weights ? conv.weights.get_size() : 0]);

    if (pass == Pass::kBackwardWeights) {
      memory src(src_md, engine, activations.untyped_data());
      memory diff_dst(dst_md, engine, other.untyped_data());
      memory diff_weights_hwio(conv.hwio, engine, result.untyped_data());
      memory diff_weights = conv.reorder_weights ? memory(conv.weights, engine, weights_bytes.get()) : diff_weights_hwio;
      conv.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_DIFF_WEIGHTS, diff_weights}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (conv.reorder_weights) conv.weights_reorder.execute(stream, diff_weights, diff_weights_hwio);
    } else {
      memory weights_hwio(conv.hwio, engine, other.untyped_data());
      memory weights = weights_hwio;
      if (conv.reorder_weights) {
        weights = memory(conv.weights, engine, weights_bytes.get());
        conv.weights_reorder.execute(stream, weights_hwio, weights);
      }
      if (pass == Pass::kForward) {
        memory src(src_md, engine, activations.untyped_data());
        memory dst(dst_md, engine, result.untyped_data());
        conv.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst},
                                   {DNNL_ARG_SCRATCHPAD, scratchpad}});
      } else {
        memory diff_dst(dst_md, engine, activations.untyped_data());
        memory diff_src(src_md, engine, result.untyped_data());
        conv.conv.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights},
                                   {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + error.what());
  }
  return ffi::Error::Success();
}

ffi::Error Dispatch(Pass pass, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, int64_t stride_h,
                    int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  switch (a.element_type()) {
    case ffi::DataType::F32:
      return Run<ffi::DataType::F32>(pass, a, b, *out, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);
    case ffi::DataType::BF16:
      return Run<ffi::DataType::BF16>(pass, a, b, *out, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);
    default:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "oneDNN convolution: float32 or bfloat16 only");
  }
}

#define PIVOT_CONV_HANDLER(NAME, PASS)                                                                          \
  ffi::Error NAME##Impl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, int64_t stride_h, \
                        int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,              \
                        int64_t pad_right) {                                                                   \
    return Dispatch(PASS, a, b, out, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right);           \
  }

PIVOT_CONV_HANDLER(ConvForward, Pass::kForward)
PIVOT_CONV_HANDLER(ConvBackwardData, Pass::kBackwardData)
PIVOT_CONV_HANDLER(ConvBackwardWeights, Pass::kBackwardWeights)

}  // namespace

#define PIVOT_CONV_BIND(NAME)                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Pivot##NAME, NAME##Impl,       \
                                ffi::Ffi::Bind()               \
                                    .Arg<ffi::AnyBuffer>()     \
                                    .Arg<ffi::AnyBuffer>()     \
                                    .Ret<ffi::AnyBuffer>()     \
                                    .Attr<int64_t>("stride_h") \
                                    .Attr<int64_t>("stride_w") \
                                    .Attr<int64_t>("pad_top")  \
                                    .Attr<int64_t>("pad_bottom") \
                                    .Attr<int64_t>("pad_left") \
                                    .Attr<int64_t>("pad_right"))

PIVOT_CONV_BIND(ConvForward);
PIVOT_CONV_BIND(ConvBackwardData);
PIVOT_CONV_BIND(ConvBackwardWeights);
