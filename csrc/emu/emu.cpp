// The emulator's scheduler: blocks on OS threads, CUDA threads as fibers, barriers, warp
// collectives, deadlock reports, the watchdog. See emu.h for the model, csrc/emu/README.md for use.
//
// Built WITHOUT -fsanitize=thread in the TSan flavour (its fiber switches would be misread as
// races); it tells the sanitizers about every fiber switch and every barrier instead.
#include "emu.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>
#include <sys/mman.h>
#include <time.h>

#include <cstdarg>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>

#if defined(DEEP_EP_EMU_ASAN)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif
#if defined(DEEP_EP_EMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif

// Context switch: saves the callee-saved registers, MXCSR and the x87 control word on the current
// stack, stores the stack pointer in *save and continues on `to` (a stack saved the same way).
extern "C" void deep_ep_emu_switch(void** save, void* to);
asm(R"(
    .text
    .globl deep_ep_emu_switch
    .type deep_ep_emu_switch,@function
deep_ep_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size deep_ep_emu_switch,.-deep_ep_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");

namespace deep_ep {
namespace emu {

namespace {

// ------------------------------------------------------------------------------------- settings
int env_int(const char* name, int fallback) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == '\0') return fallback;
    return std::atoi(v);
}

struct Settings {
    uint64_t seed = 0;           // DEEP_EP_EMU_SEED: 0 = round robin, else random scheduling
    int max_resident = 0;        // DEEP_EP_EMU_MAX_RESIDENT_BLOCKS: 0 = every block resident
    int watchdog_s = 0;          // DEEP_EP_EMU_WATCHDOG_S: 0 = off
    size_t stack_bytes = 0;      // DEEP_EP_EMU_STACK_KB
    Settings() {
        const char* s = std::getenv("DEEP_EP_EMU_SEED");
        if (s != nullptr && *s != '\0') seed = std::strtoull(s, nullptr, 10);
        max_resident = env_int("DEEP_EP_EMU_MAX_RESIDENT_BLOCKS", 0);
        watchdog_s = env_int("DEEP_EP_EMU_WATCHDOG_S", 300);
#if defined(DEEP_EP_EMU_ASAN) || defined(DEEP_EP_EMU_TSAN)
        const int kb = env_int("DEEP_EP_EMU_STACK_KB", 256);
#else
        const int kb = env_int("DEEP_EP_EMU_STACK_KB", 64);
#endif
        stack_bytes = static_cast<size_t>(std::max(kb, 16)) * 1024;
    }
};

const Settings& settings() {
    static const Settings s;
    return s;
}

// --------------------------------------------------------------------------------- error state
std::mutex g_error_mutex;
std::string g_sticky_message;            // non-empty: the context is dead (a kernel failed)
std::atomic<bool> g_sticky{false};
std::atomic<uint64_t> g_progress{0};     // bumped at every barrier/collective completion and exit

void set_sticky(const std::string& message) {
    std::lock_guard<std::mutex> lock(g_error_mutex);
    if (g_sticky_message.empty()) g_sticky_message = message;
    g_sticky.store(true);
}

// ---------------------------------------------------------------------------------- stack pool
std::mutex g_pool_mutex;
std::multimap<size_t, void*> g_pool;

void* stacks_get(size_t bytes) {
    {
        std::lock_guard<std::mutex> lock(g_pool_mutex);
        auto it = g_pool.find(bytes);
        if (it != g_pool.end()) {
            void* p = it->second;
            g_pool.erase(it);
#if defined(DEEP_EP_EMU_ASAN)
            // Abandoned fibers leave their frames' redzones poisoned: a new block starts clean.
            __asan_unpoison_memory_region(p, bytes);
#endif
            return p;
        }
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("deep_ep emulator: cannot map fiber stacks");
    return p;
}

void stacks_put(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (g_pool.size() >= 64) {
        munmap(p, bytes);
        return;
    }
    g_pool.emplace(bytes, p);
}

// ------------------------------------------------------------------------------------ the model
enum class State : int { kReady, kRunning, kBarrier, kWarp, kDone, kFailed };

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;
    uint3 idx{};
    int tid = 0;
    State state = State::kReady;
    const char* file = nullptr;  // site of the current wait
    int line = 0;
    int bar_id = -1, bar_count = 0;
    const void* spin_addr = nullptr;  // last spin point
    const char* spin_file = nullptr;
    int spin_line = 0;
    uint64_t value = 0, result = 0;
    int coll_arg = 0, coll_width = 32;
    std::string last_print;
    void* asan_fake = nullptr;
    void* tsan_fiber = nullptr;
};

struct Barrier {
    int expected = 0;  // < 0: every live thread (__syncthreads)
    int arrived = 0;
    const char* file = nullptr;
    int line = 0;
    int first_tid = -1;
    std::vector<int> waiting;
};

struct Warp {
    unsigned arrived = 0;
    CollKind kind = CollKind::kSyncWarp;
    unsigned mask = 0;
    const char* file = nullptr;
    int line = 0;
    int first_lane = -1;
};

const char* kind_name(CollKind k) {
    switch (k) {
        case CollKind::kSyncWarp: return "__syncwarp";
        case CollKind::kBallot: return "__ballot_sync";
        case CollKind::kAny: return "__any_sync";
        case CollKind::kAll: return "__all_sync";
        case CollKind::kShfl: return "__shfl_sync";
        case CollKind::kShflXor: return "__shfl_xor_sync";
        case CollKind::kShflDown: return "__shfl_down_sync";
        case CollKind::kShflUp: return "__shfl_up_sync";
    }
    return "?";
}

struct Launch {
    const char* kernel;
    const char* file;
    int line;
    dim3 grid, block;
    size_t smem;
    std::function<void()> body;
    std::atomic<bool> abort{false};
    std::mutex mutex;
    std::string error;  // first failure of any block

    void fail(const std::string& message) {
        {
            std::lock_guard<std::mutex> lock(mutex);
            if (error.empty()) error = message;
        }
        abort.store(true);
    }
};

struct Block;
std::mutex g_blocks_mutex;
std::set<Block*> g_blocks;  // running blocks, for the watchdog

struct Block {
    Launch* launch = nullptr;
    uint3 idx{};
    int num_threads = 0;
    int live = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Barrier bars[16];
    std::vector<int> runq;
    size_t runq_head = 0;
    void* sched_sp = nullptr;
    Fiber* cur = nullptr;
    std::vector<int4> smem;
    std::mt19937_64 rng;
    bool random = false;
    char* stacks = nullptr;
    size_t stack_bytes = 0;
    uint64_t unproductive = 0;
    void* asan_sched_fake = nullptr;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
    void* tsan_sched = nullptr;

    std::string where() const {
        std::ostringstream os;
        os << "kernel " << launch->kernel << " (launched at " << launch->file << ":" << launch->line << "), block ("
           << idx.x << "," << idx.y << "," << idx.z << ")";
        return os.str();
    }
    std::string who(const Fiber& f) const {
        std::ostringstream os;
        os << "thread " << f.tid << " (warp " << f.tid / 32 << ", lane " << f.tid % 32 << ") of " << where();
        return os.str();
    }
};

thread_local Block* t_block = nullptr;

Block& this_block() {
    Block* b = t_block;
    if (b == nullptr || b->cur == nullptr) {
        std::fprintf(stderr, "deep_ep emulator: a device function was called outside a kernel\n");
        std::abort();
    }
    return *b;
}

std::string site(const char* file, int line) {
    if (file == nullptr) return "?";
    const char* base = std::strstr(file, "csrc/");
    return std::string(base != nullptr ? base : file) + ":" + std::to_string(line);
}

void make_ready(Block& b, int tid) {
    b.fibers[tid].state = State::kReady;
    b.runq.push_back(tid);
}

// ------------------------------------------------------------------------------------ switching
void switch_to_fiber(Block& b, Fiber& f) {
    b.cur = &f;
    f.state = State::kRunning;
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_switch_to_fiber(f.tsan_fiber, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
#if defined(DEEP_EP_EMU_ASAN)
    __sanitizer_start_switch_fiber(&b.asan_sched_fake, f.stack, b.stack_bytes);
#endif
    deep_ep_emu_switch(&b.sched_sp, f.sp);
#if defined(DEEP_EP_EMU_ASAN)
    __sanitizer_finish_switch_fiber(b.asan_sched_fake, nullptr, nullptr);
#endif
    b.cur = nullptr;
}

// On a fiber: back to the block's scheduler (never returns for a finished or failed fiber).
void switch_to_scheduler(Block& b, Fiber& f) {
    const bool dying = f.state == State::kDone || f.state == State::kFailed;
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_switch_to_fiber(b.tsan_sched, 1);
#endif
#if defined(DEEP_EP_EMU_ASAN)
    __sanitizer_start_switch_fiber(dying ? nullptr : &f.asan_fake, b.sched_stack_bottom, b.sched_stack_size);
#endif
    deep_ep_emu_switch(&f.sp, b.sched_sp);
    (void)dying;
#if defined(DEEP_EP_EMU_ASAN)
    __sanitizer_finish_switch_fiber(f.asan_fake, nullptr, nullptr);
#endif
}

[[noreturn]] void fiber_fail(Block& b, Fiber& f, const std::string& message) {
    b.launch->fail(message);
    f.state = State::kFailed;
    switch_to_scheduler(b, f);
    std::abort();  // a failed fiber is never resumed
}

void fiber_entry() {
    Block& b = *t_block;
    Fiber& f = *b.cur;
#if defined(DEEP_EP_EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_acquire(&b);  // the launch (host writes before it) happens-before every thread of the grid
#endif
    try {
        b.launch->body();
    } catch (const std::exception& e) {
        fiber_fail(b, f, std::string("exception in ") + b.who(f) + ": " + e.what());
    }
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_release(&b);  // ... and every thread of the grid happens-before the launch's return
#endif
    f.state = State::kDone;
    switch_to_scheduler(b, f);
    std::abort();
}

void prepare_fiber(Block& b, Fiber& f) {
    // Stack, from the top: [fake return address 0][entry][rbp rbx r12 r13 r14 r15][mxcsr|fpcw]
    char* top = f.stack + b.stack_bytes;
    uintptr_t r = (reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15)) - 8;  // r % 16 == 8, as after a call
    uint64_t* slot = reinterpret_cast<uint64_t*>(r);
    slot[0] = 0;
    slot[-1] = reinterpret_cast<uint64_t>(&fiber_entry);
    for (int i = 2; i <= 7; ++i) slot[-i] = 0;
    uint32_t mxcsr;
    uint16_t fpcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    uint64_t control = mxcsr | (static_cast<uint64_t>(fpcw) << 32);
    slot[-8] = control;
    f.sp = &slot[-8];
}

// -------------------------------------------------------------------------------------- reports
std::string ranges(const std::vector<int>& ids) {
    std::ostringstream os;
    for (size_t i = 0; i < ids.size();) {
        size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        if (i != 0) os << ",";
        os << ids[i];
        if (j > i) os << "-" << ids[j];
        i = j + 1;
    }
    return os.str();
}

std::string describe_wait(const Block& b, const Fiber& f) {
    std::ostringstream os;
    switch (f.state) {
        case State::kBarrier: {
            const Barrier& br = b.bars[f.bar_id];
            if (f.bar_count < 0)
                os << "__syncthreads at " << site(f.file, f.line) << " (waits for all " << b.live << " live threads, "
                   << br.arrived << " arrived)";
            else
                os << "bar.sync " << f.bar_id << ", " << f.bar_count << " at " << site(f.file, f.line) << " ("
                   << br.arrived << " of " << f.bar_count << " threads arrived)";
            break;
        }
        case State::kWarp: {
            const Warp& w = b.warps[f.tid / 32];
            char buf[64];
            std::snprintf(buf, sizeof(buf), "(mask 0x%08x, lanes arrived 0x%08x)", w.mask, w.arrived);
            os << kind_name(w.kind) << " at " << site(f.file, f.line) << " " << buf;
            break;
        }
        case State::kReady:
        case State::kRunning:
            os << "running";
            if (f.spin_file != nullptr) {
                char buf[32];
                std::snprintf(buf, sizeof(buf), "%p", f.spin_addr);
                os << ", last spin point " << site(f.spin_file, f.spin_line) << " on address " << buf;
            }
            break;
        case State::kDone: os << "exited"; break;
        case State::kFailed: os << "failed"; break;
    }
    return os.str();
}

std::string report_threads(const Block& b, bool include_exited) {
    std::map<std::string, std::vector<int>> groups;
    for (const Fiber& f : b.fibers) {
        if (!include_exited && (f.state == State::kDone || f.state == State::kFailed)) continue;
        groups[describe_wait(b, f)].push_back(f.tid);
    }
    std::ostringstream os;
    for (auto& [what, ids] : groups) os << "\n  threads " << ranges(ids) << ": " << what;
    return os.str();
}

// ---------------------------------------------------------------------------------------- block
void run_block(Launch& launch, uint3 idx, uint64_t seed) {
    Block b;
    b.launch = &launch;
    b.idx = idx;
    const dim3 bd = launch.block;
    b.num_threads = static_cast<int>(bd.x * bd.y * bd.z);
    b.live = b.num_threads;
    b.fibers.resize(b.num_threads);
    b.warps.resize((b.num_threads + 31) / 32);
    b.smem.assign((launch.smem + 15) / 16, make_int4(0x5a5a5a5a, 0x5a5a5a5a, 0x5a5a5a5a, 0x5a5a5a5a));
    b.random = seed != 0;
    b.rng.seed(seed * 0x9e3779b97f4a7c15ull + idx.x * 7919 + idx.y * 104729 + idx.z);
    b.stack_bytes = settings().stack_bytes;
    const size_t total = b.stack_bytes * b.num_threads;
    b.stacks = static_cast<char*>(stacks_get(total));
    t_block = &b;
#if !defined(DEEP_EP_EMU_ASAN) && !defined(DEEP_EP_EMU_TSAN)
    // The crash report runs on its own stack: a fiber's may be the one that overflowed.
    std::vector<char> alt_stack(64 * 1024);
    stack_t ss{}, old_ss{};
    ss.ss_sp = alt_stack.data();
    ss.ss_size = alt_stack.size();
    sigaltstack(&ss, &old_ss);
#endif
#if defined(DEEP_EP_EMU_TSAN)
    b.tsan_sched = __tsan_get_current_fiber();
#endif
    for (int t = 0; t < b.num_threads; ++t) {
        Fiber& f = b.fibers[t];
        f.tid = t;
        f.idx = make_uint3(t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y));
        f.stack = b.stacks + b.stack_bytes * t;
        prepare_fiber(b, f);
#if defined(DEEP_EP_EMU_TSAN)
        f.tsan_fiber = __tsan_create_fiber(0);
#endif
        b.runq.push_back(t);
    }
    if (b.random) std::shuffle(b.runq.begin(), b.runq.end(), b.rng);
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_release(&b);
#endif
    {
        std::lock_guard<std::mutex> lock(g_blocks_mutex);
        g_blocks.insert(&b);
    }

    uint64_t rounds_idle = 0;
    while (b.live > 0) {
        if (launch.abort.load(std::memory_order_relaxed) || g_sticky.load(std::memory_order_relaxed)) break;
        if (b.runq_head == b.runq.size()) {
            // Nothing can run, yet threads are alive: each waits for a barrier or a collective that
            // only this block's threads could complete.
            launch.fail("deep_ep emulator: deadlock in " + b.where() +
                        ": every live thread waits at a barrier or warp collective that can never complete:" +
                        report_threads(b, false));
            break;
        }
        if (b.runq_head > 4096 && b.runq_head * 2 > b.runq.size()) {
            b.runq.erase(b.runq.begin(), b.runq.begin() + static_cast<std::ptrdiff_t>(b.runq_head));
            b.runq_head = 0;
        }
        size_t pick = b.runq_head;
        if (b.random) {
            const size_t n = b.runq.size() - b.runq_head;
            pick = b.runq_head + static_cast<size_t>(b.rng() % n);
            std::swap(b.runq[pick], b.runq[b.runq_head]);
            pick = b.runq_head;
        }
        const int tid = b.runq[pick];
        ++b.runq_head;
        Fiber& f = b.fibers[tid];
        switch_to_fiber(b, f);
        switch (f.state) {
            case State::kRunning:  // a spin point: runnable again
                f.state = State::kReady;
                b.runq.push_back(tid);
                if (++b.unproductive > b.runq.size() - b.runq_head + 1) {
                    // A whole round of spinning: give other blocks (other ranks) the CPU.
                    b.unproductive = 0;
                    if (++rounds_idle > 64) {
                        const timespec ts{0, 50000};
                        nanosleep(&ts, nullptr);
                    } else {
                        sched_yield();
                    }
                }
                break;
            case State::kDone: {
                --b.live;
                b.unproductive = 0;
                rounds_idle = 0;
                g_progress.fetch_add(1, std::memory_order_relaxed);
                Barrier& br = b.bars[0];
                if (br.expected < 0 && br.arrived > 0 && br.arrived == b.live) {  // __syncthreads counts live threads
                    for (int w : br.waiting) make_ready(b, w);
                    br = Barrier();
                }
                break;
            }
            case State::kFailed: --b.live; break;
            default:  // waiting at a barrier or collective
                b.unproductive = 0;
                rounds_idle = 0;
                break;
        }
        if (f.state == State::kFailed) break;
    }
    {
        std::lock_guard<std::mutex> lock(g_blocks_mutex);
        g_blocks.erase(&b);
    }
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_acquire(&b);
    for (Fiber& f : b.fibers) __tsan_destroy_fiber(f.tsan_fiber);
#endif
    t_block = nullptr;
#if !defined(DEEP_EP_EMU_ASAN) && !defined(DEEP_EP_EMU_TSAN)
    sigaltstack(&old_ss, nullptr);
#endif
    stacks_put(b.stacks, total);
}

// ------------------------------------------------------------------------------- crash reports
// A SIGSEGV/SIGBUS inside a kernel names the kernel, block and thread before the process dies (the
// sanitizer flavours leave it to the sanitizer, whose report has the source line).
struct sigaction g_previous_segv, g_previous_bus;

void crash_handler(int sig, siginfo_t* info, void*) {
    Block* b = t_block;
    if (b != nullptr && b->cur != nullptr) {
        const Fiber& f = *b->cur;
        char buf[768];
        const int n = std::snprintf(buf, sizeof(buf),
                                    "deep_ep emulator: %s at address %p in kernel %s (launched at %s:%d), block (%u,%u,%u), "
                                    "thread %d (warp %d, lane %d)\n",
                                    sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", info->si_addr, b->launch->kernel,
                                    b->launch->file, b->launch->line, b->idx.x, b->idx.y, b->idx.z, f.tid, f.tid / 32,
                                    f.tid % 32);
        if (n > 0) {
            ssize_t ignored = write(2, buf, static_cast<size_t>(std::min(n, static_cast<int>(sizeof(buf)) - 1)));
            (void)ignored;
        }
    }
    // The previous disposition handles the re-executed fault (default: the process dies).
    sigaction(sig, sig == SIGSEGV ? &g_previous_segv : &g_previous_bus, nullptr);
}

std::once_flag g_crash_once;

void install_crash_handler() {
#if !defined(DEEP_EP_EMU_ASAN) && !defined(DEEP_EP_EMU_TSAN)
    std::call_once(g_crash_once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = crash_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_previous_segv);
        sigaction(SIGBUS, &sa, &g_previous_bus);
    });
