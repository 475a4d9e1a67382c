// One in, one out at decode on the CPU: each (sequence, layer) scores its heads' slots from this
// step's attention, then every head over its budget gives its lowest-ranked unprotected slot to
// the newest token. The contract is in kernels/decode_evict.py; its reference is the policies'
// `act` through the policy runner's general path.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

enum Rule : int32_t { kLayerMean = 0, kGroupMean = 1, kAccumulated = 2 };

struct Head {
    int32_t* pages;
    int32_t* length;
    const float* probs;  // this step's probability per slot, summed over the head's query group
};

}  // namespace

extern "C" void kv_decode_evict(int members, const int64_t* rows, const int64_t* score_rows, const int32_t* rules,
                                const int64_t* budget, const int64_t* tail_start, const int64_t* tail_end,
                                const int64_t* recent_after, const float* const* scores, int64_t score_stride_b,
                                int64_t score_stride_h, int32_t* tables, int64_t table_stride_r,
                                int64_t table_stride_l, int64_t table_stride_h, int32_t* lengths,
                                int64_t length_stride_r, int64_t length_stride_l, int layers, int kv_heads,
                                int block_size, float group_size, char* k_rows, char* v_rows, int64_t row_bytes,
                                int32_t* slot_positions, float* slot_scores, float* slot_aux, int32_t* freed,
                                uint8_t* evicted, int threads) {
    const float heads_f = static_cast<float>(kv_heads);
#pragma omp parallel num_threads(threads) if (members * layers >= 8)
    {
        std::vector<Head> heads(kv_heads);  // one per thread, refilled for each (sequence, layer)
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < static_cast<int64_t>(members) * layers; ++task) {
            const int64_t m = task / layers, layer = task % layers;
            const int64_t row = rows[m];
            for (int h = 0; h < kv_heads; ++h)
                heads[h] = {tables + row * table_stride_r + layer * table_stride_l + h * table_stride_h,
                            lengths + row * length_stride_r + layer * length_stride_l + h,
                            scores[layer] + score_rows[m] * score_stride_b + h * score_stride_h};
            auto slot = [&](const Head& head, int64_t s) {
                return static_cast<int64_t>(head.pages[s / block_size]) * block_size + s % block_size;
            };

            // the scores, written to the slot metadata as the policy's act writes them
            const int32_t rule = rules[m];
            if (rule == kAccumulated) {
                for (const Head& head : heads)
                    for (int64_t s = 0; s < *head.length; ++s) {
                        const int64_t i = slot(head, s);
                        slot_scores[i] += head.probs[s];
                        slot_aux[i] += 1.0f;  // one more query saw the slot
                    }
            } else if (rule == kGroupMean) {
                for (const Head& head : heads)
                    for (int64_t s = 0; s < *head.length; ++s) slot_scores[slot(head, s)] = head.probs[s] / group_size;
            } else {
                // the layer's mean by token position, summed head by head in order (as torch's scatter_add
                // does), so that the result is the general path's to the bit
                bool aligned = true;
                for (int h = 1; h < kv_heads && aligned; ++h) {
                    aligned = *heads[h].length == *heads[0].length;
                    for (int64_t s = 0; s < *heads[0].length && aligned; ++s)
                        aligned = slot_positions[slot(heads[h], s)] == slot_positions[slot(heads[0], s)];
                }
                if (aligned) {
                    for (int64_t s = 0; s < *heads[0].length; ++s) {
                        float total = 0.0f;
                        for (const Head& head : heads) total += head.probs[s] / group_size;
                        for (const Head& head : heads) slot_scores[slot(head, s)] = total / heads_f;
                    }
                } else {
                    int32_t newest = 0;
                    for (const Head& head : heads)
                        for (int64_t s = 0; s < *head.length; ++s)
                            newest = std::max(newest, slot_positions[slot(head, s)]);
                    std::vector<float> total(static_cast<size_t>(newest) + 1, 0.0f);
                    for (const Head& head : heads)
                        for (int64_t s = 0; s < *head.length; ++s)
                            total[slot_positions[slot(head, s)]] += head.probs[s] / group_size;
                    for (const Head& head : heads)
                        for (int64_t s = 0; s < *head.length; ++s) {
                            const int64_t i = slot(head, s);
                            slot_scores[i] = total[slot_positions[i]] / heads_f;
                        }
                }
            }

            // one out per head over budget: the first lowest-scoring slot outside the protected spans
            for (int h = 0; h < kv_heads; ++h) {
                const Head& head = heads[h];
                const int64_t length = *head.length;
                const int64_t out = (m * layers + layer) * kv_heads + h;
                freed[out] = 0;
                evicted[out] = 0;
                if (length <= budget[m]) continue;
                int64_t victim = -1;
                float lowest = 0.0f;
                for (int64_t s = 0; s < length; ++s) {
                    const int64_t i = slot(head, s);
                    const int64_t position = slot_positions[i];
                    if ((position >= tail_start[m] && position < tail_end[m]) || position > recent_after[m]) continue;
                    if (victim < 0 || slot_scores[i] < lowest) {
                        victim = s;
                        lowest = slot_scores[i];
                    }
                }
                if (victim < 0) continue;
                const int64_t last = length - 1;
                if (victim != last) {  // the last slot fills the hole (order does not matter to attention)
                    const int64_t to = slot(head, victim), from = slot(head, last);
                    std::memcpy(k_rows + to * row_bytes, k_rows + from * row_bytes, row_bytes);
                    std::memcpy(v_rows + to * row_bytes, v_rows + from * row_bytes, row_bytes);
                    slot_positions[to] = slot_positions[from];
                    slot_scores[to] = slot_scores[from];
                    slot_aux[to] = slot_aux[from];
                }
                *head.length = static_cast<int32_t>(last);
                evicted[out] = 1;
                if (last % block_size == 0) {  // its last page emptied
                    freed[out] = head.pages[last / block_size];
                    head.pages[last / block_size] = 0;
                }
            }
        }
    }
}
