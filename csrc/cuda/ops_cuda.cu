// CUDA kernels of knnclip._C. Same definitions as the CPU kernels (see cpu/ops_cpu.h); float32
// accumulation whatever the input precision. The per-element bodies are shared with a host build
// (kernels/bodies.h), which the CPU tests run.
#include "cuda/ops_cuda.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "kernels/bodies.h"

namespace knnclip::cuda {
namespace {

#define KNNCLIP_CUDA_CHECK(expr)                                                             \
  do {                                                                                       \
    cudaError_t err_ = (expr);                                                               \
    if (err_ != cudaSuccess)                                                                 \
      throw std::runtime_error(std::string("CUDA error in ") + #expr + ": " +                \
                               cudaGetErrorString(err_));                                    \
  } while (0)

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

constexpr int kMaxDevices = 64;
constexpr uint64_t kPoolReleaseThreshold = uint64_t{256} << 20;  // what the pool keeps when idle

// Each device's stream and memory pool for the ops, made on first use: a non-blocking stream (not
// serialised with the legacy default stream, where other libraries' work may be queued) and a
// private pool that keeps up to kPoolReleaseThreshold between calls (the device's default pool,
// which other cudaMallocAsync users share, is left as it is).
struct DeviceResources {
  cudaStream_t stream = nullptr;
  cudaMemPool_t pool = nullptr;
};

DeviceResources& resources(int device) {
  static DeviceResources table[kMaxDevices];
  static std::mutex mutex;
  if (device < 0 || device >= kMaxDevices)
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " is beyond the ops' limit of 64 devices");
  std::lock_guard<std::mutex> lock(mutex);
  DeviceResources& r = table[device];
  if (r.stream == nullptr) {
    int previous = 0;
    KNNCLIP_CUDA_CHECK(cudaGetDevice(&previous));
    KNNCLIP_CUDA_CHECK(cudaSetDevice(device));
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaStream_t stream = nullptr;
    cudaMemPool_t pool = nullptr;
    cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (err == cudaSuccess) err = cudaMemPoolCreate(&pool, &props);
    if (err == cudaSuccess) {
      uint64_t threshold = kPoolReleaseThreshold;
      err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
    }
    cudaSetDevice(previous);
    KNNCLIP_CUDA_CHECK(err);
    r.stream = stream;
    r.pool = pool;
  }
  return r;
}

// The stream the current op queues its work on (set by OpScope, per thread).
thread_local cudaStream_t current = nullptr;
thread_local cudaMemPool_t current_pool = nullptr;

// Makes `device` current and its stream and pool the op's, for the lifetime of an op.
class OpScope {
 public:
  explicit OpScope(int device) : guard_(device) {
    DeviceResources& r = resources(device);
    saved_stream_ = current;
    saved_pool_ = current_pool;
    current = r.stream;
    current_pool = r.pool;
  }
  ~OpScope() {
    current = saved_stream_;
    current_pool = saved_pool_;
  }

 private:
  DeviceGuard guard_;
  cudaStream_t saved_stream_;
  cudaMemPool_t saved_pool_;
};

// A device scratch buffer from the ops' pool, in the op's stream order.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) {
    KNNCLIP_CUDA_CHECK(cudaMallocFromPoolAsync(&ptr_, bytes > 0 ? bytes : 1, current_pool, current));
  }
  ~DeviceBuffer() { cudaFreeAsync(ptr_, current); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

using kernels::load;
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
    check_finite_kernel<<<grid_for(n, 256), 256, 0, current>>>(typed, n, flags);
  });
}

