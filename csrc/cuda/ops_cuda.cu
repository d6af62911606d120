// CUDA kernels of knnclip._C. Same definitions as the CPU kernels (see cpu/ops_cpu.h); float32
// accumulation whatever the input precision.
#include "cuda/ops_cuda.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace knnclip::cuda {
namespace {

#define KNNCLIP_CUDA_CHECK(expr)                                                             \
  do {                                                                                       \
    cudaError_t err_ = (expr);                                                               \
    if (err_ != cudaSuccess)                                                                 \
      throw std::runtime_error(std::string("CUDA error in ") + #expr + ": " +                \
                               cudaGetErrorString(err_));                                    \
  } while (0)

constexpr cudaStream_t kStream = 0;  // legacy default stream (see ops_cuda.h)

// Makes `device` current for the lifetime of the guard.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    KNNCLIP_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) KNNCLIP_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// The stream-ordered allocator's default pool trims itself to its release threshold (0 unless
// set) at every synchronisation, so each op would return its scratch memory to the driver and
// allocate it again on the next call. Keep what the pool holds (it is still reused, and freed when
// the process ends); set once per device.
void keep_pool_memory(int device) {
  static std::atomic<uint64_t> done{0};  // one bit per device (devices 0..63)
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit == 0 || (done.load() & bit)) return;
  cudaMemPool_t pool = nullptr;
  if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess) {
    uint64_t threshold = UINT64_MAX;
    cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
  } else {
    cudaGetLastError();  // a device without memory pools: nothing to keep
  }
  done.fetch_or(bit);
}

// Makes `device` current and its pool keep its memory, for the lifetime of an op.
class OpScope {
 public:
  explicit OpScope(int device) : guard_(device) { keep_pool_memory(device); }

 private:
  DeviceGuard guard_;
};

// A device scratch buffer from the stream-ordered allocator.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) {
    KNNCLIP_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes > 0 ? bytes : 1, kStream));
  }
  ~DeviceBuffer() { cudaFreeAsync(ptr_, kStream); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ bool is_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool is_finite(__half x) {
  return (__half_as_ushort(x) & 0x7c00u) != 0x7c00u;
}

// Blocks for n items, capped at 65535: kernels launched with it loop over their items with a
// grid stride, so any n is covered.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

// A grid dimension that must hold `n` blocks (y and z are limited to 65535).
inline unsigned checked_dim(int64_t n, int64_t limit, const char* what) {
  if (n > limit)
    throw std::invalid_argument(std::string(what) + " is larger than a CUDA grid allows (" +
                                std::to_string(n) + " > " + std::to_string(limit) + "); split the call");
  return static_cast<unsigned>(n > 0 ? n : 1);
}

template <typename T>
__global__ void check_finite_kernel(const T* x, int64_t n, uint32_t* flags) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x)
    if (!is_finite(x[i])) {
      atomicOr(flags, static_cast<uint32_t>(kNonFinite));
      return;
    }
}

// Calls f with a typed pointer for a float32 or float16 buffer.
template <typename F>
void with_type(const void* p, DType dtype, F&& f) {
  if (dtype == DType::F32) f(static_cast<const float*>(p));
  else f(static_cast<const __half*>(p));
}

void queue_finite_check(const void* p, DType dtype, int64_t n, uint32_t* flags) {
  with_type(p, dtype, [&](auto typed) {
    check_finite_kernel<<<grid_for(n, 256), 256, 0, kStream>>>(typed, n, flags);
  });
}

// Per-thread flag word per device, allocated once; reset, filled by kernels, read back.
class Flags {
 public:
  explicit Flags(bool enabled) : enabled_(enabled) {
    if (!enabled_) return;
    KNNCLIP_CUDA_CHECK(cudaMallocAsync(&ptr_, sizeof(uint32_t), kStream));
    KNNCLIP_CUDA_CHECK(cudaMemsetAsync(ptr_, 0, sizeof(uint32_t), kStream));
  }
  ~Flags() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, kStream);
  }
  uint32_t* get() const { return ptr_; }
  // Waits for everything queued so far and returns the flags (0 when disabled). It waits with
  // check=false too: a kernel fault is then reported by the op that caused it, not by whatever
  // CUDA call comes next.
  uint32_t read() const {
    KNNCLIP_CUDA_CHECK(cudaGetLastError());  // launch errors
    uint32_t host = 0;
    if (enabled_)
      KNNCLIP_CUDA_CHECK(cudaMemcpyAsync(&host, ptr_, sizeof host, cudaMemcpyDeviceToHost, kStream));
    KNNCLIP_CUDA_CHECK(cudaStreamSynchronize(kStream));  // execution errors
    return host;
  }

 private:
  bool enabled_;
  uint32_t* ptr_ = nullptr;
};

