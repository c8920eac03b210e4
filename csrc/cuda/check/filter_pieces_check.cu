// Host check of the filter-piece layout of the extrap_sgd_ filter variant
// (extrap_kernels.cuh), run by csrc/cuda/check.sh: the layout is plain integer
// arithmetic, so its host build runs without a GPU. For each (numel, F), the pieces that
// FilterSums writes chunk by chunk must be numbered 0 .. num_pieces - 1 without gap or
// repeat, each must lie in one filter and one chunk, and the pieces FilterFactors adds up
// for filter j must be exactly those covering its elements. Not part of the extension.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../extrap_kernels.cuh"

using namespace lbkernels::cuda;

namespace {

int check(int64_t numel, int64_t f) {
  const int64_t pieces = num_pieces(numel, f);
  std::vector<int64_t> owner(pieces, -1);  // piece -> its filter
  std::vector<int64_t> size(pieces, 0);    // piece -> its elements
  for (int64_t chunk = 0; chunk < num_chunks(numel); ++chunk) {
    const ChunkPieces cp(chunk, numel, f);
    int64_t next = 0;  // the chunk's pieces tile it in order
    for (int64_t k = 0; k < cp.count; ++k) {
      int64_t lo, hi;
      cp.bounds(k, lo, hi);
      const int64_t slot = cp.first + k;
      if (lo != next || hi <= lo || slot < 0 || slot >= pieces || owner[slot] != -1) {
        std::printf("numel %lld F %lld chunk %lld piece %lld: bad slot or bounds\n",
                    static_cast<long long>(numel), static_cast<long long>(f),
                    static_cast<long long>(chunk), static_cast<long long>(k));
        return 1;
      }
      for (int64_t e = cp.begin + lo; e < cp.begin + hi; ++e) {
        if (e / f != cp.j_lo + k || piece_of(e, f) != slot) {
          std::printf("numel %lld F %lld: element %lld in piece %lld\n",
                      static_cast<long long>(numel), static_cast<long long>(f),
                      static_cast<long long>(e), static_cast<long long>(slot));
          return 1;
        }
      }
      owner[slot] = cp.j_lo + k;
      size[slot] = hi - lo;
      next = hi;
    }
    if (next != cp.n) return std::printf("numel %lld F %lld: chunk not covered\n",
                                         static_cast<long long>(numel), static_cast<long long>(f)), 1;
  }
  for (int64_t s = 0; s < pieces; ++s)
    if (owner[s] == -1)
      return std::printf("numel %lld F %lld: piece %lld never written\n",
                         static_cast<long long>(numel), static_cast<long long>(f),
                         static_cast<long long>(s)), 1;
  for (int64_t j = 0; j < numel / f; ++j) {
    int64_t first, last, covered = 0;
    filter_pieces(j, f, first, last);
    for (int64_t s = first; s <= last; ++s) covered += owner[s] == j ? size[s] : -numel;
    if (covered != f || (first > 0 && owner[first - 1] == j) ||
        (last + 1 < pieces && owner[last + 1] == j)) {
      std::printf("numel %lld F %lld: filter %lld pieces %lld..%lld\n",
                  static_cast<long long>(numel), static_cast<long long>(f),
                  static_cast<long long>(j), static_cast<long long>(first),
                  static_cast<long long>(last));
      return 1;
    }
  }
  return 0;
}

}  // namespace

int main() {
  const int64_t c = kChunkSize;
  // Filters much shorter than, equal to, dividing, straddling and longer than a chunk;
  // filter sizes sharing powers of two with the chunk size (common boundaries).
  const int64_t filters[] = {1, 3, 27, 32, 252, 260, 2048, 4608, c / 2, c - 1, c, c + 1,
                             3 * c / 2, 2 * c, 5 * c + 3};
  const int64_t rows[] = {1, 2, 7, 33};
  int cases = 0;
  for (const int64_t f : filters)
    for (const int64_t r : rows) {
      if (f * r > 12 * c) continue;
      if (check(f * r, f) != 0) return 1;
      ++cases;
    }
  if (check(3 * c + 5, 3 * c + 5) != 0) return 1;  // a 1-d tensor: one filter
  std::printf("filter pieces: %d layouts OK\n", cases + 1);
  return 0;
}