#endif
}

// ------------------------------------------------------------------------------------- watchdog
std::once_flag g_watchdog_once;

void watchdog_loop() {
    const int limit = settings().watchdog_s;
    uint64_t last = g_progress.load();
    auto since = std::chrono::steady_clock::now();
    while (true) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
        const uint64_t now_progress = g_progress.load();
        const auto now = std::chrono::steady_clock::now();
        std::lock_guard<std::mutex> lock(g_blocks_mutex);
        if (now_progress != last || g_blocks.empty()) {
            last = now_progress;
            since = now;
            continue;
        }
        if (now - since < std::chrono::seconds(limit)) continue;
        // No barrier, collective or thread exit anywhere for `limit` seconds: dump every block.
        std::ostringstream os;
        os << "deep_ep emulator watchdog: no progress for " << limit << " s (DEEP_EP_EMU_WATCHDOG_S); running blocks:";
        for (Block* b : g_blocks) os << "\n" << b->where() << ":" << report_threads(*b, false);
        std::fprintf(stderr, "%s\n", os.str().c_str());
        for (Block* b : g_blocks) b->launch->fail(os.str());
        since = now;
    }
}

}  // namespace

// ----------------------------------------------------------------------------------- public API
uint3 thread_idx() { return this_block().cur->idx; }
uint3 block_idx() { return this_block().idx; }
dim3 block_dim() { return this_block().launch->block; }
dim3 grid_dim() { return this_block().launch->grid; }
void* dynamic_smem() { return this_block().smem.data(); }

