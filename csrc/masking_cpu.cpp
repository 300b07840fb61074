// Masked-token ops on CPU (docs/OPS.md ops 2-4; docs/REFERENCE.md 4.4-4.5). See masking.h for shapes.
//
// The ops are data movement: every output row is a copy of one input row, a zero row, or (pad_with_cls
// with pos_embed) a row plus the positional row. Work is split over output rows (b, slot) in chunks of
// ~256 KiB handed out dynamically (cpu_parallel.h); the inner loops run over C and are plain copies or
// element-wise adds. The gathering loops prefetch the rows about 4 KiB ahead (hardware prefetchers stop at
// 4 KiB pages); pad_with_cls's backward, which reads grad_z in order, leaves it to the hardware (software
// prefetches made it 5-30% slower on a Zen 4; cpu-avx512bf16-masking-ab.txt). It reads grad_z once: each
// task of (batch block, channel chunk) copies or sums its rows and adds them to its block's partial
// positional sum, in one pass over each row; the partials are summed in block order afterwards, so the
// bits do not depend on the thread count. The mask plan
// selects the D-th and M-th smallest (noise, position) keys per row with nth_element instead of a sort.
// Unlike the CUDA kernels, these validate keep_idx values (range, strictly increasing, -1 only at the
// end) and the per-row counts, since reading them costs no host sync here.
#include "checks.h"
#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "masking.h"

#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace mage {

// ------------------------------------------------------------------------------------------ checks

static void check_counts_shape(const at::Tensor& counts, int64_t B, const at::Device& device, const char* name) {
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "mask_plan: ", name, " must be int64, got ",
                   counts.scalar_type());
  TORCH_CHECK_VALUE(counts.dim() == 0 || (counts.dim() == 1 && counts.size(0) == B), "mask_plan: ", name,
                    " must be a scalar or [B] = [", B, "], got shape ", counts.sizes());
  TORCH_CHECK_VALUE(counts.device() == device, "mask_plan: ", name, " must be on the device of noise (", device,
                    "), got ", counts.device());
}

void check_mask_plan_shapes(const at::Tensor& noise, const at::Tensor& num_masked, const at::Tensor& num_dropped,
                            int64_t num_kept) {
  check_float(noise, "mask_plan", "noise");
  TORCH_CHECK_VALUE(noise.dim() == 2, "mask_plan: noise must be [B, L], got shape ", noise.sizes());
  const int64_t B = noise.size(0), L = noise.size(1);
  TORCH_CHECK_VALUE(L < std::numeric_limits<int32_t>::max(), "mask_plan: L must be < 2^31, got ", L);
  check_counts_shape(num_masked, B, noise.device(), "num_masked");
  check_counts_shape(num_dropped, B, noise.device(), "num_dropped");
  TORCH_CHECK_VALUE(num_kept >= 0 && num_kept <= L, "mask_plan: num_kept must lie in [0, L] = [0, ", L, "], got ",
                    num_kept);
}

void check_keep_idx_shape(const at::Tensor& keep_idx, int64_t B, int64_t L, const at::Device& device,
                          const char* op) {
  TORCH_CHECK_TYPE(keep_idx.scalar_type() == at::kLong, op, ": keep_idx must be int64, got ",
                   keep_idx.scalar_type());
  TORCH_CHECK_VALUE(keep_idx.dim() == 2 && keep_idx.size(0) == B, op, ": keep_idx must be [B, Lk] with B = ", B,
                    ", got shape ", keep_idx.sizes());
  TORCH_CHECK_VALUE(keep_idx.size(1) <= L, op, ": keep_idx must be [B, Lk] with Lk <= L = ", L, ", got shape ",
                    keep_idx.sizes());
  TORCH_CHECK_VALUE(keep_idx.device() == device, op, ": keep_idx must be on ", device, ", got ", keep_idx.device());
}

void check_rows_shape(const at::Tensor& x, const char* op, const char* name) {
  check_float(x, op, name);
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(1) >= 1, op, ": ", name, " must be [B, 1+L, C], got shape ", x.sizes());
}

void check_pad_with_cls_shapes(const at::Tensor& y, const at::Tensor& keep_idx, const at::Tensor& masked,
                               const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& pad) {
  check_float(y, "pad_with_cls", "y");
  TORCH_CHECK_VALUE(y.dim() == 3, "pad_with_cls: y must be [B, 1+Lk, C], got shape ", y.sizes());
  const int64_t B = y.size(0), C = y.size(2);
  TORCH_CHECK_TYPE(masked.scalar_type() == at::kBool, "pad_with_cls: masked must be bool, got ",
                   masked.scalar_type());
  TORCH_CHECK_VALUE(masked.dim() == 2 && masked.size(0) == B, "pad_with_cls: masked must be [B, L] with B = ", B,
                    ", got shape ", masked.sizes());
  TORCH_CHECK_VALUE(masked.device() == y.device(), "pad_with_cls: masked must be on ", y.device(), ", got ",
                    masked.device());
  const int64_t L = masked.size(1);
  check_keep_idx_shape(keep_idx, B, L, y.device(), "pad_with_cls");
  TORCH_CHECK_VALUE(y.size(1) == 1 + keep_idx.size(1), "pad_with_cls: y must be [B, 1+Lk, C] with Lk = ",
                    "keep_idx.size(1) = ", keep_idx.size(1), ", got shape ", y.sizes());
  if (pos_embed) {
    TORCH_CHECK_TYPE(pos_embed->scalar_type() == y.scalar_type(), "pad_with_cls: pos_embed must have y's dtype ",
                     y.scalar_type(), ", got ", pos_embed->scalar_type());
    TORCH_CHECK_VALUE(pos_embed->dim() == 2 && pos_embed->size(0) == L + 1 && pos_embed->size(1) == C,
                      "pad_with_cls: pos_embed must be [", L + 1, ", ", C, "] (L = ", L, ", C = ", C,
                      "), got shape ", pos_embed->sizes());
    TORCH_CHECK_VALUE(pos_embed->device() == y.device(), "pad_with_cls: pos_embed must be on ", y.device(),
                      ", got ", pos_embed->device());
  }
  if (pad) {
    TORCH_CHECK_TYPE(pad->scalar_type() == y.scalar_type(), "pad_with_cls: pad must have y's dtype ",
                     y.scalar_type(), ", got ", pad->scalar_type());
    TORCH_CHECK_VALUE(pad->dim() == 1 && pad->size(0) == C, "pad_with_cls: pad must be [", C, "] (C = ", C,
                      "), got shape ", pad->sizes());
    TORCH_CHECK_VALUE(pad->device() == y.device(), "pad_with_cls: pad must be on ", y.device(), ", got ",
                      pad->device());
  }
}

