// Launchers of the CUDA paged attention forward: attention, attention_with_lse. Arguments and
// returns mirror the CPU extension's functions of the same names (csrc/cpu/attention.cpp). The plan
// (kernels/attention_plan.cuh, shared with the simulator): bf16 / fp16 with head size 64 or 128 run
// the tensor-core kernels (kernels/attention_mma.cuh), everything else the SIMT kernels
// (kernels/attention.cuh); long-context launches with few rows take the split-parallel path (one
// block per split + the combine kernel, an fp32 workspace sized from block_table.size(1) *
// block_size): the same bits. BATCH_INVARIANT_CUDA_ATTN_PATH=sequential|split forces a path. No
// host synchronisation: query_start_loc, seq_lens and block_table are read by the kernels on the
// device only, so the CPU launcher's checks of their *values* (nondecreasing query_start_loc,
// seq_lens >= query length, block ids in range) are not repeated here (they would need a
// device-to-host copy); the op layer's shape / dtype / device checks and these launchers' checks
// still run. Contracts: launchers.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#include "kernels/attention_plan.cuh"
#include "launch_utils.h"
#include "launchers.h"

namespace bi {
namespace cuda {
namespace {

using launch::ptr;

std::tuple<at::Tensor, at::Tensor> attention_impl(const at::Tensor& q, const at::Tensor& key_cache,
                                                  const at::Tensor& value_cache, const at::Tensor& query_start_loc,
                                                  const at::Tensor& seq_lens, const at::Tensor& block_table,
                                                  double scale, bool with_lse, const char* op) {
  launch::check_cuda(q, op, "q");
  launch::check_cuda(key_cache, op, "key_cache");
  launch::check_cuda(value_cache, op, "value_cache");
  launch::check_cuda(query_start_loc, op, "query_start_loc");
  launch::check_cuda(seq_lens, op, "seq_lens");
  launch::check_cuda(block_table, op, "block_table");
  launch::check_same_device(key_cache, "key_cache", q, "q", op);
  launch::check_same_device(value_cache, "value_cache", q, "q", op);
  launch::check_same_device(query_start_loc, "query_start_loc", q, "q", op);
  launch::check_same_device(seq_lens, "seq_lens", q, "q", op);
  launch::check_same_device(block_table, "block_table", q, "q", op);
  TORCH_CHECK(q.dim() == 3, op, ": q must be [T, Hq, D], got ", launch::describe(q));
  TORCH_CHECK(key_cache.dim() == 4, op, ": key_cache must be [num_blocks, block_size, Hk, D], got ",
              launch::describe(key_cache));
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache (", launch::describe(value_cache),
              ") must have key_cache's shape (", launch::describe(key_cache), ")");
  const auto dt = q.scalar_type();
  TORCH_CHECK(launch::is_float_dtype(dt), op, ": q must be float32, bfloat16 or float16, got ", launch::describe(q));
  TORCH_CHECK(key_cache.scalar_type() == dt && value_cache.scalar_type() == dt, op,
              ": q, key_cache and value_cache must share one dtype, got q: ", launch::describe(q),
              "; key_cache: ", launch::describe(key_cache), "; value_cache: ", launch::describe(value_cache));
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = key_cache.size(1), Hk = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, op, ": head size of key_cache (", launch::describe(key_cache),
              ") must equal q's (", launch::describe(q), ")");
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, op, ": num_heads of q (", launch::describe(q),
              ") must be a multiple of num_kv_heads of key_cache (", launch::describe(key_cache), ")");
  TORCH_CHECK(D > 0 && D <= kAttnMaxHead, op, ": head size must be in [1, ", kAttnMaxHead, "], got ",
              launch::describe(q));
  TORCH_CHECK(BS > 0 && BS <= int64_t(INT_MAX), op, ": bad block size, key_cache: ", launch::describe(key_cache));
  TORCH_CHECK(q.stride(2) == 1 && key_cache.stride(3) == 1 && value_cache.stride(3) == 1, op,
              ": the head dim must be contiguous, got strides q ", q.strides(), ", key_cache ", key_cache.strides(),
              ", value_cache ", value_cache.strides());
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.dim() == 1 && query_start_loc.size(0) >= 1,
              op, ": query_start_loc must be int32 [B+1], got ", launch::describe(query_start_loc));
  const int64_t B = query_start_loc.size(0) - 1;
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == B, op,
              ": seq_lens must be int32 [", B, "], got ", launch::describe(seq_lens));
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == B, op,
              ": block_table must be int32 [", B, ", max_blocks], got ", launch::describe(block_table));
  TORCH_CHECK(block_table.size(1) <= 1 || block_table.stride(1) == 1, op,
              ": block_table rows must be contiguous, got strides ", block_table.strides());
  TORCH_CHECK(T <= int64_t(INT_MAX) && Hq <= int64_t(INT_MAX) && B <= int64_t(INT_MAX), op,
              ": sizes exceed the grid limits, q: ", launch::describe(q));

  const c10::cuda::CUDAGuard guard(q.device());
  std::string path_error;
  const int path = attention_path_from_env(&path_error);
  TORCH_CHECK(path >= 0, op, ": ", path_error);
  at::Tensor qsl = query_start_loc.contiguous(), sl = seq_lens.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(q.device().index());
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor out, lse;
  launch::dispatch_float(dt, op, [&](auto tag) {
    using E = typename decltype(tag)::type;
    // The plan (kernels, path, grids, workspace): from the shapes and the SM count only, no host
    // sync; the workspace is sized by the block table's capacity block_table.size(1) * block_size.
    const AttnPlan plan = attention_plan<E>(path, T, B, Hq, Hk, D, block_table.size(1) * BS, contract::ATTN_SPLIT,
                                            sm_count);
    TORCH_CHECK(plan.error.empty(), op, ": ", plan.error, " (q: ", launch::describe(q), ")");
    // Every row is written by the kernels (padding tokens: zeros), except on the sequential
    // tensor-core path (tiles cover sequences only): zero-filled there.
    const auto o_opts = q.options().memory_format(at::MemoryFormat::Contiguous);
    const bool zero = plan.zero_out || T == 0 || Hq == 0 || B == 0;
    out = zero ? at::zeros({T, Hq, D}, o_opts) : at::empty({T, Hq, D}, o_opts);
    const auto l_opts = q.options().dtype(at::kFloat);
    if (with_lse) lse = zero ? at::zeros({T, Hq}, l_opts) : at::empty({T, Hq}, l_opts);
    if (T == 0 || Hq == 0 || B == 0) return;  // no sequence: every token is padding
    AttentionArgs<E> a{};
    a.q = ptr<const E>(q); a.q_st = q.stride(0); a.q_sh = q.stride(1);
    a.kc = ptr<const E>(key_cache);
    a.kc_sb = key_cache.stride(0); a.kc_ss = key_cache.stride(1); a.kc_sh = key_cache.stride(2);
    a.vc = ptr<const E>(value_cache);
    a.vc_sb = value_cache.stride(0); a.vc_ss = value_cache.stride(1); a.vc_sh = value_cache.stride(2);
    a.qsl = qsl.data_ptr<int32_t>();
    a.seq_lens = sl.data_ptr<int32_t>();
    a.bt = block_table.data_ptr<int32_t>(); a.bt_s = block_table.stride(0);
    a.T_tokens = T; a.B = int(B); a.Hq = int(Hq); a.Hk = int(Hk); a.D = int(D); a.block_size = int(BS);
    a.split = contract::ATTN_SPLIT;
    a.scale = float(scale);
    a.out = ptr<E>(out); a.o_st = out.stride(0); a.o_sh = out.stride(1);
    a.lse = with_lse ? lse.data_ptr<float>() : nullptr; a.lse_st = Hq;
    // fp32 workspace of the split-parallel path (the caching allocator frees it after the stream's kernels)
    at::Tensor ws;
    if (plan.ws_floats > 0) ws = at::empty({plan.ws_floats}, q.options().dtype(at::kFloat));
    attention_run(plan, a, ws.defined() ? ws.data_ptr<float>() : nullptr, launch::stream_launcher(stream));
  });
  return {out, lse};
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& block_table,
                     double scale) {
  return std::get<0>(attention_impl(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale,
                                    /*with_lse=*/false, "attention"));
}

std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& key_cache,
                                                      const at::Tensor& value_cache, const at::Tensor& query_start_loc,
                                                      const at::Tensor& seq_lens, const at::Tensor& block_table,
                                                      double scale) {
  return attention_impl(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale,
                        /*with_lse=*/true, "attention_with_lse");
}

}  // namespace cuda
}  // namespace bi