void bar_sync(int id, int count, const char* file, int line) {
    Block& b = this_block();
    Fiber& f = *b.cur;
    if (id < 0 || id >= 16) fiber_fail(b, f, "deep_ep emulator: bar.sync with id " + std::to_string(id) + " (0..15) at " + site(file, line) + " in " + b.who(f));
    if (count >= 0 && (count == 0 || count % 32 != 0 || count > b.num_threads))
        fiber_fail(b, f, "deep_ep emulator: bar.sync " + std::to_string(id) + " with thread count " + std::to_string(count) +
                             " (a positive multiple of 32, at most the block's " + std::to_string(b.num_threads) +
                             ") at " + site(file, line) + " in " + b.who(f));
    Barrier& br = b.bars[id];
    if (br.arrived == 0) {
        br.expected = count;
        br.file = file;
        br.line = line;
        br.first_tid = f.tid;
    } else if (br.expected != count) {
        auto name = [](int c) { return c < 0 ? std::string("__syncthreads") : std::to_string(c) + " threads"; };
        fiber_fail(b, f, "deep_ep emulator: barrier " + std::to_string(id) + " count mismatch in " + b.where() + ": thread " +
                             std::to_string(br.first_tid) + " arrived at " + site(br.file, br.line) + " expecting " +
                             name(br.expected) + ", thread " + std::to_string(f.tid) + " at " + site(file, line) +
                             " expecting " + name(count));
    }
    ++br.arrived;
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_release(&br);
#endif
    const bool complete = br.expected < 0 ? br.arrived == b.live : br.arrived == br.expected;
    if (complete) {
        for (int w : br.waiting) make_ready(b, w);
        br = Barrier();
        g_progress.fetch_add(1, std::memory_order_relaxed);
    } else {
        br.waiting.push_back(f.tid);
        f.state = State::kBarrier;
        f.bar_id = id;
        f.bar_count = count;
        f.file = file;
        f.line = line;
        switch_to_scheduler(b, f);
    }
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_acquire(&br);
#endif
}