// Per-thread flag word per device, allocated once; reset, filled by kernels, read back.
class Flags {
 public:
  explicit Flags(bool enabled) : enabled_(enabled) {
    if (!enabled_) return;
    KNNCLIP_CUDA_CHECK(cudaMallocFromPoolAsync(reinterpret_cast<void**>(&ptr_), sizeof(uint32_t), current_pool,
                                               current));
    KNNCLIP_CUDA_CHECK(cudaMemsetAsync(ptr_, 0, sizeof(uint32_t), current));
  }
  ~Flags() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, current);
  }
  uint32_t* get() const { return ptr_; }
  // Waits for everything queued so far and returns the flags (0 when disabled). It waits with
  // check=false too: a kernel fault is then reported by the op that caused it, not by whatever
  // CUDA call comes next.
  uint32_t read() const {
    KNNCLIP_CUDA_CHECK(cudaGetLastError());  // launch errors
    uint32_t host = 0;
    if (enabled_)
      KNNCLIP_CUDA_CHECK(cudaMemcpyAsync(&host, ptr_, sizeof host, cudaMemcpyDeviceToHost, current));
    KNNCLIP_CUDA_CHECK(cudaStreamSynchronize(current));  // execution errors
    return host;
  }

 private:
  bool enabled_;
  uint32_t* ptr_ = nullptr;
};

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
    const bool inside = kernels::bilinear_at(src, mh, mw, p / W, p % W, sy, sx) > threshold;
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

// Rows with a grid stride (any number of rows).
template <typename T>
__global__ void retrieval_kernel(const T* sims, const int64_t* labels, int64_t rows, int64_t k,
                                 int64_t C, float inv_tau, float* out, uint32_t* flags) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows;
       i += int64_t(blockDim.x) * gridDim.x)
  {
    const uint32_t found = kernels::retrieval_row(sims + i * k, labels + i * k, k, C, inv_tau, out + i * C);
    if (found != 0 && flags != nullptr) atomicOr(flags, found);
  }
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
    out[i * C + c] = kernels::fuse_at(to_float(base[i * C + c]), to_float(ret[i * C + c]), use, lam);
  }
}

// The bands [lo, hi) of the non-zeros of each of `rows` rows of length n.
__global__ void band_kernel(const float* m, int64_t rows, int64_t n, int64_t* lo, int64_t* hi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows; i += int64_t(blockDim.x) * gridDim.x)
    kernels::band(m + i * n, n, lo[i], hi[i]);
}

// out[n, y, x] = rows[y] @ x[n] @ cols[x]^T over the bands, one element per thread (grid stride).
template <typename T>
__global__ void resample_kernel(const T* x, int64_t N, int64_t h, int64_t w, const float* rows, const int64_t* row_lo,
                                const int64_t* row_hi, int64_t H, const float* cols, const int64_t* col_lo,
                                const int64_t* col_hi, int64_t W, float* out) {
  const int64_t total = N * H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = i % W, y = (i / W) % H, n = i / (W * H);
    out[i] = kernels::resample_at(x + n * h * w, w, rows + y * h, row_lo[y], row_hi[y], cols + c * w, col_lo[c],
                                  col_hi[c]);
  }
}

template <typename T>
__global__ void sigmoid_kernel(const T* x, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x)
    out[i] = kernels::sigmoid(load(x[i]));
}

// labels[p] = argmax_c sum_n probs[n, c] * sig[n, p], one pixel per thread.
template <typename TP>
__global__ void semantic_argmax_kernel(const TP* probs, const float* sig, int64_t N, int64_t C, int64_t P,
                                       int32_t* labels) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < P; p += int64_t(blockDim.x) * gridDim.x)
    labels[p] = kernels::semantic_argmax_at(probs, N, C, [&](int64_t n) { return sig[n * P + p]; });
}

// Mask2Former's owner of each pixel among the kept queries, one pixel per thread.
template <typename T>
__global__ void panoptic_kernel(const float* scores, const T* masks, const int64_t* queries, int64_t K, int64_t P,
                                int32_t* owner, uint8_t* own) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < P; p += int64_t(blockDim.x) * gridDim.x) {
    bool mine = false;
    kernels::panoptic_at(scores, K, [&](int64_t k) { return load(masks[queries[k] * P + p]); }, owner[p], mine);
    own[p] = mine ? 1 : 0;
  }
}

