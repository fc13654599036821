// Vector traits for one ISA; each isa_*.cpp defines SPARSIFY_SIMD_* before including this
// inside its own namespace (so same-named inline functions never merge across ISA builds).
// Included after <immintrin.h> and <cstring>.

#if defined(SPARSIFY_SIMD_AVX512)
struct Simd {
  using V = __m512;
  static constexpr int W = 16;
  static inline __mmask16 mask(int n) { return (__mmask16)((1u << n) - 1u); }
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float a) { return _mm512_set1_ps(a); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline V loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline void storen(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  // second operand wins on NaN, so NaN inputs propagate through relu/clip/max
  static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
  // max that keeps NaN: NaN when v or acc is (max_ps alone returns its second operand then)
  static inline V maxp(V acc, V v) {
    return _mm512_mask_mov_ps(_mm512_max_ps(v, acc), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
  }
  static inline V min(V a, V b) { return _mm512_min_ps(a, b); }
  static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static inline V div(V a, V b) { return _mm512_div_ps(a, b); }
  static inline V abs(V a) { return _mm512_abs_ps(a); }
  static inline V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n in [-126, 127]
  static inline V scale2(V p, V n) { return _mm512_scalef_ps(p, n); }
  // p[0..4) in every 128-bit lane; lane<I> then splats element I of each lane
  static inline V bcast4(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
  template <int I> static inline V lane(V a) { return _mm512_permute_ps(a, I * 0x55); }
};
#elif defined(SPARSIFY_SIMD_AVX2)
struct Simd {
  using V = __m256;
  static constexpr int W = 8;
  static inline __m256i mask(int n) {
    static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 8 - n));
  }
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V set1(float a) { return _mm256_set1_ps(a); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V loadn(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline void storen(float* p, V v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
  static inline V maxp(V acc, V v) {
    return _mm256_blendv_ps(_mm256_max_ps(v, acc), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  static inline V min(V a, V b) { return _mm256_min_ps(a, b); }
  static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static inline V div(V a, V b) { return _mm256_div_ps(a, b); }
  static inline V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
  static inline V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline V scale2(V p, V n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static inline V bcast4(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
  template <int I> static inline V lane(V a) { return _mm256_permute_ps(a, I * 0x55); }
};
#else  // SSE2: every x86-64 has it
struct Simd {
  using V = __m128;
  static constexpr int W = 4;
  static inline V zero() { return _mm_setzero_ps(); }
  static inline V set1(float a) { return _mm_set1_ps(a); }
  static inline V load(const float* p) { return _mm_loadu_ps(p); }
  static inline V loadn(const float* p, int n) {
    float t[4] = {0.f, 0.f, 0.f, 0.f};
    std::memcpy(t, p, sizeof(float) * n);
    return _mm_loadu_ps(t);
  }
  static inline void store(float* p, V v) { _mm_storeu_ps(p, v); }
  static inline void storen(float* p, V v, int n) {
    float t[4];
    _mm_storeu_ps(t, v);
    std::memcpy(p, t, sizeof(float) * n);
  }
  static inline V fma(V a, V b, V c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static inline V add(V a, V b) { return _mm_add_ps(a, b); }
  static inline V mul(V a, V b) { return _mm_mul_ps(a, b); }
  static inline V max(V a, V b) { return _mm_max_ps(a, b); }
  static inline V maxp(V acc, V v) {
    const V nan = _mm_cmpunord_ps(v, v);
    return _mm_or_ps(_mm_and_ps(nan, v), _mm_andnot_ps(nan, _mm_max_ps(v, acc)));
  }
  static inline V min(V a, V b) { return _mm_min_ps(a, b); }
  static inline V sub(V a, V b) { return _mm_sub_ps(a, b); }
  static inline V div(V a, V b) { return _mm_div_ps(a, b); }
  static inline V abs(V a) { return _mm_andnot_ps(_mm_set1_ps(-0.f), a); }
  // cvtps rounds to nearest under the default MXCSR; SSE2 has no roundps
  static inline V round(V a) { return _mm_cvtepi32_ps(_mm_cvtps_epi32(a)); }
  static inline V scale2(V p, V n) {
    const __m128i e = _mm_slli_epi32(_mm_add_epi32(_mm_cvtps_epi32(n), _mm_set1_epi32(127)), 23);
    return _mm_mul_ps(p, _mm_castsi128_ps(e));
  }
  static inline V bcast4(const float* p) { return _mm_loadu_ps(p); }
  template <int I> static inline V lane(V a) { return _mm_shuffle_ps(a, a, I * 0x55); }
};
#endif