void spin_point(const void* addr, const char* file, int line) {
    Block& b = this_block();
    Fiber& f = *b.cur;
    f.spin_addr = addr;
    f.spin_file = file;
    f.spin_line = line;
    ++b.unproductive;
    switch_to_scheduler(b, f);  // state stays kRunning: runnable again
}

void atomic_point() {
    Block& b = this_block();
    if (!b.random || (b.rng() & 3) != 0) return;
    Fiber& f = *b.cur;
    switch_to_scheduler(b, f);
}

uint64_t globaltimer_ns(const char* file, int line) {
    spin_point(nullptr, file, line);
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

void trap(const char* file, int line) {
    Block& b = this_block();
    Fiber& f = *b.cur;
    std::string message = "__trap() at " + site(file, line) + " in " + b.who(f);
    if (!f.last_print.empty()) message += "; it printed: " + f.last_print;
    fiber_fail(b, f, message);
}

int device_printf(const char* format, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, format);
    const int n = std::vsnprintf(buf, sizeof(buf), format, ap);
    va_end(ap);
    std::fputs(buf, stdout);
    std::fflush(stdout);
    Block* b = t_block;
    if (b != nullptr && b->cur != nullptr) {
        std::string text(buf);
        while (!text.empty() && text.back() == '\n') text.pop_back();
        b->cur->last_print = text;
    }
    return n;
}