void check_pad_backward_shapes(const at::Tensor& grad_z, const at::Tensor& keep_idx, const at::Tensor& masked) {
  check_rows_shape(grad_z, "pad_with_cls_backward", "grad_z");
  const int64_t B = grad_z.size(0);
  TORCH_CHECK_TYPE(masked.scalar_type() == at::kBool, "pad_with_cls_backward: masked must be bool, got ",
                   masked.scalar_type());
  TORCH_CHECK_VALUE(masked.dim() == 2 && masked.size(0) == B && grad_z.size(1) == 1 + masked.size(1),
                    "pad_with_cls_backward: masked must be [B, L] and grad_z [B, 1+L, C], got ", masked.sizes(),
                    " and ", grad_z.sizes());
  TORCH_CHECK_VALUE(masked.device() == grad_z.device(), "pad_with_cls_backward: masked must be on ",
                    grad_z.device(), ", got ", masked.device());
  check_keep_idx_shape(keep_idx, B, masked.size(1), grad_z.device(), "pad_with_cls_backward");
}

namespace {

// keep_idx rows must be strictly increasing positions in [0, L), followed only by -1. This and
// slot_sources below are serial: B * Lk indices take microseconds, less than waking a thread pool.
void check_keep_idx_values(const int64_t* keep, int64_t B, int64_t Lk, int64_t L, const char* op) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* k = keep + b * Lk;
    int64_t prev = -1;
    bool padding = false;
    for (int64_t j = 0; j < Lk; ++j) {
      TORCH_CHECK_VALUE(k[j] >= -1 && k[j] < L, op, ": keep_idx must hold token positions in [0, L) = [0, ", L,
                        ") or -1, got keep_idx[", b, ", ", j, "] = ", k[j]);
      if (k[j] < 0) {
        padding = true;
        continue;
      }
      TORCH_CHECK_VALUE(!padding && k[j] > prev, op,
                        ": keep_idx rows must be strictly increasing positions followed only by -1, got keep_idx[",
                        b, ", ", j - 1, ":", j + 1, "] = [", k[j - 1], ", ", k[j], "]");
      prev = k[j];
    }
  }
}

// src (B, L): j when token t = keep_idx[b, j] takes its own row (and is not masked, if masked is given), else -1.
std::vector<int64_t> slot_sources(const int64_t* keep, const bool* masked, int64_t B, int64_t Lk, int64_t L) {
  std::vector<int64_t> src(B * L, -1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < Lk; ++j) {
      const int64_t t = keep[b * Lk + j];
      if (t >= 0 && !(masked && masked[b * L + t])) src[b * L + t] = j;
    }
  }
  return src;
}

// Rows of a (B, S, C) tensor whose channel stride is 1: base pointer plus row strides, in bytes.
struct Rows {
  const char* data;
  int64_t stride_b, stride_s;
  const char* row(int64_t b, int64_t s) const { return data + b * stride_b + s * stride_s; }
};

Rows rows_of(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return {static_cast<const char*>(t.const_data_ptr()), t.stride(0) * es, t.stride(1) * es};
}

at::Tensor unit_channel_stride(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

// Large outputs (kCachedBytes and up) come from a small cache of freed blocks. A new block of that size is
// fresh pages from the kernel (glibc maps blocks above its mmap threshold, at most 32 MiB, and unmaps
// them on free), and the kernel zeroes every page on its first touch: for a [64, 257, 768] fp32 output
// (48 MiB) that is 12,337 page faults on 4 KiB pages, several times the copy itself. A training loop
// asks for the same sizes every step, so a block freed by the last step is taken again with its pages
// already in place. New blocks are 2 MiB-aligned and advised as huge pages, so where transparent huge
// pages are enabled ("madvise" or "always") the first touch faults 2 MiB at a time. The cache keeps at
// most MAGE_CPU_OUTPUT_CACHE_MIB (default 256; 0 turns it off) of freed blocks, oldest given back first.
constexpr size_t kCachedBytes = size_t{8} << 20, kHugePage = size_t{2} << 20;

class OutputCache final : public c10::Allocator {
 public:
  // Never destroyed: a tensor may outlive static destruction.
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    void* p = take(n);
    if (p == nullptr) p = fresh(n);
    return {p, new Block{p, n}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  struct Block {
    void* p;
    size_t n;
  };

  OutputCache() {
    const char* env = std::getenv("MAGE_CPU_OUTPUT_CACHE_MIB");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long mib = std::strtoll(env, &end, 10);
      TORCH_CHECK_VALUE(*end == '\0' && mib >= 0, "MAGE_CPU_OUTPUT_CACHE_MIB must be a whole number of MiB >= 0, got '",
                        env, "'");
      limit_ = static_cast<size_t>(mib) << 20;
    }
  }

  static void* fresh(size_t n) {
    void* p = nullptr;
    const size_t rounded = (std::max<size_t>(n, 1) + kHugePage - 1) / kHugePage * kHugePage;
    if (posix_memalign(&p, kHugePage, rounded) != 0) {
      C10_THROW_ERROR(OutOfMemoryError, "CPU out of memory: tried to allocate " + std::to_string(n) + " bytes");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // advice only: errors ignored
#endif
    return p;
  }

  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {  // the most recently freed first
      if (it->n == n) {
        void* p = it->p;
        cached_ -= n;
        blocks_.erase(std::next(it).base());
        return p;
      }
    }
    return nullptr;
  }

  static void release(void* ctx) {
    const Block b = *static_cast<Block*>(ctx);
    delete static_cast<Block*>(ctx);
    get().put(b);
  }

  void put(const Block& b) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (b.n > limit_) {
        evicted.push_back(b.p);
      } else {
        while (cached_ + b.n > limit_) {
          evicted.push_back(blocks_.front().p);
          cached_ -= blocks_.front().n;
          blocks_.erase(blocks_.begin());
        }
        blocks_.push_back(b);
        cached_ += b.n;
      }
    }
    for (void* p : evicted) std::free(p);
  }

  std::mutex mutex_;
  std::vector<Block> blocks_;  // freed blocks, oldest first
  size_t cached_ = 0, limit_ = size_t{256} << 20;
};

// A new output of `rows_of` size: from the cache above when large, else at::empty.
at::Tensor new_rows(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (bytes < kCachedBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

// Output rows per parallel task: about 256 KiB of data each (~25 us of copying), so a small call stays on
// one thread: waking a second one costs more than it saves, and far more when that core is busy.
int64_t row_grain(int64_t row_bytes) { return std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(row_bytes, 1)); }

// Element-wise row loops, compiled twice: portable and for AVX2 (no -march flags), so the bf16 <-> fp32
// conversions and fp32 adds vectorize. The build is chosen per op call from cpu_isa() (MAGE_CPU_ISA forces
// it). Both give the same bits: adds, and bf16 rounding to nearest-even like c10::BFloat16.
inline float bf16_to_float(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? uint16_t(0x7FC0) : rounded;
}

// Row writes into outputs too large to stay in cache (kStreamBytes and up) bypass the cache with
// non-temporal stores where the CPU has them: a plain store first reads the line it writes (a third of a
// copy's memory traffic), and the line would be evicted before anyone read it. Every streaming region
// ends with a fence (sfence) before the parallel region's barrier publishes the rows.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

void copy_plain(void* dst, const void* src, int64_t bytes) { std::memcpy(dst, src, bytes); }
void zero_plain(void* dst, int64_t bytes) { std::memset(dst, 0, bytes); }
void fence_none() {}

#if defined(__x86_64__)
// Bytes before d's first 32-byte boundary (written with plain stores), at most `bytes`.
int64_t unaligned_head(const char* d, int64_t bytes) {
  return std::min<int64_t>(bytes, (32 - (reinterpret_cast<uintptr_t>(d) & 31)) & 31);
}

__attribute__((target("avx2"))) void copy_stream_avx2(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t i = unaligned_head(d, bytes);
  std::memcpy(d, s, i);
  for (; i + 32 <= bytes; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
  }
  std::memcpy(d + i, s + i, bytes - i);
}

__attribute__((target("avx2"))) void zero_stream_avx2(void* dst, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  int64_t i = unaligned_head(d, bytes);
  std::memset(d, 0, i);
  for (; i + 32 <= bytes; i += 32) _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_setzero_si256());
  std::memset(d + i, 0, bytes - i);
}