// PyTorch's bilinear source coordinate (align_corners=False), rounded step by step like the
// CPU kernel (no fused multiply-add) so both pick the same source pixels.
__device__ __forceinline__ void source_index(int64_t dst, int64_t in, float scale, int64_t& lo,
                                             int64_t& hi, float& w) {
  float src = __fsub_rn(__fmul_rn(scale, __fadd_rn(static_cast<float>(dst), 0.5f)), 0.5f);
  if (src < 0.0f) src = 0.0f;
  int64_t i0 = static_cast<int64_t>(floorf(src));
  if (i0 > in - 1) i0 = in - 1;
  lo = i0;
  hi = i0 + (i0 < in - 1 ? 1 : 0);
  w = fminf(fmaxf(src - static_cast<float>(i0), 0.0f), 1.0f);
}

// One block per mask: binary mask at the feature resolution, and its pixel count.
template <typename T>
__global__ void binarize_kernel(const T* masks, int64_t mh, int64_t mw, int64_t H, int64_t W,
                                float threshold, float* binary, float* inv_count) {
  const int64_t m = blockIdx.x;
  const T* src = masks + m * mh * mw;
  float* dst = binary + m * H * W;
  const float sy = static_cast<float>(mh) / static_cast<float>(H);
  const float sx = static_cast<float>(mw) / static_cast<float>(W);
  __shared__ unsigned int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  unsigned int local = 0;
  for (int64_t p = threadIdx.x; p < H * W; p += blockDim.x) {
    const int64_t y = p / W, x = p % W;
    int64_t y0, y1, x0, x1;
    float wy, wx;
    source_index(y, mh, sy, y0, y1, wy);
    source_index(x, mw, sx, x0, x1, wx);
    const float v = (1.0f - wy) * ((1.0f - wx) * to_float(src[y0 * mw + x0]) + wx * to_float(src[y0 * mw + x1])) +
                    wy * ((1.0f - wx) * to_float(src[y1 * mw + x0]) + wx * to_float(src[y1 * mw + x1]));
    const bool inside = v > threshold;
    dst[p] = inside ? 1.0f : 0.0f;
    local += inside ? 1u : 0u;
  }
  atomicAdd(&count, local);
  __syncthreads();
  if (threadIdx.x == 0) inv_count[m] = count > 0 ? 1.0f / static_cast<float>(count) : 0.0f;
}

constexpr int kTile = 32;
constexpr int kRowsPerThread = 4;  // blockDim = (32, 8)

// out[b, n, c] = inv_count[b, n] * sum_p binary[b, n, p] * features[b, c, p]
template <typename T>
__global__ void pool_kernel(const float* binary, const T* features, const float* inv_count,
                            int64_t N, int64_t C, int64_t P, float* out) {
  __shared__ float mask_tile[kTile][kTile + 1];
  __shared__ float feat_tile[kTile][kTile + 1];
  const int64_t b = blockIdx.z;
  const int64_t n0 = blockIdx.y * int64_t(kTile), c0 = blockIdx.x * int64_t(kTile);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const float* bin = binary + b * N * P;
  const T* feat = features + b * C * P;
  float acc[kRowsPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = ty + 8 * r;
      const int64_t p = p0 + tx;
      mask_tile[row][tx] = (n0 + row < N && p < P) ? bin[(n0 + row) * P + p] : 0.0f;
      feat_tile[row][tx] = (c0 + row < C && p < P) ? to_float(feat[(c0 + row) * P + p]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const float f = feat_tile[tx][kk];
      for (int r = 0; r < kRowsPerThread; ++r) acc[r] += mask_tile[ty + 8 * r][kk] * f;
    }
    __syncthreads();
  }
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t n = n0 + ty + 8 * r, c = c0 + tx;
    if (n < N && c < C) out[(b * N + n) * C + c] = acc[r] * inv_count[b * N + n];
  }
}

// out[c, p] = sum_n probs[n, c] * sigmoid(logits[n, p])
template <typename TP, typename TL>
__global__ void semantic_kernel(const TP* probs, const TL* logits, int64_t N, int64_t C, int64_t P,
                                float* out) {
  __shared__ float prob_tile[kTile][kTile + 1];   // [n][c]
  __shared__ float sig_tile[kTile][kTile + 1];    // [n][p]
  const int64_t c0 = blockIdx.y * int64_t(kTile), p0 = blockIdx.x * int64_t(kTile);
  const int tx = threadIdx.x, ty = threadIdx.y;
  float acc[kRowsPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t n0 = 0; n0 < N; n0 += kTile) {
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int kk = ty + 8 * r;
      const int64_t n = n0 + kk;
      prob_tile[kk][tx] = (n < N && c0 + tx < C) ? to_float(probs[n * C + c0 + tx]) : 0.0f;
      sig_tile[kk][tx] = (n < N && p0 + tx < P)
                             ? 1.0f / (1.0f + __expf(-to_float(logits[n * P + p0 + tx])))
                             : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const float s = sig_tile[kk][tx];
      for (int r = 0; r < kRowsPerThread; ++r) acc[r] += prob_tile[kk][ty + 8 * r] * s;
    }
    __syncthreads();
  }
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t c = c0 + ty + 8 * r, p = p0 + tx;
    if (c < C && p < P) out[c * P + p] = acc[r];
  }
}

