// Autograd kernels in C++ for the ops whose every call users pay for in small shapes: the ConvLSTM /
// ConvGRU sequences (plain and layer-normalised) and the depthwise 3D convolution; the cell and
// attention ops keep torch.library's Python formulas (fastvid/ops/). Measured reason:
// torch.library.register_autograd runs Python around every call -- an autograd.Function,
// `fill_defaults` (which walks the op's schema argument by argument), setup_context, the backward
// closure -- ~0.2 ms of a tiny ConvGRU's ~0.6 ms fwd+bwd, ~0.09 ms of the depthwise forward's ~1.1 ms
// budget after a cold cache. Same formulas and errors as before; torch.compile and opcheck see the
// same functional ops (an Autograd-key kernel, as torchvision's ops have).
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

namespace fastvid {
namespace {

using at::IntArrayRef;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// The op `name` ("fastvid::...") with signature Sig; each caller keeps it in a function-local static.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// torch 2.11 (the GPU lease image's) holds autograd nodes in std::shared_ptr, 2.14 in c10::intrusive_ptr:
// make a node the way the torch we build against holds them (the type of Edge::function).
template <typename NodeT, typename... Args>
auto make_node(Args&&... args) {
  using NodePtr = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<NodeT>(std::forward<Args>(args)...);
  else
    return c10::make_intrusive<NodeT>(std::forward<Args>(args)...);
}

// A *_backward op's outputs, called with grad mode on and inputs that require grad (a backward
// with create_graph=True, or a direct call): they get a node that raises when reached, so a second
// derivative fails instead of coming out wrong (torchvision's habit).
void refuse_double_backward(const char* op, const variable_list& inputs, std::vector<Tensor*> outputs) {
  if (!torch::autograd::compute_requires_grad(inputs)) return;
  auto node = make_node<torch::autograd::Error>(std::string("fastvid.") + op + ": double backward is not supported",
                                                torch::autograd::collect_next_edges(inputs));
  for (Tensor* out : outputs)
    if (out->defined() && torch::autograd::isDifferentiableType(out->scalar_type()))
      torch::autograd::set_history(*out, node);
}

Tensor defined_or_empty(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// ---------------------------------------------------------------------------- depthwise_conv3d
using DepthwiseForward = Tensor(const Tensor&, const Tensor&, const OptTensor&, IntArrayRef, IntArrayRef,
                                IntArrayRef);
using DepthwiseBackward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              IntArrayRef, IntArrayRef, IntArrayRef,
                                                              std::array<bool, 3>);

std::tuple<Tensor, Tensor, Tensor> depthwise_backward_call(const Tensor& grad_output, const Tensor& input,
                                                           const Tensor& weight, IntArrayRef stride,
                                                           IntArrayRef padding, IntArrayRef dilation,
                                                           std::array<bool, 3> mask) {
  static const auto op = find_op<DepthwiseBackward>("fastvid::depthwise_conv3d_backward");
  return op.call(grad_output, input, weight, stride, padding, dilation, mask);
}

struct DepthwiseConv3d : torch::autograd::Function<DepthwiseConv3d> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                        IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    static const auto op = find_op<DepthwiseForward>("fastvid::depthwise_conv3d");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(input, weight, bias, stride, padding, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the tensor arguments present: input 0, weight 1, bias 2
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    auto [grad_input, grad_weight, grad_bias] = depthwise_backward_call(
        grads[0], saved[0], saved[1], ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(), mask);
    return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), mask[2] ? grad_bias : Tensor(),
            Tensor(), Tensor(), Tensor()};
  }
};

Tensor depthwise_conv3d_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                 IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  return DepthwiseConv3d::apply(input, weight, bias, stride, padding, dilation);
}

std::tuple<Tensor, Tensor, Tensor> depthwise_conv3d_backward_autograd(const Tensor& grad_output,
                                                                      const Tensor& input, const Tensor& weight,
                                                                      IntArrayRef stride, IntArrayRef padding,
                                                                      IntArrayRef dilation,
                                                                      std::array<bool, 3> mask) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return depthwise_backward_call(grad_output, input, weight, stride, padding, dilation, mask);
  }();
  refuse_double_backward("depthwise_conv3d_backward", {grad_output, input, weight},
                         {&std::get<0>(result), &std::get<1>(result), &std::get<2>(result)});
  return result;
}