void fence_stores() { _mm_sfence(); }
#endif

// Rows per group: 3 and 4 measured 10-50% slower than 2 (each copied row is one more stream of streaming
// stores; cpu-avx512bf16-masking-ab.txt).
constexpr int kRowSumOnly = 0, kRowCopy = 1, kRowPad = 2, kGroupRows = 2;

// One batch row's gradient at one position, and where it goes besides the positional sum (RowLoops::group_*).
struct GroupRow {
  const void* g;
  int kind;
  void* dst;
};

struct RowLoops {
  void (*add_f32)(float* out, const float* a, const float* b, int64_t n);
  void (*add_bf16)(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n);
  void (*accumulate_f32)(float* acc, const float* g, int64_t n);
  void (*accumulate_bf16)(float* acc, const uint16_t* g, int64_t n);
  void (*round_to_bf16)(uint16_t* out, const float* acc, int64_t n);
  // One pass over a row where two would read it twice (AVX2 only; null: the separate loops above): out = a + b
  // with streaming stores.
  void (*add_stream_f32)(float* out, const float* a, const float* b, int64_t n);
  void (*add_stream_bf16)(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n);
  // Up to kGroupRows batch rows' gradients at one position in one pass over the positional partial: acc +=
  // g[0], then acc += g[1], ... (acc = (0 + g[0]) + g[1] ... without reading acc when `init`); row r's
  // gradient also goes where its kind sends it: kRowSumOnly (the class slot), kRowCopy (dst = the row's
  // output, streaming stores when `stream`) or kRowPad (dst = the row's opmath pad sum, += g[r]).
  void (*group_f32)(float* acc, const GroupRow* rows, int count, int64_t n, bool stream, bool init);
  void (*group_bf16)(float* acc, const GroupRow* rows, int count, int64_t n, bool stream, bool init);
};

#define MAGE_ROW_LOOPS(NAME, ATTR)                                                                          \
  static ATTR void add_f32_##NAME(float* out, const float* a, const float* b, int64_t n) {                 \
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];                                                   \
  }                                                                                                         \
  static ATTR void accumulate_f32_##NAME(float* acc, const float* g, int64_t n) {                          \
    for (int64_t i = 0; i < n; ++i) acc[i] += g[i];                                                         \
  }                                                                                                         \
  static ATTR void accumulate_bf16_##NAME(float* acc, const uint16_t* g, int64_t n) {                      \
    for (int64_t i = 0; i < n; ++i) acc[i] += bf16_to_float(g[i]);                                          \
  }

MAGE_ROW_LOOPS(portable, )
#if defined(__x86_64__)
MAGE_ROW_LOOPS(avx2, __attribute__((target("avx2"))))
#endif
#undef MAGE_ROW_LOOPS

void add_bf16_portable(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

void round_to_bf16_portable(uint16_t* out, const float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(acc[i]);
}

constexpr RowLoops kRowLoops_portable{add_f32_portable, add_bf16_portable, accumulate_f32_portable,
                                      accumulate_bf16_portable, round_to_bf16_portable};

#if defined(__x86_64__)
// bf16 adds and roundings by hand. GCC vectorizes the portable loop to 42 instructions per 16 elements
// (widen by zero-extension, NaN mask packed separately, two lane permutes); the version below takes 23 and
// no shuffle, and took pad_with_cls forward bf16 with pos_embed at B=64 from 7.8 to 5.9 ms on one thread
// (53% -> 70% of the copy bandwidth). Eight fp32 lanes rounded as float_to_bf16 (to nearest even, any
// NaN -> 0x7FC0), the bf16 bits in the high half of each 32-bit lane (the low half is garbage).
__attribute__((target("avx2"))) inline __m256i round_bf16_high(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}

// The same in the low half of each lane, the high half zero.
__attribute__((target("avx2"))) inline __m256i round_bf16_lanes(__m256 f) {
  return _mm256_srli_epi32(round_bf16_high(f), 16);
}

// a + b for 16 bf16 values, without shuffles: the even elements widen by a shift into their 32-bit lane,
// the odd ones by masking off the low half; the rounded sums' high halves go back to the same places
// (even: shifted down, odd: in place) and one word blend interleaves them.
__attribute__((target("avx2"))) inline __m256i add_bf16x16(__m256i a, __m256i b) {
  const __m256i high = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  const __m256 even = _mm256_add_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)));
  const __m256 odd = _mm256_add_ps(_mm256_castsi256_ps(_mm256_and_si256(a, high)),
                                   _mm256_castsi256_ps(_mm256_and_si256(b, high)));
  return _mm256_blend_epi16(_mm256_srli_epi32(round_bf16_high(even), 16), round_bf16_high(odd), 0xAA);
}

__attribute__((target("avx2"))) void add_bf16_avx2(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i));
    const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), add_bf16x16(va, vb));
  }
  for (; i < n; ++i) out[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

__attribute__((target("avx2"))) void round_to_bf16_avx2(uint16_t* out, const float* acc, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i packed = _mm256_packus_epi32(round_bf16_lanes(_mm256_loadu_ps(acc + i)),
                                               round_bf16_lanes(_mm256_loadu_ps(acc + i + 8)));
    // packus interleaves the two sources' 128-bit halves: put the 64-bit quarters back in order.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permute4x64_epi64(packed, 0xD8));
  }
  for (; i < n; ++i) out[i] = float_to_bf16(acc[i]);
}

// pad_with_cls forward's sums streamed out as computed (no L1 buffer and copy; the backward's one pass over
// each row is the group loops below). Same adds, same bits. Streaming stores start at out's first 32-byte
// boundary (plain stores before it and for the tail). See benchmarks/results/cpu-avx2-masking-ab.txt.
__attribute__((target("avx2"))) void add_stream_f32_avx2(float* out, const float* a, const float* b, int64_t n) {
  int64_t i = unaligned_head(reinterpret_cast<const char*>(out), n * 4) / 4;
  for (int64_t k = 0; k < i; ++k) out[k] = a[k] + b[k];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  for (; i < n; ++i) out[i] = a[i] + b[i];
}

