// PLAID's search kernels, rewritten for serving (colbert_patches/scorer.py).
//
// shortlist: PLAID's centroid-only shortlist, upstream's filter_pids.
// Upstream's kernel, per call: spawns one pthread per torch thread, keeps an
// std::unordered_set of the codes seen per passage, pushes every candidate
// into a priority queue, runs its second pass through the same machinery and
// returns only passage ids (the caller recomputes the scores). Here: torch's
// own thread pool, no set (a maximum needs no de-duplication), the pruned
// centroid rows packed into one small table, partial selection
// (std::nth_element) instead of heaps, and the second pass's scores returned.
// Same scores as upstream's; ties ordered by slot.
//
// decompress: upstream's decompress_residuals (also a pthread per torch
// thread per call, a byte-by-byte table walk, and the vectors normalised by
// a second pass in torch), with one float table per residual byte, torch's
// thread pool, the vectors normalised as they are written, and int16 codes.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr float kMissing = -9999.0f;  // a query token with no scored code (upstream's value)
constexpr int64_t kPrefetchAhead = 8;  // passages
constexpr int kLanes = 16;  // partial sums of a vector's squared norm

// Sum over query tokens of each token's best score among the passage's codes
// (rows: code -> row of `table`, -1: not scored).
template <typename Code>
inline float passage_score(const Code* codes, int64_t n, const int32_t* rows, const float* table,
                           int nq, float* best, int32_t* hits) {
    // The scored rows first, without a branch per token (few tokens hit in
    // the first pass), then each hit's row folded into the maxima.
    int64_t nhits = 0;
    for (int64_t j = 0; j < n; j++) {
        const int32_t row = rows[codes[j]];
        hits[nhits] = row;
        nhits += row >= 0;
    }
    std::fill(best, best + nq, kMissing);
    for (int64_t h = 0; h < nhits; h++) {
        const float* scores = table + static_cast<int64_t>(hits[h]) * nq;
        for (int k = 0; k < nq; k++) best[k] = std::max(best[k], scores[k]);
    }
    float total = 0.0f;
    for (int k = 0; k < nq; k++) total += best[k];
    return total;
}

template <typename Code>
void score_all(const std::vector<int32_t>& slots, std::vector<float>& out, const Code* codes,
               const int64_t* doclens, const int64_t* offsets, const int32_t* rows, const float* table,
               int nq) {
    const int64_t n = static_cast<int64_t>(slots.size());
    out.resize(n);
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
        std::vector<float> best(nq);
        std::vector<int32_t> hits;
        for (int64_t i = begin; i < end; i++) {
            const int32_t slot = slots[i];
            if (i + kPrefetchAhead < end) {  // the next passages' codes start at random places
                const int32_t ahead = slots[i + kPrefetchAhead];
                const char* first = reinterpret_cast<const char*>(codes + offsets[ahead]);
                const char* last = reinterpret_cast<const char*>(codes + offsets[ahead] + doclens[ahead]);
                for (const char* line = first; line < last; line += 64) __builtin_prefetch(line);
            }
            if (static_cast<int64_t>(hits.size()) < doclens[slot]) hits.resize(doclens[slot]);
            out[i] = passage_score(codes + offsets[slot], doclens[slot], rows, table, nq, best.data(), hits.data());
        }
    });
}

// score_all over int32 or int16 codes (codecs of at most 32,768 centroids
// store int16).
void score_codes(const std::vector<int32_t>& slots, std::vector<float>& out, const torch::Tensor& codes,
                 const torch::Tensor& doclens, const torch::Tensor& offsets, const int32_t* rows,
                 const float* table, int nq) {
    if (codes.dtype() == torch::kInt16) {
        score_all(slots, out, codes.data_ptr<int16_t>(), doclens.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                  rows, table, nq);
    } else {
        score_all(slots, out, codes.data_ptr<int32_t>(), doclens.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                  rows, table, nq);
    }
}

// The best `keep` of `slots` by `scores` (ties: the smaller slot first).
void keep_best(std::vector<int32_t>& slots, std::vector<float>& scores, int64_t keep) {
    const int64_t n = static_cast<int64_t>(slots.size());
    if (keep >= n) return;
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; i++) order[i] = i;
    auto better = [&](int64_t a, int64_t b) {
        return scores[a] > scores[b] || (scores[a] == scores[b] && slots[a] < slots[b]);
    };
    std::nth_element(order.begin(), order.begin() + keep, order.end(), better);
    std::vector<int32_t> kept_slots(keep);
    std::vector<float> kept_scores(keep);
    for (int64_t i = 0; i < keep; i++) {
        kept_slots[i] = slots[order[i]];
        kept_scores[i] = scores[order[i]];
    }
    slots.swap(kept_slots);
    scores.swap(kept_scores);
}

}  // namespace