// ---------------------------------------------------------------------------- convlstm_sequence
using LstmForward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
    IntArrayRef, IntArrayRef, bool, int64_t, bool, bool, const OptTensor&);
using LstmBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, bool,
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, bool,
    int64_t, bool, const OptTensor&);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_call(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n, const Tensor& x,
    const Tensor& weight_ih, const Tensor& weight_hh, bool has_bias, const Tensor& h0, const Tensor& c0,
    const OptTensor& peephole, const Tensor& output, const Tensor& reserve, IntArrayRef padding,
    IntArrayRef dilation, bool reverse, int64_t strategy, bool channels_last, const OptTensor& lengths) {
  static const auto op = find_op<LstmBackward>("fastvid::convlstm_sequence_backward");
  return op.call(grad_output, grad_h_n, grad_c_n, x, weight_ih, weight_hh, has_bias, h0, c0, peephole, output,
                 reserve, padding, dilation, reverse, strategy, channels_last, lengths);
}

// An undefined tensor (a gradient of an output that took no part in the loss, or an absent optional
// input saved as undefined) as the op's empty optional: the inverse of defined_or_empty.
OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Saved scalars of the sequence ops (the same keys for all four).
void save_sequence_args(AutogradContext* ctx, IntArrayRef padding, IntArrayRef dilation, bool reverse,
                        bool channels_last, bool save) {
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["reverse"] = reverse;
  ctx->saved_data["channels_last"] = channels_last;
  ctx->saved_data["save"] = save;
}

void check_saved(AutogradContext* ctx, const char* name) {
  TORCH_CHECK(ctx->saved_data["save"].toBool(), "fastvid.", name, ": backward through a call made with save=False");
}

struct ConvLstmSequence : torch::autograd::Function<ConvLstmSequence> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight_ih,
                               const Tensor& weight_hh, const OptTensor& bias, const Tensor& h0, const Tensor& c0,
                               const OptTensor& peephole, IntArrayRef padding, IntArrayRef dilation, bool reverse,
                               int64_t strategy, bool channels_last, bool save, const OptTensor& lengths) {
    ctx->set_materialize_grads(false);
    auto [output, h_n, c_n, reserve] = [&] {
      at::AutoDispatchBelowADInplaceOrView below;
      static const auto op = find_op<LstmForward>("fastvid::convlstm_sequence");
      return op.call(x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse, strategy,
                     channels_last, save, lengths);
    }();
    ctx->mark_non_differentiable({reserve});
    ctx->save_for_backward({x, weight_ih, weight_hh, h0, c0, defined_or_empty(peephole), output, reserve,
                            defined_or_empty(lengths)});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["strategy"] = strategy;
    save_sequence_args(ctx, padding, dilation, reverse, channels_last, save);
    return {output, h_n, c_n, reserve};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_saved(ctx, "convlstm");
    const auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_peephole = s[5].defined();
    auto [gx, gw_ih, gw_hh, gb, gh0, gc0, gpeep] = lstm_backward_call(
        optional_of(grads[0]), optional_of(grads[1]), optional_of(grads[2]), s[0], s[1], s[2], has_bias, s[3],
        s[4], optional_of(s[5]), s[6], s[7], ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["reverse"].toBool(),
        ctx->saved_data["strategy"].toInt(), ctx->saved_data["channels_last"].toBool(), optional_of(s[8]));
    return {gx,       gw_ih,    gw_hh,    has_bias ? gb : Tensor(), gh0,      gc0,      has_peephole ? gpeep : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(),                 Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> convlstm_sequence_autograd(
    const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias, const Tensor& h0,
    const Tensor& c0, const OptTensor& peephole, IntArrayRef padding, IntArrayRef dilation, bool reverse,
    int64_t strategy, bool channels_last, bool save, const OptTensor& lengths) {
  auto r = ConvLstmSequence::apply(x, weight_ih, weight_hh, bias, h0, c0, peephole, padding, dilation, reverse,
                                   strategy, channels_last, save, lengths);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> convlstm_sequence_backward_autograd(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n, const Tensor& x,
    const Tensor& weight_ih, const Tensor& weight_hh, bool has_bias, const Tensor& h0, const Tensor& c0,
    const OptTensor& peephole, const Tensor& output, const Tensor& reserve, IntArrayRef padding,
    IntArrayRef dilation, bool reverse, int64_t strategy, bool channels_last, const OptTensor& lengths) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return lstm_backward_call(grad_output, grad_h_n, grad_c_n, x, weight_ih, weight_hh, has_bias, h0, c0, peephole,
                              output, reserve, padding, dilation, reverse, strategy, channels_last, lengths);
  }();
  auto& [gx, gw_ih, gw_hh, gb, gh0, gc0, gpeep] = result;
  refuse_double_backward("convlstm_sequence_backward",
                         {defined_or_empty(grad_output), defined_or_empty(grad_h_n), defined_or_empty(grad_c_n), x,
                          weight_ih, weight_hh, h0, c0, defined_or_empty(peephole), output},
                         {&gx, &gw_ih, &gw_hh, &gb, &gh0, &gc0, &gpeep});
  return result;
}

// ---------------------------------------------------------------------------- convgru_sequence
using GruForward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                      const OptTensor&, const Tensor&, IntArrayRef, IntArrayRef,
                                                      bool, bool, int64_t, bool, bool, const OptTensor&);
using GruBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const Tensor&, const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, bool, bool, int64_t,
    bool, const OptTensor&);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_call(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& x, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh, const Tensor& h0,
    const Tensor& output, const Tensor& reserve, IntArrayRef padding, IntArrayRef dilation, bool reset_after,
    bool reverse, int64_t strategy, bool channels_last, const OptTensor& lengths) {
  static const auto op = find_op<GruBackward>("fastvid::convgru_sequence_backward");
  return op.call(grad_output, grad_h_n, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, output, reserve, padding,
                 dilation, reset_after, reverse, strategy, channels_last, lengths);
}

struct ConvGruSequence : torch::autograd::Function<ConvGruSequence> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight_ih,
                               const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
                               const Tensor& h0, IntArrayRef padding, IntArrayRef dilation, bool reset_after,
                               bool reverse, int64_t strategy, bool channels_last, bool save,
                               const OptTensor& lengths) {
    ctx->set_materialize_grads(false);
    auto [output, h_n, reserve] = [&] {
      at::AutoDispatchBelowADInplaceOrView below;
      static const auto op = find_op<GruForward>("fastvid::convgru_sequence");
      return op.call(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation, reset_after, reverse,
                     strategy, channels_last, save, lengths);
    }();
    ctx->mark_non_differentiable({reserve});
    ctx->save_for_backward({x, weight_ih, weight_hh, defined_or_empty(bias_ih), defined_or_empty(bias_hh), h0,
                            output, reserve, defined_or_empty(lengths)});
    ctx->saved_data["reset_after"] = reset_after;
    ctx->saved_data["strategy"] = strategy;
    save_sequence_args(ctx, padding, dilation, reverse, channels_last, save);
    return {output, h_n, reserve};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_saved(ctx, "convgru");
    const auto s = ctx->get_saved_variables();
    const bool has_bias_ih = s[3].defined(), has_bias_hh = s[4].defined();
    auto [gx, gw_ih, gw_hh, gb_ih, gb_hh, gh0] = gru_backward_call(
        optional_of(grads[0]), optional_of(grads[1]), s[0], s[1], s[2], optional_of(s[3]), optional_of(s[4]),
        s[5], s[6], s[7], ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
        ctx->saved_data["reset_after"].toBool(), ctx->saved_data["reverse"].toBool(),
        ctx->saved_data["strategy"].toInt(), ctx->saved_data["channels_last"].toBool(), optional_of(s[8]));
    return {gx,       gw_ih,    gw_hh,    has_bias_ih ? gb_ih : Tensor(), has_bias_hh ? gb_hh : Tensor(),
            gh0,      Tensor(), Tensor(), Tensor(),                       Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> convgru_sequence_autograd(const Tensor& x, const Tensor& weight_ih,
                                                             const Tensor& weight_hh, const OptTensor& bias_ih,
                                                             const OptTensor& bias_hh, const Tensor& h0,
                                                             IntArrayRef padding, IntArrayRef dilation,
                                                             bool reset_after, bool reverse, int64_t strategy,
                                                             bool channels_last, bool save, const OptTensor& lengths) {
  auto r = ConvGruSequence::apply(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, padding, dilation, reset_after,
                                  reverse, strategy, channels_last, save, lengths);
  return {r[0], r[1], r[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> convgru_sequence_backward_autograd(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& x, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh, const Tensor& h0,
    const Tensor& output, const Tensor& reserve, IntArrayRef padding, IntArrayRef dilation, bool reset_after,
    bool reverse, int64_t strategy, bool channels_last, const OptTensor& lengths) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return gru_backward_call(grad_output, grad_h_n, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, output, reserve,
                             padding, dilation, reset_after, reverse, strategy, channels_last, lengths);
  }();
  auto& [gx, gw_ih, gw_hh, gb_ih, gb_hh, gh0] = result;
  refuse_double_backward("convgru_sequence_backward",
                         {defined_or_empty(grad_output), defined_or_empty(grad_h_n), x, weight_ih, weight_hh,
                          defined_or_empty(bias_ih), defined_or_empty(bias_hh), h0, output},
                         {&gx, &gw_ih, &gw_hh, &gb_ih, &gb_hh, &gh0});
  return result;
}

// ---------------------------------------------------------------------------- convlstm_ln_sequence
// The caches (x_pre, h_pre, gates, cells, stats) are outputs only so that backward gets them: not
// differentiable.
using T8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using T10 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using LnLstmForward = T8(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, bool,
                         bool, bool);
using LnLstmBackward = T10(const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                           const Tensor&, bool, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, bool, bool);

T10 ln_lstm_backward_call(const OptTensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n,
                          const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh, bool has_bias,
                          const Tensor& h0, const Tensor& c0, const Tensor& gain_ih, const Tensor& gain_hh,
                          const Tensor& gain_c, const Tensor& bias_c, const Tensor& output, const Tensor& x_pre,
                          const Tensor& h_pre, const Tensor& gates, const Tensor& cells, const Tensor& stats,
                          IntArrayRef padding, IntArrayRef dilation, bool reverse, bool channels_last) {
  static const auto op = find_op<LnLstmBackward>("fastvid::convlstm_ln_sequence_backward");
  return op.call(grad_output, grad_h_n, grad_c_n, x, weight_ih, weight_hh, has_bias, h0, c0, gain_ih, gain_hh,
                 gain_c, bias_c, output, x_pre, h_pre, gates, cells, stats, padding, dilation, reverse,
                 channels_last);
}

struct ConvLstmLnSequence : torch::autograd::Function<ConvLstmLnSequence> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight_ih,
                               const Tensor& weight_hh, const OptTensor& bias, const Tensor& h0, const Tensor& c0,
                               const Tensor& gain_ih, const Tensor& gain_hh, const Tensor& gain_c,
                               const Tensor& bias_c, IntArrayRef padding, IntArrayRef dilation, bool reverse,
                               bool channels_last, bool save) {
    ctx->set_materialize_grads(false);
    auto [output, h_n, c_n, x_pre, h_pre, gates, cells, stats] = [&] {
      static const auto op = find_op<LnLstmForward>("fastvid::convlstm_ln_sequence");
      at::AutoDispatchBelowADInplaceOrView below;
      return op.call(x, weight_ih, weight_hh, bias, h0, c0, gain_ih, gain_hh, gain_c, bias_c, padding, dilation,
                     reverse, channels_last, save);
    }();
    ctx->mark_non_differentiable({x_pre, h_pre, gates, cells, stats});
    ctx->save_for_backward(
        {x, weight_ih, weight_hh, h0, c0, gain_ih, gain_hh, gain_c, bias_c, output, x_pre, h_pre, gates, cells, stats});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    save_sequence_args(ctx, padding, dilation, reverse, channels_last, save);
    return {output, h_n, c_n, x_pre, h_pre, gates, cells, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_saved(ctx, "convlstm_ln");
    const auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto [gx, gw_ih, gw_hh, gb, gh0, gc0, g_gain_ih, g_gain_hh, g_gain_c, g_bias_c] = ln_lstm_backward_call(
        optional_of(grads[0]), optional_of(grads[1]), optional_of(grads[2]), s[0], s[1], s[2], has_bias, s[3],
        s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11], s[12], s[13], s[14],
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
        ctx->saved_data["reverse"].toBool(), ctx->saved_data["channels_last"].toBool());
    return {gx,        gw_ih,     gw_hh,    has_bias ? gb : Tensor(), gh0,      gc0,      g_gain_ih, g_gain_hh,
            g_gain_c,  g_bias_c,  Tensor(), Tensor(),                 Tensor(), Tensor(), Tensor()};
  }
};

T8 convlstm_ln_sequence_autograd(const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh,
                                 const OptTensor& bias, const Tensor& h0, const Tensor& c0, const Tensor& gain_ih,
                                 const Tensor& gain_hh, const Tensor& gain_c, const Tensor& bias_c,
                                 IntArrayRef padding, IntArrayRef dilation, bool reverse, bool channels_last,
                                 bool save) {
  auto r = ConvLstmLnSequence::apply(x, weight_ih, weight_hh, bias, h0, c0, gain_ih, gain_hh, gain_c, bias_c, padding,
                                     dilation, reverse, channels_last, save);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
}

T10 convlstm_ln_sequence_backward_autograd(const OptTensor& grad_output, const OptTensor& grad_h_n,
                                           const OptTensor& grad_c_n, const Tensor& x, const Tensor& weight_ih,
                                           const Tensor& weight_hh, bool has_bias, const Tensor& h0, const Tensor& c0,
                                           const Tensor& gain_ih, const Tensor& gain_hh, const Tensor& gain_c,
                                           const Tensor& bias_c, const Tensor& output, const Tensor& x_pre,
                                           const Tensor& h_pre, const Tensor& gates, const Tensor& cells,
                                           const Tensor& stats, IntArrayRef padding, IntArrayRef dilation,
                                           bool reverse, bool channels_last) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return ln_lstm_backward_call(grad_output, grad_h_n, grad_c_n, x, weight_ih, weight_hh, has_bias, h0, c0, gain_ih,
                                 gain_hh, gain_c, bias_c, output, x_pre, h_pre, gates, cells, stats, padding,
                                 dilation, reverse, channels_last);
  }();
  auto& [gx, gw_ih, gw_hh, gb, gh0, gc0, g_gain_ih, g_gain_hh, g_gain_c, g_bias_c] = result;
  refuse_double_backward("convlstm_ln_sequence_backward",
                         {defined_or_empty(grad_output), defined_or_empty(grad_h_n), defined_or_empty(grad_c_n), x,
                          weight_ih, weight_hh, h0, c0, gain_ih, gain_hh, gain_c, bias_c, output},
                         {&gx, &gw_ih, &gw_hh, &gb, &gh0, &gc0, &g_gain_ih, &g_gain_hh, &g_gain_c, &g_bias_c});
  return result;
}