__attribute__((target("avx2"))) void add_stream_bf16_avx2(uint16_t* out, const uint16_t* a, const uint16_t* b,
                                                           int64_t n) {
  int64_t i = unaligned_head(reinterpret_cast<const char*>(out), n * 2) / 2;
  for (int64_t k = 0; k < i; ++k) out[k] = float_to_bf16(bf16_to_float(a[k]) + bf16_to_float(b[k]));
  for (; i + 16 <= n; i += 16) {
    const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i));
    const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out + i), add_bf16x16(va, vb));
  }
  for (; i < n; ++i) out[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

// Eight bf16 values widened to fp32 (exact: the bits go to the high half).
__attribute__((target("avx2"))) inline __m256 widen_bf16x8(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2"))) inline void add_into(float* acc, __m256 v) {
  _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), v));
}

// The group loops (RowLoops::group_*). Per element the same adds in the same order as one call of the
// single-row loops per row after a zero fill (0 + g0 is g0 except that -0.0 becomes +0.0, as in the
// zero-filled partial), so the same bits; the partial is read and written once per group instead of once per
// row.
template <bool kInit>
__attribute__((target("avx2"))) inline __m256 group_start(const float* acc, __m256 g) {
  return _mm256_add_ps(kInit ? _mm256_setzero_ps() : _mm256_loadu_ps(acc), g);
}

// Where row r's streaming stores may go: a copy whose output row starts on a 32-byte boundary.
inline bool streams_to(const GroupRow& r, bool stream) {
  return stream && r.kind == kRowCopy && reinterpret_cast<uintptr_t>(r.dst) % 32 == 0;
}

// A group's rows as locals: the vector stores of the group loops may alias `rows`, which would otherwise be
// read again on every iteration.
template <typename T, int R>
struct GroupLocals {
  const T* g[R];
  int kind[R] = {};
  void* dst[R] = {};
  bool st[R] = {};  // streaming stores
  GroupLocals(const GroupRow* rows, bool stream) {
    for (int r = 0; r < R; ++r) {
      g[r] = static_cast<const T*>(rows[r].g);
      kind[r] = rows[r].kind;
      dst[r] = rows[r].dst;
      st[r] = streams_to(rows[r], stream);
    }
  }
};

inline float as_float(float x) { return x; }
inline float as_float(uint16_t h) { return bf16_to_float(h); }

// The elements [i, n) after the group loops' vectors, one at a time: the same adds, copies and pad sums.
template <typename T, int R, bool kInit>
void group_tail(float* acc, const GroupLocals<T, R>& l, int64_t i, int64_t n) {
  const auto& [g, kind, dst, st] = l;
  for (; i < n; ++i) {
    float v[R];
    for (int r = 0; r < R; ++r) v[r] = as_float(g[r][i]);
    float p = (kInit ? 0.0f : acc[i]) + v[0];
    for (int r = 1; r < R; ++r) p += v[r];
    acc[i] = p;
    for (int r = 0; r < R; ++r) {
      if (kind[r] == kRowCopy) static_cast<T*>(dst[r])[i] = g[r][i];
      if (kind[r] == kRowPad) static_cast<float*>(dst[r])[i] += v[r];
    }
  }
}

template <int R, bool kInit>
__attribute__((target("avx2"))) void group_f32_impl(float* acc, const GroupRow* rows, int64_t n, bool stream) {
  const GroupLocals<float, R> l(rows, stream);
  const auto& [g, kind, dst, st] = l;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v[R];
    for (int r = 0; r < R; ++r) v[r] = _mm256_loadu_ps(g[r] + i);
    __m256 p = group_start<kInit>(acc + i, v[0]);
    for (int r = 1; r < R; ++r) p = _mm256_add_ps(p, v[r]);
    _mm256_storeu_ps(acc + i, p);
    for (int r = 0; r < R; ++r) {
      float* d = static_cast<float*>(dst[r]) + i;
      if (kind[r] == kRowCopy) {
        st[r] ? _mm256_stream_ps(d, v[r]) : _mm256_storeu_ps(d, v[r]);
      } else if (kind[r] == kRowPad) {
        add_into(d, v[r]);
      }
    }
  }
  group_tail<float, R, kInit>(acc, l, i, n);
}

template <int R, bool kInit>
__attribute__((target("avx2"))) void group_bf16_impl(float* acc, const GroupRow* rows, int64_t n, bool stream) {
  const GroupLocals<uint16_t, R> l(rows, stream);
  const auto& [g, kind, dst, st] = l;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i raw[R];
    __m256 lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      raw[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g[r] + i));
      lo[r] = widen_bf16x8(_mm256_castsi256_si128(raw[r]));
      hi[r] = widen_bf16x8(_mm256_extracti128_si256(raw[r], 1));
    }
    __m256 p0 = group_start<kInit>(acc + i, lo[0]), p1 = group_start<kInit>(acc + i + 8, hi[0]);
    for (int r = 1; r < R; ++r) {
      p0 = _mm256_add_ps(p0, lo[r]);
      p1 = _mm256_add_ps(p1, hi[r]);
    }
    _mm256_storeu_ps(acc + i, p0);
    _mm256_storeu_ps(acc + i + 8, p1);
    for (int r = 0; r < R; ++r) {
      if (kind[r] == kRowCopy) {
        __m256i* o = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst[r]) + i);
        st[r] ? _mm256_stream_si256(o, raw[r]) : _mm256_storeu_si256(o, raw[r]);
      } else if (kind[r] == kRowPad) {
        add_into(static_cast<float*>(dst[r]) + i, lo[r]);
        add_into(static_cast<float*>(dst[r]) + i + 8, hi[r]);
      }
    }
  }
  group_tail<uint16_t, R, kInit>(acc, l, i, n);
}

// group_*_impl for a run-time group size (1 or 2) and init.
template <template <int, bool> class Impl>
void group_dispatch(float* acc, const GroupRow* rows, int count, int64_t n, bool stream, bool init) {
  static_assert(kGroupRows == 2);
  if (count == 2) {
    init ? Impl<2, true>::run(acc, rows, n, stream) : Impl<2, false>::run(acc, rows, n, stream);
  } else {
    init ? Impl<1, true>::run(acc, rows, n, stream) : Impl<1, false>::run(acc, rows, n, stream);
  }
}

template <int R, bool kInit>
struct GroupF32 {
  static void run(float* acc, const GroupRow* rows, int64_t n, bool stream) {
    group_f32_impl<R, kInit>(acc, rows, n, stream);
  }
};

template <int R, bool kInit>
struct GroupBf16 {
  static void run(float* acc, const GroupRow* rows, int64_t n, bool stream) {
    group_bf16_impl<R, kInit>(acc, rows, n, stream);
  }
};

void group_f32_avx2(float* acc, const GroupRow* rows, int count, int64_t n, bool stream, bool init) {
  group_dispatch<GroupF32>(acc, rows, count, n, stream, init);
}

void group_bf16_avx2(float* acc, const GroupRow* rows, int count, int64_t n, bool stream, bool init) {
  group_dispatch<GroupBf16>(acc, rows, count, n, stream, init);
}

constexpr RowLoops kRowLoops_avx2{add_f32_avx2,
                                  add_bf16_avx2,
                                  accumulate_f32_avx2,
                                  accumulate_bf16_avx2,
                                  round_to_bf16_avx2,
                                  add_stream_f32_avx2,
                                  add_stream_bf16_avx2,
                                  group_f32_avx2,
                                  group_bf16_avx2};

