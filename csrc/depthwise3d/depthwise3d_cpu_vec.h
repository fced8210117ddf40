// The depthwise kernels' vector helpers: cpu_vec.h's vectors, loads and stores (shared with the
// recurrent gate rows) and the shuffle masks of the NDHWC kernel, in namespace cpu of this ISA pass.
// Included once per ISA path inside its pass (cpu_isa_each.h): no include guard.
#include <cstddef>
#include <utility>

#include "../cpu_vec.h"

namespace fastvid {
namespace depthwise3d {
namespace FASTVID_ISA {
namespace cpu {

using cpu_vec::FASTVID_ISA::I32;
using cpu_vec::FASTVID_ISA::kVecBytes;
using cpu_vec::FASTVID_ISA::load_vec;
using cpu_vec::FASTVID_ISA::store_vec;
using cpu_vec::FASTVID_ISA::U16;
using cpu_vec::FASTVID_ISA::U32;
using cpu_vec::FASTVID_ISA::Vec;

// Shuffle masks over two float vectors a, b of L lanes: even / odd lanes of the pair (a, b), and
// interleaving a (even channels) with b (odd channels) back into the low / high vector.
template <size_t... l>
constexpr I32 mask_even(std::index_sequence<l...>) { return I32{static_cast<int32_t>(2 * l)...}; }
template <size_t... l>
constexpr I32 mask_interleave(int32_t start, std::index_sequence<l...>) {
  return I32{static_cast<int32_t>(start + l / 2 + (l % 2) * (kVecBytes / 4))...};
}
constexpr int kFloatLanes = kVecBytes / 4;
constexpr I32 kEven = mask_even(std::make_index_sequence<kFloatLanes>{});
constexpr I32 kOdd = kEven + 1;
constexpr I32 kLow = mask_interleave(0, std::make_index_sequence<kFloatLanes>{});
constexpr I32 kHigh = mask_interleave(kFloatLanes / 2, std::make_index_sequence<kFloatLanes>{});

}  // namespace cpu
}  // namespace FASTVID_ISA
}  // namespace depthwise3d
}  // namespace fastvid