uint64_t warp_collective(CollKind kind, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    Block& b = this_block();
    Fiber& f = *b.cur;
    const int lane = f.tid % 32, warp = f.tid / 32;
    char maskbuf[16];
    std::snprintf(maskbuf, sizeof(maskbuf), "0x%08x", mask);
    if (((mask >> lane) & 1u) == 0)
        fiber_fail(b, f, std::string("deep_ep emulator: ") + kind_name(kind) + " at " + site(file, line) + " with mask " +
                             maskbuf + " that excludes the calling lane, in " + b.who(f));
    const int lanes_in_block = std::min(32, b.num_threads - warp * 32);
    if (lanes_in_block < 32 && (mask >> lanes_in_block) != 0)
        fiber_fail(b, f, std::string("deep_ep emulator: ") + kind_name(kind) + " at " + site(file, line) + " with mask " +
                             maskbuf + " names lanes past the end of the block, in " + b.who(f));
    Warp& w = b.warps[warp];
    if (w.arrived == 0) {
        w.kind = kind;
        w.mask = mask;
        w.file = file;
        w.line = line;
        w.first_lane = lane;
    } else {
        const bool same_site = w.line == line && (w.file == file || std::strcmp(w.file, file) == 0);
        if (w.kind != kind || w.mask != mask || (kind != CollKind::kSyncWarp && !same_site)) {
            char other[16];
            std::snprintf(other, sizeof(other), "0x%08x", w.mask);
            fiber_fail(b, f, std::string("deep_ep emulator: divergent warp collective in warp ") + std::to_string(warp) +
                                 " of " + b.where() + ": lane " + std::to_string(w.first_lane) + " waits in " +
                                 kind_name(w.kind) + "(mask " + other + ") at " + site(w.file, w.line) + ", lane " +
                                 std::to_string(lane) + " calls " + kind_name(kind) + "(mask " + maskbuf + ") at " +
                                 site(file, line));
        }
    }
    f.value = value;
    f.coll_arg = arg;
    f.coll_width = width;
    w.arrived |= 1u << lane;
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_release(&w);
#endif
    if (w.arrived == w.mask) {
        Fiber* lanes = &b.fibers[warp * 32];
        uint64_t ballot = 0;
        for (int l = 0; l < 32; ++l)
            if ((mask >> l) & 1u) ballot |= static_cast<uint64_t>(lanes[l].value != 0) << l;
        for (int l = 0; l < 32; ++l) {
            if (((mask >> l) & 1u) == 0) continue;
            Fiber& g = lanes[l];
            const int wd = g.coll_width, seg = (l / wd) * wd, pos = l % wd;
            int src = l;
            switch (kind) {
                case CollKind::kSyncWarp: g.result = 0; continue;
                case CollKind::kBallot: g.result = ballot; continue;
                case CollKind::kAny: g.result = ballot != 0; continue;
                case CollKind::kAll: g.result = ballot == mask; continue;
                case CollKind::kShfl: src = seg + ((g.coll_arg % wd) + wd) % wd; break;
                case CollKind::kShflXor: src = (l ^ g.coll_arg); if (src / wd != l / wd || src >= 32) src = l; break;
                case CollKind::kShflDown: src = pos + g.coll_arg < wd ? l + g.coll_arg : l; break;
                case CollKind::kShflUp: src = pos >= g.coll_arg ? l - g.coll_arg : l; break;
            }
            if (((mask >> src) & 1u) == 0)
                fiber_fail(b, f, std::string("deep_ep emulator: ") + kind_name(kind) + " at " + site(file, line) +
                                     ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                                     ", which is not in the mask " + maskbuf + " (undefined value), warp " +
                                     std::to_string(warp) + " of " + b.where());
            g.result = lanes[src].value;
        }
        for (int l = 0; l < 32; ++l)
            if (((mask >> l) & 1u) != 0 && l != lane) make_ready(b, warp * 32 + l);
        w.arrived = 0;
        g_progress.fetch_add(1, std::memory_order_relaxed);
    } else {
        f.state = State::kWarp;
        f.file = file;
        f.line = line;
        switch_to_scheduler(b, f);
    }
#if defined(DEEP_EP_EMU_TSAN)
    __tsan_acquire(&w);
#endif
    return f.result;
}