// pad_with_cls forward's bf16 adds on CPUs with AVX-512 BF16: 32 sums per step, rounded by one vcvtne2ps2bf16
// (to nearest even, as c10::BFloat16) where the AVX2 loop spends 23 instructions per 16. The instruction
// differs from c10::BFloat16 in two cases: it reads a subnormal sum as zero, and it keeps a NaN's sign and
// payload; a step with either in any lane is redone by the AVX2 code (one fpclass per 16 sums). On a Zen 4
// the forward at B=64 went from 2.2-2.4 to 1.7-1.8 ms on one thread (cpu-avx512bf16-masking-ab.txt).
// GCC 12 warns inside its own AVX-512 headers here (their _mm512_undefined_* pass-through operands).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MAGE_AVX512BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// 16 bf16 values widened to fp32 (exact: the bits go to the high half).
MAGE_AVX512BF16 inline __m512 widen_bf16x16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

MAGE_AVX512BF16 inline __m512i add_bf16x32(const uint16_t* a, const uint16_t* b) {
  const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16));
  const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
  const __m512 lo = _mm512_add_ps(widen_bf16x16(a0), widen_bf16x16(b0));
  const __m512 hi = _mm512_add_ps(widen_bf16x16(a1), widen_bf16x16(b1));
  constexpr int kNanOrSubnormal = 0x01 | 0x20 | 0x80;  // fpclass: quiet NaN, subnormal, signalling NaN
  if (_mm512_fpclass_ps_mask(lo, kNanOrSubnormal) | _mm512_fpclass_ps_mask(hi, kNanOrSubnormal)) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(add_bf16x16(a0, b0)), add_bf16x16(a1, b1), 1);
  }
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // words 0-15 from lo, 16-31 from hi
}

MAGE_AVX512BF16 void add_bf16_avx512bf16(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) _mm512_storeu_si512(out + i, add_bf16x32(a + i, b + i));
  add_bf16_avx2(out + i, a + i, b + i, n - i);
}

MAGE_AVX512BF16 void add_stream_bf16_avx512bf16(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n) {
  int64_t i = unaligned_head(reinterpret_cast<const char*>(out), n * 2) / 2;
  add_bf16_avx2(out, a, b, i);
  for (; i + 32 <= n; i += 32) {  // two 32-byte streaming stores: out is 32-byte aligned from here
    const __m512i sum = add_bf16x32(a + i, b + i);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out + i), _mm512_castsi512_si256(sum));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out + i + 16), _mm512_extracti64x4_epi64(sum, 1));
  }
  add_bf16_avx2(out + i, a + i, b + i, n - i);
}
#undef MAGE_AVX512BF16
#pragma GCC diagnostic pop

constexpr RowLoops kRowLoops_avx512bf16{add_f32_avx2,
                                        add_bf16_avx512bf16,
                                        accumulate_f32_avx2,
                                        accumulate_bf16_avx2,
                                        round_to_bf16_avx2,
                                        add_stream_f32_avx2,
                                        add_stream_bf16_avx512bf16,
                                        group_f32_avx2,
                                        group_bf16_avx2};
#endif

// The loops for this call's path (read once per op call, not per row).
const RowLoops& row_loops() {
#if defined(__x86_64__)
  if (cpu_avx512_bf16_loops()) return kRowLoops_avx512bf16;
  if (cpu_avx2_kernels()) return kRowLoops_avx2;
#endif
  return kRowLoops_portable;
}

// out = a + b, rounded once to T (the sum is exact in opmath before rounding, as torch's add).
template <typename T>
void add_row(const RowLoops& k, T* out, const T* a, const T* b, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    k.add_f32(out, a, b, n);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    k.add_bf16(reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(a),
               reinterpret_cast<const uint16_t*>(b), n);
  } else {
    using acc_t = at::opmath_type<T>;
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc_t(a[i]) + acc_t(b[i]));
  }
}

// acc += g, in opmath.
template <typename T>
void accumulate_row(const RowLoops& k, at::opmath_type<T>* acc, const T* g, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    k.accumulate_f32(acc, g, n);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    k.accumulate_bf16(acc, reinterpret_cast<const uint16_t*>(g), n);
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += at::opmath_type<T>(g[i]);
  }
}

// out = acc rounded once to T.
template <typename T>
void store_row(const RowLoops& k, T* out, const at::opmath_type<T>* acc, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    k.round_to_bf16(reinterpret_cast<uint16_t*>(out), acc, n);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i]);
  }
}

// How a call writes the rows of `out`: streaming stores for outputs of kStreamBytes and up.
struct RowWriter {
  void (*copy)(void* dst, const void* src, int64_t bytes);
  void (*zero)(void* dst, int64_t bytes);  // all-zero bits is +0.0 in every float type
  void (*fence)();
  bool streaming;
};

RowWriter row_writer(const at::Tensor& out) {
#if defined(__x86_64__)
  if (static_cast<int64_t>(out.nbytes()) >= kStreamBytes && cpu_avx2_kernels()) {
    return {copy_stream_avx2, zero_stream_avx2, fence_stores, true};
  }
#endif
  return {copy_plain, zero_plain, fence_none, false};
}

// out = a + b as add_row, written by w (streamed in one pass where the loops have it).
template <typename T>
void add_row_to(const RowLoops& k, const RowWriter& w, T* out, const T* a, const T* b, int64_t n, T* buf) {
  if (w.streaming) {
    if constexpr (std::is_same_v<T, float>) {
      if (k.add_stream_f32) return k.add_stream_f32(out, a, b, n);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (k.add_stream_bf16) {
        return k.add_stream_bf16(reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(a),
                                 reinterpret_cast<const uint16_t*>(b), n);
      }
    }
    add_row(k, buf, a, b, n);  // the sums go out from here (L1)
    w.copy(out, buf, n * sizeof(T));
  } else {
    add_row(k, out, a, b, n);
  }
}

// Rows read ahead of their use. The rows a gather reads are scattered and start a new 4 KiB page every few
// rows, and the hardware prefetchers stop at page boundaries and need a few misses to pick up
// each new run, so the loops ask for the lines of the row about 4 KiB ahead while working on the current one.
// They go to L2 (prefetcht1), not L1: on a Zen 4, L1 prefetches of a row ahead were no faster than none (the
// L1 has too few line fills for the rows in flight), L2 ones made the gathers 1.2-1.7x faster on one thread
// (cpu-avx512bf16-masking-ab.txt). Rows over 16 KiB are left to the hardware (most of their lines are
// mid-page). Prefetch only: no result depends on it.
struct Prefetch {
  int64_t rows = 0, bytes = 0;  // rows ahead (0: none), bytes of each
  explicit Prefetch(int64_t row_bytes) {
    if (row_bytes > 0 && row_bytes <= (16 << 10)) {
      rows = std::min<int64_t>(16, ((4 << 10) + row_bytes - 1) / row_bytes);
      bytes = row_bytes;
    }
  }
  void operator()(const void* row) const {
    const char* p = static_cast<const char*>(row);
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 2);  // locality 2: prefetcht1
  }
};