// counts[k] = pixels where mask queries[k] is >= 0: blocks of (pixel chunk, k), summed in shared
// memory, one atomic add per block.
template <typename T>
__global__ void mask_pixels_kernel(const T* masks, const int64_t* queries, int64_t P, unsigned long long* counts) {
  const int64_t k = blockIdx.y;
  const T* row = masks + queries[k] * P;
  unsigned long long local = 0;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < P; p += int64_t(blockDim.x) * gridDim.x)
    local += load(row[p]) >= 0.0f ? 1ull : 0ull;
  __shared__ unsigned long long total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, local);
  __syncthreads();
  if (threadIdx.x == 0 && total > 0) atomicAdd(counts + k, total);
}

__global__ void index_range_kernel(const int64_t* index, int64_t n, int64_t limit, uint32_t* flags) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x)
    if (index[i] < 0 || index[i] >= limit) atomicOr(flags, static_cast<uint32_t>(kLabelOutOfRange));
}

}  // namespace

uintptr_t stream_handle(int device) { return reinterpret_cast<uintptr_t>(resources(device).stream); }

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

// Outputs come from the ops' pool too: cudaMalloc and cudaFree synchronise the device,
// cudaFreeAsync returns the memory once the work queued before it on the ops' stream is done.
void* device_malloc(size_t bytes, int device) {
  OpScope scope(device);
  void* p = nullptr;
  KNNCLIP_CUDA_CHECK(cudaMallocFromPoolAsync(&p, bytes > 0 ? bytes : 1, current_pool, current));
  return p;
}

void device_free(void* p, int device) noexcept {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  cudaSetDevice(device);
  try {
    cudaFreeAsync(p, resources(device).stream);
  } catch (...) {  // the resources exist: device_malloc made them
  }
  cudaSetDevice(previous);
}

void order_after_stream(uintptr_t stream, int device) {
  // 0 is not a valid CAI stream; 1 is the legacy default stream and 2 the per-thread default
  // stream: the ops' non-blocking stream waits for whichever it is given.
  if (stream == 0) return;
  OpScope scope(device);
  const cudaStream_t producer = stream == 1   ? cudaStreamLegacy
                                : stream == 2 ? cudaStreamPerThread
                                              : reinterpret_cast<cudaStream_t>(stream);
  cudaEvent_t written = nullptr;
  KNNCLIP_CUDA_CHECK(cudaEventCreateWithFlags(&written, cudaEventDisableTiming));
  const cudaError_t recorded = cudaEventRecord(written, producer);
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(current, written, 0) : recorded;
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
      binarize_kernel<<<static_cast<unsigned>(BN), 256, 0, current>>>(
          typed, mask_height, mask_width, height, width, threshold, binary.as<float>(),
          inv_count.as<float>());
    });
    const dim3 block(kTile, 8);
    const dim3 grid(static_cast<unsigned>((channels + kTile - 1) / kTile),
                    checked_dim((num_masks + kTile - 1) / kTile, 65535, "the number of masks / 32"),
                    checked_dim(batch, 65535, "the batch"));
    with_type(features, features_dtype, [&](auto typed) {
      pool_kernel<<<grid, block, 0, current>>>(binary.as<float>(), typed, inv_count.as<float>(),
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
        semantic_kernel<<<grid, block, 0, current>>>(p, l, num_masks, num_classes, pixels, out);
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
  KNNCLIP_CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<size_t>(rows * num_classes) * sizeof(float), current));
  if (rows > 0) {
    with_type(sims, sims_dtype, [&](auto s) {
      retrieval_kernel<<<grid_for(rows, 128), 128, 0, current>>>(s, labels, rows, k, num_classes,
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
        fuse_kernel<<<blocks, kWarps * 32, 0, current>>>(b, r, rows, num_classes, threshold, lam, out);
      });
    });
  }
  return flags.read();
}

