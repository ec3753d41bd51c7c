// The schemas of the CPU ops, torch.ops.racro_fast.*; their CPU implementations are registered
// next to the code (grpo_loss.cpp, logprob.cpp). kernels/cpu_ops.py loads the library and wraps
// the ops in autograd functions; the ops themselves are not differentiable.
#include <torch/library.h>

TORCH_LIBRARY(racro_fast, m) {
  m.def(
      "grpo_loss_fwd(Tensor logp, Tensor? old, Tensor? ref, Tensor adv, Tensor mask, Tensor? entropy, "
      "Tensor? rollout, float clip_low, float clip_high, float dual_clip, float kl_coef, int kl_type, "
      "float entropy_coef, int loss_agg, float inv_norm_len, int is_mode, float is_cap, float denom) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "grpo_loss_bwd(Tensor dloss, Tensor logp, Tensor? old, Tensor? ref, Tensor adv, Tensor mask, "
      "Tensor? rollout, Tensor u, Tensor out, float clip_low, float clip_high, float dual_clip, float kl_coef, "
      "int kl_type, float entropy_coef, int is_mode, float is_cap, bool need_dent) -> (Tensor, Tensor)");
  m.def("logprob_fwd(Tensor logits, Tensor y, float t, bool with_entropy) -> (Tensor, Tensor, Tensor)");
  m.def("dlogits_(Tensor(a!) x, Tensor y, int col0, float t, Tensor lse, Tensor? H, Tensor g, Tensor? gH) -> ()");
  m.def(
      "lse_tile_update_(Tensor x, Tensor y, int col0, float t, Tensor(a!) m, Tensor(b!) s, Tensor(c!)? a, "
      "Tensor(d!) zy) -> ()");
  m.def(
      "grpo_epilogue_(Tensor(a!) x, Tensor y, float t, Tensor? old, Tensor? ref, Tensor adv, Tensor w, "
      "float clip_low, float clip_high, float dual_clip, float kl_coef, int kl_type, float entropy_coef) "
      "-> Tensor");
}