// Copies (B, S_out) rows: out[b, s] = in[b, source(b, s)], or zeros for source -1.
template <typename Source>
void copy_rows(at::Tensor& out, const Rows& in, int64_t C, Source source) {
  const int64_t B = out.size(0), S = out.size(1), row_bytes = C * out.element_size();
  char* o = static_cast<char*>(out.data_ptr());
  const RowWriter w = row_writer(out);
  const Prefetch prefetch(row_bytes);
  parallel_chunks(B * S, row_grain(row_bytes), [&](int64_t begin, int64_t end) {
    // (b, s) of row r and of the row prefetch.rows ahead, stepped rather than divided out per row.
    int64_t b = begin / S, s = begin % S;
    int64_t ahead = begin + prefetch.rows, ba = ahead / S, sa = ahead % S;
    for (int64_t r = begin; r < end; ++r, ++ahead) {
      if (prefetch.rows && ahead < end) {
        const int64_t from = source(ba, sa);
        if (from >= 0) prefetch(in.row(ba, from));
      }
      const int64_t from = source(b, s);
      if (from >= 0) {
        w.copy(o + r * row_bytes, in.row(b, from), row_bytes);
      } else {
        w.zero(o + r * row_bytes, row_bytes);
      }
      if (++s == S) s = 0, ++b;
      if (++sa == S) sa = 0, ++ba;
    }
    w.fence();
  });
}

// Ordered integer key of a float: monotone in the value, -0.0 == 0.0, every NaN above +inf.
template <typename Bits, typename F>
Bits ordered_key(F f) {
  constexpr Bits sign = Bits(1) << (8 * sizeof(Bits) - 1);
  if (std::isnan(f)) return std::numeric_limits<Bits>::max();
  if (f == F(0)) f = F(0);
  Bits u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & sign) ? ~u : (u | sign);
}

// (noise, position) as one unsigned integer, so equal noise values rank by position.
template <typename scalar_t>
struct RankKey {
  using type = std::conditional_t<std::is_same_v<scalar_t, double>, unsigned __int128, uint64_t>;
  static type make(scalar_t v, int64_t t) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      return (type(ordered_key<uint64_t>(v)) << 64) | type(t);
    } else {
      return (type(ordered_key<uint32_t>(static_cast<float>(v))) << 32) | type(t);
    }
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------- mask_plan

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_plan_cpu(const at::Tensor& noise_in, const at::Tensor& num_masked,
                                                             const at::Tensor& num_dropped, c10::SymInt num_kept_s) {
  const int64_t num_kept = num_kept_s.expect_int();
  check_mask_plan_shapes(noise_in, num_masked, num_dropped, num_kept);
  const int64_t B = noise_in.size(0), L = noise_in.size(1);
  const at::Tensor noise = noise_in.contiguous();
  const at::Tensor m_counts = num_masked.contiguous(), d_counts = num_dropped.contiguous();
  const int64_t* mc = m_counts.const_data_ptr<int64_t>();
  const int64_t* dc = d_counts.const_data_ptr<int64_t>();
  const int64_t m_step = m_counts.dim() ? 1 : 0, d_step = d_counts.dim() ? 1 : 0;
  for (int64_t b = 0; b < (m_counts.dim() ? B : 1); ++b) {
    TORCH_CHECK_VALUE(mc[b] >= 0 && mc[b] <= L, "mask_plan: num_masked must lie in [0, L] = [0, ", L, "], got ",
                      mc[b], " (row ", b, ")");
  }
  for (int64_t b = 0; b < (d_counts.dim() ? B : 1); ++b) {
    TORCH_CHECK_VALUE(dc[b] >= 0 && dc[b] <= L, "mask_plan: num_dropped must lie in [0, L] = [0, ", L, "], got ",
                      dc[b], " (row ", b, ")");
    TORCH_CHECK_VALUE(L - dc[b] <= num_kept, "mask_plan: keep_idx has num_kept = ", num_kept,
                      " columns but row ", b, " keeps L - num_dropped = ", L - dc[b],
                      " tokens; pass num_kept >= L - min(num_dropped)");
  }
  at::Tensor masked = at::empty({B, L}, noise.options().dtype(at::kBool));
  at::Tensor dropped = at::empty({B, L}, noise.options().dtype(at::kBool));
  at::Tensor keep_idx = at::empty({B, num_kept}, noise.options().dtype(at::kLong));
  if (B == 0) return {masked, dropped, keep_idx};
  bool* mp = masked.data_ptr<bool>();
  bool* dp = dropped.data_ptr<bool>();
  int64_t* kp = keep_idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, noise.scalar_type(), "mask_plan_cpu", [&] {
    using Key = typename RankKey<scalar_t>::type;
    const scalar_t* np = noise.const_data_ptr<scalar_t>();
    parallel_chunks(B, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t begin, int64_t end) {
      std::vector<Key> keys(L), work(L);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = np + b * L;
        for (int64_t t = 0; t < L; ++t) keys[t] = RankKey<scalar_t>::make(row[t], t);
        // Keys are distinct, so rank(t) < n  <=>  key(t) < (n-th smallest key); n = L means all.
        const int64_t M = mc[b * m_step], D = dc[b * d_step];
        const int64_t hi = std::max(M, D), lo = std::min(M, D);
        Key thr_hi = 0, thr_lo = 0;
        std::copy(keys.begin(), keys.end(), work.begin());
        if (hi < L) {
          std::nth_element(work.begin(), work.begin() + hi, work.end());
          thr_hi = work[hi];
        }
        if (lo < hi) {  // the hi smallest now lie in work[0, hi)
          std::nth_element(work.begin(), work.begin() + lo, work.begin() + hi);
          thr_lo = work[lo];
        } else {
          thr_lo = thr_hi;
        }
        const Key thr_m = M == hi ? thr_hi : thr_lo, thr_d = D == hi ? thr_hi : thr_lo;
        const bool all_m = M == L, all_d = D == L;
        bool* mrow = mp + b * L;
        bool* drow = dp + b * L;
        int64_t* krow = kp + b * num_kept;
        int64_t n = 0;
        for (int64_t t = 0; t < L; ++t) {
          mrow[t] = all_m || keys[t] < thr_m;
          const bool d = all_d || keys[t] < thr_d;
          drow[t] = d;
          if (!d) krow[n++] = t;
        }
        std::fill(krow + n, krow + num_kept, int64_t(-1));
      }
    });
  });
  return {masked, dropped, keep_idx};
}

// -------------------------------------------------------------------------------- gather / scatter

at::Tensor gather_keep_cpu(const at::Tensor& x_in, const at::Tensor& keep_in) {
  check_rows_shape(x_in, "gather_keep", "x");
  const int64_t B = x_in.size(0), L = x_in.size(1) - 1, C = x_in.size(2);
  check_keep_idx_shape(keep_in, B, L, x_in.device(), "gather_keep");
  const at::Tensor keep_idx = keep_in.contiguous();
  const int64_t Lk = keep_idx.size(1);
  const int64_t* keep = keep_idx.const_data_ptr<int64_t>();
  check_keep_idx_values(keep, B, Lk, L, "gather_keep");
  at::Tensor y = new_rows({B, 1 + Lk, C}, x_in.options());
  if (y.numel() == 0) return y;
  const at::Tensor x = unit_channel_stride(x_in);
  copy_rows(y, rows_of(x), C, [&](int64_t b, int64_t s) -> int64_t {
    if (s == 0) return 0;
    const int64_t t = keep[b * Lk + s - 1];
    return t >= 0 ? 1 + t : -1;
  });
  return y;
}