// ---------------------------------------------------------------------------- convgru_ln_sequence
using T5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using LnGruForward = T5(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                        const Tensor&, const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, bool, bool, bool);
using LnGruBackward = T8(const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                         const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, bool,
                         bool);

T8 ln_gru_backward_call(const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& x,
                        const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias_ih,
                        const OptTensor& bias_hh, const Tensor& h0, const Tensor& gain_ih, const Tensor& gain_hh,
                        const Tensor& output, const Tensor& x_pre, const Tensor& h_pre, const Tensor& stats,
                        IntArrayRef padding, IntArrayRef dilation, bool reverse, bool channels_last) {
  static const auto op = find_op<LnGruBackward>("fastvid::convgru_ln_sequence_backward");
  return op.call(grad_output, grad_h_n, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh, output,
                 x_pre, h_pre, stats, padding, dilation, reverse, channels_last);
}

struct ConvGruLnSequence : torch::autograd::Function<ConvGruLnSequence> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight_ih,
                               const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
                               const Tensor& h0, const Tensor& gain_ih, const Tensor& gain_hh, IntArrayRef padding,
                               IntArrayRef dilation, bool reverse, bool channels_last, bool save) {
    ctx->set_materialize_grads(false);
    auto [output, h_n, x_pre, h_pre, stats] = [&] {
      static const auto op = find_op<LnGruForward>("fastvid::convgru_ln_sequence");
      at::AutoDispatchBelowADInplaceOrView below;
      return op.call(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh, padding, dilation, reverse,
                     channels_last, save);
    }();
    ctx->mark_non_differentiable({x_pre, h_pre, stats});
    ctx->save_for_backward({x, weight_ih, weight_hh, defined_or_empty(bias_ih), defined_or_empty(bias_hh), h0,
                            gain_ih, gain_hh, output, x_pre, h_pre, stats});
    save_sequence_args(ctx, padding, dilation, reverse, channels_last, save);
    return {output, h_n, x_pre, h_pre, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_saved(ctx, "convgru_ln");
    const auto s = ctx->get_saved_variables();
    const bool has_bias_ih = s[3].defined(), has_bias_hh = s[4].defined();
    auto [gx, gw_ih, gw_hh, gb_ih, gb_hh, gh0, g_gain_ih, g_gain_hh] = ln_gru_backward_call(
        optional_of(grads[0]), optional_of(grads[1]), s[0], s[1], s[2], optional_of(s[3]), optional_of(s[4]),
        s[5], s[6], s[7], s[8], s[9], s[10], s[11], ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["reverse"].toBool(),
        ctx->saved_data["channels_last"].toBool());
    return {gx,        gw_ih,     gw_hh,    has_bias_ih ? gb_ih : Tensor(), has_bias_hh ? gb_hh : Tensor(),
            gh0,       g_gain_ih, g_gain_hh, Tensor(),                      Tensor(),
            Tensor(),  Tensor(),  Tensor()};
  }
};

