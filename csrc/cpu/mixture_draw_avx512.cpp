// Vectorised pieces of the mixture sampler (round-0 slot random words, keyed permutations), AVX-512 instantiation (16 lanes per vpmuludq pair).
#include "cpu/mixture_draw_kernel_impl.h"

namespace aioli_ext {

void slot_random_pairs_avx512(uint64_t seed, uint64_t step, uint32_t round, uint64_t first_pair, int pairs,
                            uint64_t* out) {
  slot_random_pairs_impl(seed, step, round, first_pair, pairs, out);
}

int sample_lanes_avx512(const GroupPermutations* groups, const int32_t* group, const uint64_t* offset, int count,
                        int64_t* ids, int32_t* left_over) {
  return sample_lanes_impl(groups, group, offset, count, ids, left_over);
}

}  // namespace aioli_ext