at::Tensor scatter_keep_cpu(const at::Tensor& y_in, const at::Tensor& keep_in, c10::SymInt L_s) {
  const int64_t L = L_s.expect_int();
  check_rows_shape(y_in, "scatter_keep", "grad");
  const int64_t B = y_in.size(0), C = y_in.size(2);
  check_keep_idx_shape(keep_in, B, L, y_in.device(), "scatter_keep");
  TORCH_CHECK_VALUE(y_in.size(1) == 1 + keep_in.size(1), "scatter_keep: grad must be [B, 1+Lk, C] with Lk = ",
                    "keep_idx.size(1) = ", keep_in.size(1), ", got shape ", y_in.sizes());
  const at::Tensor keep_idx = keep_in.contiguous();
  const int64_t Lk = keep_idx.size(1);
  const int64_t* keep = keep_idx.const_data_ptr<int64_t>();
  check_keep_idx_values(keep, B, Lk, L, "scatter_keep");
  at::Tensor x = new_rows({B, 1 + L, C}, y_in.options());
  if (x.numel() == 0) return x;
  const std::vector<int64_t> src = slot_sources(keep, nullptr, B, Lk, L);
  const at::Tensor y = unit_channel_stride(y_in);
  copy_rows(x, rows_of(y), C, [&](int64_t b, int64_t s) -> int64_t {
    if (s == 0) return 0;
    const int64_t j = src[b * L + s - 1];
    return j >= 0 ? 1 + j : -1;
  });
  return x;
}

// ------------------------------------------------------------------------------------ pad_with_cls

at::Tensor pad_with_cls_cpu(const at::Tensor& y_in, const at::Tensor& keep_in, const at::Tensor& masked_in,
                            const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& pad) {
  check_pad_with_cls_shapes(y_in, keep_in, masked_in, pos_embed, pad);
  const int64_t B = y_in.size(0), C = y_in.size(2), L = masked_in.size(1);
  const at::Tensor keep_idx = keep_in.contiguous(), masked = masked_in.contiguous();
  const int64_t Lk = keep_idx.size(1);
  const int64_t* keep = keep_idx.const_data_ptr<int64_t>();
  check_keep_idx_values(keep, B, Lk, L, "pad_with_cls");
  at::Tensor z = new_rows({B, 1 + L, C}, y_in.options());
  if (z.numel() == 0) return z;
  const std::vector<int64_t> src = slot_sources(keep, masked.const_data_ptr<bool>(), B, Lk, L);
  const at::Tensor y = unit_channel_stride(y_in);
  const Rows yr = rows_of(y);
  const at::Tensor pe = pos_embed ? pos_embed->contiguous() : at::Tensor();
  const at::Tensor pd = pad ? pad->contiguous() : at::Tensor();
  const int64_t S = 1 + L, es = z.element_size();
  const RowLoops& loops = row_loops();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "pad_with_cls_cpu", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* pep = pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pdp = pd.defined() ? pd.const_data_ptr<scalar_t>() : nullptr;
    const RowWriter w = row_writer(z);
    const Prefetch prefetch(C * es);
    parallel_chunks(B * S, row_grain(C * es), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> sum(pep && w.streaming ? C : 0);  // for row sums streamed out by a copy
      // (b, s) of row r and of the row prefetch.rows ahead, stepped rather than divided out per row.
      int64_t b = begin / S, s = begin % S;
      int64_t ahead = begin + prefetch.rows, ba = ahead / S, sa = ahead % S;
      for (int64_t r = begin; r < end; ++r, ++ahead) {
        if (prefetch.rows && ahead < end) {  // rows of y (the class row and pad stay in cache)
          const int64_t ja = sa == 0 ? -1 : src[ba * L + sa - 1];
          if (ja >= 0) prefetch(yr.row(ba, 1 + ja));
        }
        const int64_t j = s == 0 ? -1 : src[b * L + s - 1];
        const scalar_t* from = j >= 0     ? reinterpret_cast<const scalar_t*>(yr.row(b, 1 + j))
                               : s > 0 && pdp ? pdp
                                              : reinterpret_cast<const scalar_t*>(yr.row(b, 0));
        scalar_t* out = zp + r * C;
        if (pep) {
          add_row_to(loops, w, out, from, pep + s * C, C, sum.data());
        } else {
          w.copy(out, from, C * es);
        }
        if (++s == S) s = 0, ++b;
        if (++sa == S) sa = 0, ++ba;
      }
      w.fence();
    });
  });
  return z;
}

