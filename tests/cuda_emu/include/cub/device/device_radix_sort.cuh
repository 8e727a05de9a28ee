// Emulator stand-in for cub::DeviceRadixSort::SortPairs: a stable sort on the key bits
// [begin_bit, end_bit) (keys equal in those bits keep their order, as the radix sort does).
#pragma once
#include <algorithm>
#include <numeric>
#include <vector>

#include "vos_emu/runtime.h"

namespace cub {

struct DeviceRadixSort {
  template <class K, class V, class N>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out, const V* vals_in,
                               V* vals_out, N num_items, int begin_bit = 0, int end_bit = int(sizeof(K) * 8),
                               cudaStream_t = nullptr, bool = false) {
    static_assert(std::is_unsigned<K>::value, "emulated SortPairs takes unsigned keys");
    if (temp == nullptr) {
      temp_bytes = 256;  // a real size, so that the caller's workspace arithmetic runs
      return cudaSuccess;
    }
    if (temp_bytes < 256 || begin_bit < 0 || end_bit > int(sizeof(K) * 8) || begin_bit > end_bit)
      return cudaErrorInvalidValue;
    const int64_t n = static_cast<int64_t>(num_items);
    const int width = end_bit - begin_bit;
    const unsigned long long mask = width >= 64 ? ~0ull : ((1ull << width) - 1ull);
    auto digit = [&](K k) { return (static_cast<unsigned long long>(k) >> begin_bit) & mask; };
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return digit(keys_in[a]) < digit(keys_in[b]); });
    std::vector<K> k2(n);
    std::vector<V> v2(n);
    for (int64_t i = 0; i < n; ++i) k2[i] = keys_in[order[i]], v2[i] = vals_in[order[i]];
    std::copy(k2.begin(), k2.end(), keys_out);
    std::copy(v2.begin(), v2.end(), vals_out);
    return cudaSuccess;
  }
};

}  // namespace cub
