// Compile-time limits and launch shapes of the deep_ep core. Every switch is listed here with the
// fallback it selects; the build (build_core.py) sets them with -D.
//
//   DEEP_EP_DISABLE_SM90_FEATURES  build for sm_80: no TMA, no clusters, no elect.sync. The kernels
//                                  of this version use none of them, so the switch only changes the
//                                  target architecture and `deep_ep_core_is_sm90()`.
//   DEEP_EP_HAS_NVSHMEM            never set for libdeep_ep_core.so, which stays free of NVSHMEM; the
//                                  NVSHMEM code (bootstrap, LL sends over NVSHMEM) is the separate
//                                  libdeep_ep_nvshmem.so built from csrc/nvshmem/ (build_core.py).
#pragma once

#include <cstdint>

namespace deep_ep {

// Ranks of one NVLink domain the intranode kernels handle (peer pointers are passed by value).
constexpr int kMaxNvlRanks = 8;
// Channels (`Config.num_sms // 2`); bounds the notify kernel's shared-memory tables.
constexpr int kMaxChannels = 128;
// Top-k columns the kernels carry (deep_ep.Buffer allows up to 32).
constexpr int kMaxTopK = 32;
// Local experts whose received counts go to the host-mapped counters.
constexpr int kMaxLocalExperts = 4096;

// Threads of the dispatch / combine blocks: 24 warps, so that 8 ranks get 3 warps each.
constexpr int kNumIntranodeThreads = 768;
constexpr int kNumIntranodeWarps = kNumIntranodeThreads / 32;
// Threads of the notify kernel (one block) and of the layout kernel blocks.
constexpr int kNumNotifyThreads = 512;
constexpr int kNumLayoutThreads = 256;

// Host-mapped counter words (pinned, mapped memory the CPU polls during a non-cached dispatch).
//   [kCounterRecvTokens]       tokens this rank receives, -1 until the notify kernel wrote it
//   [kCounterWorstOverflow]    0, or the largest per-rank receive count when it exceeded
//                              num_worst_tokens (sticky until the host reads and clears it)
//   [kCounterExperts + j]      tokens local expert j receives (aligned), -1 until written
//   [kCounterRdmaRecvTokens]   internode: tokens this rank forwards (M), written before the token count
constexpr int kCounterRecvTokens = 0;
constexpr int kCounterWorstOverflow = 1;
constexpr int kCounterExperts = 2;
constexpr int kCounterRdmaRecvTokens = kCounterExperts + kMaxLocalExperts;
constexpr int kNumHostCounters = kCounterRdmaRecvTokens + 1;

// Spin-wait checks read %globaltimer only every this many polls (the read is not free).
constexpr int kSpinsPerTimerCheck = 1024;

// Alignment of every buffer region, in bytes (a cache line pair; also keeps int4 accesses aligned).
constexpr int64_t kRegionAlignBytes = 128;

// Bytes of barrier signals at the end of every rank's NVLink allocation: one int per peer.
constexpr int64_t kBarrierSignalBytes = 128;
static_assert(kMaxNvlRanks * 4 <= kBarrierSignalBytes, "barrier signals must fit their region");

}  // namespace deep_ep