// RowLoops::group_* for T (null for types without them).
template <typename T>
auto group_loop(const RowLoops& k) {
  if constexpr (std::is_same_v<T, float>) {
    return k.group_f32;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return k.group_bf16;
  } else {
    return static_cast<decltype(k.group_bf16)>(nullptr);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pad_with_cls_backward_cpu(const at::Tensor& gz_in,
                                                                         const at::Tensor& keep_in,
                                                                         const at::Tensor& masked_in, bool mae,
                                                                         bool pos) {
  check_pad_backward_shapes(gz_in, keep_in, masked_in);
  const int64_t B = gz_in.size(0), C = gz_in.size(2), L = masked_in.size(1), S = 1 + L;
  const at::Tensor keep_idx = keep_in.contiguous(), masked = masked_in.contiguous();
  const int64_t Lk = keep_idx.size(1);
  const int64_t* keep = keep_idx.const_data_ptr<int64_t>();
  check_keep_idx_values(keep, B, Lk, L, "pad_with_cls_backward");
  const auto acc_dtype = gz_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_y = new_rows({B, 1 + Lk, C}, gz_in.options());
  at::Tensor pad_sum = at::empty({mae ? B : 0, C}, gz_in.options().dtype(acc_dtype));
  at::Tensor grad_pos = at::empty({pos ? S : 0, C}, gz_in.options());
  if (C == 0) return {grad_y, pad_sum, grad_pos};
  const bool* mk = masked.const_data_ptr<bool>();
  const std::vector<int64_t> src = slot_sources(keep, mk, B, Lk, L);
  const at::Tensor gz = unit_channel_stride(gz_in);
  const Rows gr = rows_of(gz);
  // One pass over grad_z in tasks of (kBatchBlock batch rows, up to kChunk channels: whole rows at usual
  // widths, which the prefetchers stream; 1 KiB pieces of rows read about 2x slower). The positional sums
  // go to one fp32 / fp64 partial [S, C] per batch block (790 KB at S = 257, C = 768: in L3 as the block's
  // rows stream past), then to grad_pos, summed over the blocks in order. The block size is fixed, so the
  // sums do not depend on the thread count. Walking positions in tiles across the block's rows, so that the
  // partial's rows stay in L1 / L2, measured no faster at B = 64 (cpu-avx2-masking-ab.txt): what the
  // positional sum cost was the extra loop over each row, now fused with the copy or the padded sum. Two
  // batch rows go through the partial per pass (fp32 and bf16 on AVX2: each element gets the same adds in
  // the same order, so the same bits), and the block's first pass stores instead of adding to a zero fill.
  constexpr int64_t kBatchBlock = 16, kChunk = 2048;
  const int64_t chunks = (C + kChunk - 1) / kChunk, blocks = (B + kBatchBlock - 1) / kBatchBlock;
  at::Tensor partial = at::empty({pos ? blocks : 0, S, C}, gz_in.options().dtype(acc_dtype));
  const RowLoops& loops = row_loops();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gz.scalar_type(), "pad_with_cls_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    acc_t* ps = mae ? pad_sum.data_ptr<acc_t>() : nullptr;
    acc_t* part = pos ? partial.data_ptr<acc_t>() : nullptr;
    const int64_t es = gz.element_size();
    auto row = [&](int64_t b, int64_t s, int64_t c0) { return reinterpret_cast<const scalar_t*>(gr.row(b, s)) + c0; };
    // At least ~512 KiB of grad_z per thread, as the row copies (row_grain, two chunks per thread).
    const RowWriter w = row_writer(grad_y);
    const int64_t task_bytes = std::min(B, kBatchBlock) * S * std::min(C, kChunk) * es;
    parallel_chunks(blocks * chunks, 1, [&](int64_t begin, int64_t end) {
      // The group's pad sums, kChunk + 48 elements apart: 4 KiB apart, a store to one would hold up the next
      // load from the other (4K aliasing; ~5% of the call on 2 threads).
      constexpr int64_t kPadStride = kChunk + 48;
      alignas(64) acc_t pad_buf[kGroupRows * kPadStride];
      acc_t* pad_accs[kGroupRows];
      for (int r = 0; r < kGroupRows; ++r) pad_accs[r] = pad_buf + r * kPadStride;
      acc_t* pad_acc = pad_accs[0];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t blk = task / chunks, c0 = (task % chunks) * kChunk, n = std::min(kChunk, C - c0);
        acc_t* bp = part ? part + blk * S * C + c0 : nullptr;
        const int64_t b0 = blk * kBatchBlock, b_end = std::min(B, (blk + 1) * kBatchBlock);
        // Rows whose token is dropped or masked get zero; then the class row's gradient.
        auto finish_row = [&](int64_t b, acc_t* pa) {
          scalar_t* gyb = gy + b * (1 + Lk) * C + c0;
          for (int64_t j = 0; j < Lk; ++j) {
            const int64_t t = keep[b * Lk + j];
            if (t < 0 || mk[b * L + t]) w.zero(gyb + (1 + j) * C, n * es);
          }
          if (mae) {
            std::copy(pa, pa + n, ps + b * C + c0);
            w.copy(gyb, row(b, 0, c0), n * es);
          } else {
            accumulate_row(loops, pa, row(b, 0, c0), n);
            store_row(loops, gyb, pa, n);
          }
        };
        // Up to kGroupRows batch rows per pass over the block's partial where the loops have it (fp32, bf16 on
        // AVX2); the partial's first pass stores ((0 + g0) + g1) ... instead of adding to a zero fill.
        const auto group_fn = group_loop<scalar_t>(loops);
        int64_t b = b0;
        if (bp && group_fn) {
          for (int count; b < b_end; b += count) {
            count = static_cast<int>(std::min<int64_t>(kGroupRows, b_end - b));
            for (int r = 0; r < count; ++r) std::fill(pad_accs[r], pad_accs[r] + n, acc_t(0));
            for (int64_t s = 0; s < S; ++s) {
              GroupRow rows[kGroupRows];
              for (int r = 0; r < count; ++r) {
                const int64_t j = s == 0 ? -1 : src[(b + r) * L + s - 1];
                scalar_t* gyb = gy + (b + r) * (1 + Lk) * C + c0;
                rows[r] = {row(b + r, s, c0), s == 0 ? kRowSumOnly : j >= 0 ? kRowCopy : kRowPad,
                           s == 0 ? nullptr : j >= 0 ? static_cast<void*>(gyb + (1 + j) * C) : pad_accs[r]};
              }
              group_fn(reinterpret_cast<float*>(bp + s * C), rows, count, n, w.streaming, b == b0);
            }
            for (int r = 0; r < count; ++r) finish_row(b + r, pad_accs[r]);
          }
        } else if (bp) {
          for (int64_t s = 0; s < S; ++s) std::fill(bp + s * C, bp + s * C + n, acc_t(0));
        }
        for (; b < b_end; ++b) {  // one row per pass (no group loops, or no positional sum)
          scalar_t* gyb = gy + b * (1 + Lk) * C + c0;
          std::fill(pad_acc, pad_acc + n, acc_t(0));
          for (int64_t s = 0; s < S; ++s) {
            const scalar_t* g = row(b, s, c0);
            const int64_t j = s == 0 ? -1 : src[b * L + s - 1];
            if (s == 0) {  // the class slot: handled in finish_row
              if (bp) accumulate_row(loops, bp, g, n);
            } else if (j >= 0) {  // a kept, unmasked token: its gradient goes back to its row
              if (bp) accumulate_row(loops, bp + s * C, g, n);
              w.copy(gyb + (1 + j) * C, g, n * es);
            } else {  // padded: summed into the row's [C] (or pad) gradient, in token order
              if (bp) accumulate_row(loops, bp + s * C, g, n);
              accumulate_row(loops, pad_acc, g, n);
            }
          }
          finish_row(b, pad_acc);
        }
      }
      w.fence();
    }, std::max<int64_t>(1, (512 << 10) / std::max<int64_t>(task_bytes, 1)));
    if (!pos) return;
    scalar_t* gp = grad_pos.data_ptr<scalar_t>();
    parallel_chunks(S, row_grain(blocks * C * partial.element_size()), [&](int64_t begin, int64_t end) {
      acc_t acc[kChunk];
      for (int64_t s = begin; s < end; ++s) {
        for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
          const int64_t n = std::min(kChunk, C - c0);
          std::fill(acc, acc + n, acc_t(0));
          for (int64_t blk = 0; blk < blocks; ++blk) accumulate_row<acc_t>(loops, acc, part + (blk * S + s) * C + c0, n);
          store_row(loops, gp + s * C + c0, acc, n);
        }
      }
    });
  });
  return {grad_y, pad_sum, grad_pos};
}

TORCH_LIBRARY_IMPL(mage, CPU, m) {
  m.impl("mask_plan", &mask_plan_cpu);
  m.impl("gather_keep", &gather_keep_cpu);
  m.impl("scatter_keep", &scatter_keep_cpu);
  m.impl("pad_with_cls", &pad_with_cls_cpu);
  m.impl("pad_with_cls_backward", &pad_with_cls_backward_cpu);
}

}  // namespace mage

// Bytes of freed outputs the cache holds now (for tests; ctypes, as cpu_isa.cpp's entry points).
extern "C" size_t mage_output_cache_bytes() { return mage::OutputCache::get().cached_bytes(); }