T5 convgru_ln_sequence_autograd(const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh,
                                const OptTensor& bias_ih, const OptTensor& bias_hh, const Tensor& h0,
                                const Tensor& gain_ih, const Tensor& gain_hh, IntArrayRef padding,
                                IntArrayRef dilation, bool reverse, bool channels_last, bool save) {
  auto r = ConvGruLnSequence::apply(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih, gain_hh, padding, dilation,
                                    reverse, channels_last, save);
  return {r[0], r[1], r[2], r[3], r[4]};
}

T8 convgru_ln_sequence_backward_autograd(const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& x,
                                         const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias_ih,
                                         const OptTensor& bias_hh, const Tensor& h0, const Tensor& gain_ih,
                                         const Tensor& gain_hh, const Tensor& output, const Tensor& x_pre,
                                         const Tensor& h_pre, const Tensor& stats, IntArrayRef padding,
                                         IntArrayRef dilation, bool reverse, bool channels_last) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return ln_gru_backward_call(grad_output, grad_h_n, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, gain_ih,
                                gain_hh, output, x_pre, h_pre, stats, padding, dilation, reverse, channels_last);
  }();
  auto& [gx, gw_ih, gw_hh, gb_ih, gb_hh, gh0, g_gain_ih, g_gain_hh] = result;
  refuse_double_backward("convgru_ln_sequence_backward",
                         {defined_or_empty(grad_output), defined_or_empty(grad_h_n), x, weight_ih, weight_hh,
                          defined_or_empty(bias_ih), defined_or_empty(bias_hh), h0, gain_ih, gain_hh, output},
                         {&gx, &gw_ih, &gw_hh, &gb_ih, &gb_hh, &gh0, &g_gain_ih, &g_gain_hh});
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvid, Autograd, m) {
  m.impl("depthwise_conv3d", &depthwise_conv3d_autograd);
  m.impl("depthwise_conv3d_backward", &depthwise_conv3d_backward_autograd);
  m.impl("convlstm_sequence", &convlstm_sequence_autograd);
  m.impl("convlstm_sequence_backward", &convlstm_sequence_backward_autograd);
  m.impl("convgru_sequence", &convgru_sequence_autograd);
  m.impl("convgru_sequence_backward", &convgru_sequence_backward_autograd);
  m.impl("convlstm_ln_sequence", &convlstm_ln_sequence_autograd);
  m.impl("convlstm_ln_sequence_backward", &convlstm_ln_sequence_backward_autograd);
  m.impl("convgru_ln_sequence", &convgru_ln_sequence_autograd);
  m.impl("convgru_ln_sequence_backward", &convgru_ln_sequence_backward_autograd);
}

}  // namespace fastvid