// One row: softmax over the row's real neighbours, summed per class (out zeroed).
template <typename T>
__device__ void retrieval_row(const T* s, const int64_t* lab, int64_t k, int64_t C, float inv_tau,
                              float* out, uint32_t* flags) {
  float best = -INFINITY;
  for (int64_t j = 0; j < k; ++j) {
    if (lab[j] == -1) continue;
    if (lab[j] < -1 || lab[j] >= C) {
      if (flags) atomicOr(flags, static_cast<uint32_t>(kLabelOutOfRange));
      return;
    }
    if (!is_finite(s[j])) {
      if (flags) atomicOr(flags, static_cast<uint32_t>(kNonFinite));
      return;
    }
    best = fmaxf(best, to_float(s[j]));
  }
  if (best == -INFINITY) return;
  float total = 0.0f;
  for (int64_t j = 0; j < k; ++j)
    if (lab[j] >= 0) total += neighbour_weight(to_float(s[j]), best, inv_tau);
  for (int64_t j = 0; j < k; ++j)
    if (lab[j] >= 0) out[lab[j]] += neighbour_weight(to_float(s[j]), best, inv_tau) / total;
}

// Rows with a grid stride (any number of rows).
template <typename T>
__global__ void retrieval_kernel(const T* sims, const int64_t* labels, int64_t rows, int64_t k,
                                 int64_t C, float inv_tau, float* out, uint32_t* flags) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows;
       i += int64_t(blockDim.x) * gridDim.x)
    retrieval_row(sims + i * k, labels + i * k, k, C, inv_tau, out + i * C, flags);
}

// One warp per row: confidence = max of the retrieval row, then the blend or the base row.
template <typename TB, typename TR>
__global__ void fuse_kernel(const TB* base, const TR* ret, int64_t rows, int64_t C, float threshold,
                            float lam, float* out) {
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t i = blockIdx.x * warps_per_block + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= rows) return;
  float best = -INFINITY;
  for (int64_t c = lane; c < C; c += 32) best = fmaxf(best, to_float(ret[i * C + c]));
  for (int offset = 16; offset > 0; offset /= 2)
    best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, offset));
  const bool use = C > 0 && best >= threshold;
  for (int64_t c = lane; c < C; c += 32) {
    const float b = to_float(base[i * C + c]);
    out[i * C + c] = use ? lam * to_float(ret[i * C + c]) + (1.0f - lam) * b : b;
  }
}

}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

std::string device_problem() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count > 0) return "";
  cudaGetLastError();  // clear the sticky error
  int driver = 0;
  cudaDriverGetVersion(&driver);  // 0 when no driver is loaded
  if (driver == 0) return "no NVIDIA driver is loaded (nvidia-smi should list the GPU)";
  if (err == cudaErrorInsufficientDriver)
    return "the NVIDIA driver supports CUDA " + std::to_string(driver / 1000) + "." +
           std::to_string((driver % 1000) / 10) + ", older than the CUDA runtime this module was built with (" +
           runtime_version() + "): update the driver (CUDA 13 needs 580 or newer) or build knnclip._C with an older "
           "CUDA toolkit";
  if (err == cudaErrorNoDevice || (err == cudaSuccess && count == 0))
    return "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)";
  return std::string("CUDA cannot use the device: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

std::string runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

int pointer_device(const void* p) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, p) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged)
    return attributes.device;
  return -1;
}

// Outputs come from the stream-ordered pool too: cudaMalloc and cudaFree synchronise the device,
// cudaFreeAsync returns the memory once the work queued before it is done.
void* device_malloc(size_t bytes, int device) {
  OpScope scope(device);
  void* p = nullptr;
  KNNCLIP_CUDA_CHECK(cudaMallocAsync(&p, bytes > 0 ? bytes : 1, kStream));
  return p;
}

void device_free(void* p, int device) noexcept {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  cudaSetDevice(device);
  cudaFreeAsync(p, kStream);
  cudaSetDevice(previous);
}

