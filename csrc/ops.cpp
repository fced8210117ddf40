// Every fastvid op's schema, once. Kernels register their implementations per device with
// TORCH_LIBRARY_IMPL next to the kernels; Python adds fake (meta) kernels and the autograd formulas
// (fastvid/ops/), except for the sequence and depthwise ops, whose autograd kernels are C++
// (csrc/autograd.cpp). Forward and backward are separate ops so autograd, torch.compile and opcheck
// all see plain functional ops.
#include <Python.h>
#include <torch/library.h>

// The CUDA archs compiled in, comma-separated ("sm_80,sm_90,compute_100"; empty without CUDA kernels):
// setup.py passes the list nvcc was given, so fastvid.info() and the backend choice read what was built.
#define FASTVID_STRINGIFY(...) #__VA_ARGS__
#define FASTVID_EXPAND_STRINGIFY(...) FASTVID_STRINGIFY(__VA_ARGS__)
#ifdef FASTVID_CUDA_ARCHS
static const char* const kCudaArchs = FASTVID_EXPAND_STRINGIFY(FASTVID_CUDA_ARCHS);
#else
static const char* const kCudaArchs = "";
#endif

// `import fastvid._C` loads this library, whose static initialisers register the ops; the module
// holds no functions (no pybind), only the build fact `cuda_archs`.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "cuda_archs", kCudaArchs) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY(fastvid, m) {
  // ---- recurrent (csrc/recurrent/): gate math in fastvid/reference/recurrent.py
  m.def("lstm_cell(Tensor gates_pre, Tensor c_prev, Tensor? peephole) -> (Tensor h, Tensor c, Tensor gates)");
  m.def("lstm_cell_backward(Tensor? grad_h, Tensor? grad_c, Tensor gates, Tensor c_prev, Tensor c, "
        "Tensor? peephole) -> (Tensor grad_gates_pre, Tensor grad_c_prev)");
  m.def("gru_cell(Tensor x_gates, Tensor h_gates, Tensor h_prev, bool reset_after) -> (Tensor h, Tensor cache)");
  m.def("gru_cell_backward(Tensor grad_h, Tensor cache, Tensor h_prev, bool reset_after) "
        "-> (Tensor grad_x_gates, Tensor grad_h_gates, Tensor grad_h_prev)");
  m.def("gru_reset_hidden(Tensor x_r, Tensor h_r, Tensor h_prev) -> Tensor");
  m.def("gru_reset_hidden_backward(Tensor grad, Tensor x_r, Tensor h_r, Tensor h_prev) "
        "-> (Tensor grad_r_pre, Tensor grad_h_prev)");
  // strategy: 0 = hoisted input conv, 1 = [x_t, h] concat buffers, 2 = Winograd (CPU 3x3; recurrent_winograd.h).
  // channels_last: the layout of every [.., C, H, W] buffer and output (an argument rather than read
  // off x's strides, so fake kernels and compiled graphs agree with the real op).
  // reserve: uint8, what backward needs (save=True; empty otherwise), see recurrent_ops.cpp.
  // lengths: [B] integers in 1..T (CPU or x's device) for variable-length sequences; sample b takes
  // part in steps t < lengths[b] only (pack_padded_sequence semantics, see recurrent_kernels.h).
  m.def("convlstm_sequence(Tensor x, Tensor weight_ih, Tensor weight_hh, Tensor? bias, Tensor h0, Tensor c0, "
        "Tensor? peephole, int[2] padding, int[2] dilation, bool reverse, int strategy, bool channels_last, bool save, "
        "Tensor? lengths=None) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor reserve)");
  m.def("convlstm_sequence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, "
        "Tensor weight_ih, Tensor weight_hh, bool has_bias, Tensor h0, Tensor c0, Tensor? peephole, "
        "Tensor output, Tensor reserve, int[2] padding, int[2] dilation, "
        "bool reverse, int strategy, bool channels_last, Tensor? lengths=None) -> (Tensor grad_x, "
        "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, Tensor grad_h0, Tensor grad_c0, "
        "Tensor grad_peephole)");
  m.def("convgru_sequence(Tensor x, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
        "Tensor h0, int[2] padding, int[2] dilation, bool reset_after, bool reverse, int strategy, "
        "bool channels_last, bool save, Tensor? lengths=None) "
        "-> (Tensor output, Tensor h_n, Tensor reserve)");
  m.def("convgru_sequence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor x, Tensor weight_ih, "
        "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor h0, Tensor output, Tensor reserve, "
        "int[2] padding, int[2] dilation, bool reset_after, bool reverse, int strategy, "
        "bool channels_last, Tensor? lengths=None) "
        "-> (Tensor grad_x, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
        "Tensor grad_bias_hh, Tensor grad_h0)");
  // Layer-normalised ConvLSTM / ConvGRU (norm="layer", csrc/recurrent/recurrent_norm.h,
  // fastvid/reference/recurrent_norm.py): gains gain_ih, gain_hh [G*C] (LSTM also gain_c, bias_c [C]);
  // hoisted input conv only; the GRU is the reset_after form. x_pre, h_pre, gates, cells, stats ([B, T, 6]
  // LSTM, [B, T, 4] GRU) are the backward caches (empty unless save).
  m.def("convlstm_ln_sequence(Tensor x, Tensor weight_ih, Tensor weight_hh, Tensor? bias, Tensor h0, Tensor c0, "
        "Tensor gain_ih, Tensor gain_hh, Tensor gain_c, Tensor bias_c, int[2] padding, int[2] dilation, bool reverse, "
        "bool channels_last, bool save) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor x_pre, Tensor h_pre, "
        "Tensor gates, Tensor cells, Tensor stats)");
  m.def("convlstm_ln_sequence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, "
        "Tensor weight_ih, Tensor weight_hh, bool has_bias, Tensor h0, Tensor c0, Tensor gain_ih, Tensor gain_hh, "
        "Tensor gain_c, Tensor bias_c, Tensor output, Tensor x_pre, Tensor h_pre, Tensor gates, Tensor cells, "
        "Tensor stats, int[2] padding, int[2] dilation, bool reverse, bool channels_last) -> (Tensor grad_x, "
        "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, Tensor grad_h0, Tensor grad_c0, "
        "Tensor grad_gain_ih, Tensor grad_gain_hh, Tensor grad_gain_c, Tensor grad_bias_c)");
  m.def("convgru_ln_sequence(Tensor x, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
        "Tensor h0, Tensor gain_ih, Tensor gain_hh, int[2] padding, int[2] dilation, bool reverse, "
        "bool channels_last, bool save) -> (Tensor output, Tensor h_n, Tensor x_pre, Tensor h_pre, Tensor stats)");
  m.def("convgru_ln_sequence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor x, Tensor weight_ih, "
        "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor h0, Tensor gain_ih, Tensor gain_hh, "
        "Tensor output, Tensor x_pre, Tensor h_pre, Tensor stats, int[2] padding, int[2] dilation, bool reverse, "
        "bool channels_last) -> (Tensor grad_x, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
        "Tensor grad_bias_hh, Tensor grad_h0, Tensor grad_gain_ih, Tensor grad_gain_hh)");
  // ---- depthwise3d (csrc/depthwise3d/): F.conv3d(groups=C) with weight [m*C, 1, kT, kH, kW], see
  // fastvid/reference/depthwise3d.py. Outputs are channels_last_3d when the input is, else contiguous;
  // a gradient not asked for in output_mask comes back as an empty [0] tensor.
  m.def("depthwise_conv3d(Tensor input, Tensor weight, Tensor? bias, int[3] stride, int[3] padding, "
        "int[3] dilation) -> Tensor");
  m.def("depthwise_conv3d_backward(Tensor grad_output, Tensor input, Tensor weight, int[3] stride, "
        "int[3] padding, int[3] dilation, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
        "Tensor grad_bias)");
  // Private: the channels-last CPU kernel's streaming stores, "auto" | "always" | "never" (tests, A/Bs);
  // returns the previous mode.
  m.def("_set_depthwise_streaming(str mode) -> str");
  // ---- attention (csrc/attention/): softmax(scale · q kᵀ) v over [B, rows, dim] operands, see
  // fastvid/reference/attention.py. lse = per-row log-sum-exp (fp32, fp64 for fp64 inputs), saved for
  // backward; grad_lse may be absent. save_scores: scores = scale · q kᵀ [B, N, M] in lse's dtype, which
  // the backward then reads instead of recomputing them (else scores is empty, [0], which the backward
  // takes as absent).
  m.def("nonlocal_attention(Tensor q, Tensor k, Tensor v, float scale, bool save_scores=False) -> "
        "(Tensor out, Tensor lse, Tensor scores)");
  m.def("nonlocal_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
        "Tensor out, Tensor lse, float scale, Tensor? scores=None) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Private: the CPU kernel's tile (query rows, key rows), for the benchmark's GEMM-rate yardstick.
  m.def("_attention_cpu_tile() -> int[]");
  // Private: the active CPU path's multiply-add rate on all threads, fp32 lanes/s (csrc/cpu_peak.cpp).
  m.def("_cpu_fma_peak(int iterations, int rounds) -> float");
  // ---- CPU ISA path (csrc/cpu_isa.cpp), private: read/switch the active path, "" = the CPU's own
  // best for _cpu_isa_simulate (tests), the path a family's last CPU kernel ran ("" none yet).
  m.def("_cpu_isa() -> str");
  m.def("_cpu_isa_supported() -> str");
  m.def("_cpu_isa_bf16() -> bool");
  m.def("_set_cpu_isa(str isa) -> ()");
  m.def("_cpu_isa_simulate(str isa) -> ()");
  m.def("_cpu_isa_ran(str family) -> str");
  // [L2 of one core, last-level cache] in bytes as the kernels' cache rules see them (0: unknown).
  m.def("_cpu_cache_bytes() -> int[]");
  // The block cache for big CPU results (csrc/cpu_block_cache.h): [limit, kept bytes, hits, misses];
  // returning every kept block to the system (fastvid.empty_cpu_cache()); an fp32 tensor from it (tests).
  m.def("_cpu_block_cache_stats() -> int[]");
  m.def("_cpu_block_cache_release() -> ()");
  m.def("_cpu_block_cache_empty(int[] size) -> Tensor");
}