// slots: int32 candidate slots; centroid_scores: float32 (centroids x query
// tokens); codes: int32 or int16 per token; doclens/offsets: int64 per slot; pruned:
// bool per centroid, the centroids the first pass scores. Returns the best
// `nfinal` of the first pass's best `ndocs`, ranked by the unpruned score,
// as (int32 slots, float32 scores), in no particular order.
std::vector<torch::Tensor> shortlist(const torch::Tensor& slots_t, const torch::Tensor& centroid_scores,
                                     const torch::Tensor& codes, const torch::Tensor& doclens,
                                     const torch::Tensor& offsets, const torch::Tensor& pruned,
                                     int64_t ndocs, int64_t nfinal) {
    TORCH_CHECK(slots_t.dtype() == torch::kInt32 && slots_t.is_contiguous(), "slots: contiguous int32");
    TORCH_CHECK(centroid_scores.dtype() == torch::kFloat32 && centroid_scores.dim() == 2,
                "centroid_scores: float32 (centroids x query tokens)");
    TORCH_CHECK((codes.dtype() == torch::kInt32 || codes.dtype() == torch::kInt16) && codes.is_contiguous(),
                "codes: contiguous int32 or int16");
    TORCH_CHECK(doclens.dtype() == torch::kInt64 && offsets.dtype() == torch::kInt64, "doclens, offsets: int64");
    TORCH_CHECK(pruned.dtype() == torch::kBool && pruned.numel() == centroid_scores.size(0), "pruned: bool per centroid");

    const torch::Tensor scores_c = centroid_scores.contiguous();
    const torch::Tensor pruned_c = pruned.contiguous();
    const torch::Tensor doclens_c = doclens.contiguous();
    const torch::Tensor offsets_c = offsets.contiguous();
    const int64_t ncentroids = scores_c.size(0);
    const int nq = static_cast<int>(scores_c.size(1));
    const float* all_rows = scores_c.data_ptr<float>();
    const bool* is_pruned = pruned_c.data_ptr<bool>();

    std::vector<int32_t> slots(slots_t.data_ptr<int32_t>(), slots_t.data_ptr<int32_t>() + slots_t.numel());
    std::vector<float> scores;
    {
        // Pass 1: only the pruned centroids' rows, packed (a few hundred
        // rows stay in cache where the whole table would not).
        std::vector<int32_t> rows(ncentroids, -1);
        std::vector<float> table;
        int32_t next = 0;
        for (int64_t c = 0; c < ncentroids; c++) {
            if (!is_pruned[c]) continue;
            rows[c] = next++;
            table.insert(table.end(), all_rows + c * nq, all_rows + (c + 1) * nq);
        }
        score_codes(slots, scores, codes, doclens_c, offsets_c, rows.data(), table.data(), nq);
        keep_best(slots, scores, ndocs);
    }
    {
        // Pass 2: every centroid.
        std::vector<int32_t> rows(ncentroids);
        for (int64_t c = 0; c < ncentroids; c++) rows[c] = static_cast<int32_t>(c);
        score_codes(slots, scores, codes, doclens_c, offsets_c, rows.data(), all_rows, nq);
        keep_best(slots, scores, nfinal);
    }
    const int64_t n = static_cast<int64_t>(slots.size());
    torch::Tensor out_slots = torch::empty({n}, torch::kInt32);
    torch::Tensor out_scores = torch::empty({n}, torch::kFloat32);
    std::copy(slots.begin(), slots.end(), out_slots.data_ptr<int32_t>());
    std::copy(scores.begin(), scores.end(), out_scores.data_ptr<float>());
    return {out_slots, out_scores};
}