uint32_t resample(const void* x, DType x_dtype, int64_t n, int64_t h, int64_t w, const float* rows, int64_t out_h,
                  const float* cols, int64_t out_w, float* out, int device, bool check) {
  OpScope scope(device);
  Flags flags(check);
  if (check) {
    queue_finite_check(x, x_dtype, n * h * w, flags.get());
    queue_finite_check(rows, DType::F32, out_h * h, flags.get());
    queue_finite_check(cols, DType::F32, out_w * w, flags.get());
  }
  const int64_t total = n * out_h * out_w;
  if (total > 0) {
    DeviceBuffer bands(static_cast<size_t>(2 * (out_h + out_w)) * sizeof(int64_t));
    int64_t* row_lo = bands.as<int64_t>();
    int64_t *row_hi = row_lo + out_h, *col_lo = row_hi + out_h, *col_hi = col_lo + out_w;
    band_kernel<<<grid_for(out_h, 128), 128, 0, current>>>(rows, out_h, h, row_lo, row_hi);
    band_kernel<<<grid_for(out_w, 128), 128, 0, current>>>(cols, out_w, w, col_lo, col_hi);
    with_type(x, x_dtype, [&](auto typed) {
      resample_kernel<<<grid_for(total, 256), 256, 0, current>>>(typed, n, h, w, rows, row_lo, row_hi, out_h, cols,
                                                                 col_lo, col_hi, out_w, out);
    });
  }
  return flags.read();
}

uint32_t semantic_argmax(const void* probs, DType probs_dtype, const void* logits, DType logits_dtype,
                         int64_t num_masks, int64_t num_classes, int64_t pixels, int32_t* labels, int device,
                         bool check) {
  OpScope scope(device);
  Flags flags(check);
  if (check) {
    queue_finite_check(probs, probs_dtype, num_masks * num_classes, flags.get());
    queue_finite_check(logits, logits_dtype, num_masks * pixels, flags.get());
  }
  if (pixels > 0) {
    // The sigmoids once per (mask, pixel), not once per class: [N, P] float32 beside the logits.
    DeviceBuffer sig(static_cast<size_t>(num_masks * pixels) * sizeof(float));
    with_type(logits, logits_dtype, [&](auto l) {
      sigmoid_kernel<<<grid_for(num_masks * pixels, 256), 256, 0, current>>>(l, num_masks * pixels, sig.as<float>());
    });
    with_type(probs, probs_dtype, [&](auto p) {
      semantic_argmax_kernel<<<grid_for(pixels, 128), 128, 0, current>>>(p, sig.as<float>(), num_masks, num_classes,
                                                                          pixels, labels);
    });
  }
  return flags.read();
}

uint32_t panoptic_owner(const float* scores, const void* masks, DType masks_dtype, const int64_t* queries, int64_t k,
                        int64_t num_masks, int64_t pixels, int32_t* owner, uint8_t* own, int64_t* mask_pixels,
                        int device, bool check) {
  OpScope scope(device);
  Flags flags(true);  // queries index the masks: always checked, before any kernel reads through them
  index_range_kernel<<<grid_for(k, 128), 128, 0, current>>>(queries, k, num_masks, flags.get());
  if (check) {
    queue_finite_check(scores, DType::F32, k, flags.get());
    queue_finite_check(masks, masks_dtype, num_masks * pixels, flags.get());
  }
  const uint32_t found = flags.read();
  if (found != 0) return found;
  KNNCLIP_CUDA_CHECK(cudaMemsetAsync(mask_pixels, 0, static_cast<size_t>(k) * sizeof(int64_t), current));
  if (pixels > 0 && k > 0) {
    with_type(masks, masks_dtype, [&](auto m) {
      panoptic_kernel<<<grid_for(pixels, 256), 256, 0, current>>>(scores, m, queries, k, pixels, owner, own);
      const dim3 grid(grid_for(pixels, 256 * 16), checked_dim(k, 65535, "the number of kept queries"));
      mask_pixels_kernel<<<grid, 256, 0, current>>>(m, queries, pixels,
                                                     reinterpret_cast<unsigned long long*>(mask_pixels));
    });
  }
  return Flags(false).read();  // waits for the kernels, so a fault is raised by this op
}

}  // namespace knnclip::cuda
