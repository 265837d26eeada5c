// Vectorised pieces of the mixture sampler (round-0 slot random words, keyed permutations), AVX-512 instantiation (16 lanes per vpmuludq pair).
#include "cpu/mixture_draw_kernel_impl.h"

namespace aioli_ext {

void slot_random_pairs_avx512(uint64_t seed, uint64_t step, uint32_t round, uint64_t first_pair, int pairs,
                            uint64_t* out) {
  slot_random_pairs_impl(seed, step, round, first_pair, pairs, out);
}

void permutation_lanes_avx512(PermutationLanes& lanes, int count) { permutation_lanes_impl(lanes, count); }

}  // namespace aioli_ext