void order_after_stream(uintptr_t stream, int device) {
  // 0 is not a valid CAI stream, 1 is the legacy default stream (ours) and 2 the per-thread
  // default stream, which synchronises with the legacy one: only other streams need an event.
  if (stream <= 2) return;
  DeviceGuard guard(device);
  cudaEvent_t written = nullptr;
  KNNCLIP_CUDA_CHECK(cudaEventCreateWithFlags(&written, cudaEventDisableTiming));
  const cudaError_t recorded = cudaEventRecord(written, reinterpret_cast<cudaStream_t>(stream));
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(kStream, written, 0) : recorded;
  cudaEventDestroy(written);  // released once the wait is done
  KNNCLIP_CUDA_CHECK(waited);
}

void copy_to_host(void* dst, const void* src, size_t bytes, int device) {
  DeviceGuard guard(device);
  KNNCLIP_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

uint32_t mask_pool(const void* features, DType features_dtype, const void* masks,
                   DType masks_dtype, int64_t batch, int64_t channels, int64_t height,
                   int64_t width, int64_t num_masks, int64_t mask_height, int64_t mask_width,
                   float threshold, float* out, int device, bool check) {
  OpScope scope(device);
  Flags flags(check);
  const int64_t P = height * width, BN = batch * num_masks;
  if (check) {
    queue_finite_check(features, features_dtype, batch * channels * P, flags.get());
    queue_finite_check(masks, masks_dtype, BN * mask_height * mask_width, flags.get());
  }
  if (BN > 0 && channels > 0) {
    DeviceBuffer binary(static_cast<size_t>(BN * P) * sizeof(float));
    DeviceBuffer inv_count(static_cast<size_t>(BN) * sizeof(float));
    with_type(masks, masks_dtype, [&](auto typed) {
      binarize_kernel<<<static_cast<unsigned>(BN), 256, 0, kStream>>>(
          typed, mask_height, mask_width, height, width, threshold, binary.as<float>(),
          inv_count.as<float>());
    });
    const dim3 block(kTile, 8);
    const dim3 grid(static_cast<unsigned>((channels + kTile - 1) / kTile),
                    checked_dim((num_masks + kTile - 1) / kTile, 65535, "the number of masks / 32"),
                    checked_dim(batch, 65535, "the batch"));
    with_type(features, features_dtype, [&](auto typed) {
      pool_kernel<<<grid, block, 0, kStream>>>(binary.as<float>(), typed, inv_count.as<float>(),
                                               num_masks, channels, P, out);
    });
  }
  return flags.read();
}

uint32_t semantic_merge(const void* probs, DType probs_dtype, const void* logits,
                        DType logits_dtype, int64_t num_masks, int64_t num_classes,
                        int64_t pixels, float* out, int device, bool check) {
  OpScope scope(device);
  Flags flags(check);
  if (check) {
    queue_finite_check(probs, probs_dtype, num_masks * num_classes, flags.get());
    queue_finite_check(logits, logits_dtype, num_masks * pixels, flags.get());
  }
  if (num_classes > 0 && pixels > 0) {
    const dim3 block(kTile, 8);
    const dim3 grid(static_cast<unsigned>((pixels + kTile - 1) / kTile),
                    checked_dim((num_classes + kTile - 1) / kTile, 65535, "the number of classes / 32"));
    with_type(probs, probs_dtype, [&](auto p) {
      with_type(logits, logits_dtype, [&](auto l) {
        semantic_kernel<<<grid, block, 0, kStream>>>(p, l, num_masks, num_classes, pixels, out);
      });
    });
  }
  return flags.read();
}

uint32_t retrieval_probs(const void* sims, DType sims_dtype, const int64_t* labels, int64_t rows,
                         int64_t k, int64_t num_classes, float tau, float* out, int device,
                         bool check) {
  OpScope scope(device);
  Flags flags(check);
  KNNCLIP_CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<size_t>(rows * num_classes) * sizeof(float), kStream));
  if (rows > 0) {
    with_type(sims, sims_dtype, [&](auto s) {
      retrieval_kernel<<<grid_for(rows, 128), 128, 0, kStream>>>(s, labels, rows, k, num_classes,
                                                                1.0f / tau, out, flags.get());
    });
  }
  return flags.read();
}

uint32_t fuse(const void* p_base, DType base_dtype, const void* p_ret, DType ret_dtype,
              int64_t rows, int64_t num_classes, float threshold, float lam, float* out,
              int device, bool check) {
  OpScope scope(device);
  Flags flags(check);
  if (check) {
    queue_finite_check(p_base, base_dtype, rows * num_classes, flags.get());
    queue_finite_check(p_ret, ret_dtype, rows * num_classes, flags.get());
  }
  if (rows > 0) {
    constexpr int kWarps = 8;
    const unsigned blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
    with_type(p_base, base_dtype, [&](auto b) {
      with_type(p_ret, ret_dtype, [&](auto r) {
        fuse_kernel<<<blocks, kWarps * 32, 0, kStream>>>(b, r, rows, num_classes, threshold, lam, out);
      });
    });
  }
  return flags.read();
}

}  // namespace knnclip::cuda