namespace {

template <typename Code>
void decompress_all(const int32_t* slots, int64_t nslots, const int64_t* starts, const Code* codes,
                    const uint8_t* residuals, const int64_t* doclens, const int64_t* offsets,
                    const float* centroids, const float* byte_values, int dim, int packed_dim, int per_byte,
                    float* out) {
    at::parallel_for(0, nslots, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            const int64_t first = offsets[slots[i]];
            for (int64_t j = 0; j < doclens[slots[i]]; j++) {
                const int64_t token = first + j;
                const float* centroid = centroids + static_cast<int64_t>(codes[token]) * dim;
                const uint8_t* packed = residuals + token * packed_dim;
                float* vector = out + (starts[i] + j) * dim;
                for (int k = 0; k < packed_dim; k++) {
                    const float* values = byte_values + static_cast<int64_t>(packed[k]) * per_byte;
                    for (int l = 0; l < per_byte; l++) vector[k * per_byte + l] = centroid[k * per_byte + l] + values[l];
                }
                // Independent partial sums: one running sum would serialise
                // the additions (no reassociation without -ffast-math).
                float partial[kLanes] = {};
                int d = 0;
                for (; d + kLanes <= dim; d += kLanes)
                    for (int l = 0; l < kLanes; l++) partial[l] += vector[d + l] * vector[d + l];
                for (; d < dim; d++) partial[0] += vector[d] * vector[d];
                float norm = 0.0f;
                for (int l = 0; l < kLanes; l++) norm += partial[l];
                const float scale = 1.0f / std::max(std::sqrt(norm), 1e-12f);  // torch's normalize eps
                for (int e = 0; e < dim; e++) vector[e] *= scale;
            }
        }
    });
}

}  // namespace

// The unit token vectors of `slots`, packed in order (sum of their doclens x
// dim, float32): centroid + residual, normalised. byte_values: float32 (256
// x values per byte), the residual values each packed byte stands for.
torch::Tensor decompress(const torch::Tensor& slots, const torch::Tensor& doclens, const torch::Tensor& offsets,
                         const torch::Tensor& codes, const torch::Tensor& residuals, const torch::Tensor& centroids,
                         const torch::Tensor& byte_values) {
    TORCH_CHECK(slots.dtype() == torch::kInt32 && slots.is_contiguous(), "slots: contiguous int32");
    TORCH_CHECK(doclens.dtype() == torch::kInt64 && offsets.dtype() == torch::kInt64, "doclens, offsets: int64");
    TORCH_CHECK((codes.dtype() == torch::kInt32 || codes.dtype() == torch::kInt16) && codes.is_contiguous(),
                "codes: contiguous int32 or int16");
    TORCH_CHECK(residuals.dtype() == torch::kUInt8 && residuals.dim() == 2 && residuals.is_contiguous(),
                "residuals: contiguous uint8 (tokens x packed dim)");
    TORCH_CHECK(centroids.dtype() == torch::kFloat32 && centroids.is_contiguous(), "centroids: contiguous float32");
    TORCH_CHECK(byte_values.dtype() == torch::kFloat32 && byte_values.size(0) == 256 && byte_values.is_contiguous(),
                "byte_values: contiguous float32 (256 x values per byte)");
    const int dim = static_cast<int>(centroids.size(1));
    const int per_byte = static_cast<int>(byte_values.size(1));
    const int packed_dim = static_cast<int>(residuals.size(1));
    TORCH_CHECK(packed_dim * per_byte == dim, "residuals and byte_values do not make up dim values");
    const torch::Tensor doclens_c = doclens.contiguous();
    const torch::Tensor offsets_c = offsets.contiguous();
    const int64_t nslots = slots.numel();
    const int32_t* slot_a = slots.data_ptr<int32_t>();
    const int64_t* lens = doclens_c.data_ptr<int64_t>();
    std::vector<int64_t> starts(nslots + 1, 0);
    for (int64_t i = 0; i < nslots; i++) starts[i + 1] = starts[i] + lens[slot_a[i]];
    torch::Tensor out = torch::empty({starts[nslots], dim}, torch::kFloat32);
    if (codes.dtype() == torch::kInt16) {
        decompress_all(slot_a, nslots, starts.data(), codes.data_ptr<int16_t>(), residuals.data_ptr<uint8_t>(), lens,
                       offsets_c.data_ptr<int64_t>(), centroids.data_ptr<float>(), byte_values.data_ptr<float>(), dim,
                       packed_dim, per_byte, out.data_ptr<float>());
    } else {
        decompress_all(slot_a, nslots, starts.data(), codes.data_ptr<int32_t>(), residuals.data_ptr<uint8_t>(), lens,
                       offsets_c.data_ptr<int64_t>(), centroids.data_ptr<float>(), byte_values.data_ptr<float>(), dim,
                       packed_dim, per_byte, out.data_ptr<float>());
    }
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("shortlist", &shortlist, "PLAID's centroid-only shortlist (two passes), with scores",
          py::call_guard<py::gil_scoped_release>());
    m.def("decompress", &decompress, "Unit token vectors of passages from codes and residuals",
          py::call_guard<py::gil_scoped_release>());
}