void launch(const char* kernel, const char* file, int line, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            std::function<void()> body) {
    (void)stream;
    if (g_sticky.load()) return;  // a dead context launches nothing (cudaGetLastError reports it)
    const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
    const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
    if (threads == 0 || threads > 1024 || blocks == 0 || smem > 228 * 1024) {
        set_last_launch_error("deep_ep emulator: invalid launch configuration of " + std::string(kernel) + " at " +
                              site(file, line) + ": grid " + std::to_string(blocks) + " blocks of " +
                              std::to_string(threads) + " threads, " + std::to_string(smem) + " bytes shared");
        return;
    }
    if (settings().watchdog_s > 0) std::call_once(g_watchdog_once, [] { std::thread(watchdog_loop).detach(); });
    install_crash_handler();
    Launch l;
    l.kernel = kernel;
    l.file = file;
    l.line = line;
    l.grid = grid;
    l.block = block;
    l.smem = smem;
    l.body = std::move(body);
    static std::atomic<uint64_t> launch_counter{0};
    const uint64_t n = ++launch_counter;
    const uint64_t seed = settings().seed == 0 ? 0 : settings().seed * 1000003ull + n;
    auto coords = [&](uint64_t i) {
        return make_uint3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                          static_cast<unsigned>(i / (static_cast<uint64_t>(grid.x) * grid.y)));
    };
    const uint64_t cap = settings().max_resident > 0 ? static_cast<uint64_t>(settings().max_resident) : blocks;
    const uint64_t workers = std::min(cap, blocks);
    std::atomic<uint64_t> next{0};
    auto worker = [&] {
        for (uint64_t i; (i = next.fetch_add(1)) < blocks;) {
            if (l.abort.load()) break;
            run_block(l, coords(i), seed == 0 ? 0 : seed + i);
        }
    };
    if (workers == 1) {
        std::thread(worker).join();  // the block thread must not be the caller's (its TLS is the block's smem)
    } else {
        std::vector<std::thread> threads_v;
        threads_v.reserve(workers);
        for (uint64_t i = 0; i < workers; ++i) threads_v.emplace_back(worker);
        for (auto& t : threads_v) t.join();
    }
    if (!l.error.empty()) {
        std::fprintf(stderr, "%s\n", l.error.c_str());
        set_sticky(l.error);
    }
}

// -------------------------------------------------------------------- error state for the runtime
namespace {
thread_local std::string t_last_launch_error;
}

void set_last_launch_error(const std::string& message) { t_last_launch_error = message; }

bool take_last_launch_error(std::string* message) {
    if (t_last_launch_error.empty()) return false;
    if (message != nullptr) *message = t_last_launch_error;
    t_last_launch_error.clear();
    return true;
}

bool sticky_error(std::string* message) {
    if (!g_sticky.load()) return false;
    if (message != nullptr) {
        std::lock_guard<std::mutex> lock(g_error_mutex);
        *message = g_sticky_message;
    }
    return true;
}

}  // namespace emu
}  // namespace deep_ep
